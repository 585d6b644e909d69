# One job from plan to verified, ordered output (DESIGN §1, §2).
#
# The coordinator stats the object once (size and ETag pin every later read),
# plans N shard tasks, registers the job with the exchange, and starts every
# attempt at once through the backend.  Results arrive over the exchange; a
# result is committed only if it agrees with the shard's published boundary
# and its output file has the reported size.  Output is written in shard
# order as soon as each next shard is committed (later shards wait on disk,
# so memory stays bounded), and every shard is checked against the tiling
# invariant before its bytes are written: emitted ranges must cover
# [0, size) exactly, or the job fails naming the gap or overlap.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from ..aws import AwsSettings
from ..errors import ConfigurationError, CoverageError, JobFailedError, ShardFailedError, ShardlineError
from ..protocol import (
    DEFAULT_MARKER_TABLE,
    Done,
    Failed,
    Head,
    Hello,
    JobEvent,
    JobState,
    Progress,
    ShardEvent,
    ShardState,
    ShardTask,
    check_delimiter,
    new_job_secret,
    next_job_state,
    next_shard_state,
)
from ..sources import ObjectInfo, open_source
from ._backends import Backend
from ._exchange import ExchangeServer

__all__ = ["CoordinatorSettings", "JobProgress", "JobReport", "JobSpec", "ShardReport", "choose_spool_dir", "run_job"]

log = logging.getLogger("shardline.coordinator.job")

_COPY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What the user asked for."""

    source: str
    shards: int
    delimiter: bytes = b"\n"
    command: str | None = None
    max_line_bytes: int | None = None
    part_size_bytes: int = 8 * 1024 * 1024
    max_in_flight_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        check_delimiter(self.delimiter)
        if self.shards < 1:
            raise ConfigurationError(f"number of shards must be >= 1, got {self.shards}")
        if self.command is not None and not self.command.strip():
            raise ConfigurationError("command is empty")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorSettings:
    markers_table: str = DEFAULT_MARKER_TABLE
    #: Where shard outputs wait for their turn; None picks one (`choose_spool_dir`).
    spool_dir: str | None = None
    #: Address workers use to reach the exchange (the listener's own by default).
    advertise_host: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardReport:
    index: int
    attempt: int
    emitted: tuple[int, int]
    bytes: int
    checksum: str
    output_bytes: int
    tail_sources: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobReport:
    job_id: str
    size: int
    etag: str
    shards: tuple[ShardReport, ...]
    output_bytes: int
    elapsed_s: float

    @property
    def tail_source_counts(self) -> dict[str, int]:
        return dict(Counter(source for shard in self.shards for source in shard.tail_sources))


@dataclass(eq=False)
class _Shard:
    task: ShardTask
    state: ShardState = ShardState.PENDING
    head: Head | None = None
    done: Done | None = None
    failure: str | None = None
    bytes_emitted: int = 0
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # committed or failed
    #: The job's "some shard failed" event, shared by all its shards.
    any_failed: asyncio.Event = field(default_factory=asyncio.Event)

    def move(self, event: ShardEvent) -> None:
        self.state = next_shard_state(self.state, event)

    def fail(self, cause: str) -> None:
        if self.state in (ShardState.STARTING, ShardState.RUNNING):
            self.failure = cause
            self.move(ShardEvent.FAIL)
            self.settled.set()
            self.any_failed.set()


@dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot for progress displays."""

    shards: int
    shards_done: int
    bytes_emitted: int
    size: int
    elapsed_s: float


