"""Per-invocation overhead of the Lambda worker on a warm process.

What is measured
----------------
One function process under the real AWS Lambda Runtime Interface Emulator
(`tests/lambdaemu.py`: ``aws-lambda-rie`` + ``awslambdaric``, the handler
``shardline.worker.lambda_handler.handler``) serves a cold invocation, then
`--warm` (default 20) more, one after another, each a RequestResponse
invoke of a tiny shard: the last of two shards of a 2 KiB S3 object in
moto, so it reads its range, writes its head marker to DynamoDB and uploads
its output to S3 (no coordinator, no command).  For the warm invocations it
reports medians of

* ``invoke_ms`` -- the Invoke API round trip as the caller sees it,
* ``runtime_ms`` -- the time the emulator's process spent on it,
* ``cpu_ms`` -- CPU (user + system) of the runtime process per invocation,
  from /proc (the mean over the warm invocations: /proc counts in ticks),

and, when the handler reports them, how many AWS clients the process made
in all (``clients_created``).

Run with the dev venv: `.venv/bin/python bench/lambda_warm.py` (~20 s).  For
the code before a change, `--src OTHER_TREE/src` (put first on the
function's PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # servers.py, lambdaemu.py

from shardline.io.aws import AwsSettings, client  # noqa: E402
from shardline.io.store import ensure_marker_table  # noqa: E402
from shardline.protocol import ShardTask  # noqa: E402

from lambdaemu import LambdaEmulator  # noqa: E402
from servers import MotoServer  # noqa: E402

HANDLER = "shardline.worker.lambda_handler.handler"
BUCKET = "lambda-warm"
KEY = "input.txt"
TABLE = "shardline-markers"
DATA = b"".join(b"line %04d\n" % i for i in range(200))


def _children(pid: int) -> list[int]:
    # Every thread's list: RIE (Go) forks from any of its threads.
    return [
        int(child)
        for thread in Path(f"/proc/{pid}/task").iterdir()
        for child in (thread / "children").read_text().split()
    ]


def _cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of `pid` and its descendants."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + sum(_cpu_ticks(child) for child in _children(pid))  # utime, stime


def _runtime_cpu_ticks(rie_pid: int) -> int:
    """CPU ticks of the runtime process(es) under one RIE process."""
    runtimes = _children(rie_pid)
    if not runtimes:
        raise RuntimeError(f"no runtime process under RIE (pid {rie_pid})")
    return sum(_cpu_ticks(pid) for pid in runtimes)


def _task(aws: AwsSettings, etag: str) -> dict[str, Any]:
    job_id = uuid.uuid4().hex
    task = ShardTask(
        job_id=job_id,
        shard=1,
        shards=2,
        attempt=0,
        source=f"s3://{BUCKET}/{KEY}",
        size=len(DATA),
        etag=etag,
        output_path=f"s3://{BUCKET}/staging/{job_id}/shard-00001.attempt-0.out",
        markers=f"dynamodb:{TABLE}",
        aws=aws.to_dict(),
    )
    parsed: dict[str, Any] = json.loads(task.to_json())
    return parsed


async def _measure(emulator: LambdaEmulator, aws: AwsSettings, etag: str, warm: int) -> dict[str, Any]:
    rie_pid = emulator.pids[0]
    assert rie_pid is not None and emulator.url is not None
    lambda_aws = AwsSettings(
        region=aws.region,
        lambda_endpoint_url=emulator.url,
        access_key_id=aws.access_key_id,
        secret_access_key=aws.secret_access_key,
        read_timeout_s=60,
    )
    invoke_s: list[float] = []
    results: list[dict[str, Any]] = []
    ticks_before = 0
    async with client(lambda_aws, "lambda") as lambda_:
        for number in range(warm + 1):
            if number == 1:
                ticks_before = _runtime_cpu_ticks(rie_pid)
            started = time.perf_counter()
            response = await lambda_.invoke(
                FunctionName=emulator.function_name, Payload=json.dumps(_task(aws, etag)).encode()
            )
            body = await response["Payload"].read()
            invoke_s.append(time.perf_counter() - started)
            if response.get("FunctionError"):
                raise RuntimeError(f"invocation {number} failed: {body.decode(errors='replace')}")
            results.append(json.loads(body))
        cpu_s = (_runtime_cpu_ticks(rie_pid) - ticks_before) / os.sysconf("SC_CLK_TCK")
    ran = emulator.ran()
    wrong = [r for r in results if r.get("bytes") is None]
    if wrong:
        raise RuntimeError(f"a shard did not run: {wrong[0]}")
    runtime_s = [inv.duration_s for inv in ran[1:] if inv.duration_s is not None]
    return {
        "warm_invocations": warm,
        "cold_invoke_ms": round(invoke_s[0] * 1000, 1),
        "invoke_ms": round(statistics.median(invoke_s[1:]) * 1000, 1),
        "runtime_ms": round(statistics.median(runtime_s) * 1000, 1),
        "cpu_ms": round(cpu_s / warm * 1000, 1),
        "clients_created": [r.get("clients_created") for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=20, help="warm invocations after the cold one (default 20)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the shardline source tree the function runs")
    args = parser.parse_args()
    if args.warm < 1:
        parser.error(f"--warm must be >= 1, got {args.warm}")
    moto = MotoServer()
    endpoint = moto.start()
    try:
        aws = endpoint.aws_settings()
        s3 = endpoint.boto3_client("s3")
        s3.create_bucket(Bucket=BUCKET)
        etag = s3.put_object(Bucket=BUCKET, Key=KEY, Body=DATA)["ETag"]

        async def go() -> dict[str, Any]:
            async with client(aws, "dynamodb") as dynamodb:
                await ensure_marker_table(dynamodb, TABLE)
            with LambdaEmulator(
                HANDLER, pythonpath=[args.src.resolve()], env=endpoint.env(), concurrency=1, timeout_s=60
            ) as emulator:
                return await _measure(emulator, aws, etag, args.warm)

        print(json.dumps({"src": str(args.src), **asyncio.run(go())}, indent=2))
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
