"""Every failure of DESIGN §5, injected for real: exact output or a clean failure.

Faults come through real sockets and real processes, never by mocking our
own code: `faultproxy.FaultProxy` sits between the workers (and the
coordinator) and the moto server for both S3 and DynamoDB, and
`faultproxy.ExchangeRelay` sits between workers and the coordinator's TCP
exchange.  Worker processes are frozen or killed with real signals.  Each
test asserts that the fault really happened (through the proxy's or the
relay's records, or the coordinator's metrics), then that the job either
produced output byte-identical to the sequential reference or failed with
an error naming the shard and the cause, with nothing presented as
complete.  No assertion is on time, except lower bounds that a slow machine
can only make larger.

docs/faults.md maps every fault to the test that proves it, including the
ones proved elsewhere (tests/coordinator/test_supervision.py,
tests/integration/test_daemon.py, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import botocore.exceptions
import pytest

from shardline.coordinator import (
    Backend,
    Coordinator,
    CoordinatorSettings,
    ExchangeServer,
    LocalProcessBackend,
    OutputPolicy,
    WorkerExit,
)
from shardline.embedded import InProcessBackend
from shardline.errors import JobFailedError
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import MemoryJobStore, ensure_marker_table
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    ExchangeSession,
    FrameType,
    Head,
    JobSpec,
    ShardTask,
    ShardTimeouts,
    TailSource,
)
from shardline.protocol._frames import encode_payload  # the payload codec alone, to forge a frame under any MAC
from shardline.worker import WorkerSettings

from faultproxy import (
    CutBody,
    CutSession,
    Delay,
    ExchangeRelay,
    FaultProxy,
    ProxyRecord,
    Rule,
    Stall,
    dynamodb_rule,
    dynamodb_throttle,
    in_shard,
    s3_internal_error,
    s3_slow_down,
)
from jobs import PACED_READER, GatedBackend, OrderedBackend, only_in_attempt, sequential_reference
from polling import eventually
from reference import reference_split
from servers import Endpoint

FAST = CoordinatorSettings(
    retry_backoff_s=0.05,
    retry_backoff_max_s=0.2,
    supervise_interval_s=0.05,
    output_policy=OutputPolicy(anywhere=True),  # outputs go to the test's tmp_path
)
#: The worker's retry loop, with short sleeps (same attempt count as the default).
QUICK_RETRY = RetryPolicy(attempts=8, base_delay_s=0.005, max_delay_s=0.05)
#: Bound on every wait for something to happen (a hang guard, not a timing check).
PATIENCE_S = 120.0
SED = "sed 's/^/>/'"


def text(seed: int, size: int) -> bytes:
    """Newline-terminated lines of random length (0..200 bytes), about `size` bytes."""
    rng = random.Random(seed)
    out = bytearray()
    number = 0
    while len(out) < size:
        out += b"%07d %s\n" % (number, bytes(rng.choice(b"abcdefghij ,;") for _ in range(rng.randint(0, 200))))
        number += 1
    return bytes(out)


def resumed_after(records: list[ProxyRecord], cut: ProxyRecord) -> ProxyRecord | None:
    """The later GET that asked for exactly the rest of `cut`'s range, if any."""
    assert cut.byte_range is not None
    start, end = cut.byte_range
    later = records[records.index(cut) + 1 :]
    return next((r for r in later if r.method == "GET" and r.byte_range == (start + cut.body_bytes, end)), None)


def assert_each_fault_resumed(proxy: FaultProxy) -> None:
    """Every faulted GET that delivered part of its range was followed by a GET
    for exactly the rest of it: resumed after the last byte received."""
    faulted = [r for r in proxy.faulted() if r.method == "GET"]
    assert faulted, "no GET was faulted"
    for cut in faulted:
        assert cut.byte_range is not None
        start, end = cut.byte_range
        if cut.body_bytes < end - start:
            assert resumed_after(proxy.records, cut) is not None, f"{cut} was not resumed at {start + cut.body_bytes}"


