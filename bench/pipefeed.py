"""What feeding a command's stdin costs: refilled per free page, or paced.

A command that reads its stdin 4 KiB at a time (mawk, many scripts) frees
one page per read.  A feeder that waits for the pipe to be writable is woken
for each such page and refills it: a wake-up of both sides per 4 KiB.
`CommandOutput` refills the pipe once it has drained to a quarter
(io/pipepacer.py).  Both feed the same page-cached file into the same
command by `splice`, interleaved, `--repeat` times:

* per-page -- a non-blocking splice, and on a full pipe a poll() for
  writability: what the event loop did before;
* shardline -- `CommandOutput.write_file_range`, the code path shard
  commands use.

Reported per consumer: median wall seconds, the command's CPU seconds and the
feeder's (this process's) CPU seconds.

    .venv/bin/python bench/pipefeed.py --file /tmp/shardline-bench-local/access.log --mib 512
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardline.io.command import CommandOutput

CONSUMERS = ["awk '{n+=NF} END {print n}'", "grep -c ' 500 '", "wc -l", "cat", "dd bs=4k status=none"]
PIPE_BYTES = 1024 * 1024


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def feed_per_page(command: str, path: Path, size: int, out: Path) -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    with open(out, "wb") as sink:
        child = subprocess.Popen(["sh", "-c", command], stdin=read_end, stdout=sink)
    os.close(read_end)
    os.set_blocking(write_end, False)
    poller = select.poll()
    poller.register(write_end, select.POLLOUT)
    source = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while done < size:
            try:
                done += os.splice(source, write_end, min(PIPE_BYTES, size - done), offset_src=done)
            except BlockingIOError:
                poller.poll()
    finally:
        os.close(source)
        os.close(write_end)
    child.wait()


async def feed_shardline(command: str, path: Path, size: int, out: Path) -> None:
    source = os.open(path, os.O_RDONLY)
    try:
        async with CommandOutput(command, out) as output:
            await output.write_file_range(source, 0, size)
            await output.finish()
    finally:
        os.close(source)


def measure(how: str, command: str, path: Path, size: int, out: Path) -> tuple[float, float, float]:
    children, ours, start = cpu_s(resource.RUSAGE_CHILDREN), cpu_s(resource.RUSAGE_SELF), time.perf_counter()
    if how == "per-page":
        feed_per_page(command, path, size, out)
    else:
        asyncio.run(feed_shardline(command, path, size, out))
    return time.perf_counter() - start, cpu_s(resource.RUSAGE_CHILDREN) - children, cpu_s(resource.RUSAGE_SELF) - ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, required=True, help="a page-cached file of lines")
    parser.add_argument("--mib", type=int, default=512, help="how much of it to feed (default 512)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = min(args.mib * 1024 * 1024, args.file.stat().st_size)
    with open(args.file, "rb") as f:  # into the page cache
        while f.read(8 << 20):
            pass
    print(f"{size / 2**20:.0f} MiB of {args.file}, {os.cpu_count()} cores, median of {args.repeat}\n")
    print("| command | feeder | wall s | command CPU-s | feeder CPU-s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "out")
        for command in CONSUMERS:
            runs: dict[str, list[tuple[float, float, float]]] = {"per-page": [], "shardline": []}
            for _ in range(args.repeat):
                for how, rows in runs.items():
                    rows.append(measure(how, command, args.file, size, out))
            for how, rows in runs.items():
                wall, child, ours = (statistics.median(column) for column in zip(*rows, strict=True))
                print(f"| `{command}` | {how} | {wall:.2f} | {child:.2f} | {ours:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
