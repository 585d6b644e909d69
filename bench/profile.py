"""CPU per shard, split into worker and coordinator, under cProfile.

    .venv/bin/python bench/profile.py                      # local file + SQLite markers, N = 16 256 5000
    .venv/bin/python bench/profile.py --s3 --shards 16 256 # moto S3 + DynamoDB markers (tests/servers.py)
    .venv/bin/python bench/profile.py --top 25 --json out.json

Runs one job per N in this process (`run_embedded` with `InProcessBackend`)
on a small object (`--size-kib`, default 1 MiB of ~100-byte lines), first
unprofiled (process CPU seconds, wall seconds), then again under cProfile.

Attribution: every piece of work the event loop runs starts in some frame
called by `Context.run` (a task step or a callback).  Each such top frame's
cumulative time goes to the side its module belongs to -- `shardline.worker`
and `shardline.io` are the worker, `shardline.coordinator` and
`shardline.embedded` the coordinator, except that a `run_task` the
coordinator's task awaits (the in-process backend) is the worker's; anything else (aiohttp's protocol
callbacks, the loop's own timers) is "loop / network".  A worker's
coroutine awaiting botocore counts botocore to the worker, which is the
point.  Self time by package and the top functions by self time and by
cumulative time complete the picture.  cProfile roughly doubles CPU time:
the unprofiled figure is the one to compare across runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name is the stdlib's `profile`, which cProfile imports: keep
# bench/ off the import path until it has.
BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(BENCH.parent / "tests"))

from shardline.coordinator import MEMORY_SPOOL_DIR, CoordinatorSettings  # noqa: E402
from shardline.embedded import InProcessBackend, run_embedded  # noqa: E402
from shardline.io.aws import AwsSettings, client  # noqa: E402
from shardline.io.store import dynamodb_location, ensure_marker_table, sqlite_location  # noqa: E402
from shardline.protocol import JobSpec  # noqa: E402

BUCKET = "profile"
KEY = "object.txt"
MARKERS_TABLE = "profile-markers"

#: Which side a module's frames belong to, by path fragment (first match wins).
_SIDES = (
    ("/shardline/worker/", "worker"),
    ("/shardline/io/", "worker"),
    ("/shardline/coordinator/", "coordinator"),
    ("/shardline/embedded.py", "coordinator"),
)
#: Self time is also totalled by package, by path fragment.
_PACKAGES = (
    "shardline/worker",
    "shardline/io",
    "shardline/coordinator",
    "shardline/protocol",
    "aiobotocore",
    "botocore",
    "aiohttp",
    "asyncio",
    "ssl",
    "sqlite3",
)


class _Discard:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def make_object(size: int, seed: int = 14) -> bytes:
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        line = b"%d " % total + b"x" * rng.randint(1, 120) + b"\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def side_of(filename: str) -> str | None:
    for fragment, side in _SIDES:
        if fragment in filename:
            return side
    return None


def package_of(filename: str) -> str:
    for package in _PACKAGES:
        if f"/{package}/" in filename or filename.endswith(f"/{package}.py"):
            return package.replace("/", ".")
    if filename == "~":
        return "builtins"
    return "other"


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    short = "/".join(parts[-2:]) if "shardline" not in parts else "/".join(parts[parts.index("shardline") :])
    return f"{short}:{line}({name})"


def attribute(stats: pstats.Stats) -> dict[str, float]:
    """Seconds per side: the cumulative time of every top frame the loop ran.

    In process, a shard attempt runs inside the coordinator's own task
    (`_run_attempt` awaits the backend, which awaits `run_task`): that
    nested `run_task` time moves from the coordinator's side to the worker's.
    """
    sides: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for func, (_cc, _nc, _tt, _ct, callers) in raw.items():
        for caller, (_c_cc, _c_nc, _c_tt, c_ct) in callers.items():
            if caller[2] == "<method 'run' of '_contextvars.Context' objects>":
                sides[side_of(func[0]) or "loop / network"] += c_ct
            if func[2] == "run_task" and "/shardline/worker/" in func[0] and side_of(caller[0]) == "coordinator":
                sides["coordinator"] -= c_ct
                sides["worker"] += c_ct
    return dict(sides)


def top(stats: pstats.Stats, key: int, count: int) -> list[tuple[str, int, float, float]]:
    """(function, calls, self s, cumulative s), the `count` largest by field `key` (2 self, 3 cumulative)."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda item: item[1][key], reverse=True)
    return [(_label(func), nc, tt, ct) for func, (_cc, nc, tt, ct, _callers) in rows[:count]]


def by_package(stats: pstats.Stats) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for func, (_cc, _nc, tt, _ct, _callers) in raw.items():
        totals[package_of(func[0])] += tt
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


