# Runs one shard attempt end to end (DESIGN §3, §4).
#
# 1. Download [s_i - 1, s_{i+1}) with concurrent ranged GETs; the first bytes
#    settle h_i (HeadScanner).  Publish the boundary as a DynamoDB marker and
#    the head fragment [s_i, h_i) over the exchange, without waiting on either.
# 2. Stream [h_i, s_{i+1}) to the output (command stdin or passthrough file)
#    while the download continues.
# 3. Complete the tail [s_{i+1}, h_{i+1}) one neighbour at a time, preferring
#    a fragment already pushed over TCP, then the neighbour's marker plus one
#    exact ranged GET, then our own forward scan.  All three give the same
#    bytes because every read is pinned to the object's ETag.  A neighbour
#    with no line start extends the tail to the next neighbour.
# 4. Report DONE {emitted range, bytes, checksum, which tail paths were used;
#    for a remote output (Lambda), the uploaded object's checksum}.
#
# Alongside, a heartbeat sends PROGRESS every second, reconnects a lost
# exchange session (rate-limited), and ends the attempt at once with
# StaleAttemptError when the coordinator fences it: a superseded attempt
# should stop spending S3 reads and command time, and must not report DONE.

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from ..errors import (
    ConfigurationError,
    ExchangeUnavailable,
    InputError,
    LineTooLongError,
    MarkerConflictError,
    ShardlineError,
    StaleAttemptError,
    TimeBudgetError,
)
from ..io.aws import AwsSettings, ClientPool
from ..io.checksum import Crc32c, file_checksum
from ..io.command import CommandOutput
from ..io.retry import RetryPolicy
from ..io.s3bucket import S3Bucket
from ..io.shardoutput import PassthroughOutput, ShardOutput
from ..io.sources import LocalFileSource, ObjectSource, open_source
from ..io.stderrlines import TaggedLines, attempt_route, shard_tag
from ..io.store import MarkerStore, open_marker_store
from ..io.urls import is_s3_url
from ..protocol import (
    COMPRESSION_MAGIC_BYTES,
    Boundary,
    Done,
    Failed,
    Head,
    HeadScanner,
    LineLengthGuard,
    Marker,
    Progress,
    ShardRange,
    ShardTask,
    TailSource,
    attempt_output_name,
    compressed_input_message,
    compression_format,
)
from ._exchange import ExchangeClient, client_tls_context
from ._reader import RangedReader, ReaderSettings, fetch_range

__all__ = ["ShardResult", "WorkerSettings", "run_task"]

log = logging.getLogger("shardline.worker.shard")

#: A local file's range goes to the command in chunks of this size (each
#: checksummed, then spliced into the pipe).
_FILE_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """Worker tuning that does not travel in the task."""

    #: Head fragments up to this size travel over TCP; larger ones are
    #: announced without data and the neighbour reads them from the object.
    fragment_push_limit_bytes: int = 1024 * 1024
    heartbeat_interval_s: float = 1.0
    #: Least time between two reconnects of a lost exchange session by the
    #: heartbeat; well below the coordinator's heartbeat deadline (30 s).
    reconnect_interval_s: float = 5.0
    #: How long the tail waits for the exchange to answer an outstanding WANT.
    want_answer_timeout_s: float = 2.0
    #: How long the final report (DONE or FAILED) may take in all, reconnecting
    #: with backoff as often as it needs to.
    report_timeout_s: float = 30.0
    #: A forward scan starts with this many bytes and doubles up to a part.
    scan_initial_bytes: int = 64 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stderr_tail_bytes: int = 8192
    #: Put each attempt's route ahead of its tagged stderr lines: a pool
    #: process's attempts share one stderr, which the backend splits by route.
    route_stderr: bool = False
    #: Wait for a command's exec in a thread (io/child.py's `spawn_soon`): right
    #: where one loop runs many shards; a pool process, running a few, saves CPU
    #: by waiting on its loop.
    spawn_off_loop: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardResult:
    boundary: Boundary
    emitted_end: int
    checksum: str
    output_bytes: int
    tail_sources: tuple[str, ...]
    committed: bool | None  # None when run without an exchange

    @property
    def emitted_start(self) -> int:
        """h_i; an empty range at s_{i+1} when no line starts in the shard."""
        return self.boundary.head_end

    @property
    def bytes(self) -> int:
        return self.emitted_end - self.emitted_start


