"""shardline against GNU parallel and the plain command on one local file (issue 15).

What is measured
----------------
One page-cached local file of at least `--size-gib` GiB of access-log lines
(generated once into `--dir` unless `--file` names one).  For each workload,
three strategies run the same work, interleaved (every repetition runs each
workload's strategies one after another), `--repeat` times:

* sequential -- the command alone, ``cmd < FILE``;
* parallel -- ``parallel --pipepart -a FILE --block -1 -k -j CORES cmd``
  (one block per job slot), with the same combining step as shardline's
  reduce where the work needs one (a sum, or ``sort -m`` over
  ``--files`` outputs);
* shardline -- ``shardline run FILE -n CORES -- cmd`` with ``--reduce`` for
  the combining step (the embedded default: local worker processes).

Workloads: identity (``cat``), ``wc -l``, ``grep -c ' 500 '``, an awk field
sum, and ``LC_ALL=C sort`` with a merge reduce (``sort -m``).  Every run's
output goes to a file in `--dir` and is compared with the sequential one (the
identity with the input itself, byte for byte); a strategy whose output
differs is reported as wrong, never timed as if right.

Bytecode caching is left on (PYTHONDONTWRITEBYTECODE is dropped from the
environment), as a user's install has it.

Reported: median wall seconds and median CPU seconds (children's user +
system) per strategy and workload, and shardline / parallel; the machine
(CPU model, cores, kernel, Python, parallel's version) and whether other work
shared it (`--shared-note`).  Results go to `bench/results/local.json` and a
Markdown table to stdout.

    .venv/bin/python bench/local.py --size-gib 1 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SUM = "awk '{s+=$1} END {print s}'"
WORKLOADS: dict[str, tuple[str, str | None]] = {
    # name: (per-shard command, combining step or None)
    "identity (cat)": ("cat", None),
    "wc -l": ("wc -l", SUM),
    "grep -c ' 500 '": ("grep -c ' 500 '", SUM),
    "awk field sum": ("awk '{n+=NF} END {print n}'", SUM),
    "sort + merge reduce": ("LC_ALL=C sort", 'LC_ALL=C sort -m "$@"'),
}


def make_log(path: Path, size_bytes: int) -> None:
    """Access-log-like lines, ~150 bytes each, repeated blocks with varying fields."""
    rng = random.Random(1)
    lines = []
    for i in range(20_000):
        status = rng.choice([200, 200, 200, 200, 301, 404, 500])
        lines.append(
            f"10.0.{i % 256}.{(i * 7) % 256} - - [01/Dec/2026:12:{i % 60:02d}:{i % 60:02d} +0000] "
            f'"GET /path/{rng.randint(1, 99999)}/item?q={rng.random():.6f} HTTP/1.1" {status} '
            f'{rng.randint(100, 99999)} "-" "Mozilla/5.0 (X11; Linux x86_64)"\n'
        )
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        written = 0
        while written < size_bytes:
            f.write(block)
            written += len(block)


def command_line(strategy: str, workload: str, source: Path, cores: int, shardline: list[str]) -> str:
    command, combine = WORKLOADS[workload]
    q = _quote
    if strategy == "sequential":
        return f"{command} < {q(source)}"
    if strategy == "parallel":
        base = f"parallel --pipepart -a {q(source)} --block -1 -k -j {cores}"
        if combine is None:
            return f"{base} {q(command)}"
        if "$@" in combine:  # a merge of each job's own output file
            merge = f"sh -c {q(combine + '; rm -f ' + chr(34) + '$@' + chr(34))} sh"
            return f"{base} --files {q(command)} | xargs {merge}"
        return f"{base} {q(command)} | {combine}"
    run = " ".join(q(part) for part in shardline)
    reduce = "" if combine is None else f" --reduce {q(combine)}"
    return f"{run} run {q(source)} -n {cores} --no-progress{reduce} -- {q(command)}"


def _quote(text: object) -> str:
    import shlex

    return shlex.quote(str(text))


#: Bytecode caching on, as a user's install has it: with PYTHONDONTWRITEBYTECODE
#: (set in some developer shells) every run would compile shardline's
#: sources again, a third of its start.
_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def timed(shell_line: str, output: Path) -> tuple[float, float]:
    """Wall seconds and children's CPU seconds of `shell_line`, stdout to `output`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(output, "wb") as out:
        subprocess.run(["sh", "-c", shell_line], stdout=out, check=True, env=_ENV)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


