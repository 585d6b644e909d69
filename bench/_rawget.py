"""One raw-ceiling worker: download a byte range of an S3 object and discard it.

    python bench/_rawget.py BUCKET KEY START END [--part-bytes B] [--inflight K] [--etag E]

Downloads [START, END) as consecutive parts of `--part-bytes`, with `--inflight`
ranged GETs outstanding at a time; each GET is read completely into memory
(as a shardline worker does) and then dropped.  S3 is reached through the
standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), the same
way the shardline CLI is.  With `--wait-go` it prints "ready" once its client
exists and starts when a line arrives on stdin.  Prints one JSON line with the bytes received and
`time.monotonic()` stamps (system-wide on Linux, so the parent can compare
them across processes).
"""

from __future__ import annotations

import time

T_PROCESS = time.monotonic()  # before the heavy imports below

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402


async def download_range(
    client, bucket: str, key: str, start: int, end: int, *, part_bytes: int, inflight: int, etag: str | None
) -> tuple[int, int]:
    """GET [start, end) in parts with `inflight` GETs outstanding; return (bytes, gets)."""
    parts = iter([(a, min(a + part_bytes, end)) for a in range(start, end, part_bytes)])
    extra = {"IfMatch": etag} if etag else {}

    async def puller() -> tuple[int, int]:
        received = gets = 0
        for a, b in parts:  # one shared iterator: the pullers take parts in order
            response = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}", **extra)
            async with response["Body"] as body:
                data = await body.read()
            if len(data) != b - a:
                raise RuntimeError(f"range {a}-{b - 1}: got {len(data)} bytes, expected {b - a}")
            received += len(data)
            gets += 1
            del data
        return received, gets

    n_pullers = max(1, min(inflight, -(-(end - start) // part_bytes)))
    results = await asyncio.gather(*(puller() for _ in range(n_pullers)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def _main(args: argparse.Namespace) -> dict:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    t_imported = time.monotonic()
    config = AioConfig(
        s3={"addressing_style": "path"},
        max_pool_connections=max(10, 2 * args.inflight),
        connect_timeout=10,
        read_timeout=60,
    )
    async with get_session().create_client("s3", config=config) as client:
        if args.wait_go:
            # Ready: let the parent start every downloader at once, none of them
            # downloading while another still imports.
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        t_start = time.monotonic()
        received, gets = await download_range(
            client,
            args.bucket,
            args.key,
            args.start,
            args.end,
            part_bytes=args.part_bytes,
            inflight=args.inflight,
            etag=args.etag,
        )
        t_end = time.monotonic()
    return {
        "start": args.start,
        "end": args.end,
        "bytes": received,
        "gets": gets,
        "t_process": T_PROCESS,
        "t_imported": t_imported,
        "t_start": t_start,
        "t_end": t_end,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bucket")
    parser.add_argument("key")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("--part-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--etag", default=None, help="send If-Match with this ETag on every GET")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--wait-go", action="store_true", help='print "ready", then wait for a line on stdin')
    args = parser.parse_args(argv)
    if args.end < args.start or args.part_bytes <= 0 or args.inflight <= 0:
        parser.error("need START <= END, --part-bytes > 0, --inflight > 0")
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            args.loop = "asyncio"
    result = uvloop.run(_main(args)) if args.loop == "uvloop" else asyncio.run(_main(args))
    result["loop"] = args.loop
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
