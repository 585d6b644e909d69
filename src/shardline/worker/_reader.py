# The bounded, concurrent, resuming ranged reader (DESIGN §4).
#
# [start, end) is cut into parts of `part_size_bytes`, the first of them
# optionally smaller and alone in flight (`first_part_bytes`: a worker looking
# for its first line start wants a few KiB soon, not a whole part later, and
# the rest of its range not competing with them).  Each part's memory is
# reserved from a byte budget *before* its GET is issued, and the GET is read
# completely into that memory, so a slow consumer stops new GETs instead of
# leaving a connection idle until S3 drops it.  Parts may complete in any
# order; they are yielded strictly in order.
#
# The budget needs no lock or condition: memory is only ever released in
# `__anext__` (the consumer is done with the previous part) or `aclose`, so
# `__anext__` releases, then issues every part that now fits, then awaits the
# next part in order: decide synchronously, then await.
#
# Part buffers are reused within a reader: a released full-size buffer goes
# to the next part instead of a new one.  A new 8 MiB bytearray is zeroed
# page by page, and those page faults cost ~0.7 ms per 8 MiB on an idle core
# and 8-25 ms on a loaded VM, more than the copy into it; reused, a buffer's
# pages are already there.  The
# memory bound is unchanged: a buffer moves from a released part to a new one.
# Each buffer is made (or taken) by its part's own task, so the first GET
# goes out before the memory of the later parts has been touched.  A reader
# that ends leaves its spare buffers to the process (`_ProcessSpares`, at most
# one default budget's worth), so the next shard this process runs starts
# with warm buffers too.  Only buffers whose part was consumed and released
# are ever reused: a cancelled part's buffer may still be written by a
# thread (a local file's pread), a consumed part's may still be read.
#
# Each request goes through `shardline.io.retry.retry`; a request that failed
# after k bytes is resumed at start + k (the source reports k through its
# `on_bytes` callback), so no byte is fetched twice by this reader.

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

from ..errors import ConfigurationError
from ..io.aio import wait_uncancellable
from ..io.retry import RetryPolicy
from ..io.retry import retry as with_retries
from ..io.sources import ObjectSource
from ..protocol import DEFAULT_MAX_IN_FLIGHT_BYTES, DEFAULT_PART_SIZE_BYTES

__all__ = [
    "RangedReader",
    "ReaderSettings",
    "ReaderStats",
    "fetch_range",
]

log = logging.getLogger("shardline.worker.reader")

#: Names of part tasks start with this, so leaks are easy to spot.
TASK_NAME_PREFIX = "shardline-reader-part"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReaderSettings:
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    #: Size of the range's first part, if smaller than the others; it is then
    #: issued alone, the others once the consumer asks for the next part.
    first_part_bytes: int | None = None
    #: Memory reserved for parts issued but not yet released by the consumer.
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES
    #: Caps concurrent GETs when parts are small relative to the budget.
    max_concurrent_requests: int = 16
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if self.part_size_bytes < 1:
            raise ConfigurationError(f"part_size_bytes must be >= 1, got {self.part_size_bytes}")
        if self.first_part_bytes is not None and not 1 <= self.first_part_bytes <= self.part_size_bytes:
            raise ConfigurationError(
                f"first_part_bytes must be between 1 and part_size_bytes ({self.part_size_bytes}),"
                f" got {self.first_part_bytes}"
            )
        if self.max_in_flight_bytes < self.part_size_bytes:
            raise ConfigurationError(
                f"max_in_flight_bytes ({self.max_in_flight_bytes}) must be >= "
                f"part_size_bytes ({self.part_size_bytes}): a part must fit in the budget"
            )
        if self.max_concurrent_requests < 1:
            raise ConfigurationError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.retry.attempts < 1:
            raise ConfigurationError(f"retry.attempts must be >= 1, got {self.retry.attempts}")


@dataclass(slots=True, kw_only=True)
class ReaderStats:
    """Counters for tests and progress reports."""

    #: Requests issued, resumptions and retries included.
    requests: int = 0
    #: Requests that failed with a retryable error and were tried again.
    retries: int = 0
    #: Bytes received into part buffers; equals the range length on success.
    bytes_fetched: int = 0
    #: High-water mark of reserved part memory; never above max_in_flight_bytes.
    max_reserved_bytes: int = 0


def _check_bounds(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end})")


async def _read_exact(
    source: ObjectSource,
    start: int,
    view: memoryview,
    *,
    etag: str,
    policy: RetryPolicy,
    stats: ReaderStats,
) -> None:
    """Fill `view` with [start, start + len(view)), resuming after each failure.

    `policy.attempts` bounds the requests for this one range, resumptions
    included.
    """
    received = 0

    def on_bytes(count: int) -> None:
        nonlocal received
        received += count
        stats.bytes_fetched += count

    async def attempt() -> None:
        stats.requests += 1
        await source.read_into(start + received, view[received:], etag=etag, on_bytes=on_bytes)

    def on_retry(_exc: Exception) -> None:
        stats.retries += 1

    if not view:
        return
    await with_retries(
        attempt,
        policy=policy,
        describe=f"{source.description} bytes [{start}, {start + len(view)})",
        on_retry=on_retry,
    )


async def fetch_range(
    source: ObjectSource,
    start: int,
    end: int,
    *,
    etag: str,
    retry: RetryPolicy,
) -> bytes:
    """Bytes [start, end) of version `etag`, with the reader's retry and resume.

    Meant for small exact reads (a neighbour's head fragment); the whole range
    is held in memory.
    """
    _check_bounds(start, end)
    buffer = bytearray(end - start)
    await _read_exact(source, start, memoryview(buffer), etag=etag, policy=retry, stats=ReaderStats())
    return bytes(buffer)


