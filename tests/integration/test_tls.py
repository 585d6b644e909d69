"""TLS on the exchange: whole jobs with workers verifying the coordinator's
certificate against a CA made inside the test, and the clear failures when
they cannot."""

from __future__ import annotations

import pytest

from shardline.coordinator import CoordinatorSettings, ExchangeServer, LocalProcessBackend, server_tls_context
from shardline.embedded import InProcessBackend
from shardline.errors import ConfigurationError, JobFailedError, ShardlineError
from shardline.protocol import JobSpec
from shardline.worker import ExchangeClient, client_tls_context

from corpus import random_mix
from jobs import run_job_on_exchange, sequential_reference
from tlsca import make_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("tls") / "ca")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("tls") / "other")


async def _run(path, *, aws, ca, backend, advertise_host: str, command: str | None = "sed 's/^/>/'", **spec_fields):
    return await run_job_on_exchange(
        JobSpec(source=str(path), shards=6, command=command, **spec_fields),
        aws=aws,
        backend=backend,
        settings=CoordinatorSettings(exchange_ca=ca.ca_pem, advertise_host=advertise_host),
        tls=server_tls_context(str(ca.server_cert), str(ca.server_key)),
    )


@pytest.mark.parametrize("advertise_host", ["localhost", "127.0.0.1"])
async def test_whole_job_over_tls_with_worker_processes(tmp_path, aws_settings, ca, advertise_host):
    data = random_mix(11, 200_000)
    path = tmp_path / "input.txt"
    path.write_bytes(data)
    output, report = await _run(
        path, aws=aws_settings, ca=ca, backend=LocalProcessBackend(max_processes=3), advertise_host=advertise_host
    )
    # Commits only happen on a DONE over the exchange: every shard's went over TLS.
    assert output == sequential_reference(data, "sed 's/^/>/'")
    assert len(report.shards) == 6


async def test_worker_that_cannot_verify_the_exchange_fails_the_job_naming_it(tmp_path, aws_settings, ca, other_ca):
    path = tmp_path / "input.txt"
    path.write_bytes(random_mix(12, 20_000))
    with pytest.raises(JobFailedError) as failure:
        # The coordinator hands out the wrong CA: no worker may trust the exchange.
        await _run(
            path,
            aws=aws_settings,
            ca=_Swapped(ca, other_ca),
            backend=InProcessBackend(),
            advertise_host="localhost",
            max_attempts=2,
        )
    message = str(failure.value)
    assert "certificate" in message and "shard" in message, message


async def test_certificate_for_another_name_is_refused(tmp_path):
    ca = make_ca(tmp_path, names=("exchange.example",), ips=())
    tls = server_tls_context(str(ca.server_cert), str(ca.server_key))
    async with ExchangeServer(host="127.0.0.1", tls=tls) as exchange:
        client = ExchangeClient(
            host="127.0.0.1",  # not a name the certificate holds
            port=exchange.address[1],
            job_id="j",
            shard=0,
            attempt=0,
            secret=b"s" * 32,
            tls=client_tls_context(ca.ca_pem),
        )
        with pytest.raises(ConfigurationError, match="certificate"):
            await client.connect()
        await client.aclose()


def test_bad_tls_configuration_is_a_clear_error(tmp_path, ca):
    with pytest.raises(ConfigurationError, match="TLS certificate"):
        server_tls_context(str(tmp_path / "missing.pem"), str(ca.server_key))
    with pytest.raises(ShardlineError, match="CA"):
        client_tls_context("not a certificate")


class _Swapped:
    """The server's certificate from `serving`, the CA handed to workers from `trusted`."""

    def __init__(self, serving, trusted) -> None:
        self.server_cert = serving.server_cert
        self.server_key = serving.server_key
        self.ca_pem = trusted.ca_pem
