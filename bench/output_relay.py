"""Output bytes through the coordinator, per byte of output, for remote workers.

What is measured
----------------
Lambda workers share no disk with the coordinator: each attempt uploads its
output to the staging prefix.  This script runs the same job with workers
that do exactly that (in-process workers told to write to S3, as Lambda's
are; no emulator, so it runs in well under a minute) against a moto server
on 127.0.0.1, in three configurations:

* `stdout`   -- no `output`: the coordinator must read every byte (it is
  the one writing stdout), so 1.0 is the floor;
* `s3`       -- `output: s3://bucket/out/`;
* `s3+reduce`-- the same with `reduce: wc -l` (the reduce runs on the
  coordinator, so it must read every shard's output).

and counts, by wrapping the coordinator's S3 calls in this process (the same
wrappers work on any version of shardline, so the "before" figure comes from
the same script run against older code):

* fetched  -- bytes of remote outputs downloaded (`S3Bucket.download_file`),
* uploaded -- bytes the coordinator wrote to the destination
  (`S3Destination.put_part` / `put_result`),
* copied   -- bytes S3 copied server-side (`S3Destination.copy_part`, where it exists).

"through" = (fetched + uploaded) / output bytes.  Where the coordinator
exposes its own counter (`JobReport.relayed_output_bytes`, i.e.
`shardline_output_relayed_bytes_total`), it is checked against the wrappers.
Every part is compared with the object's bytes.

Run with the dev venv: `.venv/bin/python bench/output_relay.py` (~30 s);
for the code before a change, point PYTHONPATH at that tree's `src`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # servers.py: MotoServer

import shardline  # noqa: E402
from shardline.coordinator import CoordinatorSettings, OutputPolicy  # noqa: E402
from shardline.coordinator._outputs import S3Destination  # noqa: E402
from shardline.embedded import InProcessBackend, run_embedded  # noqa: E402
from shardline.io.s3bucket import S3Bucket  # noqa: E402
from shardline.protocol import JobSpec  # noqa: E402

from servers import MotoServer  # noqa: E402

BUCKET = "relay"
CONFIGS: dict[str, dict[str, Any]] = {
    "stdout": {},
    "s3": {"output": f"s3://{BUCKET}/out-s3/"},
    "s3+reduce": {"output": f"s3://{BUCKET}/out-reduce/", "reduce": "wc -l"},
}
counts: Counter[str] = Counter()


class StagedInProcessBackend(InProcessBackend):
    """In-process workers that upload each attempt's output to S3, as Lambda workers do."""

    def output_location(self, job_id: str, shard: int, attempt: int) -> str:
        return f"s3://{BUCKET}/staging/{job_id}/shard-{shard:05d}.attempt-{attempt}.out"


def _count_coordinator_transfers() -> None:
    download_file = S3Bucket.download_file
    put_part, put_result = S3Destination.put_part, S3Destination.put_result

    async def counted_download(self: S3Bucket, key: str, path: str, *, expected_bytes: int) -> None:
        await download_file(self, key, path, expected_bytes=expected_bytes)
        counts["fetched"] += expected_bytes

    async def counted_put_part(self: S3Destination, index: int, path: str) -> str:
        counts["uploaded"] += os.path.getsize(path)
        return await put_part(self, index, path)

    async def counted_put_result(self: S3Destination, path: str) -> str:
        counts["uploaded"] += os.path.getsize(path)
        return await put_result(self, path)

    S3Bucket.download_file = counted_download  # type: ignore[method-assign]
    S3Destination.put_part = counted_put_part  # type: ignore[method-assign]
    S3Destination.put_result = counted_put_result  # type: ignore[method-assign]
    copy_part = getattr(S3Destination, "copy_part", None)
    if copy_part is not None:

        async def counted_copy_part(self: S3Destination, index: int, source: str, *, size: int) -> str:
            counts["copied"] += size
            return str(await copy_part(self, index, source, size=size))

        S3Destination.copy_part = counted_copy_part  # type: ignore[method-assign]


def _object(size: int) -> bytes:
    line = b"".join(b"%07d some words of a log line\n" % i for i in range(1000))
    return (line * (size // len(line) + 1))[:size]


async def _run(config: str, spec_fields: dict[str, Any], *, aws: Any, shards: int, data: bytes, s3: Any) -> dict:
    counts.clear()
    settings = CoordinatorSettings(output_policy=OutputPolicy(anywhere=True))
    spec = JobSpec(source=f"s3://{BUCKET}/input.txt", shards=shards, **spec_fields)
    out = io.BytesIO()
    started = time.monotonic()
    report = await run_embedded(spec, out=out, aws=aws, backend=StagedInProcessBackend(), settings=settings)
    elapsed_s = time.monotonic() - started
    output_bytes = sum(shard.output_bytes for shard in report.shards)
    if "output" in spec_fields:
        prefix = spec_fields["output"].removeprefix(f"s3://{BUCKET}/")
        parts = b"".join(
            s3.get_object(Bucket=BUCKET, Key=f"{prefix}part-{i:05d}")["Body"].read() for i in range(shards)
        )
        assert parts == data, f"{config}: the parts are not the object"
        if "reduce" in spec_fields:
            output_bytes += len(s3.get_object(Bucket=BUCKET, Key=f"{prefix}result")["Body"].read())
    else:
        assert out.getvalue() == data, f"{config}: stdout is not the object"
    own = getattr(report, "relayed_output_bytes", None)
    if own is not None:
        for way in ("fetched", "uploaded"):
            assert own.get(way, 0) == counts[way], f"{config}: coordinator says {own}, wrappers {dict(counts)}"
    through = counts["fetched"] + counts["uploaded"]
    return {
        "config": config,
        "output_bytes": output_bytes,
        "fetched": counts["fetched"],
        "uploaded": counts["uploaded"],
        "copied": counts["copied"],
        "through_per_output_byte": round(through / output_bytes, 3),
        "coordinator_counter": dict(own) if own is not None else None,
        "elapsed_s": round(elapsed_s, 2),
    }


async def _main(args: argparse.Namespace) -> list[dict]:
    server = MotoServer()
    endpoint = server.start()
    try:
        aws = endpoint.aws_settings(read_timeout_s=30.0)
        os.environ.update(endpoint.env())
        s3 = endpoint.boto3_client("s3")
        s3.create_bucket(Bucket=BUCKET)
        data = _object(args.size_mib * 1024 * 1024)
        s3.put_object(Bucket=BUCKET, Key="input.txt", Body=data)
        _count_coordinator_transfers()
        return [
            await _run(config, fields, aws=aws, shards=args.shards, data=data, s3=s3)
            for config, fields in CONFIGS.items()
        ]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = asyncio.run(_main(args))
    print(f"shardline from {Path(shardline.__file__).parent}; {args.size_mib} MiB, N={args.shards}")
    print(f"{'config':<10} {'output B':>10} {'fetched':>10} {'uploaded':>10} {'copied':>10} {'through/B':>9} {'s':>6}")
    for row in rows:
        print(
            f"{row['config']:<10} {row['output_bytes']:>10} {row['fetched']:>10} {row['uploaded']:>10} "
            f"{row['copied']:>10} {row['through_per_output_byte']:>9} {row['elapsed_s']:>6}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
