# One job's life on the coordinator (DESIGN §1, §2, §5).
#
# Every shard runs as one or more *attempts*.  An attempt is started through a
# backend and watched against three deadlines (start: the worker must reach
# the exchange; heartbeat: a connected worker must not go silent; total).
# An attempt that fails, exits without a committed result or misses a
# deadline is stopped and the shard is retried with the next attempt number
# after a backoff, up to `spec.max_attempts`.  A straggler may get one
# speculative attempt beside it; the first to commit wins and the other is
# stopped.
#
# Fencing: only live attempts may talk to the exchange (a stale one is
# refused), only a live attempt's DONE can commit, each attempt writes its
# own output file, and the coordinator raises the shard's marker fence past
# attempts it has given up on, so their marker writes are rejected too.  The
# attempt number is made durable *before* an attempt starts, so a restarted
# coordinator never reuses a number an orphaned worker may still hold.
#
# Output: shards are *released* in order, each only after its commit is
# durable and its emitted range passed the tiling check, so nothing
# unverified is ever shown.  Released shards are published to the output
# destination and fed to the reduce command in the same pass.
#
# A destination is never mixed with an earlier job's files (DESIGN §9).  A
# job that may overwrite removes the earlier output's manifest before it
# writes anything, and the rest of that output only once its own manifest is
# in place; a job that fails removes only the names it may have written
# (`_written`), so it never deletes an earlier job's files.
#
# All decisions (commit, fail, retry, speculate) are synchronous methods that
# change state and schedule I/O; the supervisor loop and the exchange hooks
# call them.

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import (
    CommandFailedError,
    JobCancelledError,
    JobFailedError,
    ShardFailedError,
    ShardlineError,
)
from ..io.aws import AwsSettings
from ..io.markers import MarkerStore
from ..io.retry import RetryPolicy
from ..io.s3bucket import S3Buckets
from ..io.urls import is_s3_url
from ..protocol import (
    DEFAULT_MARKER_TABLE,
    CommittedAttempt,
    Coverage,
    Done,
    Error,
    Failed,
    Head,
    Hello,
    JobEvent,
    JobLimits,
    JobRecord,
    JobSpec,
    JobState,
    JobView,
    Progress,
    ShardEvent,
    ShardRange,
    ShardRecord,
    ShardState,
    ShardTask,
    ShardView,
    attempt_output_name,
    attempt_secret,
    job_secret,
    next_job_state,
    next_shard_state,
)
from ._backends import Backend
from ._metrics import CoordinatorMetrics
from ._outputs import (
    MANIFEST_NAME,
    RESULT_NAME,
    Destination,
    ManifestShard,
    OutputPolicy,
    ReduceRunner,
    build_manifest,
    file_checksum,
    output_size,
    part_name,
)
from ._spool import LOCK_FILE, MEMORY_SPOOL_DIR
from ._store import DEFAULT_JOBS_TABLE, JobStore

__all__ = ["CoordinatorSettings", "OutputPiece", "written_by_earlier_runs"]

log = logging.getLogger("shardline.coordinator.job")

#: How long stopping a job waits for its attempts' backends to let go.
_STOP_WAIT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorSettings:
    markers_table: str = DEFAULT_MARKER_TABLE
    jobs_table: str = DEFAULT_JOBS_TABLE
    #: Root for job spools (one directory per job); None picks one per job
    #: (`choose_spool_dir`).  A daemon that must resume after a restart needs
    #: a root that survives it.
    spool_dir: str | None = None
    #: Where `choose_spool_dir` looks first (memory-backed), and how much of
    #: it the spools of live jobs may claim in all (None: what is free).
    memory_spool_dir: str = MEMORY_SPOOL_DIR
    memory_spool_limit_bytes: int | None = None
    #: Address workers use to reach the exchange (the listener's own by default).
    #: With TLS it must be a name the exchange's certificate holds.
    advertise_host: str | None = None
    #: PEM of the CA that workers verify a TLS exchange's certificate with
    #: (sent in each task); None: the workers' system trust store.
    exchange_ca: str | None = None
    #: How long a finished job and its kept output stay available.
    retain_s: float = 3600.0
    #: Backoff before retry n is min(max, base * 2**(n-1)), with jitter.
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 15.0
    #: Speculate once this fraction of shards is done, on a shard running
    #: longer than `speculate_slowdown` x the median commit time (and at
    #: least `speculate_min_s`).
    speculate_after_fraction: float = 0.75
    speculate_slowdown: float = 3.0
    speculate_min_s: float = 10.0
    #: How often deadlines are checked.
    supervise_interval_s: float = 0.25
    #: Which destinations jobs may write (`JobSpec.output`); the default allows none.
    output_policy: OutputPolicy = OutputPolicy()
    #: Variables kept out of every command's environment (shards' and the
    #: reduce's), on top of the ``SHARDLINE_*`` ones that never reach a command.
    command_env_drop: tuple[str, ...] = ()
    #: The most a submitted job may ask for (checked by `Coordinator.submit`).
    job_limits: JobLimits = JobLimits()