@pytest.fixture
async def proxy(moto: Endpoint) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(moto.url, seed=5) as fault_proxy:
        yield fault_proxy


def via(proxy: FaultProxy, moto: Endpoint, **overrides: object) -> AwsSettings:
    """Settings that send both S3 and DynamoDB through `proxy`."""
    fields: dict[str, object] = {"read_timeout_s": 10.0, **overrides}
    return moto.aws_settings(s3_endpoint_url=proxy.url, dynamodb_endpoint_url=proxy.url, **fields)


def quick_backend(**settings: object) -> InProcessBackend:
    return InProcessBackend(worker_settings=WorkerSettings(retry=QUICK_RETRY, **settings))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def service(
    aws: AwsSettings, backend: Backend, *, settings: CoordinatorSettings = FAST, exchange: ExchangeServer | None = None
) -> AsyncIterator[Coordinator]:
    async with client(aws, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if exchange is None:
                exchange = await stack.enter_async_context(ExchangeServer())
            yield await stack.enter_async_context(
                Coordinator(
                    aws=aws,
                    backends={backend.name: backend},
                    store=MemoryJobStore(),
                    exchange=exchange,
                    settings=settings,
                )
            )
    finally:
        await backend.aclose()


async def outcome(service: Coordinator, job_id: str) -> tuple[bytes, JobFailedError | None]:
    """Everything the job's output stream delivered, and how it ended."""
    out = bytearray()
    try:
        async with asyncio.timeout(PATIENCE_S):
            async for piece in service.output(job_id):
                with open(piece.path, "rb") as f:
                    f.seek(piece.start)
                    out += f.read(piece.end - piece.start)
    except JobFailedError as exc:
        return bytes(out), exc
    return bytes(out), None


async def run_through(service: Coordinator, spec: JobSpec) -> bytes:
    view = await service.submit(spec)
    output, error = await outcome(service, view.id)
    assert error is None, error
    return output


def assert_clean_failure(output: bytes, error: JobFailedError | None, expected: bytes, pattern: str) -> None:
    """Failed, naming a shard and the cause; what was shown is a verified prefix, never the whole."""
    assert error is not None, "the job should have failed"
    assert re.search(pattern, str(error)), str(error)
    assert expected.startswith(output), "the output shown before the failure is not a prefix of the answer"
    assert output != expected or not expected


# --- S3: resets, throttling, stalls, latency ------------------------------------------


async def test_s3_resets_mid_part_on_several_shards_resume_from_the_last_byte(s3, bucket, moto, proxy):
    data = text(seed=1, size=240_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    shards, cut_shards = 4, (0, 1, 3)
    # Each rule cuts three GETs inside one shard: its first part, then the
    # GET that resumed it, then the next one -- repeatedly, on three shards,
    # with FIN and RST alternately.
    proxy.set_rules(
        [
            Rule(
                method="GET",
                header="Range",
                when=in_shard(len(data), shards, index),
                fault=CutBody(after_bytes=5000 + 700 * index, reset=index % 2 == 1, linger_s=0.25),
                times=3,
            )
            for index in cut_shards
        ]
    )
    spec = JobSpec(
        source=f"s3://{bucket}/k", shards=shards, command=SED, part_size_bytes=32 * 1024, max_in_flight_bytes=64 * 1024
    )
    async with service(via(proxy, moto), quick_backend()) as svc:
        view = await svc.submit(spec)
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert error is None, error
    assert output == sequential_reference(data, SED)
    assert proxy.applied == [3, 3, 3]
    assert_each_fault_resumed(proxy)
    # The reader absorbed every reset: no shard attempt had to be retried.
    assert view.retries == 0 and [s.attempt for s in view.shards] == [0] * shards


async def test_slow_down_and_internal_error_storm_backs_off_then_succeeds(s3, bucket, moto, proxy):
    data = text(seed=2, size=150_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    # The first seven ranged GETs are all refused: fewer than the reader's
    # eight attempts per range, however they fall on the ranges.
    proxy.set_rules(
        [
            Rule(method="GET", header="Range", fault=s3_slow_down(), times=4),
            Rule(method="GET", header="Range", fault=s3_internal_error(), times=3),
        ]
    )
    spec = JobSpec(source=f"s3://{bucket}/k", shards=3, part_size_bytes=16 * 1024, max_in_flight_bytes=64 * 1024)
    async with service(via(proxy, moto), quick_backend()) as svc:
        view = await svc.submit(spec)
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert error is None, error
    assert output == data
    assert proxy.applied == [4, 3]
    assert sorted(r.status for r in proxy.faulted()) == [500] * 3 + [503] * 4
    for refused in proxy.faulted():  # each refused range was asked for again, and served
        later = proxy.records[proxy.records.index(refused) + 1 :]
        assert any(r.byte_range == refused.byte_range and r.status == 206 and r.complete for r in later)
    assert view.retries == 0


async def test_persistent_slow_down_on_one_shard_fails_the_job_naming_it(s3, bucket, moto, proxy):
    data = text(seed=3, size=60_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    proxy.set_rules([Rule(method="GET", header="Range", when=in_shard(len(data), 4, 2), fault=s3_slow_down())])
    backend = InProcessBackend(
        worker_settings=WorkerSettings(retry=RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01))
    )
    async with service(via(proxy, moto), backend) as svc:
        view = await svc.submit(JobSpec(source=f"s3://{bucket}/k", shards=4, max_attempts=2))
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    # Shard 2's range is unreadable; shards 1 and 3 read into it too (their
    # tail and their first byte), so any of them may be the one named.
    assert_clean_failure(
        output, error, data, r"shard [123] failed: .*SlowDown.*gave up after 3 attempts.*\(2 attempts\)"
    )
    assert view.state.value == "failed"
    assert proxy.applied[0] >= 6


async def test_body_stalled_past_the_read_timeout_is_retried_from_the_last_byte(s3, bucket, moto, proxy):
    data = text(seed=4, size=120_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    # The body stops for 4 s after 3000 bytes; the client's read timeout is 1 s.
    proxy.set_rules([Rule(method="GET", header="Range", fault=Stall(after_bytes=3000, stall_s=4.0), times=2)])
    spec = JobSpec(source=f"s3://{bucket}/k", shards=3, part_size_bytes=16 * 1024, max_in_flight_bytes=32 * 1024)
    async with service(via(proxy, moto, read_timeout_s=1.0), quick_backend()) as svc:
        view = await svc.submit(spec)
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert error is None, error
    assert output == data
    assert proxy.applied == [2]
    for stalled in proxy.faulted():
        assert stalled.byte_range is not None
        assert stalled.body_bytes == 3000 < stalled.byte_range[1] - stalled.byte_range[0]
    assert_each_fault_resumed(proxy)
    assert view.retries == 0


@pytest.mark.parametrize(
    ("delay_s", "read_timeout_s", "retried"), [(0.3, 10.0, False), (3.0, 1.0, True)], ids=["below", "above"]
)
async def test_first_byte_latency_below_and_above_the_read_timeout(
    s3, bucket, moto, proxy, delay_s, read_timeout_s, retried
):
    data = text(seed=5, size=80_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    proxy.set_rules([Rule(method="GET", header="Range", fault=Delay(delay_s=delay_s), times=3)])
    spec = JobSpec(source=f"s3://{bucket}/k", shards=2, part_size_bytes=16 * 1024, max_in_flight_bytes=32 * 1024)
    async with service(via(proxy, moto, read_timeout_s=read_timeout_s), quick_backend()) as svc:
        assert await run_through(svc, spec) == data
    delayed = proxy.faulted()
    assert len(delayed) == 3
    for record in delayed:
        later = proxy.records[proxy.records.index(record) + 1 :]
        asked_again = [r for r in later if r.byte_range == record.byte_range]
        if retried:  # the client gave up waiting and asked again
            assert any(r.complete for r in asked_again)
        else:  # just slower: served once, completely
            assert record.complete and not asked_again


# --- the slow consumer: the seed failure of this whole field ----------------------------

SLOW_TIMEOUT_S = 1.0
SLOW_PAUSE_S = 1.5
SLOW_RATE = 1_000_000.0


@pytest.fixture
async def s3_like_proxy(moto: Endpoint) -> AsyncIterator[FaultProxy]:
    """Drops a client that takes no bytes for SLOW_TIMEOUT_S, as S3 does."""
    async with FaultProxy(moto.url, client_send_timeout_s=SLOW_TIMEOUT_S) as fault_proxy:
        yield fault_proxy


async def test_naive_single_stream_to_a_slow_consumer_dies_of_incomplete_read(s3, bucket, moto, s3_like_proxy):
    """The control: one GET streamed at the consumer's pace is cut by the server."""
    data = random.Random(6).randbytes(12 * 1024 * 1024)  # more than loopback buffers absorb
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    settings = via(s3_like_proxy, moto, read_timeout_s=SLOW_TIMEOUT_S)
    received = 0
    async with client(settings, "s3") as s3_client:
        response = await s3_client.get_object(Bucket=bucket, Key="big")
        body = response["Body"]
        with pytest.raises((aiohttp.ClientPayloadError, botocore.exceptions.IncompleteReadError)):
            chunk = await body.read(65536)
            received += len(chunk)
            await asyncio.sleep(SLOW_PAUSE_S)  # the consumer is busy
            while chunk := await body.read(65536):
                received += len(chunk)
        body.close()
    assert received < len(data)
    assert [r.client_stalled for r in s3_like_proxy.records] == [True]


async def test_slow_consumer_gets_exact_output_with_no_connection_left_idle(tmp_path, s3, bucket, moto, s3_like_proxy):
    data = text(seed=7, size=4_000_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    script = tmp_path / "paced_reader.py"
    script.write_text(PACED_READER)
    command = f"{sys.executable} {script} {SLOW_PAUSE_S} {SLOW_RATE}"
    spec = JobSpec(
        source=f"s3://{bucket}/k",
        shards=2,
        command=command,
        part_size_bytes=256 * 1024,
        max_in_flight_bytes=512 * 1024,
    )
    settings = via(s3_like_proxy, moto, read_timeout_s=SLOW_TIMEOUT_S)
    started = time.monotonic()
    async with service(settings, quick_backend()) as svc:
        output = await run_through(svc, spec)
    elapsed = time.monotonic() - started
    assert output == data  # and so no IncompleteRead reached anyone
    # The consumer really was slower than the read timeout (a lower bound only).
    assert elapsed > SLOW_PAUSE_S + 1.0 > 2 * SLOW_TIMEOUT_S
    gets = [r for r in s3_like_proxy.records if r.method == "GET"]
    # Every GET was read to its end at once: none waited on the consumer.
    assert gets and all(r.complete and not r.client_stalled for r in gets)


# --- DynamoDB throttling on marker writes ----------------------------------------------

#: In the body of a worker's marker write (UpdateItem), not of the coordinator's fence raises.
MARKER_WRITE = b'"#head_end"'


async def test_dynamodb_throttling_on_marker_writes_and_reads_is_retried(s3, bucket, moto, proxy):
    data = text(seed=8, size=50_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    proxy.set_rules(
        [
            dynamodb_rule("UpdateItem", dynamodb_throttle(), body_contains=MARKER_WRITE, times=6),
            dynamodb_rule("GetItem", dynamodb_throttle(), times=3),
        ]
    )
    async with service(via(proxy, moto), quick_backend(want_answer_timeout_s=0.0)) as svc:
        view = await svc.submit(JobSpec(source=f"s3://{bucket}/k", shards=4, command=SED))
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert error is None, error
    assert output == sequential_reference(data, SED)
    assert proxy.applied[0] == 6
    throttled = proxy.faulted(0)
    assert {r.operation for r in throttled} == {"UpdateItem"} and {r.status for r in throttled} == {400}
    # Every shard's marker was written in the end, each after its throttles.
    writes = [r for r in proxy.records if r.operation == "UpdateItem" and r.rule_index is None and r.status == 200]
    assert len(writes) >= 4
    assert view.retries == 0


async def test_persistent_dynamodb_throttling_fails_the_job_naming_the_shard(s3, bucket, moto, proxy):
    data = text(seed=9, size=20_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    proxy.set_rules([dynamodb_rule("UpdateItem", dynamodb_throttle(), body_contains=MARKER_WRITE)])
    backend = InProcessBackend(
        worker_settings=WorkerSettings(retry=RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01))
    )
    async with service(via(proxy, moto), backend) as svc:
        view = await svc.submit(JobSpec(source=f"s3://{bucket}/k", shards=3, max_attempts=2))
        output, error = await outcome(svc, view.id)
    assert_clean_failure(
        output, error, data, r"shard \d failed: marker write .*ProvisionedThroughputExceededException.*gave up"
    )


# --- workers: frozen after their head, never starting --------------------------------


class Rerouted(Backend):
    """Delegates to `inner`, with every attempt's exchange session through `relay`."""

    def __init__(self, inner: Backend, relay: ExchangeRelay) -> None:
        self.inner = inner
        self.name = inner.name
        self.relay = relay

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        host, port = self.relay.address
        return await self.inner.run(
            dataclasses.replace(task, exchange_host=host, exchange_port=port), on_started=on_started
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_worker_frozen_after_sending_its_head_hits_the_heartbeat_deadline(tmp_path, aws_settings):
    data = text(seed=10, size=100_000)
    source = tmp_path / "input"
    source.write_bytes(data)
    pid_file = tmp_path / "frozen.pid"
    # Shard 1's first attempt tells us its worker's pid and then stops reading.
    command = only_in_attempt(1, 0, f"echo $PPID > {pid_file}; sleep 600") + f"; {SED}"
    spec = JobSpec(source=str(source), shards=3, command=command, timeouts=ShardTimeouts(heartbeat_s=3.0))
    async with ExchangeServer() as exchange, ExchangeRelay(exchange.address) as relay:
        backend = Rerouted(LocalProcessBackend(max_processes=3), relay)
        async with service(aws_settings, backend, exchange=exchange) as svc:
            view = await svc.submit(spec)

            def head_sent() -> bool:
                return any(r.shard == 1 and r.attempt == 0 and "HEAD" in r.up for r in relay.records)

            await eventually(
                lambda: pid_file.exists() and pid_file.read_text().strip() != "",
                "shard 1 started",
                timeout_s=PATIENCE_S,
            )
            await eventually(head_sent, "shard 1 sent its HEAD", timeout_s=PATIENCE_S)
            os.kill(int(pid_file.read_text()), signal.SIGSTOP)  # the whole worker freezes
            output, error = await outcome(svc, view.id)
            view = svc.view(view.id)
            misses = svc.metrics.deadline_misses["heartbeat"]
    assert error is None, error
    assert output == sequential_reference(data, SED)
    assert misses >= 1
    assert view.shards[1].attempt >= 1
    frozen = [r for r in relay.records if r.shard == 1 and r.attempt == 0]
    assert frozen and not any("DONE" in r.up for r in frozen)


async def test_worker_processes_that_never_start_fail_the_job_naming_the_shard(tmp_path, aws_settings):
    data = text(seed=11, size=10_000)
    source = tmp_path / "input"
    source.write_bytes(data)
    # A "Python" that starts and then never runs anything: each attempt's
    # process exists but never reaches the exchange.
    stuck = tmp_path / "stuck-python"
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    backend = LocalProcessBackend(max_processes=2, python=str(stuck), stop_grace_s=0.5)
    spec = JobSpec(source=str(source), shards=2, max_attempts=2, timeouts=ShardTimeouts(start_s=1.0))
    async with service(aws_settings, backend) as svc:
        view = await svc.submit(spec)
        output, error = await outcome(svc, view.id)
        misses = svc.metrics.deadline_misses["start"]
    # Both shards' attempts may share one stuck process (a pool process runs
    # several): the last attempt then ends either by its own start deadline
    # or because its process was stopped for not cancelling the other one.
    stopped = r"worker process \d+ was stopped: it did not cancel another attempt"
    assert_clean_failure(
        output, error, data, rf"shard \d failed: (worker did not reach the exchange|{stopped}).*\(2 attempts\)"
    )
    assert misses >= 2


# --- the exchange: sessions dropped before or after the fragment ------------------------


# Lines of 10 bytes; with 3 shards of 40 bytes no shard starts on a line start.
HANDSHAKE_DATA = b"".join(b"line %04d\n" % i for i in range(12))


@pytest.mark.parametrize(
    ("order", "cut", "tail"),
    [
        # Shard 1 ran first, so shard 0's WANT is answered with a FRAGMENT at
        # once: the session dies just before it, and the marker is used.
        ([1, 2, 0], CutSession(frames=("FRAGMENT",), shard=0), TailSource.MARKER),
        # Shard 1 has not run: the session dies before the PENDING answer,
        # no marker exists yet, so shard 0 scans for the boundary itself.
        ([0, 1, 2], CutSession(frames=("PENDING",), shard=0), TailSource.SCAN),
        # The FRAGMENT arrives and then the session dies: the fragment in hand
        # is used, and DONE goes over a new session.
        ([1, 2, 0], CutSession(frames=("FRAGMENT",), when="after", shard=0), TailSource.PUSHED),
    ],
    ids=["before-fragment-marker", "before-answer-scan", "after-fragment-pushed"],
)
async def test_exchange_session_dropped_around_the_fragment(tmp_path, aws_settings, order, cut, tail):
    source = tmp_path / "input"
    source.write_bytes(HANDSHAKE_DATA)
    # No heartbeat reconnects during the job (the report reconnects on its own),
    # so what the dropped session did not deliver stays undelivered.
    worker = WorkerSettings(want_answer_timeout_s=60.0, reconnect_interval_s=600.0)
    async with ExchangeServer() as exchange, ExchangeRelay(exchange.address, [cut]) as relay:
        backend = OrderedBackend(order, Rerouted(InProcessBackend(worker_settings=worker), relay))
        async with service(aws_settings, backend, exchange=exchange) as svc:
            view = await svc.submit(JobSpec(source=str(source), shards=3))
            output, error = await outcome(svc, view.id)
            view = svc.view(view.id)
    assert error is None, error
    assert output == HANDSHAKE_DATA
    assert relay.applied == [1]
    (dropped,) = relay.cuts()
    assert (dropped.shard, dropped.attempt, dropped.session) == (0, 0, 1)
    assert view.shards[0].tail_sources == (tail,)
    # The shard still reported over a second session, and committed its first attempt.
    assert any(r.shard == 0 and r.session == 2 and "DONE" in r.up for r in relay.records)
    assert view.shards[0].attempt == 0 and view.retries == 0


# --- rogue clients on the exchange port -------------------------------------------------


_HEADER = struct.Struct("!2sBBI")


def frame(kind: int, payload: bytes, *, version: int = 1, mac: bytes = b"\0" * 32) -> bytes:
    return _HEADER.pack(b"SL", version, kind, len(payload)) + payload + mac


def meta(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


async def send_and_listen(address: tuple[str, int], payload: bytes) -> bytes:
    """Send `payload`, then return whatever the exchange answers before closing."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # a frame cut short must end somewhere
    async with asyncio.timeout(PATIENCE_S):
        answer = await reader.read()
    writer.close()
    return answer


async def test_malformed_tampered_and_replayed_frames_are_rejected_logged_and_harmless(tmp_path, aws_settings, caplog):
    data = text(seed=12, size=30_000)
    source = tmp_path / "input"
    source.write_bytes(data)
    backend = GatedBackend(worker_settings=WorkerSettings(retry=QUICK_RETRY))
    caplog.set_level(logging.INFO, logger="shardline.coordinator.exchange")
    async with service(aws_settings, backend) as svc:
        view = await svc.submit(JobSpec(source=str(source), shards=3, command=SED))
        await eventually(lambda: len(backend.tasks) == 3, "all attempts launched", timeout_s=PATIENCE_S)
        address = svc.exchange.address
        task = backend.tasks[1]
        # What a genuine worker of shard 1 sends first, recorded off the wire.
        genuine = ExchangeSession.client(job_id=task.job_id, shard=1, attempt=0, secret=task.secret)
        hello = genuine.send(genuine.hello)
        # A HEAD claiming a bogus boundary, under a MAC the sender cannot compute.
        bogus_head = Head(
            shard=1, start=task.range.start, head_end=task.range.start + 1, line_start=True, has_data=False
        )
        forged = frame(FrameType.HEAD, encode_payload(bogus_head), mac=os.urandom(32))
        unauthenticated = {
            "not JSON meta": frame(FrameType.HELLO, meta(b"{not json")),
            "meta that is not an object": frame(FrameType.HELLO, meta(b"[1, 2]")),
            "HELLO with unknown fields": frame(FrameType.HELLO, meta(b'{"job_id": "x", "evil": 1}')),
            "meta length beyond payload": frame(FrameType.HELLO, (10**6).to_bytes(4, "big") + b"{}"),
            "unknown frame type": frame(99, meta(b"{}")),
            "unsupported version": frame(FrameType.HELLO, meta(b"{}"), version=9),
            "HEAD before HELLO": forged,
            "HELLO with a tampered MAC": hello[:-1] + bytes([hello[-1] ^ 1]),
            "truncated frame then EOF": hello[:-10],
            "oversized frame": _HEADER.pack(b"SL", 1, FrameType.HEAD, 1 << 30),
        }
        for name, payload in unauthenticated.items():
            answer = await send_and_listen(address, payload)
            assert answer == b"", f"{name}: the exchange answered {answer!r}"
        # The recorded HELLO is authentic: its first use is welcomed, but what
        # follows without the session key (a forged HEAD) is not.  Every replay
        # of it is refused before WELCOME: its nonce was used.
        first = await send_and_listen(address, hello + forged)
        assert first, "the first use of the recorded HELLO got no WELCOME"
        replays = {
            "forged HEAD": forged,
            "oversized frame": _HEADER.pack(b"SL", 1, FrameType.DONE, 1 << 30),
            "garbage": b"GET / HTTP/1.1\r\n\r\n",
        }
        for name, payload in replays.items():
            answer = await send_and_listen(address, hello + payload)
            assert answer == b"", f"replayed HELLO + {name}: the exchange answered {answer!r}"
        refused = {cause: count for cause, count in svc.exchange.refused.items() if count}
        backend.gate.set()
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert error is None, error
    assert output == sequential_reference(data, SED)  # the forged boundary never reached shard 0
    assert view.retries == 0
    # Counted by cause: the one tampered MAC before and the one after the
    # (authentic) HELLO fail authentication, the oversized header is refused
    # from its first bytes, and the rest are malformed or out of place.
    assert refused == {"bad_frame": 8, "auth_failed": 2, "preauth_oversized": 1, "replayed_hello": len(replays)}
    # Logged once per cause, however many connections there were.
    logged = [r.getMessage() for r in caplog.records if "exchange refused a connection" in r.getMessage()]
    assert sorted(re.search(r"\(cause (\w+)\)", message)[1] for message in logged) == sorted(refused)
    assert any("replayed HELLO" in message for message in logged)


# --- the object changes mid-job -----------------------------------------------------------


class HoldShard(InProcessBackend):
    """Runs every attempt at once, except shard `held`'s, which waits for `gate`."""

    def __init__(self, held: int) -> None:
        super().__init__(worker_settings=WorkerSettings(retry=QUICK_RETRY))
        self.held = held
        self.gate = asyncio.Event()

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        if task.shard == self.held:
            await self.gate.wait()
        return await super().run(task, on_started=on_started)


@pytest.mark.parametrize("destination", [False, True], ids=["stdout", "output-dir"])
async def test_object_overwritten_mid_job_fails_with_an_etag_error_and_no_complete_output(
    tmp_path, s3, bucket, aws_settings, destination
):
    data = text(seed=13, size=90_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    out_dir = tmp_path / "out"
    spec = JobSpec(source=f"s3://{bucket}/k", shards=3, output=str(out_dir) if destination else None)
    backend = HoldShard(held=2)
    async with service(aws_settings, backend) as svc:
        view = await svc.submit(spec)  # the ETag is pinned here
        await eventually(lambda: svc.view(view.id).shards_done == 2, "shards 0 and 1 committed", timeout_s=PATIENCE_S)
        s3.put_object(Bucket=bucket, Key="k", Body=data.replace(b"a", b"A"))
        backend.gate.set()
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    assert_clean_failure(
        output, error, b"" if destination else data, r"shard 2 failed: s3://.* the object changed .*ETag no longer"
    )
    assert view.state.value == "failed" and view.retries == 0  # not retried: no retry can fix it
    if destination:
        assert not (out_dir / "_manifest.json").exists()
        assert not out_dir.exists() or not any(out_dir.iterdir())


# --- commands failing -------------------------------------------------------------------


@pytest.mark.parametrize("always", [False, True], ids=["once", "always"])
async def test_command_failing_on_one_shard_is_retried_up_to_the_limit(tmp_path, aws_settings, always):
    data = text(seed=14, size=40_000)
    source = tmp_path / "input"
    source.write_bytes(data)
    runs = tmp_path / "runs.log"
    fail = "echo 'parse error near record 42' >&2; exit 5"
    failing = f'if [ "$SHARDLINE_SHARD" = 2 ]; then {fail}; fi' if always else only_in_attempt(2, 0, fail)
    command = f'echo "$SHARDLINE_SHARD $SHARDLINE_ATTEMPT" >> {runs}; {failing}; {SED}'
    # Opted in: by default a command's exit status is not retried (test_command_exit_status_is_not_retried).
    spec = JobSpec(source=str(source), shards=4, command=command, max_attempts=3, command_retries=2)
    async with service(aws_settings, quick_backend()) as svc:
        view = await svc.submit(spec)
        output, error = await outcome(svc, view.id)
        view = svc.view(view.id)
    attempts_of_2 = [line for line in runs.read_text().splitlines() if line.split()[0] == "2"]
    expected = sequential_reference(data, SED)
    if always:
        assert_clean_failure(
            output,
            error,
            expected,
            r"shard 2 failed: command exited with status 5: parse error near record 42 \(3 attempts\)",
        )
        assert sorted(attempts_of_2) == ["2 0", "2 1", "2 2"]
    else:
        assert error is None, error
        assert output == expected
        assert sorted(attempts_of_2) == ["2 0", "2 1"]
        assert view.shards[2].attempt == 1 and view.retries == 1


# --- regressions found by the chaos test --------------------------------------------------


async def test_output_directory_with_a_line_longer_than_a_shard(tmp_path, aws_settings):
    """Shards holding no line start emit nothing, at the end of their range --
    inside a predecessor's emitted range: the manifest's tiling check must not
    take that for an overlap."""
    data = b"short\n" + b"x" * 5000 + b"\nend\n"
    source = tmp_path / "input"
    source.write_bytes(data)
    out_dir = tmp_path / "out"
    spec = JobSpec(source=str(source), shards=4, output=str(out_dir))
    async with service(aws_settings, quick_backend()) as svc:
        view = await svc.submit(spec)
        _, error = await outcome(svc, view.id)
    assert error is None, error
    manifest = json.loads((out_dir / "_manifest.json").read_text())
    assert b"".join(Path(shard["part"]).read_bytes() for shard in manifest["shards"]) == data
    assert [shard["bytes"] for shard in manifest["shards"]] == [len(p) for p in reference_split(data, 4, b"\n")]
