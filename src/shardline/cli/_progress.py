# The progress line `shardline run` shows on a terminal's stderr: shards
# done, bytes done, the current rate and the ETA, redrawn in place.  An
# embedded run hands the display the coordinator's own progress; a run on a
# daemon polls GET /jobs/{id} for it (`RemoteProgress`, `poll_progress`).
#
# The line never shares a row with anything else written to the terminal:
# while it is shown, sys.stderr (and the logging handlers writing to it)
# and, when stdout is the same terminal, the job's output go through
# `ProgressDisplay`, which erases the line before each write and draws it
# again after, but only when the cursor is back at the start of a row (an
# output line half written keeps the progress line off until it ends).

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import ShardlineError
from ._format import human_size

if TYPE_CHECKING:
    from ..client import CoordinatorClient

__all__ = ["ProgressDisplay", "RemoteProgress", "poll_progress", "progress_wanted"]

log = logging.getLogger("shardline.cli")

#: How often the progress line asks the coordinator for the job's state.
_PROGRESS_POLL_S = 1.0
#: How often the line is redrawn.
_REDRAW_S = 0.25
#: The window the current rate is measured over: long enough to smooth the
#: bursts of shards committing, short enough to follow a change of pace.
_RATE_WINDOW_S = 5.0
_ERASE = "\r\x1b[K"


def progress_wanted(args: Any) -> bool:
    """--progress / --no-progress, else on when stderr is a terminal."""
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


class ProgressDisplay:
    """One self-overwriting status line on a terminal's stderr.

    `install()` routes sys.stderr, the logging handlers that write to it
    and (returned) the job's output stream through the display; `close()`
    erases the line and puts everything back.  Writes may come from other
    threads (the output is copied in one): a lock orders them with redraws.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._text = ""  # the line as last drawn or due
        self._drawn = False
        self._at_row_start = True  # where everything but the line left the cursor
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._restore: list[Callable[[], None]] = []

    # -- routing writes through the display ---------------------------------------

    def install(self, out: BinaryIO) -> BinaryIO:
        """Route sys.stderr through the display; return the stream to write the
        job's output to (`out` itself unless it is the same terminal)."""
        original = sys.stderr
        erasing = _ErasingText(self, original)
        sys.stderr = erasing
        self._restore.append(lambda: setattr(sys, "stderr", original))
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is original:
                handler.setStream(erasing)
                self._restore.append(functools.partial(handler.setStream, original))
        if _same_terminal(out, self._stream):
            return cast(BinaryIO, _ErasingBinary(self, out))  # write() and flush() are all the output uses
        return out

    def write_around(self, write: Callable[[], None], ends_row: bool) -> None:
        """Do `write` (something written to the terminal) with the line erased
        first, and drawn again after if `ends_row`."""
        with self._lock:
            if self._drawn:
                self._stream.write(_ERASE)
                self._stream.flush()
                self._drawn = False
            write()
            self._at_row_start = ends_row
            self._draw_locked()

    def _draw_locked(self) -> None:
        if self._text and self._at_row_start:
            self._stream.write(_ERASE + self._text)
            self._stream.flush()
            self._drawn = True

    # -- the line -----------------------------------------------------------------

    def attach(self, snapshot: Callable[[], Any]) -> None:
        """Start redrawing from `snapshot()` (shards, shards_done, bytes_emitted, size, elapsed_s)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(snapshot))

    async def _loop(self, snapshot: Callable[[], Any]) -> None:
        while True:
            try:
                p = snapshot()
            except ShardlineError as exc:
                # The job is gone (an embedded job is forgotten once its output is
                # out): the run's own outcome is what counts, not the display's.
                log.debug("progress display stops: %s", exc)
                return
            text = self.line(p.shards_done, p.shards, p.bytes_emitted, p.size, time.monotonic())
            with self._lock:
                self._text = text
                self._draw_locked()
            await asyncio.sleep(_REDRAW_S)

    def line(self, shards_done: int, shards: int, bytes_done: int, size: int, now: float) -> str:
        """The progress line for this moment; the ETA is the bytes left at the
        rate of the last few seconds (not the average since the start, which
        counts the start-up, nor shards, which differ in cost)."""
        self._samples.append((now, bytes_done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_S:
            self._samples.popleft()
        then, bytes_then = self._samples[0]
        rate = (bytes_done - bytes_then) / (now - then) if now > then else 0.0
        remaining = max(size - bytes_done, 0)
        eta = f"{remaining / rate:5.0f}s" if rate > 0 else "    ?"
        if remaining == 0 and size > 0:
            eta = "   0s"
        return (
            f"[shardline] shards {shards_done}/{shards}  "
            f"{human_size(bytes_done)}/{human_size(size)}  {human_size(rate)}/s  ETA {eta}"
        )

    async def close(self) -> None:
        """Stop redrawing, clear the line, and put sys.stderr and logging back."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        with self._lock:
            if self._drawn:
                self._stream.write(_ERASE)
                self._stream.flush()
                self._drawn = False
            self._text = ""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()


class _ErasingText:
    """A text stream (stderr) whose writes erase and redraw the progress line."""

    def __init__(self, display: ProgressDisplay, stream: IO[str]) -> None:
        self._display = display
        self._stream = stream
        self.buffer = _ErasingBinary(display, stream.buffer) if hasattr(stream, "buffer") else None

    def write(self, text: str) -> int:
        def write() -> None:
            self._stream.write(text)
            self._stream.flush()

        if text:
            self._display.write_around(write, ends_row=text.endswith("\n"))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ...
        return getattr(self._stream, name)


class _ErasingBinary:
    """A binary stream on the same terminal whose writes erase and redraw the
    progress line.  No fileno(), so that output is copied through write()."""

    def __init__(self, display: ProgressDisplay, stream: BinaryIO) -> None:
        self._display = display
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> int:
        def write() -> None:
            self._stream.write(data)
            self._stream.flush()

        if data:
            self._display.write_around(write, ends_row=bytes(data[-1:]) == b"\n")
        return len(data)

    def flush(self) -> None:
        self._stream.flush()


def _same_terminal(out: Any, terminal: Any) -> bool:
    """Whether `out` writes to the terminal `terminal` is (the progress line's)."""
    try:
        out_fd, terminal_fd = out.fileno(), terminal.fileno()
        return os.isatty(out_fd) and os.path.samestat(os.fstat(out_fd), os.fstat(terminal_fd))
    except (AttributeError, OSError, ValueError):
        return False


@dataclass(slots=True)
class RemoteProgress:
    """What the progress line shows, from the latest GET /jobs/{id}."""

    shards: int
    started: float
    shards_done: int = 0
    bytes_emitted: int = 0
    size: int = 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


async def poll_progress(coordinator: CoordinatorClient, job_id: str, progress: RemoteProgress) -> None:
    """Keep `progress` up to date with job `job_id` until cancelled."""
    while True:
        try:
            view = await coordinator.job(job_id)
        except ShardlineError as exc:  # the output stream reports real trouble; the display just waits
            log.debug("progress poll failed: %s", exc)
        else:
            progress.shards_done = view["shards_done"]
            progress.bytes_emitted = view["bytes_emitted"]
            progress.size = view["size"] or 0
        await asyncio.sleep(_PROGRESS_POLL_S)
