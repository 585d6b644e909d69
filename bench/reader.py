"""One worker's download path against the bare aiobotocore ceiling, in one process.

`throughput.py` times whole commands, so process start-up, the spool and the
coordinator all count.  This isolates the piece DESIGN §4 makes a promise
about: shardline's RangedReader (reserved memory, If-Match, resumable reads,
ordered delivery) versus plain concurrent ranged GETs read with
`await body.read()`, with the same part size and GETs in flight, over the
same object on SeaweedFS, alternating runs so machine noise hits both.

    .venv/bin/python bench/reader.py [--size-mib 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # servers.py: SeaweedServer

from shardline.io.aws import AwsSettings, client  # noqa: E402
from shardline.io.sources import open_source  # noqa: E402
from shardline.worker._reader import RangedReader, ReaderSettings  # noqa: E402

from servers import SeaweedServer  # noqa: E402

MiB = 1024 * 1024
BUCKET, KEY = "shardline-bench", "reader-object"


async def raw_download(aws: AwsSettings, size: int, part: int, in_flight: int) -> None:
    """The ceiling: ranged GETs, `in_flight` at a time, each read whole, discarded."""
    slots = asyncio.Semaphore(in_flight)
    async with client(aws, "s3") as s3:

        async def one(offset: int) -> None:
            async with slots:
                end = min(offset + part, size) - 1
                response = await s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={offset}-{end}")
                async with response["Body"] as body:
                    await body.read()

        await asyncio.gather(*(one(offset) for offset in range(0, size, part)))


async def shardline_reader(aws: AwsSettings, size: int, part: int, in_flight: int) -> None:
    settings = ReaderSettings(part_size_bytes=part, max_in_flight_bytes=part * in_flight)
    async with open_source(f"s3://{BUCKET}/{KEY}", aws) as source:
        info = await source.stat()
        async with RangedReader(source, start=0, end=size, etag=info.etag, settings=settings) as reader:
            async for _chunk in reader:
                pass


async def measure(args: argparse.Namespace) -> dict:
    server = SeaweedServer()
    endpoint = server.start()
    try:
        s3 = endpoint.boto3_client("s3")
        s3.create_bucket(Bucket=BUCKET)
        size = args.size_mib * MiB
        s3.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
        aws = endpoint.aws_settings(dynamodb_endpoint_url=None)  # SeaweedFS has no DynamoDB
        part = args.part_mib * MiB
        times: dict[str, list[float]] = {"raw": [], "shardline": []}
        await raw_download(aws, size, part, args.in_flight)  # warm-up
        for _ in range(args.repeat):
            for name, run in (("raw", raw_download), ("shardline", shardline_reader)):
                started = time.perf_counter()
                await run(aws, size, part, args.in_flight)
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) for name, values in times.items()}
        return {
            "size_bytes": size,
            "part_bytes": part,
            "in_flight": args.in_flight,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "seconds": times,
            "median_mib_s": {name: size / MiB / seconds for name, seconds in medians.items()},
            "shardline_over_raw": medians["raw"] / medians["shardline"],
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="object size (default 512)")
    parser.add_argument("--part-mib", type=int, default=8, help="part size (default 8)")
    parser.add_argument("--in-flight", type=int, default=4, help="GETs in flight (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs per strategy (default 5)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "reader.json")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, rate in result["median_mib_s"].items():
        print(f"{name:10s} {rate:8.1f} MiB/s (median of {args.repeat})")
    print(f"shardline reader / raw: {result['shardline_over_raw']:.3f}   ({args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
