"""shardline against every alternative, on the same objects, same endpoint, same run.

    .venv/bin/python bench/run.py            # full run  -> bench/results/full.{json,md} + full-*.png
    .venv/bin/python bench/run.py --quick    # < 5 min   -> bench/results/quick.{json,md} + quick-*.png

Starts SeaweedFS (S3, 127.0.0.1, telemetry off), a moto server (the
DynamoDB-compatible endpoint), and two copies of `_s3proxy.py` in front of
them: S3 with first-byte latency and a per-connection bandwidth cap, DynamoDB
with a small latency ("realistic-S3 mode").  Generates the data sets, uploads
them, and runs the six strategies of `_strategies.py` in rotating order,
`--repeat` times:

1. sweep     -- realistic mode, the short-lines object, N in --shards;
2. datasets  -- realistic mode, every data set (short, long, mixed, a line
                longer than a shard and no final newline) at --dataset-shards;
3. delivery  -- SeaweedFS directly, shardline's default 8 MiB parts: each
                shardline worker's delivery rate (shard bytes / its lifetime)
                against N raw ranged downloaders (bare aiobotocore GETs, same
                part size and GETs in flight), interleaved.

Every run of a correct strategy is checked against a reference computed from
the object's bytes (each shard's emitted range and CRC32C, and the whole
output's size and CRC32C); all correct strategies must agree.  Results: JSON,
a Markdown table (for the README) and PNG plots.  Everything it starts is
stopped by PID on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

import throughput  # noqa: E402  (data generator, bucket + table helpers)
from _rawget import download_range  # noqa: E402
from _strategies import CORRECT, STRATEGIES, Plan, RunResult, WarmProcessPool, nominal, run_strategy  # noqa: E402
from crc32c import crc32c  # noqa: E402

from shardline.io.aws import AwsSettings, client  # noqa: E402

from servers import MotoServer, SeaweedServer  # noqa: E402

MiB = 1024 * 1024
BUCKET = throughput.BUCKET
CHAIN_TABLE = "bench-chain"
MARKERS_TABLE = "shardline-markers"


# --------------------------------------------------------------------------- data sets


def make_dataset(kind: str, size: int, seed: int, shards: int) -> bytes:
    """short: ~100 B lines; long: ~32 KiB lines; mixed: short lines with 64 KiB..2 MiB ones;
    longline: short lines, one line 2.5 shards long at 30 %, no final newline."""
    line_bytes = 32 * 1024 if kind == "long" else 100
    data = bytearray(b"".join(throughput.generate(size, line_bytes, seed, 8 * MiB)))
    no_newline = bytes.maketrans(b"\n", b"x")
    rng = random.Random(seed)
    if kind == "mixed":
        for _ in range(max(1, size // (4 * MiB))):
            length = rng.randint(64 * 1024, 2 * MiB)
            at = rng.randrange(0, max(1, size - length - 1))
            data[at : at + length] = data[at : at + length].translate(no_newline)
    elif kind == "longline":
        length = int(2.5 * size / shards)
        at = int(0.3 * size)
        data[at : at + length] = data[at : at + length].translate(no_newline)
        data[-1:] = b"x"
    return bytes(data)


def describe(data: bytes) -> dict:
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    longest = max(map(len, data.split(b"\n"))) + 1  # incl. the delimiter (one too many if last and unended)
    return {"size": len(data), "crc32c": crc32c(data), "lines": lines, "longest_line": longest}


def reference(data: bytes, n: int) -> list[tuple]:
    """Each shard's expected (start, end, crc32c), or ("empty",): the ownership rule from the bytes."""
    size = len(data)
    starts = nominal(size, n)
    heads = [0]
    for i in range(1, n):
        hit = data.find(b"\n", starts[i] - 1) if starts[i] > 0 else -1
        heads.append(hit + 1 if hit >= 0 else size)
    heads.append(size)
    view = memoryview(data)
    return [
        (heads[i], heads[i + 1], crc32c(view[heads[i] : heads[i + 1]])) if heads[i + 1] > heads[i] else ("empty",)
        for i in range(n)
    ]


def normalize(shards: list[tuple[int, int, int]]) -> list[tuple]:
    return [("empty",) if end <= start or start < 0 else (start, end, crc) for start, end, crc in shards]


# --------------------------------------------------------------------------- servers


