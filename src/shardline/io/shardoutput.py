# A shard's output stage: where the bytes a worker emits go, and the one
# interface both kinds follow (`ShardOutput`: start, write with backpressure,
# finish, abort).  `PassthroughOutput` copies them unchanged into the output
# file, writing in a worker thread so a slow disk never stalls the event loop;
# `command.CommandOutput` feeds them to a shell command.

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import os
from types import TracebackType
from typing import BinaryIO, Self

from ..errors import StorageError

__all__ = ["PassthroughOutput", "ShardOutput", "State", "storage_error"]

log = logging.getLogger("shardline.io.shardoutput")


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


class PassthroughOutput(ShardOutput):
    """Writes the input unchanged to `output_path` (created or truncated)."""

    def __init__(self, output_path: str | os.PathLike[str]) -> None:
        super().__init__()
        self._path = os.fspath(output_path)
        self._file: BinaryIO | None = None
        # The write running in a worker thread; an abort waits for it rather
        # than closing the file under its feet.
        self._pending_write: asyncio.Future[int] | None = None

    async def start(self) -> None:
        self._advance(State.NEW, State.RUNNING, "start")
        # Opened on the loop thread: an open abandoned in a worker thread by a
        # cancelled caller would leak its descriptor.
        try:
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed by finish() or aclose()
        except OSError as exc:
            self._state = State.CLOSED
            raise storage_error("open", self._path, exc) from exc

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._require_running("write to")
        assert self._file is not None
        size = memoryview(data).nbytes
        if not size:
            return
        self._pending_write = asyncio.ensure_future(asyncio.to_thread(self._file.write, data))
        try:
            # Shielded: if we are cancelled the thread keeps writing anyway,
            # and `_abort()` waits for it.
            await asyncio.shield(self._pending_write)
        except OSError as exc:
            raise storage_error("write", self._path, exc) from exc
        self.bytes_in += size

    async def finish(self) -> int:
        self._advance(State.RUNNING, State.FINISHING, "finish")
        assert self._file is not None
        try:
            await asyncio.to_thread(self._file.close)  # flushes
        except OSError as exc:
            await self.aclose()
            raise storage_error("write", self._path, exc) from exc
        except BaseException:
            await self.aclose()
            raise
        self._file = None
        self._state = State.FINISHED
        return self.bytes_in

    async def _abort(self) -> None:
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