class _Job:
    """One running job; also the exchange's hooks for it."""

    def __init__(self, *, job_id: str, spec: JobSpec, info: ObjectInfo, tasks: list[ShardTask]) -> None:
        self.id = job_id
        self.spec = spec
        self.info = info
        self.state = JobState.PENDING
        self.any_failed = asyncio.Event()
        self.shards = [_Shard(task=task, any_failed=self.any_failed) for task in tasks]
        self.started = time.monotonic()

    def progress(self) -> JobProgress:
        return JobProgress(
            shards=len(self.shards),
            shards_done=sum(shard.state is ShardState.DONE for shard in self.shards),
            bytes_emitted=sum(shard.bytes_emitted for shard in self.shards),
            size=self.info.size,
            elapsed_s=time.monotonic() - self.started,
        )

    def _current(self, hello: Hello) -> _Shard | None:
        if hello.shard >= len(self.shards):
            return None
        shard = self.shards[hello.shard]
        return shard if shard.task.attempt == hello.attempt else None

    # -- ExchangeHooks -------------------------------------------------------

    def on_connect(self, hello: Hello) -> str | None:
        shard = self._current(hello)
        if shard is None:
            return f"shard {hello.shard} attempt {hello.attempt} is not current for job {self.id}"
        if shard.state is ShardState.STARTING:
            shard.move(ShardEvent.CONNECT)
        return None

    def on_head(self, hello: Hello, head: Head) -> str | None:
        shard = self._current(hello)
        if shard is None:
            return f"shard {hello.shard} attempt {hello.attempt} is not current"
        task = shard.task
        shard_range = task.range
        if head.start != shard_range.start or not shard_range.start <= head.head_end <= shard_range.end:
            return f"HEAD [{head.start}, {head.head_end}) outside shard range [{shard_range.start}, {shard_range.end})"
        shard.head = head
        return None

    def on_progress(self, hello: Hello, progress: Progress) -> None:
        shard = self._current(hello)
        if shard is not None:
            shard.bytes_emitted = progress.bytes_emitted

    def on_done(self, hello: Hello, done: Done) -> bool:
        shard = self._current(hello)
        if shard is None or shard.state is not ShardState.RUNNING:
            return False
        problem = self._check_done(shard, done)
        if problem is not None:
            shard.fail(problem)
            return False
        shard.done = done
        shard.bytes_emitted = done.bytes
        shard.move(ShardEvent.COMMIT)
        shard.settled.set()
        return True

    def on_failed(self, hello: Hello, failed: Failed) -> None:
        shard = self._current(hello)
        if shard is not None:
            shard.fail(failed.message)

    def on_disconnect(self, hello: Hello) -> None:
        pass  # the backend notices when the worker's runtime ends

    def _check_done(self, shard: _Shard, done: Done) -> str | None:
        """Why `done` cannot be committed, or None."""
        shard_range = shard.task.range
        if done.line_start and not shard_range.start <= done.emitted_start < shard_range.end:
            return f"DONE starts at {done.emitted_start}, outside its range [{shard_range.start}, {shard_range.end})"
        if not done.line_start and done.emitted_start != shard_range.end:
            return f"DONE says no line start but places its boundary at {done.emitted_start}, not {shard_range.end}"
        head = shard.head
        if head is not None and (head.head_end, head.line_start) != (done.emitted_start, done.line_start):
            return (
                f"DONE boundary {done.emitted_start} (line start: {done.line_start}) disagrees with its HEAD "
                f"{head.head_end} (line start: {head.line_start})"
            )
        try:
            size = os.path.getsize(shard.task.output_path)
        except OSError as exc:
            return f"output file unreadable: {exc}"
        if size != done.output_bytes:
            return f"output file has {size} bytes, DONE says {done.output_bytes}"
        return None


#: Memory-backed and usually mounted; writing there skips disk writeback,
#: which costs more than the download itself on slow disks.
_MEMORY_SPOOL = "/dev/shm"
_SPOOL_HEADROOM_BYTES = 256 * 1024 * 1024


def choose_spool_dir(object_size: int) -> str:
    """tmpfs when it can hold twice the object (outputs rarely outgrow their
    input by more), else the system temp dir."""
    try:
        stat = os.statvfs(_MEMORY_SPOOL)
    except OSError:
        return tempfile.gettempdir()
    free = stat.f_bavail * stat.f_frsize
    if os.access(_MEMORY_SPOOL, os.W_OK) and free >= 2 * object_size + _SPOOL_HEADROOM_BYTES:
        return _MEMORY_SPOOL
    return tempfile.gettempdir()