async def run_task(
    task: ShardTask,
    *,
    settings: WorkerSettings | None = None,
    time_budget_s: float | None = None,
    clients: ClientPool | None = None,
) -> ShardResult:
    """Run one shard attempt described by `task`; raises ShardlineError on failure.

    The failure is also reported to the exchange (FAILED) when there is one.
    With `time_budget_s`, the shard's work (download, command, upload) stops
    after that many seconds with TimeBudgetError, reported like any failure,
    so a runtime with a hard limit (Lambda) says why before it is killed.
    `clients` are the S3 and DynamoDB clients of the process, shared by
    every shard it runs and left open; without it the attempt makes its own.
    """
    settings = settings or WorkerSettings()
    aws = AwsSettings.from_dict(task.aws)
    exchange: ExchangeClient | None = None
    async with AsyncExitStack() as stack:
        if clients is None:
            clients = await stack.enter_async_context(ClientPool())
        if task.exchange_host is not None and task.exchange_port is not None:
            exchange = ExchangeClient(
                host=task.exchange_host,
                port=task.exchange_port,
                job_id=task.job_id,
                shard=task.shard,
                attempt=task.attempt,
                secret=task.secret,
                tls=client_tls_context(task.exchange_ca) if task.exchange_tls else None,
            )
            stack.push_async_callback(exchange.aclose)
            # The handshake only saves work: the first GET does not wait for it.
            exchange.connect_soon()
        try:
            source = await stack.enter_async_context(open_source(task.source, aws, clients=clients))
            markers = await stack.enter_async_context(
                open_marker_store(task.markers, aws=aws, retry_policy=settings.retry, clients=clients)
            )
            upload_to: tuple[S3Bucket, str] | None = None
            output_path = task.output_path
            if is_s3_url(task.output_path):
                # A remote worker: write locally (Lambda's /tmp), upload before DONE.
                bucket, key = S3Bucket.for_url(task.output_path, aws=aws, retry_policy=settings.retry, clients=clients)
                stack.push_async_callback(bucket.aclose)
                upload_to = bucket, key
                output_path = _local_output_path(task)
                stack.callback(_remove_quietly, output_path)
            output = _make_output(task, output_path, settings)
            stack.push_async_callback(output.aclose)
            run = _ShardRun(
                task=task,
                settings=settings,
                source=source,
                markers=markers,
                exchange=exchange,
                output=output,
            )
            budget = asyncio.timeout(time_budget_s)
            output_checksum: str | None = None
            try:
                async with budget:
                    result = await run.execute()
                    if upload_to is not None:
                        # The coordinator never reads a remote output it need not
                        # (an S3 destination copies it server-side): the manifest's
                        # checksum comes from here.
                        output_checksum = await file_checksum(output_path)
                        bucket, key = upload_to
                        await bucket.upload_file(key, output_path)
            except TimeoutError:
                if not budget.expired():
                    raise
                raise TimeBudgetError(
                    f"shard {task.shard} attempt {task.attempt} ran out of its {time_budget_s:.0f}s time budget"
                ) from None
        except ShardlineError as exc:
            if exchange is not None:
                failed = Failed(kind=type(exc).__name__, message=str(exc), retryable=is_retryable(exc))
                with contextlib.suppress(ExchangeUnavailable, StaleAttemptError):
                    await exchange.report(failed, timeout_s=settings.report_timeout_s)
            raise
        if exchange is None:
            return result
        ack = await exchange.report(
            Done(
                emitted_start=result.emitted_start,
                emitted_end=result.emitted_end,
                line_start=result.boundary.line_start,
                bytes=result.bytes,
                checksum=result.checksum,
                output_bytes=result.output_bytes,
                tail_sources=list(result.tail_sources),
                output_checksum=output_checksum,
            ),
            timeout_s=settings.report_timeout_s,
        )
        return dataclasses.replace(result, committed=ack.committed)


