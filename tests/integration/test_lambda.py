"""The `lambda` backend end to end, through the real Lambda runtime.

Workers run as the deployment package built by `shardline package-worker`
(unzipped, as Lambda lays it out) under the AWS Lambda Runtime Interface
Emulator and `awslambdaric` (tests/lambdaemu.py); the coordinator's real
`LambdaBackend` invokes them with aioboto3 (`InvocationType=Event`) through
an endpoint speaking the Lambda Invoke API.  S3 and DynamoDB are moto, and
the exchange runs over TLS with a CA made in the test, as a Lambda
deployment does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from crc32c import crc32c

from shardline.coordinator import CoordinatorSettings, LambdaBackend, OutputPolicy, server_tls_context
from shardline.errors import ConfigurationError
from shardline.io.aws import client
from shardline.io.retry import RetryPolicy
from shardline.protocol import JobSpec, ShardTask, ShardTimeouts

from corpus import random_mix
from daemons import Daemon, clean_env, submit
from jobs import run_job_on_exchange, sequential_reference
from lambdaemu import LambdaEmulator
from reference import reference_split
from tlsca import make_ca

HANDLER = "shardline.worker.lambda_handler.handler"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("lambda-tls"))


def _emulator(moto, worker_package_dir, tmp_path, **kwargs) -> LambdaEmulator:
    return LambdaEmulator(
        HANDLER,
        pythonpath=[worker_package_dir],  # the package first: it must be all the handler needs
        env={**moto.env(), **kwargs.pop("env", {})},
        log_dir=tmp_path / "lambda-logs",
        **kwargs,
    )


async def _run_on_lambda(
    emulator, *, aws_settings, ca, s3, bucket, data, command, shards=4, output_policy=OutputPolicy(), **spec_fields
):
    s3.put_object(Bucket=bucket, Key="input.txt", Body=data)
    aws = replace(aws_settings, lambda_endpoint_url=emulator.url)
    backend = LambdaBackend(
        function=emulator.arn,
        staging=f"s3://{bucket}/staging/",
        aws=aws,
        max_concurrency=4,
        storage_retry=RetryPolicy(),
    )
    output, report = await run_job_on_exchange(
        JobSpec(source=f"s3://{bucket}/input.txt", shards=shards, command=command, backend="lambda", **spec_fields),
        aws=aws,
        backend=backend,
        settings=CoordinatorSettings(exchange_ca=ca.ca_pem, advertise_host="localhost", output_policy=output_policy),
        tls=server_tls_context(str(ca.server_cert), str(ca.server_key)),
    )
    return output, report, backend


def _staging_keys(s3, bucket) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="staging/").get("Contents", [])]


async def test_job_on_lambda_workers_is_exact(moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path, caplog):
    data = random_mix(31, 400_000) + b"\n" + b"L" * 150_000 + b"\nlast line without newline"
    command = "tr a-j A-J"
    caplog.set_level(logging.DEBUG, logger="shardline.io.aws")
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=3) as emulator:
        output, report, _ = await _run_on_lambda(
            emulator, aws_settings=aws_settings, ca=ca, s3=s3, bucket=bucket, data=data, command=command, shards=5
        )
        await emulator.until_idle(60)
        ran = emulator.ran()
        assert len(ran) >= 5 and all(inv.function_error is None for inv in ran), [inv.result for inv in ran]
        results = [inv.json() for inv in ran]
        # Every event was the task as a JSON object, over TLS, writing to the staging prefix.
        events = [inv.event for inv in ran]
        assert all(e["exchange_tls"] and e["output_path"].startswith(f"s3://{bucket}/staging/") for e in events)
        lines = [line for i in range(3) for line in emulator.handler_lines(i) if line.strip()]
    assert output == sequential_reference(data, command)
    assert [shard.attempt for shard in report.shards] == [0] * 5
    assert sum(r["ok"] for r in results) == 5 and {r["detail"] for r in results if r["ok"]} == {"committed"}
    assert _staging_keys(s3, bucket) == []
    # One Lambda client made for every invoke of the backend.
    assert sum(r.getMessage().startswith("created a lambda client") for r in caplog.records) == 1
    # For stdout every output byte must reach the coordinator, exactly once.
    assert report.relayed_output_bytes == {"fetched": len(output)}
    # CloudWatch-friendly: one JSON object per line, naming the shard.
    parsed = [json.loads(line) for line in lines]
    assert parsed and all({"time", "level", "message", "job_id", "shard", "attempt"} <= p.keys() for p in parsed)


async def test_an_s3_destination_moves_no_output_byte_through_the_coordinator(
    moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path
):
    """Lambda workers upload their outputs; each committed one is copied into
    the destination by S3 itself, with the checksum the worker reported: the
    coordinator fetches and uploads nothing (counted), and the output is exact."""
    data = random_mix(32, 300_000) + b"\nlast line without newline"
    command = "tr a-j A-J"
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=3) as emulator:
        output, report, _ = await _run_on_lambda(
            emulator,
            aws_settings=aws_settings,
            ca=ca,
            s3=s3,
            bucket=bucket,
            data=data,
            command=command,
            shards=4,
            output=f"s3://{bucket}/out/",
            output_policy=OutputPolicy(anywhere=True),
        )
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(4)]
    assert parts == [sequential_reference(piece, command) for piece in reference_split(data, 4, b"\n")]
    assert output == b"" and sum(map(len, parts)) == sum(shard.output_bytes for shard in report.shards) > 0
    assert sum(report.relayed_output_bytes.values()) == 0, report.relayed_output_bytes
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/_manifest.json")["Body"].read())
    assert [shard["output_checksum"] for shard in manifest["shards"]] == [
        f"crc32c:{crc32c(part):08x}" for part in parts
    ]
    assert _staging_keys(s3, bucket) == []  # the committed attempts' objects and any others


async def test_handler_out_of_time_reports_and_is_retried(
    moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path
):
    data = b"".join(b"line %05d\n" % i for i in range(2000))
    # Shard 1's first attempt outlives its Lambda; every later attempt is quick.
    command = 'if [ "$SHARDLINE_SHARD" = 1 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then sleep 60; fi; cat'
    env = {"SHARDLINE_LAMBDA_RESERVE_MS": "3000"}
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=2, timeout_s=8, env=env) as emulator:
        output, report, _ = await _run_on_lambda(
            emulator, aws_settings=aws_settings, ca=ca, s3=s3, bucket=bucket, data=data, command=command
        )
        await emulator.until_idle(60)
        results = [inv.json() for inv in emulator.ran() if not inv.timed_out]
    assert output == data
    assert report.shards[1].attempt == 1 and report.retries >= 1
    out_of_time = [r for r in results if r.get("shard") == 1 and r.get("attempt") == 0]
    assert out_of_time and "TimeBudgetError" in out_of_time[0]["detail"], out_of_time
    assert out_of_time[0]["retryable"] is True


async def test_function_killed_mid_shard_is_reinvoked(moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path):
    """The runtime dies without a word (as when Lambda kills it): the heartbeat
    deadline notices, and the shard is invoked again as a new attempt."""
    data = b"".join(b"record %05d\n" % i for i in range(3000))
    command = 'if [ "$SHARDLINE_SHARD" = 2 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then kill -9 $PPID; sleep 30; fi; cat'
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=2) as emulator:
        output, report, _ = await _run_on_lambda(
            emulator,
            aws_settings=aws_settings,
            ca=ca,
            s3=s3,
            bucket=bucket,
            data=data,
            command=command,
            timeouts=ShardTimeouts(start_s=60, heartbeat_s=3, total_s=120),
        )
    assert output == data
    assert report.shards[2].attempt >= 1


async def test_throttled_invokes_back_off_and_succeed(moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path):
    data = b"".join(b"%d\n" % i for i in range(5000))
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=2) as emulator:
        emulator.throttle_next(5)
        output, _, backend = await _run_on_lambda(
            emulator, aws_settings=aws_settings, ca=ca, s3=s3, bucket=bucket, data=data, command=None
        )
        throttled = [inv for inv in emulator.invocations if inv.throttled]
    assert output == data
    assert len(throttled) == 5 and backend.throttled == 5


async def test_a_warm_function_reuses_its_clients(moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path):
    """One function process serves every shard, one after another: its S3 and
    DynamoDB clients are made by the first invocation and used by every later
    one (counted in each result, and in the function's debug log)."""
    data = random_mix(33, 200_000)
    env = {"SHARDLINE_LOG_LEVEL": "DEBUG"}
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=1, env=env) as emulator:
        output, _, _ = await _run_on_lambda(
            emulator, aws_settings=aws_settings, ca=ca, s3=s3, bucket=bucket, data=data, command="rev", shards=4
        )
        await emulator.until_idle(60)
        results = [inv.json() for inv in emulator.ran()]
        messages = [json.loads(line)["message"] for line in emulator.handler_lines(0) if line.startswith("{")]
    assert output == sequential_reference(data, "rev")
    assert [r["invocation"] for r in results] == [1, 2, 3, 4], results
    assert [r["clients_created"] for r in results] == [2, 2, 2, 2]
    created = sorted(m.split(" (")[0] for m in messages if m.startswith("created a "))
    assert created == ["created a dynamodb client", "created a s3 client"]