class Proxy:
    """bench/_s3proxy.py in a child process; stopped by PID (closing its stdin, then SIGKILL)."""

    def __init__(self, upstream_url: str, latency_ms: float, conn_mib_s: float) -> None:
        upstream = upstream_url.split("://", 1)[1]
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "_s3proxy.py"),
                upstream,
                f"--latency-ms={latency_ms}",
                f"--conn-mib-s={conn_mib_s}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.process.stdout.readline())}"

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def aws_settings(s3_url: str, dynamodb_url: str) -> AwsSettings:
    return AwsSettings(
        region="us-east-1",
        s3_endpoint_url=s3_url,
        dynamodb_endpoint_url=dynamodb_url,
        access_key_id="testing",
        secret_access_key="testing",
        max_pool_connections=64,
    )


# --------------------------------------------------------------------------- trials


def check(result: RunResult, expected: list[tuple], obj: dict) -> tuple[bool, str]:
    if result.strategy == "shardline-cli":  # no per-shard records from a subprocess: the whole output only
        ok = result.out_bytes == obj["size"] and result.out_crc == obj["crc32c"]
        return ok, "ok (whole output)" if ok else f"output {result.out_bytes} bytes crc {result.out_crc:08x}"
    got = normalize(result.shards)
    bad = [i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e]
    if len(got) != len(expected):
        return False, f"{len(got)} shard results for {len(expected)} shards"
    if bad:
        return False, f"{len(bad)} of {len(expected)} shards differ from the ownership rule (first: {bad[0]})"
    if result.out_bytes != obj["size"] or result.out_crc != obj["crc32c"]:
        return False, f"output {result.out_bytes} bytes crc {result.out_crc:08x}, object crc {obj['crc32c']:08x}"
    return True, "ok"


async def trial(
    name: str,
    plan: Plan,
    expected: list[tuple],
    obj: dict,
    phase: str,
    dataset: str,
    rep: int,
    pool: WarmProcessPool | None = None,
) -> dict:
    """One run of strategy `name`, checked; with `pool`, shardline's workers run in its
    processes and the row is labelled "shardline-processes"."""
    label = f"{name}-processes" if pool is not None else name
    row: dict = {"phase": phase, "dataset": dataset, "n": plan.shards, "strategy": label, "rep": rep}
    try:
        result = await run_strategy(name, plan, pool=pool)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        print(f"  {phase:8s} {dataset:9s} N={plan.shards:<4d} {label:15s} FAILED {row['error']}", flush=True)
        return row
    ok, detail = check(result, expected, obj)
    worker = [b - a for a, b in result.spans]
    row.update(
        seconds=round(result.seconds, 4),
        boundary_s=None if result.boundary_s is None else round(result.boundary_s, 4),
        worker_median_s=round(statistics.median(worker), 4) if worker else None,
        worker_max_s=round(max(worker), 4) if worker else None,
        # spawn -> the last worker started (backend start-up, coordinator planning)
        worker_start_max_s=round(max(a for a, _ in result.spans), 4) if result.spans else None,
        output_bytes=result.out_bytes,
        output_crc32c=f"{result.out_crc:08x}",
        shards_digest=f"{zlib.crc32(repr(normalize(result.shards)).encode()):08x}",
        matches_reference=ok,
        ok=ok or name == "naive",
        check=detail,
        harness_cpu_s=result.notes.pop("harness_cpu_s", None),
        **({"notes": result.notes} if result.notes else {}),
    )
    boundary = "" if result.boundary_s is None else f"  boundary {result.boundary_s:6.2f} s"
    print(
        f"  {phase:8s} {dataset:9s} N={plan.shards:<4d} {label:15s} {result.seconds:7.2f} s{boundary}"
        f"  {'ok' if ok else ('(cuts lines, as expected)' if name == 'naive' else 'WRONG: ' + detail)}",
        flush=True,
    )
    return row


async def raw_workers(plan: Plan, size: int, etag: str) -> dict:
    """N raw ranged downloaders in this process: per-worker spans (client set-up included)."""
    starts = nominal(size, plan.shards)

    async def one(i: int) -> tuple[int, float]:
        t = time.monotonic()
        async with client(plan.aws, "s3") as s3:
            got, _ = await download_range(
                s3,
                plan.bucket,
                plan.key,
                starts[i],
                starts[i + 1],
                part_bytes=plan.part_bytes,
                inflight=plan.inflight,
                etag=etag,
            )
        return got, time.monotonic() - t

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(plan.shards)))
    seconds = time.monotonic() - t0
    if sum(r[0] for r in results) != size:
        raise RuntimeError("raw downloaders did not receive the whole object")
    rates = [got / MiB / s for got, s in results]
    return {"seconds": round(seconds, 4), "worker_mib_s": [round(r, 1) for r in rates]}


