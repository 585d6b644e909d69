"""`bench/run.py`'s shardline-cli phase alone: `shardline run s3://...` against naive, and its timeline.

    .venv/bin/python bench/cli_start.py                       # N=16, 128 MiB, 5 rounds + 2 timelines (~1 min)
    git archive REV src | tar -x -C /tmp/before               # an older tree to compare with, same run
    .venv/bin/python bench/cli_start.py --repeat 9 --tree before=/tmp/before/src

The same set-up as `run.py` (SeaweedFS behind `_s3proxy.py`'s first-byte
latency and per-connection cap, moto behind a 5 ms proxy, the short-lines
object, AWS_CA_BUNDLE of one certificate), the same runners
(`_strategies.naive`; `_strategies.shardline_cli`: `shardline run s3://... -n
N --workers=process --max-processes=N --store=dynamodb`, timed from its spawn
to its exit, its output checked whole) run in rotating order `--repeat`
times after an untimed warm-up of each: naive, this checkout's CLI, and the
CLI of every `--tree NAME=SRC` (SRC first on PYTHONPATH, in the CLI and its
worker processes).  Reported: medians and the median of the per-round
ratios CLI / naive.

Then `--timelines` more CLI runs of every tree, interleaved, with
`_clitimeline` in every process (the CLI and its worker processes): when
each step happened, in ms after the spawn -- Python up, the imports, the
clients made, the markers-table check, the stat, the first task sent, the
workers' warm-up and first GET, the output, the workers stopped, the exit --
and each process's CPU.  Those runs are instrumented (a file append per
event) and not in the ratio.  Results: bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _clitimeline
import _strategies
import run as bench  # run.py also puts tests/ on sys.path (servers)
import throughput

from servers import MotoServer, SeaweedServer

MiB = 1024 * 1024

#: The timeline's rows: (what, process role, label, which: first or last occurrence).
STEPS = [
    ("CLI Python up", "cli", "python up", "first"),
    ("CLI run_command (argv parsed)", "cli", "cli run_command", "first"),
    ("CLI imports coordinator: begin", "cli", "import shardline.coordinator begin", "first"),
    ("CLI imports coordinator: end", "cli", "import shardline.coordinator end", "first"),
    ("CLI imports botocore.session: begin", "cli", "import botocore.session begin", "first"),
    ("CLI imports botocore.session: end", "cli", "import botocore.session end", "first"),
    ("CLI imports aiohttp: begin", "cli", "import aiohttp begin", "first"),
    ("CLI imports aiohttp: end", "cli", "import aiohttp end", "first"),
    ("CLI prestart: begin", "cli", "prestart begin", "first"),
    ("CLI prestart: end (processes spawned)", "cli", "prestart end", "first"),
    ("CLI dynamodb client: begin", "cli", "dynamodb client begin", "first"),
    ("CLI dynamodb client: made", "cli", "dynamodb client made", "first"),
    ("CLI markers table check: begin", "cli", "markers table check begin", "first"),
    ("CLI markers table check: end", "cli", "markers table check end", "first"),
    ("CLI submit: begin", "cli", "submit begin", "first"),
    ("CLI s3 client: made", "cli", "s3 client made", "first"),
    ("CLI stat: begin", "cli", "stat begin", "first"),
    ("CLI stat: end", "cli", "stat end", "first"),
    ("CLI first task sent", "cli", "task sent begin", "first"),
    ("workers: first Python up", "worker", "python up", "first"),
    ("workers: last Python up", "worker", "python up", "last"),
    ("workers: first S3 client made", "worker", "s3 client made", "first"),
    ("workers: last S3 client made", "worker", "s3 client made", "last"),
    ("workers: first warm (clients) done", "worker", "worker warm end", "first"),
    ("workers: last warm (clients) done", "worker", "worker warm end", "last"),
    ("workers: first task begins", "worker", "worker task begin", "first"),
    ("workers: first GET issued", "worker", "first GET begin", "first"),
    ("workers: first GET's part complete", "worker", "first GET end", "first"),
    ("workers: last first GET issued", "worker", "first GET begin", "last"),
    ("CLI first output piece", "cli", "output piece", "first"),
    ("workers: last task ends", "worker", "worker task end", "last"),
    ("CLI last output piece", "cli", "output piece", "last"),
    ("CLI worker processes stop: begin", "cli", "worker processes stop begin", "first"),
    ("CLI worker processes stop: end", "cli", "worker processes stop end", "first"),
    ("CLI client pool close: end", "cli", "client pool close end", "last"),
    ("CLI event loop ends", "cli", "cli event loop end", "first"),
    ("CLI exit", "cli", "cli exit", "first"),
    ("harness: exit seen", "harness", "exit seen", "first"),
]


def timeline(path: Path, spawned: float) -> dict[str, float | str | None]:
    """Each STEPS row's ms after the spawn, from one run's event file."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    cli_pids = {pid for pid, label, *_ in events if label == "cli run_command"}
    roles: dict[str, list[tuple[str, float]]] = {"cli": [], "worker": [], "harness": []}
    cpu: dict[int, float] = {}  # each process's CPU seconds at its last event
    for pid, label, t, cpu_s in events:
        role = "harness" if pid == os.getpid() else "cli" if pid in cli_pids else "worker"
        roles[role].append((label, t))
        cpu[pid] = cpu_s
    row: dict[str, float | str | None] = {}
    for what, role, label, which in STEPS:
        times = sorted(t for name, t in roles[role] if name == label)
        row[what] = round((times[0 if which == "first" else -1] - spawned) * 1000, 1) if times else None
    row["CPU ms: CLI process"] = round(sum(cpu[pid] for pid in cli_pids) * 1000, 1)
    workers = [cpu[pid] for pid in cpu if pid not in cli_pids and pid != os.getpid()]
    row["CPU ms: each worker process"] = "/".join(f"{c * 1000:.0f}" for c in sorted(workers))
    return row