async def test_invocations_after_failed_ones_succeed(moto, s3, bucket, aws_settings, ca, worker_package_dir, tmp_path):
    """On one function process: an invoke the worker cannot run (an internal
    error), then a job whose shard 1 runs out of its time budget and whose
    shard 2's command fails at first.  The retries succeed on the same
    process, the output is exact, and the job's invocations share the
    clients the first of them made."""
    data = b"".join(b"line %05d\n" % i for i in range(2000))
    command = 'if [ "$SHARDLINE_ATTEMPT" = 0 ]; then case $SHARDLINE_SHARD in 1) sleep 60;; 2) exit 3;; esac; fi; cat'
    env = {"SHARDLINE_LAMBDA_RESERVE_MS": "3000"}
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=1, timeout_s=8, env=env) as emulator:
        unknown_setting = ShardTask(
            job_id="broken",
            shard=0,
            shards=1,
            attempt=0,
            source=f"s3://{bucket}/input.txt",
            size=len(data),
            etag="unknown",
            output_path=f"s3://{bucket}/staging/broken",
            markers="dynamodb:shardline-markers",
            aws={"no_such_setting": 1},
        )
        async with client(replace(aws_settings, lambda_endpoint_url=emulator.url), "lambda") as lambda_:
            answer = await lambda_.invoke(FunctionName=emulator.arn, Payload=unknown_setting.to_json().encode())
            broken = json.loads(await answer["Payload"].read())
        output, report, _ = await _run_on_lambda(
            emulator,
            aws_settings=aws_settings,
            ca=ca,
            s3=s3,
            bucket=bucket,
            data=data,
            command=command,
            command_retries=1,
        )
        await emulator.until_idle(60)
        results = [inv.json() for inv in emulator.ran()][1:]
    assert broken["detail"].startswith("internal error: TypeError") and broken["invocation"] == 1
    assert output == data
    assert [shard.attempt for shard in report.shards] == [0, 1, 1, 0]
    failed = {(r["shard"], r["attempt"]): r["detail"] for r in results if not r["ok"]}
    assert failed.keys() == {(1, 0), (2, 0)}, failed
    assert "TimeBudgetError" in failed[1, 0] and "CommandExitError" in failed[2, 0]
    assert [r["invocation"] for r in results] == [2, 3, 4, 5, 6, 7]
    assert {r["clients_created"] for r in results} == {2}