#: The environment of the delivery phase's processes, raw and shardline alike.  glibc
#: gives each 8 MiB buffer fresh pages by default (mmap, or a heap it trims) and
#: a page fault costs ~2 ms per MiB on a loaded VM: more than the bytes' copy.
#: These settings keep freed memory for the next buffer.
WARM_MALLOC = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * MiB), "MALLOC_TRIM_THRESHOLD_": str(512 * MiB)}


async def raw_processes(plan: Plan, size: int, etag: str) -> dict:
    """N raw ranged downloaders, one `_rawget.py` process each, all started at
    once when all are ready: per-worker spans from its first GET to its last
    byte (process start, imports and client set-up excluded, as a warm pool's
    shardline worker has them behind it)."""
    starts = nominal(size, plan.shards)
    env = {
        **WARM_MALLOC,
        "AWS_ENDPOINT_URL": plan.aws.s3_endpoint_url or "",
        "AWS_ACCESS_KEY_ID": plan.aws.access_key_id or "",
        "AWS_SECRET_ACCESS_KEY": plan.aws.secret_access_key or "",
        "AWS_DEFAULT_REGION": plan.aws.region or "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    argv = [sys.executable, str(BENCH / "_rawget.py"), plan.bucket, plan.key, "--wait-go"]
    options = [f"--part-bytes={plan.part_bytes}", f"--inflight={plan.inflight}", f"--etag={etag}"]
    processes = [
        await asyncio.create_subprocess_exec(
            *argv, str(starts[i]), str(starts[i + 1]), *options, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for i in range(plan.shards)
    ]
    try:
        for process in processes:  # every one imported, its client made
            assert process.stdout is not None
            if (await process.stdout.readline()).strip() != b"ready":
                raise RuntimeError("_rawget.py did not get ready")
        t0 = time.monotonic()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
        outputs = [await process.communicate() for process in processes]
        seconds = time.monotonic() - t0
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()  # our child, by PID
                await process.wait()
    if any(process.returncode != 0 for process in processes):
        raise RuntimeError(f"_rawget.py exited with {[process.returncode for process in processes]}")
    results = [json.loads(out) for out, _ in outputs]
    if sum(r["bytes"] for r in results) != size:
        raise RuntimeError("raw downloaders did not receive the whole object")
    rates = [r["bytes"] / MiB / (r["t_end"] - r["t_start"]) for r in results]
    return {"seconds": round(seconds, 4), "worker_mib_s": [round(r, 1) for r in rates]}


# --------------------------------------------------------------------------- summary


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        if "seconds" not in row:
            continue
        key = (row["phase"], row["dataset"], str(row["n"]), row["strategy"])
        out.setdefault(key, []).append(row)
    summary: dict = {}
    for (phase, dataset, n, strategy), group in out.items():
        secs = [r["seconds"] for r in group]
        summary.setdefault(phase, {}).setdefault(dataset, {}).setdefault(n, {})[strategy] = {
            "trials": len(group),
            "median_s": med(secs),
            "min_s": round(min(secs), 4),
            "max_s": round(max(secs), 4),
            "boundary_median_s": med([r.get("boundary_s") for r in group]),
            "worker_median_s": med([r.get("worker_median_s") for r in group]),
            "harness_cpu_median_s": med([r.get("harness_cpu_s") for r in group]),
        }
    return summary


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("median_s") or not b.get("median_s"):
        return None
    return round(a["median_s"] / b["median_s"], 3)


def grows(values: list[float | None]) -> bool:
    vals = [v for v in values if v is not None]
    return len(vals) >= 2 and all(b > a for a, b in itertools.pairwise(vals))


def targets(result: dict) -> list[dict]:
    sweep = result["summary"].get("sweep", {}).get("short", {})
    ns = sorted(sweep, key=int)
    out = []
    for n in ("16", "64"):
        r = ratio(sweep.get(n, {}).get("shardline"), sweep.get(n, {}).get("naive"))
        out.append(
            {
                "target": f"shardline / naive <= 1.10 at N={n} (realistic S3)",
                "value": r,
                "met": None if r is None else r <= 1.10,
            }
        )
    for other in ("chain", "download-split"):
        values = [ratio(sweep[n].get(other), sweep[n].get("shardline")) for n in ns]
        out.append(
            {
                "target": f"{other} / shardline grows with N (realistic S3)",
                "value": dict(zip(ns, values, strict=False)),
                "met": grows(values),
            }
        )
    delivery = result.get("delivery") or {}
    where = "SeaweedFS" if delivery.get("mode", "direct") == "direct" else "realistic S3"
    pairings = [("worker processes" if "inprocess" in delivery else "in-process workers", delivery)]
    if "inprocess" in delivery:
        pairings.append(("in-process workers", delivery["inprocess"]))
    for how, figures in pairings:
        r = figures.get("shardline_over_raw")
        out.append(
            {
                "target": f"per-worker delivery >= 0.90 x raw ranged-GET throughput ({where}, {how})",
                "value": r,
                "met": None if r is None else r >= 0.90,
            }
        )
    return out


def markdown(result: dict) -> str:
    cfg, machine = result["config"], result["machine"]
    sweep = result["summary"].get("sweep", {}).get("short", {})
    ns = sorted(sweep, key=int)
    lines = [
        f"Measured {result['started'][:10]} on {machine['cpus']} CPUs ({machine['platform']}, "
        f"Python {machine['python']}, SeaweedFS {machine['weed']}); load average "
        f"{machine['loadavg_start'][0]:.2f} at start, {machine.get('loadavg_end', [0])[0]:.2f} at end. "
        f"Realistic-S3 mode: {cfg['latency_ms']:g} ms to first byte, {cfg['conn_mib_s']:g} MiB/s per connection, "
        f"DynamoDB {cfg['dynamodb_latency_ms']:g} ms; {cfg['part_kib']} KiB parts, {cfg['inflight']} GETs in flight "
        f"per worker; median of {cfg['repeat']}; `{result['command']}`.",
        "",
        f"Total seconds, short-lines object ({result['datasets']['short']['size'] / MiB:.0f} MiB), "
        "time to the last resolved boundary in parentheses:",
        "",
        "| strategy | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for strategy in (*STRATEGIES, "shardline-cli"):
        cells = []
        for n in ns:
            s = sweep[n].get(strategy)
            if not s:
                cells.append("-")
                continue
            b = f" ({s['boundary_median_s']:.2f})" if s["boundary_median_s"] is not None else ""
            cells.append(f"{s['median_s']:.2f}{b}")
        if any(c != "-" for c in cells):
            lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    for label, num, den in (
        ("shardline / naive", "shardline", "naive"),
        ("chain / shardline", "chain", "shardline"),
        ("download-split / shardline", "download-split", "shardline"),
    ):
        vals = [ratio(sweep[n].get(num), sweep[n].get(den)) for n in ns]
        lines.append(f"| *{label}* | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    ds = result["summary"].get("datasets", {})
    if ds:
        n = next(iter(next(iter(ds.values()))))
        lines += [
            "",
            f"Every data set at N={n} (total seconds):",
            "",
            "| data set | " + " | ".join(f"`{s}`" for s in STRATEGIES) + " |",
            "|---|" + "---|" * len(STRATEGIES),
        ]
        for name, per_n in ds.items():
            row = per_n.get(n, {})
            lines.append(
                f"| {name} | " + " | ".join(f"{row[s]['median_s']:.2f}" if s in row else "-" for s in STRATEGIES) + " |"
            )
    d = result.get("delivery")
    if d:
        lines += [
            "",
            f"Per-worker delivery, {'SeaweedFS directly' if d.get('mode', 'direct') == 'direct' else 'realistic-S3'} "
            f"(N={d['n']}, {d['part_mib']:g} MiB parts): shardline "
            f"{d['shardline_worker_mib_s']:.1f} MiB/s vs raw ranged GETs {d['raw_worker_mib_s']:.1f} MiB/s = "
            f"**{d['shardline_over_raw']:.2f}x**" + (" (one process per worker)" if "inprocess" in d else "") + ".",
        ]
        if "inprocess" in d:
            i = d["inprocess"]
            lines[-1] += (
                f" In-process workers (all on the coordinator's event loop): {i['shardline_worker_mib_s']:.1f} vs "
                f"{i['raw_worker_mib_s']:.1f} MiB/s = {i['shardline_over_raw']:.2f}x."
            )
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        value = t["value"]
        if isinstance(value, dict):
            value = ", ".join(f"N={k}: {v}" for k, v in value.items())
        lines.append(f"| {t['target']} | {value} | {'yes' if t['met'] else ('no' if t['met'] is False else '-')} |")
    lines.append(f"\nCorrectness: {result['correctness']['summary']}")
    return "\n".join(lines) + "\n"


def plots(result: dict, prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = result["summary"].get("sweep", {}).get("short", {})
    ns = sorted(sweep, key=int)
    if ns:
        for what, key, title in (
            ("total", "median_s", "total time"),
            ("boundary", "boundary_median_s", "time to the last resolved boundary"),
        ):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for strategy in (*STRATEGIES, "shardline-cli"):
                xs = [int(n) for n in ns if sweep[n].get(strategy, {}).get(key) is not None]
                ys = [sweep[str(n)][strategy][key] for n in xs]
                if xs:
                    ax.plot(xs, ys, marker="o", label=strategy)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([int(n) for n in ns], ns)
            ax.set_xlabel("workers N")
            ax.set_ylabel("seconds (median)")
            ax.set_title(f"{title}, realistic-S3 mode")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            path = prefix.with_name(f"{prefix.name}-{what}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for num, den in (("chain", "shardline"), ("download-split", "shardline"), ("shardline", "naive")):
            vals = [ratio(sweep[n].get(num), sweep[n].get(den)) for n in ns]
            ax.plot([int(n) for n in ns], vals, marker="o", label=f"{num} / {den}")
        ax.axhline(1.10, color="grey", linestyle="--", linewidth=0.8, label="1.10")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([int(n) for n in ns], ns)
        ax.set_xlabel("workers N")
        ax.set_ylabel("ratio of median total times")
        ax.set_title("ratios, realistic-S3 mode")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = prefix.with_name(f"{prefix.name}-ratios.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    ds = result["summary"].get("datasets", {})
    if ds:
        n = next(iter(next(iter(ds.values()))))
        names = list(ds)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(STRATEGIES)
        for k, strategy in enumerate(STRATEGIES):
            ys = [ds[d].get(n, {}).get(strategy, {}).get("median_s") or 0 for d in names]
            ax.bar([x + k * width for x in range(len(names))], ys, width, label=strategy)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"data sets at N={n}, realistic-S3 mode")
        ax.legend(fontsize=8)
        path = prefix.with_name(f"{prefix.name}-datasets.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    d = result.get("delivery")
    if d:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar(["raw ranged GETs", "shardline worker"], [d["raw_worker_mib_s"], d["shardline_worker_mib_s"]])
        ax.set_ylabel("MiB/s per worker (median)")
        ax.set_title(f"per-worker delivery, SeaweedFS, N={d['n']}")
        path = prefix.with_name(f"{prefix.name}-delivery.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="shardline vs naive / download-split / prescan / chain / overread, same object, same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small objects, N=4,16, one repeat (< 5 min)")
    parser.add_argument("--shards", default=None, help="sweep N values (default 4,16,64,256; quick 4,16)")
    parser.add_argument("--dataset-shards", type=int, default=None, help="N for the data-set phase (16; quick 4)")
    parser.add_argument("--size-mib", type=int, default=None, help="short-lines object (128; quick 24)")
    parser.add_argument("--dataset-mib", type=int, default=None, help="other data sets (48; quick 8)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (3; quick 1)")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="S3 first-byte latency")
    parser.add_argument("--conn-mib-s", type=float, default=2.0, help="S3 bandwidth per connection (S3: ~80 MB/s)")
    parser.add_argument("--dynamodb-latency-ms", type=float, default=5.0, help="DynamoDB first-byte latency")
    parser.add_argument("--part-kib", type=int, default=1024, help="ranged GET size in realistic mode")
    parser.add_argument("--inflight", type=int, default=4, help="GETs in flight per worker (and for prescan)")
    parser.add_argument("--chain-poll-ms", type=float, default=25.0, help="chain: DynamoDB poll interval")
    parser.add_argument("--delivery-shards", type=int, default=2, help="N for the delivery phase")
    parser.add_argument("--bulk-mib", type=int, default=None, help="delivery-phase object (256; quick 64)")
    parser.add_argument(
        "--delivery-mode",
        choices=["direct", "realistic"],
        default="direct",
        help="delivery phase against SeaweedFS directly (8 MiB parts) or through the realistic-S3 proxy",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed run of every strategy first (0: none)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: sweep,datasets,delivery")
    parser.add_argument(
        "--cli-max-shards", type=int, default=16, help="also time `shardline run` (worker processes) up to this N"
    )
    parser.add_argument(
        "--full-ca-bundle",
        action="store_true",
        help="let every client load the full CA bundle (default: AWS_CA_BUNDLE = one certificate; endpoints are http)",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--report-only", type=Path, default=None, metavar="JSON", help="only re-render the table and plots of JSON"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default=None, help="results name (full / quick)")
    args = parser.parse_args(argv)
    q = args.quick
    args.shard_counts = [int(x) for x in (args.shards or ("4,16" if q else "4,16,64,256")).split(",")]
    args.dataset_shards = args.dataset_shards or (4 if q else 16)
    args.size_mib = args.size_mib or (24 if q else 128)
    args.dataset_mib = args.dataset_mib or (8 if q else 48)
    args.repeat = args.repeat or (1 if q else 3)
    args.bulk_mib = args.bulk_mib or (64 if q else 256)
    args.name = args.name or ("quick" if q else "full")
    args.skip = {s for s in args.skip.split(",") if s}
    return args


async def run_phases(args: argparse.Namespace, result: dict, objects: dict, real: AwsSettings, direct: AwsSettings):
    pools: list[WarmProcessPool] = []  # the delivery phase's worker processes, stopped by PID at the end
    try:
        await _phases(args, result, objects, real, direct, pools)
    finally:
        for pool in pools:
            await pool.shutdown()


async def _phases(
    args: argparse.Namespace,
    result: dict,
    objects: dict,
    real: AwsSettings,
    direct: AwsSettings,
    pools: list[WarmProcessPool],
) -> None:
    rows = result["trials"]
    pool: WarmProcessPool | None = None

    def plan(key: str, n: int, aws: AwsSettings, part: int) -> Plan:
        return Plan(
            bucket=BUCKET,
            key=key,
            shards=n,
            aws=aws,
            part_bytes=part,
            inflight=args.inflight,
            chain_table=CHAIN_TABLE,
            chain_poll_s=args.chain_poll_ms / 1000,
            markers_table=MARKERS_TABLE,
        )

    part = args.part_kib * 1024
    order = list(STRATEGIES)
    if args.warmup:  # imports, first clients, tables: paid once, untimed
        expected = reference(objects["warmup"]["data"], 4)
        for name in [*order, "shardline-cli"]:
            await trial(
                name, plan("warmup", 4, real, part), expected, objects["warmup"]["info"], "warm-up", "warmup", 0
            )
    for rep in range(args.repeat):
        if "sweep" not in args.skip:
            for n in args.shard_counts:
                expected = reference(objects["short"]["data"], n)
                extra = ["shardline-cli"] if n <= args.cli_max_shards else []
                for name in order + extra:
                    p = plan("short", n, real, part)
                    rows.append(await trial(name, p, expected, objects["short"]["info"], "sweep", "short", rep))
                order = order[1:] + order[:1]  # rotate: noise hits every strategy alike
        if "datasets" not in args.skip:
            n = args.dataset_shards
            for dataset in ("short", "long", "mixed", "longline"):
                if dataset == "short" and "sweep" not in args.skip and n in args.shard_counts:
                    continue  # same runs as the sweep's; copied below
                expected = reference(objects[dataset]["data"], n)
                for name in order:
                    p = plan(dataset, n, real, part)
                    rows.append(await trial(name, p, expected, objects[dataset]["info"], "datasets", dataset, rep))
                order = order[1:] + order[:1]
        if "delivery" not in args.skip:
            n = args.delivery_shards
            realistic = args.delivery_mode == "realistic"
            p = plan("bulk", n, real if realistic else direct, part if realistic else 8 * MiB)
            info = objects["bulk"]["info"]
            expected = reference(objects["bulk"]["data"], n)
            if pool is None:
                # The processes import and make their clients in this untimed job.
                pool = WarmProcessPool(n, env=WARM_MALLOC)
                pools.append(pool)
                await trial("shardline", p, expected, info, "warm-up", "bulk", 0, pool)
            if rep == 0 and args.warmup:  # the direct endpoint's first clients, untimed
                await raw_workers(p, info["size"], info["etag"])
                await trial("shardline", p, expected, info, "warm-up", "bulk", 0)
            # In-process (every worker and the coordinator on this process's one
            # event loop), then one process per worker (as `shardline run` and Lambda).
            raw = await raw_workers(p, info["size"], info["etag"])
            raw.update(phase="delivery", dataset="bulk", strategy="raw", n=n, rep=rep)
            rows.append(raw)
            rows.append(await trial("shardline", p, expected, info, "delivery", "bulk", rep))
            print(f"  delivery raw workers: {raw['worker_mib_s']} MiB/s", flush=True)
            raw = await raw_processes(p, info["size"], info["etag"])
            raw.update(phase="delivery", dataset="bulk", strategy="raw-processes", n=n, rep=rep)
            rows.append(raw)
            rows.append(await trial("shardline", p, expected, info, "delivery", "bulk", rep, pool))
            print(f"  delivery raw worker processes: {raw['worker_mib_s']} MiB/s", flush=True)
    # the data-set table reuses the sweep's short-lines runs at the same N
    for row in list(rows):
        if row.get("phase") == "sweep" and row["n"] == args.dataset_shards and "datasets" not in args.skip:
            rows.append({**row, "phase": "datasets", "copied_from": "sweep"})


def _delivery_side(rows: list[dict], raw_name: str, ours_name: str, shard_mib: float) -> dict | None:
    """Per-worker rates of one pairing, each repetition's raw run next to its shardline run."""
    raw = {r["rep"]: r for r in rows if r.get("phase") == "delivery" and r["strategy"] == raw_name}
    ours = {r["rep"]: r for r in rows if r.get("phase") == "delivery" and r["strategy"] == ours_name and r["ok"]}
    reps = sorted(set(raw) & set(ours))
    if not reps:
        return None
    raw_rates = [statistics.median(raw[k]["worker_mib_s"]) for k in reps]
    ours_rates = [shard_mib / ours[k]["worker_median_s"] for k in reps]
    return {
        "raw_worker_mib_s": round(statistics.median(raw_rates), 1),
        "shardline_worker_mib_s": round(statistics.median(ours_rates), 1),
        # Median of the per-repetition ratios: the box's load drifts, a pair shares it.
        "shardline_over_raw": round(statistics.median(o / r for o, r in zip(ours_rates, raw_rates, strict=True)), 3),
        "raw_total_s": med([raw[k]["seconds"] for k in reps]),
        "shardline_total_s": med([ours[k]["seconds"] for k in reps]),
        "repetitions": len(reps),
    }


def delivery_summary(result: dict, objects: dict, n: int, args: argparse.Namespace) -> dict | None:
    """Both pairings of the delivery phase; the top-level figures are the worker processes'."""
    if "bulk" not in objects:
        return None
    shard_mib = objects["bulk"]["info"]["size"] / n / MiB
    processes = _delivery_side(result["trials"], "raw-processes", "shardline-processes", shard_mib)
    inprocess = _delivery_side(result["trials"], "raw", "shardline", shard_mib)
    if processes is None or inprocess is None:
        return None
    processes["definition"] = (
        "one process per worker: shard bytes / (task handed to a warm pool process -> its answer) against "
        "range bytes / (first GET -> last byte) of one _rawget.py process per range; both after their "
        "process start, imports and client set-up; median over workers, then of the per-repetition ratios"
    )
    inprocess["definition"] = (
        "every worker and the coordinator on the harness's one event loop: shard bytes / (task start -> "
        "DONE acknowledged) against N raw downloaders on the same loop (client set-up -> last byte)"
    )
    return {
        "n": n,
        "mode": args.delivery_mode,
        "part_mib": 8 if args.delivery_mode == "direct" else args.part_kib / 1024,
        **processes,
        "inprocess": inprocess,
    }


def report_only(path: Path, no_plots: bool) -> int:
    """Re-render the Markdown table and the plots of an existing results file."""
    result = json.loads(path.read_text())
    result["targets"] = targets(result)
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    if not no_plots:
        result["plots"] = plots(result, path.with_suffix(""))
    throughput.write_json(result, path)
    print(md)
    return 0


def small_ca_bundle(directory: str) -> str | None:
    """A one-certificate CA bundle, for AWS_CA_BUNDLE.

    Every endpoint here is plain http on 127.0.0.1, yet each aiobotocore
    client loads the whole CA bundle (certifi, ~150 certificates) into an SSL
    context on its first request: ~20 ms of CPU per client.  On AWS each
    worker pays that on its own CPU; here N in-process workers would pay it
    one after another on one core, for every strategy.  Nothing is verified
    over http, so one certificate does the same job.
    """
    try:
        import certifi
    except ImportError:
        return None
    text = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    first = text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)] + "\n"
    path = os.path.join(directory, "ca.pem")
    Path(path).write_text(first)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only is not None:
        return report_only(args.report_only.resolve(), args.no_plots)
    scratch = tempfile.mkdtemp(prefix="bench-run-")
    if not args.full_ca_bundle and (bundle := small_ca_bundle(scratch)):
        os.environ["AWS_CA_BUNDLE"] = bundle
    t_begin = time.monotonic()
    results_dir = BENCH / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{args.name}.json"
    seaweed = SeaweedServer()
    moto = MotoServer()
    proxies: list[Proxy] = []
    result: dict = {
        "status": "running",
        "command": "python bench/run.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "weed": seaweed.version().split("\n")[0].replace("version ", "").strip(),
            "loadavg_start": os.getloadavg(),
        },
        "strategies": list(STRATEGIES),
        "trials": [],
    }
    code = 0
    objects: dict = {}
    try:
        print("starting SeaweedFS, moto and the proxies ...", flush=True)
        s3_endpoint = seaweed.start()
        moto_log = Path(scratch) / "moto.log"
        moto_endpoint = throughput.start_quietly(moto, moto_log)
        s3_proxy = Proxy(s3_endpoint.url, args.latency_ms, args.conn_mib_s)
        proxies.append(s3_proxy)
        ddb_proxy = Proxy(moto_endpoint.url, args.dynamodb_latency_ms, 0)
        proxies.append(ddb_proxy)
        s3 = throughput.s3_client(s3_endpoint)
        throughput.create_bucket(s3)
        throughput.create_marker_table(moto_endpoint, MARKERS_TABLE)
        moto_endpoint.boto3_client("dynamodb").create_table(
            TableName=CHAIN_TABLE,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        sizes = {"warmup": 4, "short": args.size_mib, "long": args.dataset_mib, "mixed": args.dataset_mib}
        sizes.update(longline=args.dataset_mib, bulk=args.bulk_mib)
        for kind, mib in sizes.items():
            if (kind in ("long", "mixed", "longline") and "datasets" in args.skip) or (
                kind == "bulk" and "delivery" in args.skip
            ):
                continue
            t = time.monotonic()
            data = make_dataset(kind if kind != "bulk" else "short", mib * MiB, args.seed, args.dataset_shards)
            s3.put_object(Bucket=BUCKET, Key=kind, Body=data)
            info = describe(data)
            info["etag"] = s3.head_object(Bucket=BUCKET, Key=kind)["ETag"]
            objects[kind] = {"data": data, "info": info}
            print(
                f"data set {kind:9s} {mib} MiB, {info['lines']} lines, longest {info['longest_line']} B "
                f"({time.monotonic() - t:.1f} s)",
                flush=True,
            )
        result["datasets"] = {k: v["info"] for k, v in objects.items()}
        real = aws_settings(s3_proxy.url, ddb_proxy.url)
        direct = aws_settings(s3_endpoint.url, moto_endpoint.url)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(run_phases(args, result, objects, real, direct))
        result["status"] = "completed"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        code = 130
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {result['error']}", file=sys.stderr)
        code = 1
    finally:
        for proxy in proxies:
            proxy.stop()
        moto.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        seaweed.stop()
        result["machine"]["loadavg_end"] = os.getloadavg()
    result["summary"] = summarize(result["trials"])
    if result["status"] == "completed":
        result["delivery"] = delivery_summary(result, objects, args.delivery_shards, args)
    checked = (*CORRECT, "shardline-cli", "shardline-processes")
    correct_rows = [r for r in result["trials"] if r.get("strategy") in checked and "matches_reference" in r]
    failed = [r for r in result["trials"] if r.get("ok") is False]
    naive_rows = [r for r in result["trials"] if r.get("strategy") == "naive" and "matches_reference" in r]
    result["correctness"] = {
        "passed": bool(correct_rows) and not failed and all(r["matches_reference"] for r in correct_rows),
        "correct_runs_checked": len(correct_rows),
        "failed_runs": [{k: r.get(k) for k in ("phase", "dataset", "n", "strategy", "error", "check")} for r in failed],
        "naive_runs_matching_reference": sum(r["matches_reference"] for r in naive_rows),
        "naive_runs": len(naive_rows),
    }
    c = result["correctness"]
    c["summary"] = (
        f"{'PASSED' if c['passed'] else 'FAILED'}: {c['correct_runs_checked']} runs of the correct strategies, every "
        f"shard's range and CRC32C equal to the ownership rule's and to each other's; naive matched in "
        f"{c['naive_runs_matching_reference']} of {c['naive_runs']} runs (it cuts lines)."
    )
    result["targets"] = targets(result)
    result["total_s"] = round(time.monotonic() - t_begin, 1)
    throughput.write_json(result, json_path)
    if result["status"] == "completed":
        md = markdown(result)
        (results_dir / f"{args.name}.md").write_text(md)
        if not args.no_plots:
            try:
                result["plots"] = plots(result, results_dir / args.name)
            except ImportError as exc:
                print(f"no plots ({exc}): pip install -e '.[bench]'", file=sys.stderr)
        throughput.write_json(result, json_path)
        print()
        print(md)
    print(f"{result['status']} in {result['total_s']} s; results in {json_path}", flush=True)
    if not c["passed"] and code == 0:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
