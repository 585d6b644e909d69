# A command's stderr, passed on to a person line by line (`parallel --tag`
# style): each line prefixed with its shard, cut at a maximum length, and
# rate-limited so that a command printing a warning per record cannot flood
# the terminal or slow the job.  Dropped lines are counted and said so.

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import IO, Protocol

__all__ = ["ByteSink", "TaggedLines", "attempt_route", "routed_lines", "shard_tag", "tagged_lines_only"]


class ByteSink(Protocol):
    """Where passed-on stderr lines go: a binary stream's write and flush."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def shard_tag(shard: int) -> str:
    """The prefix of shard `shard`'s command stderr lines, `parallel --tag` style."""
    return f"shard {shard}: "


def tagged_lines_only(data: bytes) -> bytes:
    """The whole lines of `data` that carry a `shard_tag` (a worker's own log lines dropped)."""
    return b"".join(line for _, line in routed_lines(data))


# A pool process runs several attempts at once, all writing to its one
# stderr: each command line is sent behind its attempt's route, which the
# backend strips, so it keeps each attempt's lines apart and passes on only
# ``shard K: line``.  Unit separators cannot occur in a tag, and a command
# cannot forge another attempt's route: its line is inside the tag, after it.
_ROUTED_LINE = re.compile(rb"^(?:\x1f([^\x1f\n]{1,300})\x1f)?(shard \d+: [^\n]*\n)", re.MULTILINE)


def attempt_route(job_id: str, shard: int, attempt: int) -> str:
    """The route a pool process puts ahead of an attempt's tagged stderr lines."""
    return f"\x1f{job_id}/{shard}/{attempt}\x1f"


def routed_lines(data: bytes) -> list[tuple[str | None, bytes]]:
    """The tagged lines of `data` (whole lines), each with its attempt's route
    (as `attempt_route` made it) or None; a worker's own log lines dropped."""
    return [
        (f"\x1f{route.decode(errors='replace')}\x1f" if route else None, line)
        for route, line in _ROUTED_LINE.findall(data)
    ]


#: A line longer than this is cut (and marked) when passed on.
DEFAULT_MAX_LINE_BYTES = 4096
#: Lines passed on per second, on average, and in one burst.
DEFAULT_LINES_PER_S = 50.0
DEFAULT_BURST_LINES = 500


class TaggedLines:
    """A writable for `CommandOutput(forward_stderr=...)` that writes each complete
    line to `sink` as ``tag + line``; `end()` passes on an unfinished last line.

    Lines beyond the rate (a token bucket of `burst_lines`, refilled at
    `lines_per_s`) are dropped, and the count is written once lines flow again
    and at `end()`.  Each line is one `write` to `sink`, so lines of several
    shards sharing a pipe never interleave mid-line.
    """

    def __init__(
        self,
        sink: IO[bytes],
        tag: str,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        lines_per_s: float = DEFAULT_LINES_PER_S,
        burst_lines: int = DEFAULT_BURST_LINES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._tag = tag.encode()
        self._max_line_bytes = max_line_bytes
        self._lines_per_s = lines_per_s
        self._burst_lines = burst_lines
        self._clock = clock
        self._tokens = float(burst_lines)
        self._refilled_at = clock()
        self._partial = bytearray()
        self._cut = False  # inside a line that was passed on cut
        self._dropped = 0

    def write(self, data: bytes) -> int:
        self._partial += data
        while (end := self._partial.find(b"\n")) >= 0:
            if not self._cut:
                self._line(bytes(self._partial[:end]))
            self._cut = False
            del self._partial[: end + 1]
        if self._cut:
            self._partial.clear()  # the rest of a line already passed on cut
        elif len(self._partial) > self._max_line_bytes:
            # Bound what is held: pass the line on cut, drop the rest of it.
            self._line(bytes(self._partial))
            self._partial.clear()
            self._cut = True
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    def end(self) -> None:
        """The stream ended: pass on its last line without a newline, and the drop count."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial = bytearray()
        self._report_dropped()
        self._sink.flush()

    def _line(self, line: bytes) -> None:
        now = self._clock()
        self._tokens = min(self._burst_lines, self._tokens + (now - self._refilled_at) * self._lines_per_s)
        self._refilled_at = now
        if self._tokens < 1:
            self._dropped += 1
            return
        self._tokens -= 1
        self._report_dropped()
        if len(line) > self._max_line_bytes:
            line = line[: self._max_line_bytes] + b" [line cut]"
        self._sink.write(self._tag + line + b"\n")

    def _report_dropped(self) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            self._sink.write(self._tag + f"[{dropped} lines of stderr not shown: too many per second]\n".encode())