def test_lambda_backend_configuration_errors(aws_settings):
    with pytest.raises(ConfigurationError, match="function"):
        LambdaBackend(function="not a name!", staging="s3://b/p/", aws=aws_settings, storage_retry=RetryPolicy())
    with pytest.raises(ConfigurationError, match="staging"):
        LambdaBackend(function="shardline-worker", staging="/local/dir", aws=aws_settings, storage_retry=RetryPolicy())
    backend = LambdaBackend(
        function="shardline-worker", staging="s3://b/pre", aws=aws_settings, storage_retry=RetryPolicy()
    )
    assert backend.output_location("j", 3, 1) == "s3://b/pre/j/shard-00003.attempt-1.out"


def test_serve_with_the_lambda_backend_over_tls(moto, s3, bucket, ca, worker_package_dir, tmp_path):
    """`shardline serve --backend lambda ...` as a process: the flags as the
    README gives them, a job submitted over HTTP, its output exact."""
    data = random_mix(41, 200_000)
    s3.put_object(Bucket=bucket, Key="input.txt", Body=data)
    with _emulator(moto, worker_package_dir, tmp_path, concurrency=2) as emulator:
        env = clean_env(tmp_path, **moto.env(), AWS_ENDPOINT_URL_LAMBDA=emulator.url)
        server = Daemon(
            tmp_path,
            env,
            "--backend", "lambda",
            "--function", emulator.arn,
            "--staging", f"s3://{bucket}/staging/",
            "--lambda-concurrency", "2",
            "--advertise-host", "localhost",
            "--exchange-tls-cert", str(ca.server_cert),
            "--exchange-tls-key", str(ca.server_key),
            "--exchange-ca", str(ca.ca_cert),
        )  # fmt: skip
        try:
            job_id = submit(server, source=f"s3://{bucket}/input.txt", shards=3, command="rev")
            status, output = server.request(f"/jobs/{job_id}/output")
            _, body = server.request(f"/jobs/{job_id}")
        finally:
            assert server.stop() == 0, server.log()
        ran = emulator.ran()
    assert status == 200 and output == sequential_reference(data, "rev")
    assert json.loads(body)["state"] == "succeeded"
    assert len(ran) >= 3 and all(inv.event["exchange_tls"] for inv in ran)
    assert _staging_keys(s3, bucket) == []