#: Outputs up to this size are compared word by word (`wc`'s padding may
#: differ); larger ones (the sort's, 1 GiB) byte for byte by `cmp`: split
#: into Python lists they held ~11 GiB in this process, and the memory
#: pressure slowed the next repetition's identity run (6.1 s instead of 1.3).
_WORDWISE_MAX_BYTES = 1024 * 1024


def same_output(workload: str, output: Path, reference: Path, source: Path) -> bool:
    if workload.startswith("identity"):
        return _same_file(output, source)
    if max(output.stat().st_size, reference.stat().st_size) > _WORDWISE_MAX_BYTES:
        return _same_file(output, reference)
    return output.read_bytes().split() == reference.read_bytes().split()


def _same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def machine(shared_note: str) -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run(["parallel", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "parallel": version[0] if version else "",
        "shared": shared_note,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--file", type=Path, help="an existing file to use instead of a generated one")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/shardline-bench-local"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names, of: %(default)s")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "local.json")
    parser.add_argument(
        "--shared-note", default="", help="say whether other work shared the machine during the run (recorded)"
    )
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        print("GNU parallel is not installed (apt-get install parallel)", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.file or args.dir / "access.log"
    if args.file is None and (not source.exists() or source.stat().st_size < args.size_gib * 2**30):
        make_log(source, int(args.size_gib * 2**30))
    subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # page-cache it
    shardline = [sys.executable, "-m", "shardline"]
    # Bytecode written before the first timed run, as an install writes it.
    subprocess.run([sys.executable, "-c", "import shardline.cli._run, shardline.embedded"], env=_ENV, check=True)
    workloads = [name for name in WORKLOADS if name in args.workloads.split(",")]
    strategies = ["sequential", "parallel", "shardline"]
    trials: dict[str, dict[str, list[tuple[float, float]]]] = {w: {s: [] for s in strategies} for w in workloads}
    wrong: dict[str, set[str]] = {w: set() for w in workloads}
    for repetition in range(args.repeat):
        for workload in workloads:
            reference = args.dir / "out.sequential"
            for strategy in strategies:
                output = args.dir / f"out.{strategy}"
                line = command_line(strategy, workload, source, args.cores, shardline)
                wall, cpu = timed(line, output)
                if strategy != "sequential" and not same_output(workload, output, reference, source):
                    wrong[workload].add(strategy)
                trials[workload][strategy].append((wall, cpu))
                print(f"[{repetition + 1}/{args.repeat}] {workload:20} {strategy:10} {wall:7.2f} s {cpu:6.2f} CPU-s")
            for strategy in strategies:
                (args.dir / f"out.{strategy}").unlink(missing_ok=True)
    size = source.stat().st_size
    rows = []
    for workload in workloads:
        row: dict[str, object] = {"workload": workload, "wrong": sorted(wrong[workload])}
        for strategy in strategies:
            walls = [wall for wall, _ in trials[workload][strategy]]
            cpus = [cpu for _, cpu in trials[workload][strategy]]
            row[strategy] = {"median_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus)}
        row["shardline_over_parallel"] = row["shardline"]["median_s"] / row["parallel"]["median_s"]  # type: ignore[index]
        rows.append(row)
    result = {
        "machine": machine(args.shared_note),
        "file_bytes": size,
        "cores": args.cores,
        "repeat": args.repeat,
        "commands": {
            w: {s: command_line(s, w, source, args.cores, ["shardline"]) for s in strategies} for w in workloads
        },
        "rows": rows,
        "trials": trials,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{size / 2**30:.2f} GiB, page-cached, {args.cores} cores, median of {args.repeat} (wall s / CPU s)\n")
    print("| workload | sequential | parallel | shardline | shardline / parallel |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = []
        for strategy in strategies:
            cell = row[strategy]
            text = f"{cell['median_s']:.2f} ({cell['median_cpu_s']:.1f})"  # type: ignore[index]
            cells.append(text + (" WRONG" if strategy in row["wrong"] else ""))  # type: ignore[operator]
        print(f"| {row['workload']} | {' | '.join(cells)} | {row['shardline_over_parallel']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
