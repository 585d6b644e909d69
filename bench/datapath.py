"""The worker's per-byte CPU on its data path, before and after CRC32C and
the in-place searches, side by side on the same buffers (no network).

    .venv/bin/python bench/datapath.py                 # 8 MiB parts, 64 MiB, best of 5
    .venv/bin/python bench/datapath.py --line-bytes 100 --max-line-bytes 4096

Every emitted byte is checksummed, and with ``--max-line-bytes`` also
checked by the line-length guard; a shard's first part also goes through
the head scanner.  "before" is what the worker did until now (zlib's CRC32,
and `bytes(...)` copies of each chunk in the guard and the scanner),
"after" is `shardline.io.checksum.Crc32c` and the protocol's scanner and
guard searching the part buffer in place.  Rounds alternate between the
two; the best round of each is reported, in GiB/s of one core.
"""

from __future__ import annotations

import argparse
import random
import time
import zlib

from shardline.io.checksum import Crc32c
from shardline.protocol import HeadScanner, LineLengthGuard, ShardRange

MiB = 1024 * 1024


def parts(total_bytes: int, part_bytes: int, line_bytes: int) -> list[memoryview]:
    """Part buffers as the ranged reader yields them: views of whole bytearrays."""
    rng = random.Random(14)
    line = b"x" * (line_bytes - 1) + b"\n"
    buffers = []
    for _ in range(total_bytes // part_bytes):
        data = bytearray((line * (part_bytes // line_bytes + 1))[:part_bytes])
        data[rng.randrange(part_bytes)] = ord("y")
        buffers.append(memoryview(data))
    return buffers


def run(chunks: list[memoryview], max_line_bytes: int | None, *, copy: bool) -> int:
    """One shard's worth of parts through the scanner, the guard and the checksum.

    `copy` is the old path: every chunk copied with `bytes(...)` before the
    scanner and the guard searched it, and zlib's CRC32.
    """
    size = len(chunks[0]) * len(chunks)
    scanner = HeadScanner(ShardRange(index=1, shards=2, start=1, end=size, size=size + 1), b"\n")
    scanner.feed(bytes(chunks[0]) if copy else chunks[0])
    guard = LineLengthGuard(b"\n", max_line_bytes, start=0) if max_line_bytes is not None else None
    crc = 0
    checksum = Crc32c()
    for chunk in chunks:
        if guard is not None:
            guard.feed(bytes(chunk) if copy else chunk)
        if copy:
            crc = zlib.crc32(chunk, crc)
        else:
            checksum.update(chunk)
    return crc if copy else checksum.value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-mib", type=int, default=64)
    parser.add_argument("--part-mib", type=int, default=8)
    parser.add_argument("--line-bytes", type=int, default=100)
    parser.add_argument("--max-line-bytes", type=int, default=None, help="also run the line-length guard")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    chunks = parts(args.total_mib * MiB, args.part_mib * MiB, args.line_bytes)
    total = sum(len(c) for c in chunks)
    best = {"before": 0.0, "after": 0.0}
    for _ in range(args.rounds):
        for name, copy in (("before", True), ("after", False)):
            started = time.process_time()
            run(chunks, args.max_line_bytes, copy=copy)
            elapsed = time.process_time() - started
            best[name] = max(best[name], total / max(elapsed, 1e-9) / (1024 * MiB))
    guard = f", line-length guard at {args.max_line_bytes} B" if args.max_line_bytes else ""
    print(
        f"{args.total_mib} MiB in {args.part_mib} MiB parts, {args.line_bytes} B lines{guard}; best of {args.rounds}:"
    )
    for name, rate in best.items():
        print(f"  {name:6} {rate:6.2f} GiB/s of one core ({1 / rate:.3f} CPU s per GiB)")
    print(f"  after / before: {best['after'] / best['before']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
