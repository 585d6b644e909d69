# A shard's output stage: where the bytes a worker emits go, and the one
# interface both kinds follow (`ShardOutput`: start, write with backpressure,
# finish, abort).  `PassthroughOutput` copies them unchanged into the output
# file, writing in a worker thread so a slow disk never stalls the event loop;
# `command.CommandOutput` feeds them to a shell command.
#
# Pre-allocation: the output usually lives on tmpfs (the memory spool), where
# a write into pages the file does not have yet costs two to three times the
# copy itself (the kernel allocates and zeroes each page; 40-55 ms against
# 17 ms for 128 MiB into pages already there, on this project's 2-core VM).
# Given the size it expects, `PassthroughOutput` has the thread pool
# allocate the file's pages ahead of the writes (Linux `fallocate` with
# KEEP_SIZE, one chunk at a time, at most a reader's budget ahead), from the
# first write on: that work then runs while the next parts download and
# beside the event loop, instead of inside each write, which holds its part
# buffer -- and so the next GET -- until it returns.  Not from the open: on
# a busy machine those steps delayed the first GETs' answers (the first
# part in at 109-176 ms instead of 68-96 in a worker process).
# KEEP_SIZE never changes the file's size or any byte in it, so the writes
# (and a reader of the finished file) see only what was written; `finish`
# frees pages allocated past the end.

from __future__ import annotations

import abc
import asyncio
import ctypes
import enum
import logging
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO, Self

from ..errors import StorageError
from ..protocol import DEFAULT_MAX_IN_FLIGHT_BYTES
from .checksum import Crc32c

__all__ = ["PassthroughOutput", "ShardOutput", "State", "storage_error"]

log = logging.getLogger("shardline.io.shardoutput")

#: `PassthroughOutput` pre-allocates this much per step, and only outputs
#: expected to be at least this large (a thread is not worth it for less).
PREALLOCATE_CHUNK_BYTES = 8 * 1024 * 1024
#: ... and at most this far ahead of its writes: a reader's parts in flight,
#: the bytes the next writes will bring.
PREALLOCATE_AHEAD_BYTES = DEFAULT_MAX_IN_FLIGHT_BYTES

_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's fallocate(2) (ctypes releases the GIL around the call), or None.

    Not `os.posix_fallocate`: where a file system lacks fallocate, glibc
    emulates it by writing into the file, which would race with our writes.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    FINISHING = "finishing"
    FINISHED = "finished"
    CLOSED = "closed"


class ShardOutput(abc.ABC):
    """Where a shard's emitted input bytes go.

    Use as an async context manager (entering calls `start()` unless it was
    already called; leaving calls `aclose()`), or call the methods directly:
    `start()`, any number of `write()`, then `finish()`.  One task drives an
    output; `aclose()` aborts and is idempotent and cancellation-safe.
    """

    def __init__(self) -> None:
        #: Input bytes accepted so far (every byte of every completed `write()`).
        self.bytes_in = 0
        self._state = State.NEW
        self._cleanup: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        if self._state is State.NEW:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the output (and start the command, if any)."""

    @abc.abstractmethod
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hand over `data`; returns once it is accepted, so `data` may be reused."""

    @abc.abstractmethod
    async def finish(self) -> int:
        """End of input: wait for completion and return the output file's size."""

    async def aclose(self) -> None:
        """Abort unless finished: stop any command, close every file.

        The cleanup runs in its own task under a shield, so cancelling the
        caller cannot interrupt it halfway; a second call waits for the same
        cleanup.
        """
        if self._cleanup is None:
            self._state = State.CLOSED
            self._cleanup = asyncio.ensure_future(self._abort())
        await asyncio.shield(self._cleanup)

    @abc.abstractmethod
    async def _abort(self) -> None:
        """Release whatever is still held; idempotent, logs instead of raising."""

    def _advance(self, expected: State, new: State, action: str) -> None:
        if self._state is not expected:
            raise RuntimeError(f"cannot {action} a {type(self).__name__} that is {self._state.value}")
        self._state = new

    def _require_running(self, action: str) -> None:
        self._advance(State.RUNNING, State.RUNNING, action)


def storage_error(action: str, path: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action} shard output {path!r}: {exc.strerror or exc}")


