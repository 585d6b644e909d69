"""A deliberately naive reference for the ownership rule (DESIGN §1).

Written without looking at `shardline.protocol` and without importing it, so
that the property tests compare two independent readings of the rule.  It is
quadratic in places on purpose: clarity over speed, inputs are small.

- Nominal starts: s_i = floor(i * size / N), i in 0..N.
- A line starts at 0 and right after every delimiter (a delimiter that is the
  last byte of the object starts nothing: there is no byte after it).
- A line belongs to the shard whose nominal range [s_i, s_{i+1}) holds its
  first byte; a shard emits its lines, in order.
"""

from __future__ import annotations

__all__ = [
    "reference_head_ends",
    "reference_line_starts",
    "reference_lines",
    "reference_split",
    "reference_starts",
]


def reference_starts(size: int, shards: int) -> list[int]:
    """s_0..s_N."""
    return [(i * size) // shards for i in range(shards + 1)]


def reference_lines(data: bytes, delimiter: bytes) -> list[tuple[int, bytes]]:
    """(first byte offset, bytes including the delimiter if any) for each line."""
    lines = []
    current = b""
    current_start = 0
    for offset in range(len(data)):
        byte = data[offset : offset + 1]
        if current == b"":
            current_start = offset
        current += byte
        if byte == delimiter:
            lines.append((current_start, current))
            current = b""
    if current != b"":
        lines.append((current_start, current))  # the last line lacks a delimiter
    return lines


def reference_line_starts(data: bytes, delimiter: bytes) -> list[int]:
    return [start for start, _ in reference_lines(data, delimiter)]


def _owner(offset: int, starts: list[int]) -> int:
    for i in range(len(starts) - 1):
        if starts[i] <= offset < starts[i + 1]:
            return i
    raise AssertionError(f"offset {offset} is in no nominal range")


def reference_split(data: bytes, shards: int, delimiter: bytes) -> list[bytes]:
    """What each shard must emit: the lines whose first byte is in its range."""
    starts = reference_starts(len(data), shards)
    emitted = [b""] * shards
    for start, line in reference_lines(data, delimiter):
        emitted[_owner(start, starts)] += line
    return emitted


def reference_head_ends(data: bytes, shards: int, delimiter: bytes) -> list[int]:
    """h_0..h_N: h_i is the first line start >= s_i, or size if there is none."""
    size = len(data)
    starts = reference_starts(size, shards)
    line_starts = reference_line_starts(data, delimiter)
    head_ends = []
    for s in starts:
        later = [p for p in line_starts if p >= s]
        head_ends.append(later[0] if later else size)
    return head_ends


def reference_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: slow, obviously right."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
