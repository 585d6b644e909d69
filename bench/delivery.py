"""Where a shardline worker's lifetime goes, next to a raw ranged downloader's.

    .venv/bin/python bench/delivery.py [--bulk-mib 256] [--shards 2] [--repeat 3]
                                       [--workers inprocess|process] [--profile FILE]

The delivery phase of `bench/run.py` in detail: SeaweedFS directly, 8 MiB
parts, 4 GETs in flight.  Alternates N raw ranged downloaders in this process
(`_rawget.download_range`, one client each, client set-up included) with one
shardline job (`_strategies.shardline_embedded`: the real coordinator,
exchange, markers in DynamoDB (moto)), its workers in-process or one warm
pool process each (`--workers process`), and prints worker 0's timeline on
both sides in ms from its start: each GET issued and its first (shardline)
or headers (raw) and last byte, and for shardline the exchange session, the
boundary published, own range, tail, DONE acknowledged, plus its output
writes' and checksum updates' total time.  The stamps come from wrappers
around shardline's functions (`_timeline.py`; nothing else changes).
`--compare FEATURE` runs shardline twice per repetition, without and with
FEATURE: `preallocation` (the output's pages allocated ahead of the writes,
`PassthroughOutput(expected_bytes=...)`).
`--profile FILE` also writes cProfiles (CPU time of the harness's event-loop
thread) of the shardline runs to FILE and of the raw runs to FILE.raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/profile.py would shadow the stdlib's `profile`, which cProfile imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
import cProfile  # noqa: E402

sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

import _timeline  # noqa: E402
import throughput  # noqa: E402
from _rawget import download_range  # noqa: E402
from _strategies import Plan, WarmProcessPool, nominal, run_strategy  # noqa: E402
from run import small_ca_bundle  # noqa: E402

from shardline.io.aws import AwsSettings, client  # noqa: E402

from servers import MotoServer, SeaweedServer  # noqa: E402

MiB = 1024 * 1024


def show(title: str, events: list[tuple[str, float]], t0: float) -> None:
    print(f"  {title}")
    for label, t in sorted(events, key=lambda e: e[1]):
        print(f"    {(t - t0) * 1000:8.1f} ms  {label}")


class _StampedClient:
    """An S3 client whose get_object stamps the request and its response headers."""

    def __init__(self, s3, events: list[tuple[str, float]]) -> None:  # type: ignore[no-untyped-def]
        self._s3, self._events = s3, events

    async def get_object(self, **kwargs):  # type: ignore[no-untyped-def]
        at = int(kwargs["Range"].split("=")[1].split("-")[0]) // MiB
        self._events.append((f"part {at:4d} MiB GET", time.monotonic()))
        response = await self._s3.get_object(**kwargs)
        self._events.append((f"part {at:4d} MiB headers", time.monotonic()))
        return response


async def raw_once(plan: Plan, size: int, etag: str, profiler: cProfile.Profile | None = None) -> list[float]:
    starts = nominal(size, plan.shards)
    timelines: dict[int, list[tuple[str, float]]] = defaultdict(list)

    async def one(i: int) -> float:
        t = time.monotonic()
        timelines[i].append(("start", t))
        async with client(plan.aws, "s3") as s3:
            timelines[i].append(("client ready", time.monotonic()))
            await download_range(
                _StampedClient(s3, timelines[i]),
                plan.bucket,
                plan.key,
                starts[i],
                starts[i + 1],
                part_bytes=plan.part_bytes,
                inflight=plan.inflight,
                etag=etag,
            )
        timelines[i].append(("done", time.monotonic()))
        return time.monotonic() - t

    cpu0 = time.thread_time()
    if profiler is not None:
        profiler.enable()
    try:
        spans = await asyncio.gather(*(one(i) for i in range(plan.shards)))
    finally:
        if profiler is not None:
            profiler.disable()
    print(f"  raw: loop thread CPU {time.thread_time() - cpu0:.3f} s over {max(spans):.3f} s")
    show("raw worker 0", timelines[0], timelines[0][0][1])
    return [(starts[i + 1] - starts[i]) / MiB / s for i, s in enumerate(spans)]


def _timeline_lines(path: str) -> list[dict]:
    """The worker processes' timelines written since the file was last emptied."""
    try:
        with open(path) as file:
            lines = [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []
    os.truncate(path, 0)
    return lines


async def shardline_once(
    plan: Plan, size: int, profiler: cProfile.Profile | None, pool: WarmProcessPool | None, timeline: str
) -> list[float]:
    _timeline.clear()
    cpu0 = time.thread_time()
    if profiler is not None:
        profiler.enable()
    try:
        result = await run_strategy("shardline", plan, pool=pool)
    finally:
        if profiler is not None:
            profiler.disable()
    print(f"  shardline: harness loop thread CPU {time.thread_time() - cpu0:.3f} s over {result.seconds:.3f} s")
    if pool is None:
        events, writes, crcs = _timeline.EVENTS[0], _timeline.WRITES, _timeline.CRCS
    else:
        lines = {line["shard"]: line for line in _timeline_lines(timeline)}
        events = [tuple(e) for e in lines[0]["events"]]
        writes, crcs = lines[0]["writes"], lines[0]["crcs"]
    t0 = min(t for label, t in events if label == "run_task begin")
    show(f"shardline worker 0 ({'own process' if pool else 'in-process'})", events, t0)
    big = [(s, allocated) for n, s, allocated in writes if n >= MiB]
    if big:
        ahead = [s for s, allocated in big if allocated]
        print(
            f"  worker 0: output writes >= 1 MiB: {len(big)}, median {statistics.median(s for s, _ in big) * 1000:.1f}"
            f" ms, total {sum(s for s, _ in big) * 1000:.0f} ms ({len(ahead)} into pages allocated ahead"
            f"{f', median {statistics.median(ahead) * 1000:.1f} ms' if ahead else ''}); checksum updates: {len(crcs)},"
            f" total {sum(crcs) * 1000:.0f} ms"
        )
    starts = nominal(size, plan.shards)
    return [(starts[i + 1] - starts[i]) / MiB / (b - a) for i, (a, b) in enumerate(result.spans)]


async def main_async(
    args: argparse.Namespace, aws: AwsSettings, size: int, etag: str, timeline: str, without: str
) -> None:
    plan = Plan(
        bucket=throughput.BUCKET,
        key="bulk",
        shards=args.shards,
        aws=aws,
        part_bytes=8 * MiB,
        inflight=4,
        markers_table="shardline-markers",
    )
    # CPU time of this (the event loop's) thread, not wall time: the box is shared.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    raw_profiler = cProfile.Profile(time.thread_time) if args.profile else None
    pool = WarmProcessPool(args.shards) if args.workers == "process" else None
    try:
        await raw_once(plan, size, etag)  # warm-up: first clients, imports
        await shardline_once(plan, size, None, pool, timeline)
        raw_rates: list[float] = []
        ours_rates: list[float] = []
        without_rates: list[float] = []
        for rep in range(args.repeat):
            print(f"repetition {rep}")
            rates = await raw_once(plan, size, etag, raw_profiler)
            raw_rates.append(statistics.median(rates))
            print(f"  raw MiB/s per worker: {[round(r, 1) for r in rates]}")
            # Without the feature first in even repetitions, second in odd ones.
            for featured in (True, False) if rep % 2 else (False, True):
                if featured:
                    rates = await shardline_once(plan, size, profiler, pool, timeline)
                    ours_rates.append(statistics.median(rates))
                    print(f"  shardline MiB/s per worker: {[round(r, 1) for r in rates]}")
                elif args.compare:
                    Path(without).write_text(args.compare)
                    try:
                        rates = await shardline_once(plan, size, None, pool, timeline)
                    finally:
                        os.unlink(without)
                    without_rates.append(statistics.median(rates))
                    print(f"  shardline without {args.compare} MiB/s per worker: {[round(r, 1) for r in rates]}")
    finally:
        if pool is not None:
            await pool.shutdown()
    ratios = [o / r for o, r in zip(ours_rates, raw_rates, strict=True)]
    print(
        f"median per-worker MiB/s: raw {statistics.median(raw_rates):.1f}, shardline "
        f"{statistics.median(ours_rates):.1f}; median of the per-repetition ratios {statistics.median(ratios):.3f}"
    )
    if without_rates:
        ratios = [u / r for u, r in zip(without_rates, raw_rates, strict=True)]
        print(
            f"without {args.compare}: shardline {statistics.median(without_rates):.1f} MiB/s per worker,"
            f" median of the per-repetition ratios {statistics.median(ratios):.3f}"
        )
    if profiler is not None:
        profiler.dump_stats(args.profile)
        assert raw_profiler is not None
        raw_profiler.dump_stats(args.profile + ".raw")
        print(f"profiles (CPU time of the event loop's thread): {args.profile} (shardline), {args.profile}.raw")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", default=None, metavar="FILE")
    parser.add_argument(
        "--compare",
        choices=["preallocation"],
        default=None,
        metavar="FEATURE",
        help="each repetition also runs shardline without FEATURE (preallocation)",
    )
    parser.add_argument(
        "--workers",
        choices=["inprocess", "process"],
        default="inprocess",
        help="shardline's workers on the harness's event loop, or one warm pool process each",
    )
    args = parser.parse_args()
    _timeline.instrument()
    scratch = tempfile.mkdtemp(prefix="bench-delivery-")
    timeline = os.path.join(scratch, "timeline.jsonl")
    # Worker processes (inherit this environment) instrument themselves and write here.
    os.environ[_timeline.ENV] = timeline
    without = os.path.join(scratch, "without")
    os.environ[_timeline.WITHOUT_ENV] = without
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_timeline.site_dir(scratch), os.environ.get("PYTHONPATH")) if p
    )
    if bundle := small_ca_bundle(scratch):  # as bench/run.py does
        os.environ["AWS_CA_BUNDLE"] = bundle
    seaweed, moto = SeaweedServer(), MotoServer()
    try:
        s3_endpoint = seaweed.start()
        moto_endpoint = throughput.start_quietly(moto, Path("/dev/null"))
        s3 = throughput.s3_client(s3_endpoint)
        throughput.create_bucket(s3)
        throughput.create_marker_table(moto_endpoint, "shardline-markers")
        data = b"".join(throughput.generate(args.bulk_mib * MiB, 100, 1, 8 * MiB))
        s3.put_object(Bucket=throughput.BUCKET, Key="bulk", Body=data)
        etag = s3.head_object(Bucket=throughput.BUCKET, Key="bulk")["ETag"]
        aws = AwsSettings(
            region="us-east-1",
            s3_endpoint_url=s3_endpoint.url,
            dynamodb_endpoint_url=moto_endpoint.url,
            access_key_id="testing",
            secret_access_key="testing",
            max_pool_connections=64,
        )
        import uvloop

        uvloop.run(main_async(args, aws, len(data), etag, timeline, without))
    finally:
        moto.stop()
        seaweed.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
