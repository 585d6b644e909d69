"""shardline's fixed start, and how soon a pipe that wants only a little returns (issue 15).

Two measurements, each run `--repeat` times with the candidate trees
interleaved (base, new, base, new, ...), so machine noise hits all alike:

* tiny -- ``shardline run TINY -n 4 -- wc -l`` on a 100-line file: the fixed
  cost of a run (start-up, workers, exit);
* head -- ``shardline run BIG | head -c 100`` (identity) on `--big`: how
  soon the run returns once its reader has had enough.

Each tree is a ``src`` directory put first on PYTHONPATH (``--tree
NAME=PATH``; the default is this checkout's ``src``), so a baseline is a
``git archive REV src | tar -x -C DIR`` away.  Bytecode caching is left on,
as a user's install has it.  Reported: median, min and max wall seconds.

    .venv/bin/python bench/start.py --big /tmp/big.log --tree base=/tmp/base/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall_s(shell_line: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(["sh", "-c", shell_line], env=env, stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=Path, required=True, help="a large local file (page-cached first)")
    parser.add_argument("--tree", action="append", default=[], help="NAME=SRC_DIR to compare (repeatable)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.tree)
    trees.setdefault("this", str(Path(__file__).resolve().parent.parent / "src"))
    tiny = Path(tempfile.mkdtemp()) / "tiny.txt"
    tiny.write_text("".join(f"{i}\n" for i in range(100)))
    subprocess.run(["cat", str(args.big)], stdout=subprocess.DEVNULL, check=True)
    env_base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    shardline = f"{sys.executable} -m shardline run"
    lines = {
        "tiny": f"{shardline} {tiny} -n 4 --no-progress -- wc -l",
        "head": f"{shardline} {args.big} --no-progress | head -c 100",
    }
    results: dict[tuple[str, str], list[float]] = {}
    envs = {name: {**env_base, "PYTHONPATH": src} for name, src in trees.items()}
    for env in envs.values():  # warm: bytecode written, files cached
        wall_s(lines["tiny"], env)
    for _ in range(args.repeat):
        for what, line in lines.items():
            for name, env in envs.items():
                results.setdefault((what, name), []).append(wall_s(line, env))
    print(f"median (min-max) wall seconds of {args.repeat}, {os.cpu_count()} cores")
    for (what, name), walls in results.items():
        print(f"{what:5} {name:8} {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