@dataclass(frozen=True, slots=True)
class OutputPiece:
    """Bytes [start, end) of the file at `path`, the next part of a job's output."""

    path: str
    start: int
    end: int


@dataclass(eq=False)
class _Attempt:
    number: int
    task: ShardTask
    speculative: bool
    started_at: float | None = None  # loop time the backend really started it
    connected: bool = False
    last_heard: float = 0.0
    runner: asyncio.Task[None] | None = None


class _Shard:
    def __init__(self, record: ShardRecord, shard_range: ShardRange, *, fresh: bool) -> None:
        self.index = record.index
        self.range = shard_range
        self.state = record.state
        # The store holds a reservation: attempt numbers below it may have been
        # used.  A fresh job's records reserve attempt 0, so its first launch
        # needs no write; after a restart every reserved number is stale.
        self.saved_next_attempt = record.next_attempt
        self.next_attempt = 0 if fresh else record.next_attempt
        self.committed = record.committed
        self.error = record.error
        self.retries = record.retries
        self.live: dict[int, _Attempt] = {}
        self.failures = 0
        self.bytes_emitted = record.committed.bytes if record.committed else 0
        self.boundary: tuple[int, bool] | None = None  # (h_i, line start) from the first HEAD
        self.retry_at: float | None = None
        self.speculated = False
        self.fence = 0  # marker fence raised so far
        self.commit_saved: asyncio.Task[None] | None = None

    def move(self, event: ShardEvent) -> None:
        self.state = next_shard_state(self.state, event)

    def record(self, job_id: str) -> ShardRecord:
        return ShardRecord(
            job_id=job_id,
            index=self.index,
            state=self.state,
            next_attempt=max(self.next_attempt, self.saved_next_attempt),
            committed=self.committed,
            error=self.error,
            retries=self.retries,
        )

    @property
    def state_shown(self) -> ShardState:
        """DONE only once the commit is durable: what a restart would keep."""
        if self.state is ShardState.DONE and self.commit_saved is not None and not self.commit_saved.done():
            return ShardState.RUNNING
        return self.state

    @property
    def attempt_shown(self) -> int:
        if self.committed is not None:
            return self.committed.attempt
        return max(self.live, default=max(self.next_attempt - 1, 0))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobContext:
    """What every job of one coordinator shares."""

    aws: AwsSettings
    store: JobStore
    settings: CoordinatorSettings
    metrics: CoordinatorMetrics
    exchange_address: tuple[str, int]
    #: Workers dial the exchange over TLS (and verify it with settings.exchange_ca).
    exchange_tls: bool
    #: Every job's exchange secret is derived from it (protocol.job_secret).
    coordinator_key: bytes = field(repr=False)
    markers: MarkerStore  # for marker fences
    #: Remote workers' attempt outputs (checked on DONE, fetched at release).
    s3_buckets: S3Buckets
    retry_policy: RetryPolicy = RetryPolicy()