class _CoverageCheck:
    """Checks, shard by shard in order, that emitted ranges tile [0, size)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next_start = 0  # where the next non-empty shard must start

    def admit(self, index: int, shard_start: int, shard_end: int, done: Done) -> None:
        if not done.line_start:
            return  # no line starts here: emits nothing, covered by a predecessor
        start, end = done.emitted_start, done.emitted_end
        if not shard_start <= start < shard_end:
            raise CoverageError(f"shard {index} emitted from {start}, outside its range [{shard_start}, {shard_end})")
        if start > self.next_start:
            raise CoverageError(
                f"gap: bytes [{self.next_start}, {start}) before shard {index} were emitted by no shard"
            )
        if start < self.next_start:
            raise CoverageError(f"overlap: bytes [{start}, {self.next_start}) emitted twice (shard {index})")
        self.next_start = end

    def finish(self) -> None:
        if self.next_start != self.size:
            raise CoverageError(f"gap: bytes [{self.next_start}, {self.size}) at the end were emitted by no shard")


async def run_job(
    spec: JobSpec,
    *,
    aws: AwsSettings,
    backend: Backend,
    exchange: ExchangeServer,
    out: BinaryIO,
    settings: CoordinatorSettings = CoordinatorSettings(),
    on_start: Callable[[Callable[[], JobProgress]], None] | None = None,
) -> JobReport:
    """Run `spec` to completion, writing the ordered output to `out`.

    `on_start` receives a function returning a JobProgress snapshot, for
    progress displays.  Raises JobFailedError (naming the shard and cause) or
    a ShardlineError about the input; never returns with unverified output.
    """
    async with open_source(spec.source, aws) as source:
        info = await source.stat()
    job_id = uuid.uuid4().hex[:16]
    secret = new_job_secret()
    spool = tempfile.mkdtemp(prefix=f"shardline-{job_id}-", dir=settings.spool_dir or choose_spool_dir(info.size))
    host, port = exchange.address
    tasks = [
        ShardTask(
            job_id=job_id,
            shard=index,
            shards=spec.shards,
            attempt=0,
            source=spec.source,
            size=info.size,
            etag=info.etag,
            delimiter=spec.delimiter,
            command=spec.command,
            output_path=os.path.join(spool, f"shard-{index:05d}.attempt-0.out"),
            exchange_host=settings.advertise_host or host,
            exchange_port=port,
            secret=secret,
            markers_table=settings.markers_table,
            max_line_bytes=spec.max_line_bytes,
            part_size_bytes=spec.part_size_bytes,
            max_in_flight_bytes=spec.max_in_flight_bytes,
            aws=aws.to_dict(),
        )
        for index in range(spec.shards)
    ]
    job = _Job(job_id=job_id, spec=spec, info=info, tasks=tasks)
    exchange.register(job_id, secret, job)
    log.info("job %s: %s, %d bytes, etag %s, %d shards", job_id, spec.source, info.size, info.etag, spec.shards)
    if on_start is not None:
        on_start(job.progress)
    runners: list[asyncio.Task[None]] = []
    try:
        job.state = next_job_state(job.state, JobEvent.START)
        runners = [asyncio.create_task(_run_attempt(job, shard, backend)) for shard in job.shards]
        output_bytes = await _write_in_order(job, out)
        job.state = next_job_state(job.state, JobEvent.SUCCEED)
    except ShardlineError as exc:
        job.state = next_job_state(job.state, JobEvent.FAIL)
        if isinstance(exc, (ShardFailedError, CoverageError)):
            raise JobFailedError(f"job {job_id} failed: {exc}") from exc
        raise
    finally:
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        exchange.unregister(job_id)
        shutil.rmtree(spool, ignore_errors=True)
    return JobReport(
        job_id=job_id,
        size=info.size,
        etag=info.etag,
        shards=tuple(
            ShardReport(
                index=shard.task.shard,
                attempt=shard.task.attempt,
                emitted=(shard.done.emitted_start, shard.done.emitted_end),
                bytes=shard.done.bytes,
                checksum=shard.done.checksum,
                output_bytes=shard.done.output_bytes,
                tail_sources=tuple(shard.done.tail_sources),
            )
            for shard in job.shards
            if shard.done is not None
        ),
        output_bytes=output_bytes,
        elapsed_s=time.monotonic() - job.started,
    )


async def _run_attempt(job: _Job, shard: _Shard, backend: Backend) -> None:
    shard.move(ShardEvent.LAUNCH)
    try:
        exit_ = await backend.run(shard.task)
    except Exception as exc:  # a backend that cannot run the attempt at all
        log.exception("job %s shard %d: backend %s failed", job.id, shard.task.shard, backend.name)
        shard.fail(f"backend {backend.name} could not run the worker: {type(exc).__name__}: {exc}")
        return
    if shard.state in (ShardState.STARTING, ShardState.RUNNING):
        # The runtime ended without a committed result (crash, kill, refused
        # report); an exit of 0 here still means the result never arrived.
        shard.fail(f"{exit_.detail} before its result was committed")


async def _write_in_order(job: _Job, out: BinaryIO) -> int:
    coverage = _CoverageCheck(job.info.size)
    written = 0
    for shard in job.shards:
        await _wait_settled(job, shard)
        assert shard.done is not None
        shard_range = shard.task.range
        coverage.admit(shard_range.index, shard_range.start, shard_range.end, shard.done)
        written += await asyncio.to_thread(_copy_file, shard.task.output_path, out)
        with contextlib.suppress(OSError):
            os.unlink(shard.task.output_path)
    coverage.finish()
    return written


async def _wait_settled(job: _Job, shard: _Shard) -> None:
    """Wait for `shard`, failing early if any other shard fails meanwhile."""
    if not shard.settled.is_set():
        waiters = [asyncio.ensure_future(shard.settled.wait()), asyncio.ensure_future(job.any_failed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
    if shard.state is not ShardState.DONE:
        failed = next(s for s in job.shards if s.state is ShardState.FAILED)
        raise ShardFailedError(failed.task.shard, failed.failure or "unknown failure")


def _copy_file(path: str, out: BinaryIO) -> int:
    """Copy a shard's output to `out`; sendfile when both ends allow it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out.flush()
        try:
            out_fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            out_fd = None
        if out_fd is not None:
            sent = 0
            try:
                while sent < size:
                    n = os.sendfile(out_fd, f.fileno(), sent, size - sent)
                    if n == 0:
                        break
                    sent += n
                if sent == size:
                    return size
            except OSError as exc:
                if exc.errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
                    raise
            f.seek(sent)
            shutil.copyfileobj(f, out, _COPY_BYTES)
            out.flush()
            return size
        shutil.copyfileobj(f, out, _COPY_BYTES)
        return size