class _ProcessSpares:
    """Released part buffers that outlive their reader, for later readers of
    this process; holds at most `max_bytes`.  Thread-safe (each event loop
    of a process may run readers)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._buffers: list[bytearray] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray | None:
        with self._lock:
            for index, buffer in enumerate(self._buffers):
                if len(buffer) == size:
                    self._bytes -= size
                    return self._buffers.pop(index)
        return None

    def give(self, buffers: list[bytearray]) -> None:
        with self._lock:
            for buffer in buffers:
                if self._bytes + len(buffer) <= self._max_bytes:
                    self._buffers.append(buffer)
                    self._bytes += len(buffer)


_PROCESS_SPARES = _ProcessSpares(DEFAULT_MAX_IN_FLIGHT_BYTES)


@dataclass(slots=True, kw_only=True)
class _Part:
    start: int
    size: int
    #: Set by the part's task before its first request.
    buffer: bytearray | None = None
    task: asyncio.Task[None] | None = None


class RangedReader:
    """Yields consecutive memoryviews covering [start, end) exactly, in order.

    Use as ``async with RangedReader(...) as reader: async for chunk in
    reader``.  A yielded view stays valid until the consumer asks for the next
    one; its memory then returns to the budget and the buffer may be filled
    with a later part, so a consumer that needs bytes longer must copy them
    (as `ShardOutput.write` lets its caller reuse a buffer).  The reader
    does not own `source`.  On any error from iteration the reader closes
    itself before re-raising; leaving the `async with` block early cancels
    and awaits in-flight requests.
    """

    def __init__(
        self,
        source: ObjectSource,
        *,
        start: int,
        end: int,
        etag: str,
        settings: ReaderSettings,
    ) -> None:
        _check_bounds(start, end)
        self.source = source
        self.start = start
        self.end = end
        self.etag = etag
        self.settings = settings
        self.stats = ReaderStats()
        self._next_start = start
        self._pending: deque[_Part] = deque()
        self._consumed: _Part | None = None
        #: Released full-size part buffers, for the next parts to fill.
        self._spare: list[bytearray] = []
        self._reserved_bytes = 0
        self._closed = False

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self

    async def __anext__(self) -> memoryview:
        if self._closed:
            raise StopAsyncIteration
        self._release_consumed()
        self._issue_parts()
        if not self._pending:
            self._closed = True
            raise StopAsyncIteration
        try:
            part = await self._next_part()
        except BaseException:
            await self.aclose()
            raise
        self._consumed = self._pending.popleft()  # == part
        assert part.buffer is not None
        return memoryview(part.buffer)

    def _release_consumed(self) -> None:
        if self._consumed is not None:
            self._reserved_bytes -= self._consumed.size
            if self._consumed.size == self.settings.part_size_bytes and self._consumed.buffer is not None:
                self._spare.append(self._consumed.buffer)
            self._consumed = None

    def _issue_parts(self) -> None:
        """Reserve memory for, and start, every next part that fits the budget."""
        settings = self.settings
        while self._next_start < self.end and len(self._pending) < settings.max_concurrent_requests:
            first_part_bytes = settings.first_part_bytes if self._next_start == self.start else None
            first_alone = first_part_bytes is not None
            size = min(first_part_bytes or settings.part_size_bytes, self.end - self._next_start)
            if self._reserved_bytes + size > settings.max_in_flight_bytes:
                break
            self._reserved_bytes += size
            self.stats.max_reserved_bytes = max(self.stats.max_reserved_bytes, self._reserved_bytes)
            part = _Part(start=self._next_start, size=size)
            spare = None
            if size == settings.part_size_bytes:
                spare = self._spare.pop() if self._spare else _PROCESS_SPARES.take(size)
            part.task = asyncio.create_task(
                self._fill(part, spare),
                name=f"{TASK_NAME_PREFIX} {self.source.description} [{part.start}, {part.start + size})",
            )
            self._pending.append(part)
            self._next_start += size
            log.debug(
                "%s: part [%d, %d) issued, %d bytes reserved",
                self.source.description,
                part.start,
                part.start + size,
                self._reserved_bytes,
            )
            if first_alone:
                break  # the rest once it is in: nothing competes with it for the connection or the loop

    async def _fill(self, part: _Part, spare: bytearray | None) -> None:
        """Read `part` into `spare`, or into a new buffer made here in its own task."""
        part.buffer = bytearray(part.size) if spare is None else spare
        await _read_exact(
            self.source,
            part.start,
            memoryview(part.buffer),
            etag=self.etag,
            policy=self.settings.retry,
            stats=self.stats,
        )

    async def _next_part(self) -> _Part:
        """Wait for the first pending part; fail as soon as any pending part fails."""
        head = self._pending[0]
        assert head.task is not None
        while not head.task.done():
            running = [part.task for part in self._pending if part.task is not None and not part.task.done()]
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for part in self._pending:
                task = part.task
                if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                    task.result()  # raises: a later part's error dooms the range too
        head.task.result()
        return head

    async def aclose(self) -> None:
        """Cancel and await in-flight requests and release all part memory."""
        self._closed = True
        self._consumed = None
        _PROCESS_SPARES.give(self._spare)
        self._spare = []
        tasks = [part.task for part in self._pending if part.task is not None]
        self._pending.clear()
        self._reserved_bytes = 0
        for task in tasks:
            task.cancel()
        if tasks:
            await wait_uncancellable(asyncio.gather(*tasks, return_exceptions=True))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