class Job:
    """One job: its shards, their attempts, and the ordered release of output."""

    def __init__(
        self,
        *,
        record: JobRecord,
        shards: list[ShardRecord],
        backend: Backend,
        destination: Destination | None,
        context: JobContext,
        fresh: bool,
        written_earlier: Collection[str] = (),
    ) -> None:
        """`written_earlier`: destination names that runs of this job before a
        coordinator restart may have written (`written_by_earlier_runs`)."""
        assert record.size is not None and record.etag is not None
        self.record = record
        self.id = record.job_id
        self.spec = record.spec
        self.size = record.size
        self.state = record.state
        self.error = record.error
        self.finished_at = record.finished_at
        self.backend = backend
        self.destination = destination
        self.context = context
        #: Registered with the exchange; each task carries only its attempt's secret.
        self.exchange_secret = job_secret(context.coordinator_key, self.id)
        self.shards = [
            _Shard(r, ShardRange.of(record.size, record.spec.shards, r.index), fresh=fresh)
            for r in sorted(shards, key=lambda r: r.index)
        ]
        self.released = len(self.shards) if self.state is JobState.SUCCEEDED else 0
        self.result_path: str | None = record.result_path if self.state is JobState.SUCCEEDED else None
        self.result_done = self.state is JobState.SUCCEEDED
        self.failure: ShardlineError | None = None
        #: Destination names this job may have written: what its failure removes.
        self._written = set(written_earlier)
        self.finished = asyncio.Event()
        if self.state.is_final:
            self.finished.set()
        self._changed = asyncio.Event()
        self._durations_s: list[float] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._suspending = False

    # -- views -----------------------------------------------------------------

    def view(self) -> JobView:
        return JobView(
            id=self.id,
            state=self.state,
            spec=self.spec,
            size=self.size,
            etag=self.record.etag,
            shards=tuple(
                ShardView(
                    index=shard.index,
                    state=shard.state_shown,
                    attempt=shard.attempt_shown,
                    bytes=shard.bytes_emitted,
                    emitted=(shard.committed.emitted_start, shard.committed.emitted_end) if shard.committed else None,
                    tail_sources=shard.committed.tail_sources if shard.committed else (),
                    error=shard.error,
                )
                for shard in self.shards
            ),
            created_at=self.record.created_at,
            finished_at=self.finished_at,
            error=self.error,
            output=self.spec.output,
            retries=sum(shard.retries for shard in self.shards),
        )

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"job-{self.id}")

    async def _run(self) -> None:
        if self.state is JobState.PENDING:
            self._move(JobEvent.START)
            await self._save_job()
        for shard in self.shards:
            if shard.state is not ShardState.DONE:
                # Resuming (or never launched): whatever ran before is stale.
                shard.state = ShardState.PENDING
                self._raise_fence(shard)
        supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.id}")
        try:
            await self._release_in_order()
        except asyncio.CancelledError:
            if not self._suspending:
                raise
            return
        except ShardlineError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must fail the job, not leave it hanging
            log.exception("job %s: internal error", self.id)
            self._fail(ShardlineError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            await self._stop_attempts()
            await self._discard_remote_outputs()
        if self.failure is None:
            self._move(JobEvent.SUCCEED)
            self._sweep_spool()
            log.info("job %s succeeded", self.id)
        else:
            cancelled = isinstance(self.failure, JobCancelledError)
            self._move(JobEvent.CANCEL if cancelled else JobEvent.FAIL)
            for shard in self.shards:
                if not shard.state.is_final:
                    shard.move(ShardEvent.CANCEL)
            self.error = str(self.failure) if cancelled else f"job {self.id} failed: {self.failure}"
            log.info("job %s %s: %s", self.id, self.state.value, self.error)
            await self._discard_outputs()
        self.finished_at = time.time()
        await self._save_job()
        await asyncio.gather(*(self._save_shard(shard) for shard in self.shards), return_exceptions=True)
        self.finished.set()
        self._notify()

    async def cancel(self) -> None:
        if self.state.is_final:
            return
        self._fail(JobCancelledError(f"job {self.id} was cancelled"))
        await self.finished.wait()

    async def suspend(self) -> None:
        """Stop this job's work without deciding its fate: a restarted
        coordinator resumes it from the store."""
        if self._main is None or self._main.done():
            return
        self._suspending = True
        self._main.cancel()
        await asyncio.gather(self._main, return_exceptions=True)
        await self._stop_attempts()

    async def _stop_attempts(self) -> None:
        runners = [a.runner for s in self.shards for a in s.live.values() if a.runner is not None]
        for runner in runners:
            runner.cancel()
        if runners:
            _, stuck = await asyncio.wait(runners, timeout=_STOP_WAIT_S)
            if stuck:  # a backend that ignores cancellation must not hang the job
                log.error("job %s: %d attempt(s) did not stop within %.0fs", self.id, len(stuck), _STOP_WAIT_S)
        for shard in self.shards:
            shard.live.clear()
        background, self._background = self._background, set()
        await asyncio.gather(*background, return_exceptions=True)

    def _fail(self, exc: ShardlineError) -> None:
        if self.failure is None and not self.state.is_final:
            self.failure = exc
            self._notify()

    def _move(self, event: JobEvent) -> None:
        self.state = next_job_state(self.state, event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Wait until `condition()` holds (re-checked on every state change),
        or `timeout_s` passes."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that arrives as the event fires.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._changed.wait()

    # -- attempts --------------------------------------------------------------

    def _task(self, shard: _Shard, attempt: int) -> ShardTask:
        host, port = self.context.exchange_address
        return ShardTask(
            job_id=self.id,
            shard=shard.index,
            shards=self.spec.shards,
            attempt=attempt,
            source=self.spec.source,
            size=self.size,
            etag=self.record.etag or "",
            delimiter=self.spec.delimiter,
            command=self.spec.command,
            output_path=self.backend.output_location(self.id, shard.index, attempt)
            or self._spool_path(shard.index, attempt),
            exchange_host=self.context.settings.advertise_host or host,
            exchange_port=port,
            exchange_tls=self.context.exchange_tls,
            exchange_ca=self.context.settings.exchange_ca if self.context.exchange_tls else None,
            secret=attempt_secret(self.exchange_secret, shard.index, attempt),
            markers_table=self.context.settings.markers_table,
            max_line_bytes=self.spec.max_line_bytes,
            part_size_bytes=self.spec.part_size_bytes,
            max_in_flight_bytes=self.spec.max_in_flight_bytes,
            aws=self.context.aws.to_dict(),
            command_env_drop=self.context.settings.command_env_drop,
        )

    def _spool_path(self, index: int, attempt: int) -> str:
        return os.path.join(self.record.spool_dir, attempt_output_name(index, attempt))

    def _launch(self, shard: _Shard, *, speculative: bool = False) -> None:
        number = shard.next_attempt
        shard.next_attempt += 1
        attempt = _Attempt(number=number, task=self._task(shard, number), speculative=speculative)
        shard.live[number] = attempt
        shard.retry_at = None
        if shard.state is ShardState.PENDING:
            shard.move(ShardEvent.LAUNCH)
        attempt.runner = asyncio.create_task(
            self._run_attempt(shard, attempt), name=f"{self.id}-{shard.index}-{number}"
        )

    async def _run_attempt(self, shard: _Shard, attempt: _Attempt) -> None:
        loop = asyncio.get_running_loop()

        def started() -> None:
            attempt.started_at = attempt.last_heard = loop.time()

        try:
            try:
                if shard.saved_next_attempt < shard.next_attempt:
                    await self._save_shard(shard)  # the number is durable before anyone can use it
                exit_ = await self.backend.run(attempt.task, on_started=started)
                cause = f"{exit_.detail} before its result was committed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the backend (or the store) could not run the attempt at all
                log.exception("job %s shard %d attempt %d could not run", self.id, shard.index, attempt.number)
                cause = f"backend {self.backend.name} could not run the worker: {type(exc).__name__}: {exc}"
            if shard.live.get(attempt.number) is attempt:
                self._end_attempt(shard, attempt, cause, retryable=True, reason="failed")
        finally:
            uncommitted = shard.committed is None or shard.committed.attempt != attempt.number
            if uncommitted and not is_s3_url(attempt.task.output_path):  # remote ones go with the job's staging
                with contextlib.suppress(OSError):
                    os.unlink(attempt.task.output_path)

    def _end_attempt(self, shard: _Shard, attempt: _Attempt, cause: str, *, retryable: bool, reason: str) -> None:
        """`attempt` failed: stop it, and retry the shard or fail the job."""
        if shard.live.pop(attempt.number, None) is None:
            return
        if attempt.runner is not None and attempt.runner is not asyncio.current_task():
            attempt.runner.cancel()
        if shard.state.is_final or self.failure is not None:
            return
        shard.failures += 1
        shard.error = f"attempt {attempt.number}: {cause}"
        # INFO: most failures are retried; the job's own failure is what callers report.
        log.info("job %s shard %d attempt %d: %s", self.id, shard.index, attempt.number, cause)
        self._raise_fence(shard)
        if shard.live:
            return  # a speculative twin is still running
        if not retryable or shard.failures >= self.spec.max_attempts:
            shard.move(ShardEvent.FAIL)
            tries = f"{shard.failures} attempt{'s' if shard.failures > 1 else ''}"
            self._fail(ShardFailedError(shard.index, f"{cause} ({tries})" if retryable else cause))
        else:
            shard.move(ShardEvent.RETRY)
            settings = self.context.settings
            # Half the base delay at least, plus the one retry helper's jittered backoff.
            policy = RetryPolicy(base_delay_s=settings.retry_backoff_s, max_delay_s=settings.retry_backoff_max_s)
            backoff_s = settings.retry_backoff_s / 2 + policy.delay_s(shard.failures)
            shard.retry_at = asyncio.get_running_loop().time() + backoff_s
            shard.retries += 1
            self.context.metrics.retries[reason] += 1
        self._save_shard_soon(shard)
        self._notify()

    def _raise_fence(self, shard: _Shard) -> None:
        """Reject marker writes from every attempt below the lowest live one."""
        fence = min([*shard.live, shard.next_attempt])
        if fence <= shard.fence:
            return
        shard.fence = fence
        self._spawn(
            self.context.markers.raise_fence(self.id, shard.index, fence),
            f"marker fence of shard {shard.index}",
        )

    # -- supervision: deadlines, retries, speculation ----------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.context.settings.supervise_interval_s
        while True:
            now = loop.time()
            for shard in self.shards:
                if shard.state.is_final:
                    continue
                for attempt in list(shard.live.values()):
                    missed = self._missed_deadline(attempt, now)
                    if missed is not None:
                        kind, cause = missed
                        self.context.metrics.deadline_misses[kind] += 1
                        self._end_attempt(shard, attempt, cause, retryable=True, reason=kind)
                if shard.state is ShardState.PENDING and (shard.retry_at is None or now >= shard.retry_at):
                    self._launch(shard)
            self._maybe_speculate(now)
            await self._until(lambda: False, timeout_s=interval)

    def _missed_deadline(self, attempt: _Attempt, now: float) -> tuple[str, str] | None:
        if attempt.started_at is None:
            return None  # still queued for a backend slot
        timeouts = self.spec.timeouts
        if now - attempt.started_at > timeouts.total_s:
            return "total", f"missed its total deadline ({timeouts.total_s:g}s)"
        if not attempt.connected and now - attempt.started_at > timeouts.start_s:
            return "start", f"worker did not reach the exchange within its start deadline ({timeouts.start_s:g}s)"
        if attempt.connected and now - attempt.last_heard > timeouts.heartbeat_s:
            return "heartbeat", f"worker silent for longer than its heartbeat deadline ({timeouts.heartbeat_s:g}s)"
        return None

    def _maybe_speculate(self, now: float) -> None:
        settings = self.context.settings
        done = sum(shard.state is ShardState.DONE for shard in self.shards)
        if not self._durations_s or done < settings.speculate_after_fraction * len(self.shards):
            return
        threshold = max(settings.speculate_min_s, settings.speculate_slowdown * statistics.median(self._durations_s))
        for shard in self.shards:
            if shard.state.is_final or shard.speculated or len(shard.live) != 1:
                continue
            (attempt,) = shard.live.values()
            if attempt.started_at is not None and now - attempt.started_at > threshold:
                log.info(
                    "job %s shard %d: straggling for %.1fs, starting a speculative attempt",
                    self.id,
                    shard.index,
                    now - attempt.started_at,
                )
                shard.speculated = True
                shard.retries += 1
                self.context.metrics.retries["speculative"] += 1
                self._launch(shard, speculative=True)

    # -- exchange hooks (synchronous decisions) -----------------------------------

    def _live(self, hello: Hello) -> tuple[_Shard, _Attempt] | None:
        if hello.shard >= len(self.shards):
            return None
        shard = self.shards[hello.shard]
        attempt = shard.live.get(hello.attempt)
        return (shard, attempt) if attempt is not None else None

    def _refuse(self, hello: Hello, what: str) -> Error:
        self.context.metrics.fenced_writes += 1
        message = f"{what}: shard {hello.shard} attempt {hello.attempt} is not current (stale) for job {self.id}"
        return Error(message=message, stale=True)

    def session_idle_timeout_s(self) -> float:
        return self.spec.timeouts.heartbeat_s

    def on_connect(self, hello: Hello) -> Error | None:
        found = self._live(hello)
        if found is None:
            return self._refuse(hello, "session refused")
        shard, attempt = found
        attempt.connected = True
        attempt.last_heard = asyncio.get_running_loop().time()
        if attempt.started_at is None:  # a backend that cannot tell when it started
            attempt.started_at = attempt.last_heard
        if shard.state is ShardState.STARTING:
            shard.move(ShardEvent.CONNECT)
        return None

    def on_head(self, hello: Hello, head: Head) -> Error | None:
        found = self._live(hello)
        if found is None:
            return self._refuse(hello, "HEAD refused")
        shard, attempt = found
        attempt.last_heard = asyncio.get_running_loop().time()
        if head.start != shard.range.start or not shard.range.start <= head.head_end <= shard.range.end:
            return Error(
                message=f"HEAD [{head.start}, {head.head_end}) outside shard range "
                f"[{shard.range.start}, {shard.range.end})"
            )
        boundary = (head.head_end, head.line_start)
        if shard.boundary is not None and shard.boundary != boundary:
            return Error(message=f"HEAD boundary {boundary} disagrees with an earlier attempt's {shard.boundary}")
        shard.boundary = boundary
        return None

    def on_progress(self, hello: Hello, progress: Progress) -> None:
        found = self._live(hello)
        if found is not None:
            shard, attempt = found
            attempt.last_heard = asyncio.get_running_loop().time()
            if shard.committed is None:
                shard.bytes_emitted = max(shard.bytes_emitted, progress.bytes_emitted)

    async def on_done(self, hello: Hello, done: Done) -> bool:
        found = self._live(hello)
        if found is None:
            self._refuse(hello, "DONE refused")
            return False
        shard, attempt = found
        if shard.state is not ShardState.RUNNING:
            return False
        problem = self._check_done(shard, done)
        if problem is None:
            problem = await self._check_output_size(attempt.task.output_path, done.output_bytes)
            if self._live(hello) is None or shard.state is not ShardState.RUNNING:
                return False  # stopped, or a twin committed, while we looked
        if problem is not None:
            self._end_attempt(shard, attempt, problem, retryable=True, reason="failed")
            return False
        loop = asyncio.get_running_loop()
        shard.committed = CommittedAttempt(
            attempt=attempt.number,
            emitted_start=done.emitted_start,
            emitted_end=done.emitted_end,
            line_start=done.line_start,
            bytes=done.bytes,
            checksum=done.checksum,
            output_bytes=done.output_bytes,
            output_path=attempt.task.output_path,
            tail_sources=tuple(done.tail_sources),
        )
        shard.bytes_emitted = done.bytes
        shard.error = None
        shard.move(ShardEvent.COMMIT)
        del shard.live[attempt.number]
        if not self.backend.observes_exit and attempt.runner is not None:
            attempt.runner.cancel()  # nothing else would end it (and free its slot)
        for loser in list(shard.live.values()):  # a slower twin: stop it
            shard.live.pop(loser.number)
            if loser.runner is not None:
                loser.runner.cancel()
        if attempt.started_at is not None:
            self._durations_s.append(loop.time() - attempt.started_at)
        metrics = self.context.metrics
        metrics.tail_sources.update(done.tail_sources)
        metrics.bytes_emitted += done.bytes
        metrics.output_bytes += done.output_bytes
        shard.commit_saved = self._spawn(self._save_shard(shard), f"commit of shard {shard.index}")
        self._notify()
        return True

    def on_failed(self, hello: Hello, failed: Failed) -> None:
        found = self._live(hello)
        if found is None:
            self._refuse(hello, "FAILED ignored")
            return
        shard, attempt = found
        self._end_attempt(shard, attempt, failed.message, retryable=failed.retryable, reason="failed")

    def on_disconnect(self, hello: Hello) -> None:
        pass  # the heartbeat deadline and the backend notice a worker that is gone

    def _check_done(self, shard: _Shard, done: Done) -> str | None:
        """Why `done`'s boundary cannot be committed, or None."""
        shard_range = shard.range
        if done.line_start and not shard_range.start <= done.emitted_start < shard_range.end:
            return f"DONE starts at {done.emitted_start}, outside its range [{shard_range.start}, {shard_range.end})"
        if not done.line_start and done.emitted_start != shard_range.end:
            return f"DONE says no line start but places its boundary at {done.emitted_start}, not {shard_range.end}"
        if shard.boundary is not None and shard.boundary != (done.emitted_start, done.line_start):
            return (
                f"DONE boundary {done.emitted_start} (line start: {done.line_start}) disagrees with the HEAD "
                f"{shard.boundary[0]} (line start: {shard.boundary[1]})"
            )
        return None

    async def _check_output_size(self, location: str, output_bytes: int) -> str | None:
        """Why the attempt's output at `location` does not match DONE, or None."""
        try:
            size = await output_size(location, self.context.s3_buckets)
        except (OSError, ShardlineError) as exc:
            return f"output unreadable: {exc}"
        if size is None:
            return f"output {location} does not exist"
        if size != output_bytes:
            return f"output {location} has {size} bytes, DONE says {output_bytes}"
        return None

    async def _fetch_output(self, shard: _Shard, committed: CommittedAttempt) -> CommittedAttempt:
        """Bring a remote worker's committed output into the spool; every
        reader of outputs (release, destination, reduce) reads local files."""
        local = self._spool_path(shard.index, committed.attempt)
        bucket, key = self.context.s3_buckets.for_url(committed.output_path)
        await bucket.download_file(key, local, expected_bytes=committed.output_bytes)
        with contextlib.suppress(ShardlineError):  # the job's staging sweep gets it otherwise
            await bucket.request("delete_object", Key=key)
        shard.committed = replace(committed, output_path=local)
        await self._save_shard(shard)
        return shard.committed

    # -- ordered release, destination, reduce ----------------------------------------

    def _committed_or_failing(self, shard: _Shard) -> bool:
        return shard.state is ShardState.DONE or self.failure is not None

    def _released_or_finished(self, index: int) -> bool:
        return self.released > index or self.finished.is_set()

    async def _release_in_order(self) -> None:
        if self.destination is not None and self.spec.overwrite:
            # Before any part is replaced: the earlier output stops claiming to be complete.
            await self.destination.remove_manifest()
        coverage = Coverage(self.size)
        for shard in self.shards:
            await self._until(functools.partial(self._committed_or_failing, shard))
            if self.failure is not None:
                raise self.failure
            if shard.commit_saved is not None:
                await shard.commit_saved
            committed = shard.committed
            assert committed is not None
            coverage.admit(
                shard.index,
                nominal=(shard.range.start, shard.range.end),
                emitted=(committed.emitted_start, committed.emitted_end),
            )
            if is_s3_url(committed.output_path):
                committed = await self._fetch_output(shard, committed)
            self.released = shard.index + 1
            self._notify()
            if self.destination is not None and committed.published is None:
                checksum = await file_checksum(committed.output_path)
                self._written.add(part_name(shard.index))  # before: a failed write may still have landed
                where = await self.destination.put_part(shard.index, committed.output_path)
                shard.committed = replace(committed, published=where, output_checksum=checksum)
                await self._save_shard(shard)
        coverage.finish()
        result_bytes = await self._reduce() if self.spec.reduce is not None else None
        if self.destination is not None:
            await self._publish_manifest(result_bytes)
            if self.spec.overwrite:
                # Only now that this output is complete: whatever the earlier one had beyond it.
                await self.destination.remove_others(self._output_names())
        self.result_done = True

    async def _reduce(self) -> int:
        """Run the reduce command over every shard's output, in order: on its
        stdin, and as its arguments for merges (``sort -m "$@"``)."""
        assert self.spec.reduce is not None
        outputs = [shard.committed.output_path for shard in self.shards if shard.committed is not None]
        path = os.path.join(self.record.spool_dir, f"result.{os.getpid()}.{time.monotonic_ns()}.out")
        env = {"SHARDLINE_JOB_ID": self.id, "SHARDLINE_SHARDS": str(self.spec.shards)}
        drop = self.context.settings.command_env_drop
        async with ReduceRunner(self.spec.reduce, path, env=env, drop_env=drop, args=outputs) as reduce:
            self.result_path = path  # readers follow it as it grows
            self._notify()
            for output in outputs:
                await reduce.feed_file(output)
            try:
                result_bytes = await reduce.finish()
            except CommandFailedError as exc:
                raise ShardlineError(f"reduce {exc}") from exc
        self.record = replace(self.record, result_path=path)
        return result_bytes

    async def _publish_manifest(self, result_bytes: int | None) -> None:
        assert self.destination is not None
        result = None
        if self.result_path is not None:
            self._written.add(RESULT_NAME)
            result = await self.destination.put_result(self.result_path)
        shards = []
        for shard in self.shards:
            committed = shard.committed
            assert committed is not None and committed.published is not None
            shards.append(
                ManifestShard(
                    index=shard.index,
                    range=(shard.range.start, shard.range.end),
                    emitted=(committed.emitted_start, committed.emitted_end),
                    bytes=committed.bytes,
                    checksum=committed.checksum,
                    attempt=committed.attempt,
                    part=committed.published,
                    output_bytes=committed.output_bytes,
                    output_checksum=committed.output_checksum or "",
                )
            )
        manifest = build_manifest(
            job_id=self.id,
            source=self.spec.source,
            size=self.size,
            etag=self.record.etag or "",
            delimiter=self.spec.delimiter,
            command=self.spec.command,
            reduce=self.spec.reduce,
            shards=shards,
            result=result,
            result_bytes=result_bytes,
        )
        self._written.add(MANIFEST_NAME)
        where = await self.destination.put_manifest(manifest)
        self.record = replace(self.record, manifest=where)

    def _output_names(self) -> set[str]:
        """The destination names of this job's complete output."""
        names = {part_name(shard.index) for shard in self.shards} | {MANIFEST_NAME}
        if self.spec.reduce is not None:
            names.add(RESULT_NAME)
        return names

    async def _discard_outputs(self) -> None:
        """A failed or cancelled job leaves nothing that could pass for its
        output, and removes nothing it did not write."""
        if self.destination is not None:
            try:
                await self.destination.remove(self._written)
            except ShardlineError as exc:
                log.error("job %s: could not remove partial output at %s: %s", self.id, self.destination.url, exc)
        shutil.rmtree(self.record.spool_dir, ignore_errors=True)

    async def _discard_remote_outputs(self) -> None:
        try:
            await self.backend.discard_outputs(self.id)
        except ShardlineError as exc:  # leftovers cost storage, not correctness
            log.warning("job %s: could not remove attempt outputs: %s", self.id, exc)

    def _sweep_spool(self) -> None:
        """Delete whatever stale attempts left in the spool: only committed
        outputs (and the reduce result) are kept."""
        keep = {shard.committed.output_path for shard in self.shards if shard.committed is not None}
        keep.add(self.result_path or "")
        keep.add(os.path.join(self.record.spool_dir, LOCK_FILE))
        with contextlib.suppress(OSError), os.scandir(self.record.spool_dir) as entries:
            for entry in entries:
                if entry.path not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def discard_spool(self) -> None:
        shutil.rmtree(self.record.spool_dir, ignore_errors=True)

    # -- reading the output ------------------------------------------------------------

    async def output(self, *, consume: bool = False) -> AsyncIterator[OutputPiece]:
        """The job's output in order, as it becomes available; raises at the
        end unless the job succeeded.  `consume` deletes each shard's file once
        the caller has taken it (a single reader that needs no replay)."""
        if self.spec.reduce is not None:
            async for piece in self._follow_result():
                yield piece
        elif self.spec.output is None:
            for shard in self.shards:
                await self._until(functools.partial(self._released_or_finished, shard.index))
                if self.released <= shard.index:
                    break
                committed = shard.committed
                assert committed is not None
                if committed.output_bytes:
                    yield OutputPiece(committed.output_path, 0, committed.output_bytes)
                if consume:
                    with contextlib.suppress(OSError):
                        os.unlink(committed.output_path)
        await self.finished.wait()
        self._raise_unless_succeeded()

    async def _follow_result(self) -> AsyncIterator[OutputPiece]:
        """Follow the reduce command's output file while it grows."""
        await self._until(lambda: self.result_path is not None or self.finished.is_set())
        position = 0
        while True:
            complete = self.result_done or self.finished.is_set()
            path = self.result_path
            if path is None:
                return
            try:
                size = os.path.getsize(path)
            except OSError:
                size = position
            if size > position:
                yield OutputPiece(path, position, size)
                position = size
            if complete:
                return
            await self._until(lambda: self.result_done or self.finished.is_set(), timeout_s=0.05)

    def _raise_unless_succeeded(self) -> None:
        if self.state is JobState.SUCCEEDED:
            return
        if self.state is JobState.CANCELLED:
            raise JobCancelledError(self.error or f"job {self.id} was cancelled")
        raise JobFailedError(self.error or f"job {self.id} failed")

    # -- persistence ----------------------------------------------------------------------

    async def _save_job(self) -> None:
        self.record = replace(
            self.record,
            state=self.state,
            updated_at=time.time(),
            finished_at=self.finished_at,
            error=self.error,
        )
        await self.context.store.save_job(self.record)

    async def _save_shard(self, shard: _Shard) -> None:
        record = shard.record(self.id)
        await self.context.store.save_shard(record)
        shard.saved_next_attempt = max(shard.saved_next_attempt, record.next_attempt)

    def _save_shard_soon(self, shard: _Shard) -> None:
        self._spawn(self._save_shard(shard), f"saving shard {shard.index}")

    def _spawn(self, coroutine: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)

        def finished(task: asyncio.Task[Any]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("job %s: %s failed: %s", self.id, what, task.exception())

        task.add_done_callback(finished)
        return task


def written_by_earlier_runs(spec: JobSpec, shards: Sequence[ShardRecord]) -> set[str]:
    """Destination names that runs of this job before a coordinator restart
    may have written, judged from its stored shard records.

    The store records each part once it is written (`published`), and parts
    are written in order: so beyond the recorded ones, only the first
    unrecorded part -- or, once every part is recorded, the result and the
    manifest -- may have been written without the store learning of it.
    Those count only when the job does not overwrite: its destination was
    empty at submit, so whatever bears those names is its own.  With
    overwrite they may be the earlier output's, which a failed job leaves
    (the earlier manifest is removed as each run starts, so it never claims
    completeness again).
    """
    recorded = {shard.index for shard in shards if shard.committed is not None and shard.committed.published}
    names = {part_name(index) for index in recorded}
    if not spec.overwrite:
        first_unrecorded = next((index for index in range(spec.shards) if index not in recorded), None)
        if first_unrecorded is not None:
            names.add(part_name(first_unrecorded))
        else:
            names |= {RESULT_NAME, MANIFEST_NAME} if spec.reduce is not None else {MANIFEST_NAME}
    return names
