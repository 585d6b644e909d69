"""The coordinator's own CPU per shard in a real `shardline run` (issue 14 item 2).

    .venv/bin/python bench/coordinator_cpu.py /tmp/one_mb.txt -n 5000 --exact-shards --workers process -- wc -l

Runs `shardline run ARGS...` in this process -- the embedded coordinator,
its exchange and its release -- with the pool's worker processes as
children, and prints (to stderr, after the run's own output) the wall time
and this process's CPU seconds (user + system, all its threads, children
excluded), in all and per shard.  Start-up (imports, about 0.2 s here) is
included.  Make the 1 MB file with
`head -c 1000000 /dev/urandom | base64 > /tmp/one_mb.txt`.
"""

from __future__ import annotations

import resource
import sys
import time

from shardline.cli import main as shardline_main


def _shards(argv: list[str]) -> int:
    for flag in ("-n", "--shards"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    raise SystemExit("give -n N (the per-shard figure needs it)")


def main() -> int:
    argv = sys.argv[1:]
    shards = _shards(argv[: argv.index("--")] if "--" in argv else argv)
    started = time.monotonic()
    status = shardline_main(["run", *argv])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime
    print(
        f"wall {time.monotonic() - started:.2f} s; coordinator CPU {cpu_s:.2f} s "
        f"(user {usage.ru_utime:.2f}, system {usage.ru_stime:.2f}) = {1000 * cpu_s / shards:.3f} ms per shard",
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