async def cli_run(plan: _strategies.Plan, env: dict[str, str]) -> tuple[float, _strategies.Sink]:
    """One `shardline run`, spawn to exit: its wall seconds and what it wrote."""
    sink = _strategies.Sink()
    spool = tempfile.mkdtemp(prefix="bench-spool-", dir=_strategies.choose_spool_dir(0))
    try:
        started = time.monotonic()
        await _strategies.shardline_cli(plan, sink, spool, extra_env=env)
        return time.monotonic() - started, sink
    finally:
        shutil.rmtree(spool, ignore_errors=True)


async def timed_runs(
    args: argparse.Namespace, plan: _strategies.Plan, obj: dict, expected: list, trees: dict[str, dict[str, str]]
) -> list[dict]:
    """naive and the CLI of every tree, `--repeat` rounds in rotating order, after an untimed warm-up of each."""
    rows: list[dict] = []
    order = ["naive", *trees]
    for rep in range(-1, args.repeat):  # -1: the warm-up (imports, bytecode, first clients)
        for name in order:
            if name == "naive":
                row = await bench.trial("naive", plan, expected, obj, "cli", "short", rep)
            else:
                seconds, sink = await cli_run(plan, trees[name])
                ok = sink.bytes == obj["size"] and sink.crc == obj["crc32c"]
                row = {"strategy": f"shardline-cli:{name}", "rep": rep, "seconds": round(seconds, 4), "ok": ok}
                print(f"  {row['strategy']:24s} {seconds:6.2f} s  {'ok' if ok else 'WRONG OUTPUT'}", flush=True)
            if rep >= 0:
                rows.append(row)
        order = order[1:] + order[:1]  # noise hits every one alike
    return rows