#: Failures that another attempt would meet again (or that must not be
#: retried at all: a fenced attempt's shard is someone else's now).
_FINAL_ERRORS = (InputError, ConfigurationError, MarkerConflictError, StaleAttemptError)


#: The most a header (--header N) may hold: every shard keeps it in memory.
_MAX_HEADER_BYTES = 16 * 1024 * 1024


def is_retryable(exc: ShardlineError) -> bool:
    """Whether the coordinator may retry the shard after `exc` (commands, storage: yes)."""
    return not isinstance(exc, _FINAL_ERRORS)


def _local_output_path(task: ShardTask) -> str:
    name = f"shardline-{task.job_id}-{attempt_output_name(task.shard, task.attempt)}"
    return os.path.join(tempfile.gettempdir(), name)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _make_output(task: ShardTask, output_path: str, settings: WorkerSettings) -> ShardOutput:
    if task.command is None:
        # The output is about the shard's range: its pages are allocated ahead of the writes.
        return PassthroughOutput(output_path, expected_bytes=task.range.end - task.range.start)
    env = {
        "SHARDLINE_JOB_ID": task.job_id,
        "SHARDLINE_SHARD": str(task.shard),
        "SHARDLINE_SHARDS": str(task.shards),
        "SHARDLINE_ATTEMPT": str(task.attempt),
    }
    stderr = getattr(sys.stderr, "buffer", None)
    tag = shard_tag(task.shard)
    if settings.route_stderr:
        tag = attempt_route(task.job_id, task.shard, task.attempt) + tag
    return CommandOutput(
        task.command,
        output_path,
        env=env,
        drop_env=task.command_env_drop,
        stderr_tail_bytes=settings.stderr_tail_bytes,
        # Our stderr: the user's terminal (in-process workers), or a pipe a
        # local backend passes on (embedded runs) or keeps the tail of (a daemon).
        forward_stderr=TaggedLines(stderr, tag) if stderr is not None else None,
        ok_exit=task.ok_exit,
        spawn_off_loop=settings.spawn_off_loop,
    )


