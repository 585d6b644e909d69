"""CPU seconds of the pool worker processes of `shardline run`, trees interleaved.

    git archive main src | tar -x -C /tmp/s4base
    .venv/bin/python bench/pool_cpu.py --tree base=/tmp/s4base/src --pairs 3 -- \\
        /tmp/one_mb.txt -n 5000 --exact-shards --workers process -- wc -l
    .venv/bin/python bench/pool_cpu.py --profile /tmp/prof -- /tmp/one_mb.txt -n 5000 ...

Runs ``python -m shardline run ARGS...`` once per tree per round: "this"
(the tree this script is in) and every ``--tree NAME=SRC`` (SRC first on
PYTHONPATH, in the CLI and in its pool processes), the order alternating
from round to round, so a change of the shared machine's load falls on
both.  Every process writes its own CPU at exit (`_poolcpu.py`); a row per
run gives the wall time, the CLI's (coordinator's) CPU, the pool
processes' own CPU (their threads included, their commands not) in all
and per shard, and the commands' CPU (the pool processes' reaped
children).  With a ``wc -l`` command, the output is checked: N counts
adding up to the source's line count.

``--profile DIR`` runs this tree once with cProfile (by thread CPU time)
in each pool process's main thread and prints the top functions of the
merged stats (DIR keeps the ``.prof`` files); the profiler's own overhead
inflates the totals, so read it for shares and call counts, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _poolcpu

BENCH = Path(__file__).resolve().parent
THIS_SRC = str(BENCH.parent / "src")


def _shards(argv: list[str]) -> int:
    options = argv[: argv.index("--")] if "--" in argv else argv
    for flag in ("-n", "--shards"):
        if flag in options:
            return int(options[options.index(flag) + 1])
    raise SystemExit("give -n N (the per-shard figures need it)")


def _check_wc(argv: list[str], output: Path, shards: int) -> str:
    """'ok' when the run's output is `shards` counts adding up to the source's lines ('-' if not `wc -l`)."""
    if "--" not in argv or argv[argv.index("--") + 1 :] != ["wc", "-l"]:
        return "-"
    with open(argv[0], "rb") as source:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: source.read(1 << 20), b""))
    counts = [int(line) for line in output.read_text().split()]
    if len(counts) != shards or sum(counts) != lines:
        raise SystemExit(
            f"wrong output: {len(counts)} counts adding up to {sum(counts)}, expected {shards} and {lines}"
        )
    return "ok"


def run_once(name: str, src: str, argv: list[str], scratch: str, *, profile: bool = False) -> dict[str, object]:
    figures_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    site = _poolcpu.site_dir(scratch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, src]), _poolcpu.ENV: str(figures_dir)}
    if profile:
        env[_poolcpu.PROFILE_ENV] = "1"
    output = figures_dir / "output"
    started = time.monotonic()
    with open(output, "wb") as out:
        status = subprocess.run([sys.executable, "-m", "shardline", "run", *argv], stdout=out, env=env).returncode
    wall_s = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"{name}: shardline run exited {status}")
    shards = _shards(argv)
    processes = [json.loads(path.read_text()) for path in figures_dir.glob("*.json")]
    pools = [p for p in processes if p["role"] == "pool"]
    cli = [p for p in processes if p["role"] == "cli"]
    pool_s = sum(p["user_s"] + p["system_s"] for p in pools)
    return {
        "tree": name,
        "wall_s": wall_s,
        "cli_s": sum(p["user_s"] + p["system_s"] for p in cli),
        "pools": len(pools),
        "pool_s": pool_s,
        "pool_user_s": sum(p["user_s"] for p in pools),
        "pool_system_s": sum(p["system_s"] for p in pools),
        "pool_main_thread_s": sum(p["main_thread_s"] for p in pools),
        "pool_ms_per_shard": 1000 * pool_s / shards,
        "commands_s": sum(p["children_s"] for p in pools),
        "output": _check_wc(argv, output, shards),
        "load": os.getloadavg()[0],
        "figures": str(figures_dir),
    }


def _row(r: dict[str, object]) -> str:
    return (
        f"| {r['tree']} | {r['load']:.1f} | {r['wall_s']:.2f} | {r['cli_s']:.2f} | {r['pool_s']:.2f} "
        f"({r['pool_user_s']:.2f} + {r['pool_system_s']:.2f}; main thread {r['pool_main_thread_s']:.2f}) "
        f"| {r['pool_ms_per_shard']:.3f} | {r['commands_s']:.2f} | {r['output']} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=SRC", help="another src tree to compare")
    parser.add_argument("--pairs", type=int, default=3, help="rounds (each runs every tree once)")
    parser.add_argument("--profile", metavar="DIR", help="profile this tree's pool processes once instead")
    parser.add_argument("--top", type=int, default=40, help="functions shown with --profile")
    args, run_argv = parser.parse_known_args()
    if run_argv[:1] == ["--"]:
        run_argv = run_argv[1:]
    if not run_argv:
        parser.error("give the arguments of `shardline run` after --")
    scratch = tempfile.mkdtemp(prefix="poolcpu-")
    if args.profile:
        result = run_once("this", THIS_SRC, run_argv, scratch, profile=True)
        target = Path(args.profile)
        target.mkdir(parents=True, exist_ok=True)
        profiles = sorted(Path(str(result["figures"])).glob("pool-*.prof"))
        for path in profiles:
            os.replace(path, target / path.name)
        print(_row(result), file=sys.stderr)
        calls: dict[str, int] = {}
        for path in Path(str(result["figures"])).glob("pool-*.json"):
            for name, count in json.loads(path.read_text()).get("loop_calls", {}).items():
                calls[name] = calls.get(name, 0) + count
        shards = _shards(run_argv)
        print(
            "loop calls per shard: " + ", ".join(f"{k} {v / shards:.2f}" for k, v in sorted(calls.items())),
            file=sys.stderr,
        )
        stats = pstats.Stats(*[str(target / path.name) for path in profiles], stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        return 0
    trees = [("this", THIS_SRC), *(tuple(t.split("=", 1)) for t in args.tree)]
    results: list[dict[str, object]] = []
    print("| tree | load | wall s | CLI CPU s | pool CPU s (user + sys) | pool ms/shard | commands s | output |")
    print("|---|---|---|---|---|---|---|---|")
    for round_index in range(args.pairs):
        order = trees if round_index % 2 == 0 else trees[::-1]
        for name, src in order:
            result = run_once(name, src, run_argv, scratch)
            results.append(result)
            print(_row(result), flush=True)
    for name, _ in trees:
        mine = [r for r in results if r["tree"] == name]
        print(
            f"{name}: median wall {statistics.median(float(r['wall_s']) for r in mine):.2f} s, "
            f"pool {statistics.median(float(r['pool_s']) for r in mine):.2f} CPU-s "
            f"({statistics.median(float(r['pool_ms_per_shard']) for r in mine):.3f} ms/shard), "
            f"CLI {statistics.median(float(r['cli_s']) for r in mine):.2f} CPU-s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