async def run_job(source: str, shards: int, aws: AwsSettings, markers: str, spool: str, concurrency: int) -> int:
    spec = JobSpec(source=source, shards=shards)
    settings = CoordinatorSettings(markers=markers, spool_dir=spool)
    out = _Discard()
    backend = InProcessBackend(max_concurrent=concurrency)
    report = await run_embedded(spec, out=out, aws=aws, backend=backend, settings=settings)  # type: ignore[arg-type]
    assert len(report.shards) == shards, report
    return out.bytes


def measure(args: argparse.Namespace, source: str, aws: AwsSettings, markers: str, workdir: str) -> list[dict]:
    results = []
    for n in args.shards:
        spool = tempfile.mkdtemp(dir=workdir)
        cpu, wall = time.process_time(), time.perf_counter()
        written = asyncio.run(run_job(source, n, aws, markers, spool, args.concurrency))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert written == args.size_kib * 1024, (written, args.size_kib)
        row: dict[str, Any] = {"shards": n, "cpu_s": cpu, "wall_s": wall, "cpu_per_shard_ms": 1000 * cpu / n}
        if not args.no_profile:
            profiler = cProfile.Profile()
            spool = tempfile.mkdtemp(dir=workdir)
            profiler.enable()
            asyncio.run(run_job(source, n, aws, markers, spool, args.concurrency))
            profiler.disable()
            stats = pstats.Stats(profiler)
            row["profiled_s"] = stats.total_tt  # type: ignore[attr-defined]
            row["sides_ms_per_shard"] = {k: 1000 * v / n for k, v in sorted(attribute(stats).items())}
            row["packages_ms_per_shard"] = {k: 1000 * v / n for k, v in by_package(stats).items()}
            row["top_self"] = top(stats, 2, args.top)
            row["top_cumulative_shardline"] = [r for r in top(stats, 3, 400) if r[0].startswith("shardline/")][
                : args.top
            ]
        results.append(row)
        print_row(row)
    return results


def print_row(row: dict) -> None:
    print(
        f"\nN={row['shards']}: {row['cpu_s']:.2f} s CPU, {row['wall_s']:.2f} s wall, "
        f"{row['cpu_per_shard_ms']:.2f} ms CPU per shard (unprofiled)"
    )
    if "sides_ms_per_shard" not in row:
        return
    sides = ", ".join(f"{k} {v:.2f}" for k, v in row["sides_ms_per_shard"].items())
    print(f"  profiled ({row['profiled_s']:.2f} s): ms per shard by side: {sides}")
    packages = ", ".join(f"{k} {v:.2f}" for k, v in list(row["packages_ms_per_shard"].items())[:8])
    print(f"  self ms per shard by package: {packages}")
    print("  top by self time:                                        calls    self s     cum s")
    for label, calls, tt, ct in row["top_self"]:
        print(f"    {label[:56]:56} {calls:8d} {tt:9.3f} {ct:9.3f}")
    print("  top shardline functions by cumulative time:")
    for label, calls, tt, ct in row["top_cumulative_shardline"]:
        print(f"    {label[:56]:56} {calls:8d} {tt:9.3f} {ct:9.3f}")


async def _prepare_s3(aws: AwsSettings, data: bytes) -> None:
    async with client(aws, "s3") as s3:
        await s3.create_bucket(Bucket=BUCKET)
        await s3.put_object(Bucket=BUCKET, Key=KEY, Body=data)
    async with client(aws, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, MARKERS_TABLE, create=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[16, 256, 5000])
    parser.add_argument("--size-kib", type=int, default=1024, help="object size (default 1 MiB)")
    parser.add_argument("--s3", action="store_true", help="moto S3 source and DynamoDB markers (else a local file)")
    parser.add_argument("--concurrency", type=int, default=64, help="in-process shards at once (the default's)")
    parser.add_argument("--top", type=int, default=15, help="functions to list")
    parser.add_argument("--no-profile", action="store_true", help="unprofiled CPU and wall time only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    data = make_object(args.size_kib * 1024)
    # The spools where a real run puts them (memory-backed when there is one):
    # a file created on a disk file system here cost ~0.8 ms, a tenth of a shard.
    memory = MEMORY_SPOOL_DIR if os.path.isdir(MEMORY_SPOOL_DIR) else None
    with tempfile.TemporaryDirectory(prefix="shardline-profile-", dir=memory) as workdir:
        moto = None
        try:
            if args.s3:
                from servers import MotoServer

                moto = MotoServer()
                aws = moto.start().aws_settings()
                asyncio.run(_prepare_s3(aws, data))
                source, markers = f"s3://{BUCKET}/{KEY}", dynamodb_location(MARKERS_TABLE)
            else:
                aws = AwsSettings()
                source = os.path.join(workdir, KEY)
                Path(source).write_bytes(data)
                markers = sqlite_location(os.path.join(workdir, "markers.db"))
            print(f"{len(data)} bytes from {'moto S3' if args.s3 else 'a local file'}, markers {markers.split(':')[0]}")
            results = measure(args, source, aws, markers, workdir)
        finally:
            if moto is not None:
                moto.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