class _Preallocator:
    """Allocates a file's pages [start, size) in steps run in the thread
    pool, one at a time, at most `ahead_bytes` ahead of what was written
    (`wrote`), so it follows the writes instead of running in one burst.
    A hint only: it stops at the first error (a file system without
    fallocate, no space: the writes then allocate, or fail, on their own).
    """

    def __init__(self, fd: int, *, start: int, size_bytes: int, ahead_bytes: int) -> None:
        self._fd = fd
        self._size_bytes = size_bytes
        self._ahead_bytes = ahead_bytes
        self._target_bytes = min(size_bytes, start + ahead_bytes)
        self._stopped = False
        self._step: asyncio.Future[int] | None = None
        #: Where the allocated pages end (for tests and the bench).
        self.allocated_bytes = start
        self._next_step()

    def wrote(self, end: int) -> None:
        """The file now holds [0, end): allocate up to `ahead_bytes` past it."""
        self._target_bytes = max(self._target_bytes, min(self._size_bytes, end + self._ahead_bytes))
        self._next_step()

    def _next_step(self) -> None:
        if self._stopped or self._step is not None or self.allocated_bytes >= self._target_bytes:
            return
        assert _fallocate is not None
        length = min(PREALLOCATE_CHUNK_BYTES, self._size_bytes - self.allocated_bytes)
        step = asyncio.get_running_loop().run_in_executor(
            None, _fallocate, self._fd, _FALLOC_FL_KEEP_SIZE, self.allocated_bytes, length
        )
        step.add_done_callback(lambda done: self._stepped(done, length))
        self._step = step

    def _stepped(self, step: asyncio.Future[int], length: int) -> None:
        self._step = None
        if step.cancelled() or step.exception() is not None or step.result() != 0:
            log.debug("pre-allocating %d bytes stopped at %d", self._size_bytes, self.allocated_bytes)
            self._stopped = True
            return
        self.allocated_bytes += length
        self._next_step()

    def stop(self) -> asyncio.Future[int] | None:
        """Take no further step; the one still running, to await before the fd closes."""
        self._stopped = True
        return self._step


class PassthroughOutput(ShardOutput):
    """Writes the input unchanged to `output_path` (created or truncated).

    With `expected_bytes` (the size the output will probably have), the
    file's pages are allocated ahead of the writes (see the module comment);
    the output's bytes and size are the same either way.
    """

    def __init__(self, output_path: str | os.PathLike[str], *, expected_bytes: int | None = None) -> None:
        super().__init__()
        self._path = os.fspath(output_path)
        self._expected_bytes = expected_bytes
        self._file: BinaryIO | None = None
        self._preallocator: _Preallocator | None = None
        # The write running in a worker thread; an abort waits for it rather
        # than closing the file under its feet.
        self._pending_write: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._advance(State.NEW, State.RUNNING, "start")
        # Opened on the loop thread: an open abandoned in a worker thread by a
        # cancelled caller would leak its descriptor.
        try:
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed by finish() or aclose()
        except OSError as exc:
            self._state = State.CLOSED
            raise storage_error("open", self._path, exc) from exc

    @property
    def preallocated_bytes(self) -> int:
        """Where the pages allocated ahead of the writes end so far (0: none)."""
        return 0 if self._preallocator is None else self._preallocator.allocated_bytes

    async def write(self, data: bytes | bytearray | memoryview, *, checksum: Crc32c | None = None) -> None:
        """`ShardOutput.write`; with `checksum`, `data` is also added to it
        in the same hop to the thread pool, after the write: CRC32C releases
        the GIL, so it runs beside the event loop instead of on it."""
        self._require_running("write to")
        assert self._file is not None
        size = memoryview(data).nbytes
        if not size:
            return
        self._pending_write = asyncio.ensure_future(asyncio.to_thread(self._write, self._file, data, checksum))
        expected = self._expected_bytes or 0
        if self._preallocator is None and _fallocate is not None and expected >= PREALLOCATE_CHUNK_BYTES:
            # From the first write on, past its range: while the first GETs go
            # out and are answered, the CPU is theirs.
            self._preallocator = _Preallocator(
                self._file.fileno(),
                start=self.bytes_in + size,
                size_bytes=expected,
                ahead_bytes=PREALLOCATE_AHEAD_BYTES,
            )
        try:
            # Shielded: if we are cancelled the thread keeps writing anyway,
            # and `_abort()` waits for it.
            await asyncio.shield(self._pending_write)
        except OSError as exc:
            raise storage_error("write", self._path, exc) from exc
        self.bytes_in += size
        if self._preallocator is not None:
            self._preallocator.wrote(self.bytes_in)

    @staticmethod
    def _write(file: BinaryIO, data: bytes | bytearray | memoryview, checksum: Crc32c | None) -> None:
        file.write(data)
        if checksum is not None:
            checksum.update(data)

    async def finish(self) -> int:
        self._advance(State.RUNNING, State.FINISHING, "finish")
        assert self._file is not None
        try:
            await self._stop_preallocating()
            await asyncio.to_thread(self._close, self._file)
        except OSError as exc:
            await self.aclose()
            raise storage_error("write", self._path, exc) from exc
        except BaseException:
            await self.aclose()
            raise
        self._file = None
        self._state = State.FINISHED
        return self.bytes_in

    async def _stop_preallocating(self) -> None:
        step = None if self._preallocator is None else self._preallocator.stop()
        if step is not None:
            await asyncio.wait({step})  # its outcome is the step's own (`_stepped`)

    def _close(self, file: BinaryIO) -> None:
        """Flush and close; first free what was allocated past the end (thread pool)."""
        if self._preallocator is not None:
            file.flush()
            os.ftruncate(file.fileno(), self.bytes_in)
        file.close()

    async def _abort(self) -> None:
        await self._stop_preallocating()
        if self._pending_write is not None:
            await asyncio.wait({self._pending_write})
            if not self._pending_write.cancelled():
                # Mark any error retrieved: the writer has raised it already,
                # or was cancelled and no longer cares.
                self._pending_write.exception()
        if self._file is not None:
            file, self._file = self._file, None
            try:
                await asyncio.to_thread(file.close)
            except OSError as exc:
                log.warning("closing aborted output %s: %s", self._path, exc)