class _ShardRun:
    def __init__(
        self,
        *,
        task: ShardTask,
        settings: WorkerSettings,
        source: ObjectSource,
        markers: MarkerStore,
        exchange: ExchangeClient | None,
        output: ShardOutput,
    ) -> None:
        self.task = task
        self.settings = settings
        self.source = source
        self.markers = markers
        self.exchange = exchange
        self.output = output
        self.shard = task.range
        self.reader_settings = ReaderSettings(
            part_size_bytes=task.part_size_bytes, max_in_flight_bytes=task.max_in_flight_bytes, retry=settings.retry
        )
        self.emitted = 0
        self.crc = Crc32c()
        self.guard: LineLengthGuard | None = None
        #: The object's first `task.header_lines` lines (--header); shard 0 reads them as its own.
        self.header = b""

    async def execute(self) -> ShardResult:
        if self.task.header_lines and self.shard.index > 0:
            self.header = await self._read_header()
        await self.output.start()
        if self.exchange is None:
            return await self._work()
        if not self.shard.is_last:
            await self.exchange.want(self.shard.index + 1)
        work = asyncio.ensure_future(self._work())
        heartbeat = asyncio.ensure_future(self._heartbeat(self.exchange))
        try:
            # The heartbeat ends only by raising (fenced): that stops the work.
            await asyncio.wait({work, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            heartbeat.cancel()
            await asyncio.wait({work, heartbeat})
        if work.cancelled():
            heartbeat.result()
        return work.result()

    async def _work(self) -> ShardResult:
        boundary, publish = await self._stream_own_range()
        tail_sources: tuple[str, ...] = ()
        if boundary.line_start:
            tail_sources = await self._complete_tail()
            if self.guard is not None:
                self.guard.finish()
        await publish
        output_bytes = await self.output.finish()
        result = ShardResult(
            boundary=boundary,
            emitted_end=boundary.head_end + self.emitted,
            checksum=self.crc.hexdigest(),
            output_bytes=output_bytes,
            tail_sources=tail_sources,
            committed=None,
        )
        log.info(
            "shard %d attempt %d: emitted [%d, %d) %d bytes, tail via %s",
            self.shard.index,
            self.task.attempt,
            result.emitted_start,
            result.emitted_end,
            result.bytes,
            ",".join(tail_sources) or "-",
        )
        return result

    # -- step 1 and 2: our own range -------------------------------------------

    def _by_file(self) -> bool:
        """Whether our range goes from the file to the command without Python
        buffers: a local file into a command's stdin, no line-length guard."""
        return (
            isinstance(self.source, LocalFileSource)
            and isinstance(self.output, CommandOutput)
            and self.task.max_line_bytes is None
        )

    async def _stream_own_range(self) -> tuple[Boundary, asyncio.Future[None]]:
        """Download our range, settle h_i, publish it, and emit [h_i, s_{i+1})."""
        if self._by_file():
            return await self._stream_own_range_by_file()
        shard = self.shard
        scanner = HeadScanner(shard, self.task.delimiter, max_line_bytes=self.task.max_line_bytes)
        boundary = scanner.result
        if boundary is not None and not boundary.line_start:
            return boundary, asyncio.ensure_future(self._publish(boundary, b""))  # empty range
        head = bytearray()  # [s_i, ...) while it fits the push limit
        head_fits = True
        publish: asyncio.Future[None] | None = None
        if boundary is not None:  # shard 0: h_0 = 0, nothing to scan
            await self._start_emitting(boundary.head_end)
            publish = asyncio.ensure_future(self._publish(boundary, b""))
        position = shard.fetch_start
        reader_settings = self.reader_settings
        if boundary is None:  # h_i is near s_i: a small first GET publishes it sooner
            first_part_bytes = min(self.settings.scan_initial_bytes, reader_settings.part_size_bytes)
            reader_settings = dataclasses.replace(reader_settings, first_part_bytes=first_part_bytes)
        try:
            async with RangedReader(
                self.source, start=shard.fetch_start, end=shard.end, etag=self.task.etag, settings=reader_settings
            ) as reader:
                async for chunk in reader:
                    chunk_start, position = position, position + len(chunk)
                    if chunk_start == 0 and self.task.shards > 1:
                        self._refuse_compressed(chunk)
                    if boundary is None:
                        decision = scanner.feed(chunk)
                        if isinstance(decision, Boundary):
                            boundary = decision
                    # Collect head-fragment bytes until the fragment is complete.
                    if publish is None:
                        head_end = boundary.head_end if boundary is not None else position
                        low, high = max(chunk_start, shard.start), min(position, head_end)
                        if high > low and head_fits:
                            if len(head) + (high - low) <= self.settings.fragment_push_limit_bytes:
                                head += chunk[low - chunk_start : high - chunk_start]
                            else:
                                head_fits, head = False, bytearray()
                        if boundary is not None and position >= boundary.head_end:
                            publish = asyncio.ensure_future(self._publish(boundary, bytes(head) if head_fits else None))
                            if boundary.line_start:
                                await self._start_emitting(boundary.head_end)
                                await self._emit(chunk, boundary.head_end - chunk_start)
                        continue
                    if boundary is not None and boundary.line_start:
                        await self._emit(chunk)
        except LineTooLongError as exc:
            if publish is not None:
                publish.cancel()
            if not exc.starts_earlier:
                raise
            # Name the line by its start, as the shard emitting it would have.
            raise LineTooLongError(offset=await self._line_start_before(exc.offset), limit=exc.limit) from None
        except BaseException:
            if publish is not None:
                publish.cancel()
            raise
        assert boundary is not None and publish is not None, "the scanner decides by the end of the range"
        return boundary, publish

    async def _stream_own_range_by_file(self) -> tuple[Boundary, asyncio.Future[None]]:
        """`_stream_own_range` for a local file into a command: h_i from
        growing exact reads (the head is usually found in the first window),
        then [h_i, s_{i+1}) by `_emit_file_range`."""
        shard = self.shard
        if shard.fetch_start == 0 and self.task.shards > 1:
            first_end = min(shard.end, COMPRESSION_MAGIC_BYTES)
            self._refuse_compressed(
                await fetch_range(self.source, 0, first_end, etag=self.task.etag, retry=self.settings.retry)
            )
        scanner = HeadScanner(shard, self.task.delimiter, max_line_bytes=self.task.max_line_bytes)
        boundary = scanner.result
        fragment: bytes | None = b""
        if boundary is None:
            head = bytearray()  # [s_i, ...) while it fits the push limit
            position, window = shard.fetch_start, self.settings.scan_initial_bytes
            while boundary is None or position < boundary.head_end:
                end = min(shard.end, position + window)
                if boundary is not None:  # decided one byte early: the fragment runs to its end
                    end = boundary.head_end
                data = await fetch_range(self.source, position, end, etag=self.task.etag, retry=self.settings.retry)
                if boundary is None:
                    decision = scanner.feed(data)
                    if isinstance(decision, Boundary):
                        boundary = decision
                head_end = boundary.head_end if boundary is not None else end
                low, high = max(position, shard.start), min(end, head_end)
                if high > low and fragment is not None:
                    if len(head) + (high - low) <= self.settings.fragment_push_limit_bytes:
                        head += data[low - position : high - position]
                    else:
                        fragment, head = None, bytearray()
                position = end
                window = min(window * 2, self.task.part_size_bytes)
            if fragment is not None:
                fragment = bytes(head)
        publish = asyncio.ensure_future(self._publish(boundary, fragment))
        try:
            if boundary.line_start:
                await self._start_emitting(boundary.head_end)
                await self._emit_file_range(boundary.head_end, shard.end)
        except BaseException:
            publish.cancel()
            raise
        return boundary, publish

    async def _emit_file_range(self, start: int, end: int) -> None:
        """Emit bytes [start, end) of the local file: each chunk is read once
        into one reused buffer and checksummed there, off the event loop
        (`LocalFileSource.read_checksummed`), and reaches the command's stdin
        by a kernel-side copy (`CommandOutput.write_file_range`), not through
        that buffer.  So the next chunk is read while this one is spliced,
        and the command never waits on a read."""
        source, output = self.source, self.output
        assert isinstance(source, LocalFileSource) and isinstance(output, CommandOutput)
        descriptor = source.descriptor()
        buffer = memoryview(bytearray(min(_FILE_CHUNK_BYTES, max(end - start, 0))))

        def read(position: int) -> asyncio.Future[None] | None:
            if position >= end:
                return None
            chunk = buffer[: min(len(buffer), end - position)]
            return asyncio.ensure_future(source.read_checksummed(position, chunk, etag=self.task.etag, crc=self.crc))

        position = start
        reading = read(position)
        try:
            while reading is not None:
                count = min(len(buffer), end - position)
                await reading
                # The next read starts once this one ended: chunks are checksummed in order.
                reading = read(position + count)
                await output.write_file_range(descriptor, position, count)
                # What went into the pipe is what was checksummed: the same version.
                source.check_version(self.task.etag)
                self.emitted += count
                position += count
        finally:
            if reading is not None:
                reading.cancel()
                await asyncio.wait({reading})
                if not reading.cancelled():
                    reading.exception()  # retrieved: the failure that matters is already raising

    def _refuse_compressed(self, first: bytes | memoryview) -> None:
        """Shard 0 sees the object's first bytes: a compressed stream cannot be cut into byte ranges."""
        name = compression_format(bytes(first[:COMPRESSION_MAGIC_BYTES]))
        if name is not None:
            raise InputError(compressed_input_message(self.task.source, name))

    async def _start_emitting(self, start: int) -> None:
        if self.task.max_line_bytes is not None:
            self.guard = LineLengthGuard(self.task.delimiter, self.task.max_line_bytes, start=start)
        # The header goes to the command ahead of our lines, but it is not ours:
        # neither counted as emitted nor checksummed (shard 0 emits it).  A shard
        # starting inside the header gets the header lines before its start.
        await self.output.write(self.header[:start])

    async def _line_start_before(self, offset: int) -> int:
        """Where the line holding `offset` starts: after the last delimiter before it (or 0)."""
        end = offset
        while end > 0:
            start = max(0, end - self.settings.scan_initial_bytes)
            data = await fetch_range(self.source, start, end, etag=self.task.etag, retry=self.settings.retry)
            found = data.rfind(self.task.delimiter)
            if found >= 0:
                return start + found + 1
            end = start
        return 0

    async def _read_header(self) -> bytes:
        """The object's first `header_lines` lines (fewer if it has fewer), read with doubling ranges."""
        wanted, delimiter, size = self.task.header_lines, self.task.delimiter, self.task.size
        length = self.settings.scan_initial_bytes
        while True:
            data = await fetch_range(self.source, 0, min(length, size), etag=self.task.etag, retry=self.settings.retry)
            end = 0
            for _ in range(wanted):
                found = data.find(delimiter, end)
                if found < 0:
                    break
                end = found + len(delimiter)
            else:
                return data[:end]
            if len(data) == size:
                return data  # fewer lines than asked for: all of it is header
            if length >= _MAX_HEADER_BYTES:
                raise InputError(
                    f"--header {wanted}: the first {wanted} lines are longer than {_MAX_HEADER_BYTES} bytes"
                )
            length *= 2

    async def _emit(self, data: bytes | memoryview, start: int = 0, end: int | None = None) -> None:
        """Emit ``data[start:end]``; the bounds spare the line-length guard a copy of a slice."""
        stop = len(data) if end is None else end
        if stop <= start:
            return
        if self.guard is not None:
            self.guard.feed(data, start, stop)
        view = memoryview(data)[start:stop] if (start, stop) != (0, len(data)) else data
        self.emitted += stop - start
        if isinstance(self.output, PassthroughOutput):
            # Checksummed in the write's thread, off the event loop.
            await self.output.write(view, checksum=self.crc)
            return
        self._checksum(view)
        await self.output.write(view)

    def _checksum(self, data: bytes | memoryview) -> None:
        """Add emitted bytes to the shard's checksum (a passthrough output adds
        them as it writes them, a local file's range into a command where it
        reads them: `_emit_file_range`)."""
        self.crc.update(data)

    async def _publish(self, boundary: Boundary, fragment: bytes | None) -> None:
        """Head fragment to the exchange and marker to DynamoDB."""
        marker = Marker(
            job_id=self.task.job_id,
            shard=self.shard.index,
            attempt=self.task.attempt,
            boundary=boundary,
            etag=self.task.etag,
        )
        if self.exchange is not None:
            # Written at once (the exchange relays it to the neighbour that wants it), then the marker.
            self.exchange.publish_head(
                Head(
                    shard=self.shard.index,
                    start=boundary.start,
                    head_end=boundary.head_end,
                    line_start=boundary.line_start,
                    has_data=fragment is not None,
                    data=fragment or b"",
                )
            )
        await self.markers.publish(marker)

    # -- step 3: the tail --------------------------------------------------------

    async def _complete_tail(self) -> tuple[str, ...]:
        sources: list[str] = []
        for index in range(self.shard.index + 1, self.task.shards):
            boundary, how = await self._neighbour_head(self.task.neighbour_range(index))
            sources.append(how)
            if boundary.line_start:
                break
        return tuple(sources)

    async def _neighbour_head(self, neighbour: ShardRange) -> tuple[Boundary, str]:
        """Emit neighbour's head fragment [s_j, h_j) and return its boundary."""
        pushed = None
        if self.exchange is not None:
            pushed = await self.exchange.fragment(neighbour.index, answer_timeout_s=self.settings.want_answer_timeout_s)
        if pushed is not None:
            boundary = Boundary(start=pushed.start, head_end=pushed.head_end, line_start=pushed.line_start)
            self._check_neighbour(neighbour, boundary, "pushed fragment")
            if pushed.has_data:
                await self._emit(pushed.data)
                return boundary, TailSource.PUSHED
            await self._emit_range(neighbour.start, boundary.head_end)
            return boundary, TailSource.MARKER
        marker = await self.markers.lookup(self.task.job_id, neighbour.index)
        if marker is not None:
            if marker.etag != self.task.etag:
                raise MarkerConflictError(
                    f"marker of shard {neighbour.index} is pinned to etag {marker.etag}, this job to {self.task.etag}"
                )
            self._check_neighbour(neighbour, marker.boundary, "marker")
            await self._emit_range(neighbour.start, marker.boundary.head_end)
            return marker.boundary, TailSource.MARKER
        return await self._scan_head(neighbour), TailSource.SCAN

    def _check_neighbour(self, neighbour: ShardRange, boundary: Boundary, what: str) -> None:
        expected_end = boundary.head_end if boundary.line_start else neighbour.end
        if (
            boundary.start != neighbour.start
            or not neighbour.start <= boundary.head_end <= neighbour.end
            or (boundary.head_end != expected_end)
        ):
            raise MarkerConflictError(
                f"{what} of shard {neighbour.index} says {boundary}, outside its range "
                f"[{neighbour.start}, {neighbour.end})"
            )
        if boundary.line_start and boundary.head_end == neighbour.end:
            raise MarkerConflictError(f"{what} of shard {neighbour.index} puts a line start at its range end")

    async def _emit_range(self, start: int, end: int) -> None:
        if end <= start:
            return
        async with RangedReader(
            self.source, start=start, end=end, etag=self.task.etag, settings=self.reader_settings
        ) as reader:
            async for chunk in reader:
                await self._emit(chunk)

    async def _scan_head(self, neighbour: ShardRange) -> Boundary:
        """Find h_j ourselves with growing exact reads, emitting [s_j, h_j) as we go."""
        scanner = HeadScanner(neighbour, self.task.delimiter, max_line_bytes=self.task.max_line_bytes)
        if scanner.result is not None:
            boundary = scanner.result
            await self._emit_range(neighbour.start, boundary.head_end)
            return boundary
        position = neighbour.fetch_start
        window = self.settings.scan_initial_bytes
        while True:
            end = min(neighbour.end, position + window)
            data = await fetch_range(self.source, position, end, etag=self.task.etag, retry=self.settings.retry)
            decision = scanner.feed(data)
            decided = decision if isinstance(decision, Boundary) else None
            stop = end if decided is None else min(end, decided.head_end)
            low = max(position, neighbour.start)
            if stop > low:
                await self._emit(data, low - position, stop - position)
            if decided is not None:
                # The scanner can decide "no line start" one byte before the
                # range ends; the fragment still runs to the end.
                await self._emit_range(max(end, neighbour.start), decided.head_end)
                return decided
            position = end
            window = min(window * 2, self.task.part_size_bytes)

    async def _heartbeat(self, exchange: ExchangeClient) -> None:
        """PROGRESS every interval, reconnecting a lost session; raises StaleAttemptError once fenced."""
        loop = asyncio.get_running_loop()
        reconnect_at = loop.time() + self.settings.reconnect_interval_s
        while not await exchange.wait_fenced(self.settings.heartbeat_interval_s):
            if exchange.rejection is not None:
                continue  # refused for another reason: this attempt has nothing more to say
            if not exchange.connected and not exchange.connecting and loop.time() >= reconnect_at:
                # Without this, a transient drop would let the coordinator's
                # heartbeat deadline kill a healthy worker.
                reconnect_at = loop.time() + self.settings.reconnect_interval_s
                try:
                    await exchange.connect()
                except ExchangeUnavailable as exc:
                    log.info("shard %d: reconnecting to the exchange failed: %s", self.shard.index, exc)
            if exchange.connected:
                await exchange.send(Progress(bytes_emitted=self.emitted))
        raise StaleAttemptError(
            f"shard {self.shard.index} attempt {self.task.attempt} was fenced by the coordinator: {exchange.rejection}"
        )
