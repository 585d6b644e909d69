"""What one command's spawn costs, by how it is started and how big the parent is.

A shard's command is ``sh -c COMMAND``; a job of N shards spawns N of them,
from a pool worker (small) or, in-process, from the coordinator (large).
Side by side, interleaved, in one process that grows between rounds:

* fork -- the event loop's ``subprocess_exec`` (uvloop/libuv forks, so the
  parent's page tables are copied: the cost grows with its memory);
* posix_spawn -- ``shardline.io.child.spawn`` (clone with CLONE_VM |
  CLONE_VFORK: nothing copied), what `CommandOutput` uses.

Each spawn runs ``sh -c 'wc -l'`` on an empty stdin and is awaited to its
exit.  Reported per spawn: wall ms and this process's CPU ms (children's
CPU excluded: the command itself costs both the same).

    .venv/bin/python bench/spawn.py --spawns 300 --ballast-mib 0,300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import uvloop

from shardline.io.child import spawn


async def by_fork(count: int) -> None:
    loop = asyncio.get_running_loop()

    class Exit(asyncio.SubprocessProtocol):
        def __init__(self) -> None:
            self.exited = loop.create_future()

        def process_exited(self) -> None:
            self.exited.set_result(None)

    for _ in range(count):
        stdin_read, stdin_write = os.pipe()
        os.close(stdin_write)
        out = os.open(os.devnull, os.O_WRONLY)
        transport, protocol = await loop.subprocess_exec(
            Exit, "sh", "-c", "wc -l", stdin=stdin_read, stdout=out, stderr=subprocess.PIPE, start_new_session=True
        )
        os.close(stdin_read)
        os.close(out)
        await protocol.exited
        transport.close()


async def by_posix_spawn(count: int) -> None:
    env = dict(os.environ)
    for _ in range(count):
        stdin_read, stdin_write = os.pipe()
        os.close(stdin_write)
        out = os.open(os.devnull, os.O_WRONLY)
        child = spawn(
            ("sh", "-c", "wc -l"), env=env, stdin_fd=stdin_read, stdout_fd=out, stderr_tail_bytes=0, forward_stderr=None
        )
        os.close(stdin_read)
        os.close(out)
        await child.exited
        await child.stderr_closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=300, help="spawns per method and size")
    parser.add_argument("--ballast-mib", default="0,300", help="comma-separated parent sizes to add (MiB, touched)")
    args = parser.parse_args()
    ballast: list[bytearray] = []
    print(f"{'parent +MiB':>11} {'method':>12} {'wall ms':>8} {'cpu ms':>7}")
    for size_mib in (int(s) for s in args.ballast_mib.split(",")):
        while len(ballast) < size_mib:
            ballast.append(bytearray(b"x" * (1 << 20)))  # written, so resident
        for method in (by_fork, by_posix_spawn, by_fork, by_posix_spawn):
            wall, cpu = time.perf_counter(), time.process_time()
            uvloop.run(method(args.spawns))
            wall_ms = (time.perf_counter() - wall) / args.spawns * 1e3
            cpu_ms = (time.process_time() - cpu) / args.spawns * 1e3
            name = method.__name__.removeprefix("by_")
            print(f"{size_mib:>11} {name:>12} {wall_ms:>8.2f} {cpu_ms:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
