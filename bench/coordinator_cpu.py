"""CPU per process in a real `shardline run` (issue 14 item 2).

    for w in process inprocess; do
      .venv/bin/python bench/coordinator_cpu.py /tmp/one_mb.txt -n 5000 --exact-shards --workers $w -- wc -l > /tmp/c
    done

Runs `shardline run ARGS...` in this process -- the embedded coordinator,
its exchange and its release (and, with ``--workers inprocess``, the shards
themselves) -- with the pool's worker processes and the commands as
children, and prints to stderr, after the run's own output:

- the wall time;
- this process's CPU seconds (user + system, all its threads), in all and
  per shard;
- for its main thread (the event loop), how the wall time splits (Linux,
  /proc/self/task/TID/schedstat): on a CPU, waiting for one on the run
  queue (other processes had it: on a shared machine this grows with the
  load), and blocked (idle in epoll, waiting for the GIL or a vfork);
- the children's CPU seconds (pool worker processes and commands, reaped
  ones only: all of them by the end of the run).

Start-up (imports, about 0.2 s here) is included.  Make the 1 MB file with
`head -c 1000000 /dev/urandom | base64 > /tmp/one_mb.txt`; check the output
with `awk '{s+=$1} END {print NR, s}' /tmp/counts` against `wc -l`.
"""

from __future__ import annotations

import resource
import sys
import threading
import time

from shardline.cli import main as shardline_main


def _shards(argv: list[str]) -> int:
    for flag in ("-n", "--shards"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    raise SystemExit("give -n N (the per-shard figure needs it)")


def _main_thread_s() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds waiting on the run queue) of this thread so far, where Linux tells."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            on_cpu_ns, waiting_ns, _ = map(int, f.read().split())
    except (OSError, ValueError):
        return None
    return on_cpu_ns / 1e9, waiting_ns / 1e9


def main() -> int:
    argv = sys.argv[1:]
    shards = _shards(argv[: argv.index("--")] if "--" in argv else argv)
    started = time.monotonic()
    thread_before = _main_thread_s()
    status = shardline_main(["run", *argv])
    wall_s = time.monotonic() - started
    thread_after = _main_thread_s()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = usage.ru_utime + usage.ru_stime
    lines = [
        f"wall {wall_s:.2f} s; this process CPU {cpu_s:.2f} s (user {usage.ru_utime:.2f}, system "
        f"{usage.ru_stime:.2f}) = {1000 * cpu_s / shards:.3f} ms per shard",
        f"children (pool workers, commands) CPU {children.ru_utime + children.ru_stime:.2f} s "
        f"(user {children.ru_utime:.2f}, system {children.ru_stime:.2f})",
    ]
    if thread_before is not None and thread_after is not None:
        on_cpu_s = thread_after[0] - thread_before[0]
        waiting_s = thread_after[1] - thread_before[1]
        lines.append(
            f"main thread: on a CPU {on_cpu_s:.2f} s, waiting for one {waiting_s:.2f} s, "
            f"blocked {max(0.0, wall_s - on_cpu_s - waiting_s):.2f} s"
        )
    print("\n".join(lines), file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