async def timelines(
    args: argparse.Namespace, plan: _strategies.Plan, scratch: str, trees: dict[str, dict[str, str]]
) -> dict[str, list[dict]]:
    """`--timelines` instrumented runs of every tree's CLI, the trees interleaved."""
    site = _clitimeline.site_dir(scratch)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for index in range(args.timelines):
        for name, env in trees.items():
            events = Path(scratch, f"timeline-{name}-{index}.jsonl")
            path = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
            os.environ[_clitimeline.ENV] = str(events)
            try:
                spawned = time.monotonic()
                await cli_run(plan, {**env, "PYTHONPATH": path, _clitimeline.ENV: str(events)})
                _clitimeline.stamp("exit seen")
            finally:
                del os.environ[_clitimeline.ENV]
            runs[name].append(timeline(events, spawned))
            if args.events_dir is not None:  # the raw events, for a closer look
                args.events_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(events, args.events_dir / f"{name}-{index}-spawned-{spawned:.6f}.jsonl")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="timed pairs (naive, shardline-cli)")
    parser.add_argument("--timelines", type=int, default=2, help="instrumented CLI runs after the pairs")
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--conn-mib-s", type=float, default=2.0)
    parser.add_argument("--dynamodb-latency-ms", type=float, default=5.0)
    parser.add_argument("--part-kib", type=int, default=1024)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also time the CLI with SRC first on PYTHONPATH (e.g. `git archive REV src | tar -x -C DIR`); repeatable",
    )
    parser.add_argument("--events-dir", type=Path, default=None, help="keep each timeline's raw events here")
    parser.add_argument("--name", default="cli-start", help="results: bench/results/NAME.json")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench-clistart-")
    if bundle := bench.small_ca_bundle(scratch):
        os.environ["AWS_CA_BUNDLE"] = bundle
    seaweed, moto, proxies = SeaweedServer(), MotoServer(), []
    result: dict = {
        "command": "python bench/cli_start.py" + (" " + " ".join(sys.argv[1:]) if argv is None else ""),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": os.getloadavg(),
    }
    try:
        s3_endpoint = seaweed.start()
        moto_endpoint = throughput.start_quietly(moto, Path(scratch) / "moto.log")
        s3_proxy = bench.Proxy(s3_endpoint.url, args.latency_ms, args.conn_mib_s)
        proxies.append(s3_proxy)
        ddb_proxy = bench.Proxy(moto_endpoint.url, args.dynamodb_latency_ms, 0)
        proxies.append(ddb_proxy)
        s3 = throughput.s3_client(s3_endpoint)
        throughput.create_bucket(s3)
        throughput.create_marker_table(moto_endpoint, bench.MARKERS_TABLE)
        data = bench.make_dataset("short", args.size_mib * MiB, 1, args.shards)
        s3.put_object(Bucket=bench.BUCKET, Key="short", Body=data)
        obj = bench.describe(data)
        expected = bench.reference(data, args.shards)
        del data
        plan = _strategies.Plan(
            bucket=bench.BUCKET,
            key="short",
            shards=args.shards,
            aws=bench.aws_settings(s3_proxy.url, ddb_proxy.url),
            part_bytes=args.part_kib * 1024,
            inflight=args.inflight,
            chain_table=bench.CHAIN_TABLE,
            chain_poll_s=0.025,
            markers_table=bench.MARKERS_TABLE,
        )

        trees = {"this": {}, **{name: {"PYTHONPATH": src} for name, src in (t.split("=", 1) for t in args.tree)}}

        async def both() -> tuple[list[dict], dict[str, list[dict]]]:
            rows = await timed_runs(args, plan, obj, expected, trees)
            return rows, await timelines(args, plan, scratch, trees)

        rows, runs = asyncio.run(both())
    finally:
        for proxy in proxies:
            proxy.stop()
        moto.stop()
        seaweed.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    result["loadavg_end"] = os.getloadavg()
    result["trials"] = rows
    ok = all(row.get("ok") for row in rows)
    names = ["naive", *(f"shardline-cli:{name}" for name in trees)]
    seconds = {name: {row["rep"]: row["seconds"] for row in rows if row["strategy"] == name} for name in names}
    summary: dict = {"correct": ok, "median_s": {}}
    for name in names:
        summary["median_s"][name] = round(statistics.median(seconds[name].values()), 3) if seconds[name] else None
        if name != "naive":  # the median of the per-round ratios: a round's runs share the box's load
            ratios = [seconds[name][rep] / seconds["naive"][rep] for rep in seconds[name] if rep in seconds["naive"]]
            summary[f"{name} / naive"] = round(statistics.median(ratios), 3) if ratios else None
            summary[f"{name} / naive, rounds"] = [round(r, 3) for r in ratios]
    result["summary"] = summary
    result["timelines"] = runs
    print(json.dumps(summary, indent=1))
    for name, tree_runs in runs.items():
        if not tree_runs:
            continue
        print(f"\n{f'{name}: ms after spawn':44s}" + "".join(f"{f'run {i}':>9s}" for i in range(len(tree_runs))))
        for what in tree_runs[0]:
            print(f"{what:44s}" + "".join(f"{'-' if r[what] is None else r[what]:>9}" for r in tree_runs))
    throughput.write_json(result, bench.BENCH / "results" / f"{args.name}.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
