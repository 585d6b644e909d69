# One job's life on the coordinator (DESIGN §2, §5): the thin I/O shell
# around its `Supervisor`.
#
# The supervisor decides (what to launch, stop, fence, save, commit, when the
# job fails); this module performs: it runs each attempt through the
# backend, raises marker fences, saves records to the store, verifies an
# attempt's output before its DONE is decided, and drives the clock.  The
# ordered release of the output is `_release.Release`.  Every exchange hook
# hands its event to the supervisor in one synchronous call and performs the
# actions it returns; the only await before a decision is the one that
# verifies a DONE's output, and the decision itself is taken afterwards.

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from dataclasses import replace
from typing import Any

from ..errors import JobCancelledError, LeaseLostError, ShardlineError
from ..io.store import Lease
from ..io.urls import is_s3_url
from ..protocol import (
    SHARDS_PAGE_DEFAULT,
    CommittedAttempt,
    Done,
    Error,
    Failed,
    Head,
    Hello,
    JobEvent,
    JobRecord,
    JobState,
    JobView,
    Progress,
    ShardRecord,
    ShardState,
    ShardTask,
    ShardView,
    attempt_output_name,
    attempt_secret,
    job_secret,
    next_job_state,
)
from ._backends import Backend
from ._context import JobContext
from ._destination import Destination
from ._manifest import output_problem
from ._release import Release
from ._supervisor import (
    Action,
    CommitShard,
    Launch,
    RaiseFence,
    SaveShard,
    StopAttempt,
    Supervisor,
    SupervisorSettings,
)
from ._writer import RecordWriter

__all__ = ["Job", "job_view", "shard_task", "shard_views"]

log = logging.getLogger("shardline.coordinator.job")

#: How long stopping a job waits for its attempts' backends to let go.
_STOP_WAIT_S = 30.0


class Job:
    """One job: its supervisor, its attempts' runs, its store records and its release."""

    def __init__(
        self,
        *,
        record: JobRecord,
        shards: list[ShardRecord],
        backend: Backend,
        destination: Destination | None,
        context: JobContext,
        lease: Lease | None,
        fresh: bool,
        written_earlier: Collection[str] = (),
        on_lost: Callable[[Job, LeaseLostError], None] = lambda job, exc: None,
    ) -> None:
        """`lease`: this coordinator's on the job (None for a finished job, only shown).
        `fresh`: the records were just created (else loaded after a restart).
        `written_earlier`: destination names that runs of this job before a
        coordinator restart may have written (`written_by_earlier_runs`).
        `on_lost` is told when another coordinator has taken the job over."""
        assert record.size is not None and record.etag is not None
        self.record = record
        self.id = record.job_id
        self.spec = record.spec
        self.size = record.size
        self.state = record.state
        self.error = record.error
        self.finished_at = record.finished_at
        self.backend = backend
        self.context = context
        #: Registered with the exchange; each task carries only its attempt's secret.
        self.exchange_secret = job_secret(context.coordinator_key, self.id)
        #: What every ShardTask carries of the AWS settings, built once rather than per attempt.
        self.aws_task_settings = context.aws.to_dict()
        settings = context.settings
        self.supervisor = Supervisor(
            job_id=self.id,
            size=self.size,
            records=shards,
            fresh=fresh,
            settings=SupervisorSettings(
                max_attempts=self.spec.max_attempts,
                command_retries=self.spec.command_retries,
                timeouts=self.spec.timeouts,
                retry_backoff_s=settings.retry_backoff_s,
                retry_backoff_max_s=settings.retry_backoff_max_s,
                speculate_after_fraction=settings.speculate_after_fraction,
                speculate_slowdown=settings.speculate_slowdown,
                speculate_min_s=settings.speculate_min_s,
                max_live_attempts=settings.max_live_attempts,
            ),
            metrics=context.metrics,
        )
        self.finished = asyncio.Event()
        if self.state.is_final:
            self.finished.set()
        self.release = Release(self, destination, written_earlier=written_earlier)
        self.writer = RecordWriter(
            context.store,
            lease or Lease(job_id=self.id, owner="", epoch=0, expires_at=0),
            shard_record=self.supervisor.record,
            job_record=self._current_record,
            on_saved=lambda record: self.supervisor.saved(record.index, record),
            on_lost=self._lost,
        )
        self._on_lost = on_lost
        self._lease_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._wake_scheduled = False
        self._runners: dict[tuple[int, int], asyncio.Task[None]] = {}
        #: The writer version of each shard's commit: shown, and released, as DONE only once durable.
        self._commits: dict[int, int] = {}
        #: Versions of commits not yet known durable, oldest first (versions only grow): what a
        #: view counts as running rather than done, without looking at every shard.
        self._undurable_commits: collections.deque[int] = collections.deque()
        self._background: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._suspending = False

    @property
    def destination(self) -> Destination | None:
        return self.release.destination

    # -- the job's life -----------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"job-{self.id}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.state is JobState.PENDING:
            self._move(JobEvent.START)
            await self.writer.wait_durable(self.writer.mark_job())
        self._perform(self.supervisor.start(loop.time()))
        ticker = asyncio.create_task(self._tick(), name=f"supervise-{self.id}")
        try:
            await self.release.run()
        except asyncio.CancelledError:
            if not self._suspending:
                raise
            return
        except LeaseLostError:
            return  # another coordinator owns the job now: nothing more is ours to decide
        except ShardlineError as exc:
            self._perform(self.supervisor.fail(exc))
        except Exception as exc:  # a bug must fail the job, not leave it hanging
            log.exception("job %s: internal error", self.id)
            self._perform(self.supervisor.fail(ShardlineError(f"internal error: {type(exc).__name__}: {exc}")))
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await self._stop_attempts()
            if not self._suspending and self.writer.lost is None:
                # A job left to resume (here or by its new owner) keeps its committed outputs.
                await self._discard_remote_outputs()
        failure = self.supervisor.failure
        if failure is None:
            self._move(JobEvent.SUCCEED)
            self.release.sweep_spool()
            log.info("job %s succeeded", self.id)
        else:
            cancelled = isinstance(failure, JobCancelledError)
            self._move(JobEvent.CANCEL if cancelled else JobEvent.FAIL)
            self.error = str(failure) if cancelled else f"job {self.id} failed: {failure}"
            log.info("job %s %s: %s", self.id, self.state.value, self.error)
            await self.release.discard_outputs()
        self._perform(self.supervisor.finish(succeeded=failure is None))
        self.finished_at = time.time()
        self.writer.mark_job()
        await self._drain_background()
        with contextlib.suppress(ShardlineError):  # logged by the writer; the job's end stands
            await self.writer.flush()
        await self.writer.aclose()
        self.finished.set()
        self.notify()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._perform(self.supervisor.tick(loop.time()))
            await asyncio.sleep(self.context.settings.supervise_interval_s)

    async def cancel(self) -> None:
        if self.state.is_final:
            return
        self._perform(self.supervisor.fail(JobCancelledError(f"job {self.id} was cancelled")))
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
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel()
        if runners:
            _, stuck = await asyncio.wait(runners, timeout=_STOP_WAIT_S)
            if stuck:  # a backend that ignores cancellation must not hang the job
                log.error("job %s: %d attempt(s) did not stop within %.0fs", self.id, len(stuck), _STOP_WAIT_S)
        await self._drain_background()

    async def _drain_background(self) -> None:
        while self._background:
            background, self._background = self._background, set()
            await asyncio.gather(*background, return_exceptions=True)

    def _move(self, event: JobEvent) -> None:
        self.state = next_job_state(self.state, event)

    def notify(self) -> None:
        """Wake whoever waits in `until` (something about the job changed):
        once per turn of the event loop, however many changes that turn saw,
        so a burst of shard events wakes each waiter once, not once per event."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Wait until `condition()` holds (re-checked on every change), or `timeout_s` passes."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that arrives as the event fires.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._changed.wait()

    # -- performing the supervisor's actions --------------------------------------

    def _perform(self, actions: Iterable[Action]) -> None:
        changed = False
        for action in actions:
            changed = True
            if isinstance(action, Launch):
                task = shard_task(self, action.shard, action.attempt)
                self._runners[(action.shard, action.attempt)] = asyncio.create_task(
                    self._run_attempt(action, task), name=f"{self.id}-{action.shard}-{action.attempt}"
                )
            elif isinstance(action, StopAttempt):
                self._stop_runner(action.shard, action.attempt)
            elif isinstance(action, RaiseFence):
                fence = self.context.markers.raise_fence(self.id, action.shard, action.min_attempt)
                self._spawn(fence, f"marker fence of shard {action.shard}")
            elif isinstance(action, SaveShard):
                self.writer.mark_shard(action.shard)
            elif isinstance(action, CommitShard):
                version = self._commits[action.shard] = self.writer.mark_shard(action.shard)
                self._undurable_commits.append(version)
                if not self.backend.observes_exit:
                    self._stop_runner(action.shard, action.attempt)  # nothing else would end it (and free its slot)
        if changed:
            self.notify()

    def _stop_runner(self, shard: int, attempt: int) -> None:
        runner = self._runners.get((shard, attempt))
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("job %s: %s failed: %s", self.id, what, task.exception())

        task.add_done_callback(finished)
        return task

    # -- attempts -------------------------------------------------------------------

    def spool_path(self, shard: int, attempt: int) -> str:
        return os.path.join(self.record.spool_dir, attempt_output_name(shard, attempt))

    def output_path(self, shard: int, attempt: int) -> str:
        return self.backend.output_location(self.id, shard, attempt) or self.spool_path(shard, attempt)

    async def _run_attempt(self, launch: Launch, task: ShardTask) -> None:
        loop = asyncio.get_running_loop()
        shard, attempt = launch.shard, launch.attempt
        try:
            try:
                # The number is durable before anyone can use it, and we still own the job.
                await self.writer.wait_durable(self.writer.mark_shard(shard) if launch.reserve else 0)
                await self._ensure_lease()
                exit_ = await self.backend.run(
                    task, on_started=lambda: self.supervisor.backend_started(shard, attempt, loop.time())
                )
                cause = f"{exit_.detail} before its result was committed"
            except (asyncio.CancelledError, LeaseLostError):
                raise
            except Exception as exc:  # the backend (or the store) could not run the attempt at all
                log.exception("job %s shard %d attempt %d could not run", self.id, shard, attempt)
                cause = f"backend {self.backend.name} could not run the worker: {type(exc).__name__}: {exc}"
            self._perform(self.supervisor.attempt_exited(shard, attempt, cause, loop.time()))
        finally:
            self._runners.pop((shard, attempt), None)
            committed = self.supervisor.committed(shard)
            uncommitted = committed is None or committed.attempt != attempt
            if uncommitted and is_s3_url(task.output_path):
                # Now, not only with the job's staging (which still catches an
                # attempt that cannot be stopped and uploads later: Lambda).
                self._spawn(self._delete_remote_output(task.output_path), f"removing {task.output_path}")
            elif uncommitted:
                with contextlib.suppress(OSError):
                    os.unlink(task.output_path)

    async def _delete_remote_output(self, location: str) -> None:
        bucket, key = self.context.s3_buckets.for_url(location)
        try:
            await bucket.request("delete_object", Key=key)
        except ShardlineError as exc:  # leftovers cost storage, not correctness
            log.info("job %s: could not remove %s: %s", self.id, location, exc)

    async def _discard_remote_outputs(self) -> None:
        try:
            await self.backend.discard_outputs(self.id)
        except ShardlineError as exc:  # leftovers cost storage, not correctness
            log.warning("job %s: could not remove attempt outputs: %s", self.id, exc)

    # -- exchange hooks -------------------------------------------------------------

    def session_idle_timeout_s(self) -> float:
        return self.spec.timeouts.heartbeat_s

    def on_connect(self, hello: Hello) -> Error | None:
        refusal = self.supervisor.on_connect(hello, asyncio.get_running_loop().time())
        self.notify()
        return refusal

    def on_head(self, hello: Hello, head: Head) -> Error | None:
        return self.supervisor.on_head(hello, head, asyncio.get_running_loop().time())

    def on_progress(self, hello: Hello, progress: Progress) -> None:
        self.supervisor.on_progress(hello, progress, asyncio.get_running_loop().time())

    async def on_done(self, hello: Hello, done: Done) -> bool:
        """Verify the attempt's output (I/O), then let the supervisor decide."""
        if self.supervisor.may_commit(hello, done) is not None:
            return False
        path = self.output_path(hello.shard, hello.attempt)
        problem = await output_problem(path, done.output_bytes, self.context.s3_buckets)
        committed, actions = self.supervisor.on_done(
            hello, done, output_path=path, output_problem=problem, now=asyncio.get_running_loop().time()
        )
        self._perform(actions)
        if committed:
            self.release.on_commit(hello.shard)
        return committed

    def on_failed(self, hello: Hello, failed: Failed) -> None:
        self._perform(self.supervisor.on_failed(hello, failed, asyncio.get_running_loop().time()))

    def on_disconnect(self, hello: Hello) -> None:
        pass  # the heartbeat deadline and the backend notice a worker that is gone

    # -- the store ---------------------------------------------------------------------

    def commit_durable(self, shard: int) -> bool:
        return self.writer.durable >= self._commits.get(shard, 0)

    def undurable_commits(self) -> int:
        """How many committed shards' commits are not in the store yet (amortised O(1))."""
        pending, durable = self._undurable_commits, self.writer.durable
        while pending and pending[0] <= durable:
            pending.popleft()
        return len(pending)

    async def committed_durably(self, shard: int) -> CommittedAttempt:
        """`shard`'s committed attempt once its commit is in the store; raises the job's failure instead."""
        supervisor = self.supervisor
        await self.until(lambda: supervisor.state(shard) is ShardState.DONE or supervisor.failure is not None)
        if supervisor.failure is not None:
            raise supervisor.failure
        await self.writer.wait_durable(self._commits.get(shard, 0))
        committed = supervisor.committed(shard)
        assert committed is not None
        return committed

    async def update_committed(self, shard: int, committed: CommittedAttempt) -> None:
        """Record where `shard`'s committed output is now (fetched, published), durably."""
        await self._ensure_lease()  # before what it records is written anywhere
        self.supervisor.update_committed(shard, committed)
        await self.writer.wait_durable(self.writer.mark_shard(shard))

    def _current_record(self) -> JobRecord:
        self.record = replace(
            self.record, state=self.state, updated_at=time.time(), finished_at=self.finished_at, error=self.error
        )
        return self.record

    async def renew_lease(self) -> None:
        """Extend our lease on the job (the coordinator does, every third of its length);
        LeaseLostError once another coordinator has taken the job over."""
        async with self._lease_lock:
            if self.writer.lost is not None:
                raise self.writer.lost
            try:
                self.writer.lease = await self.context.store.renew(
                    self.writer.lease, lease_s=self.context.settings.lease_s
                )
            except LeaseLostError as exc:
                self.writer.lost = exc
                self._lost(exc)
                raise

    async def _ensure_lease(self) -> None:
        """Renew first unless our lease holds, by our own clock, with a third of it to spare:
        a stalled owner that wakes up launches and writes nothing before it has renewed."""
        if not self.writer.lease.valid(time.time(), margin_s=self.context.settings.lease_s / 3):
            await self.renew_lease()

    def _lost(self, exc: LeaseLostError) -> None:
        """Another coordinator took the job over: stop without deciding or writing anything more."""
        log.warning("job %s: lost to another coordinator; stopping it here: %s", self.id, exc)
        self._on_lost(self, exc)


def job_view(job: Job, *, limit: int = SHARDS_PAGE_DEFAULT) -> JobView:
    """What `GET /jobs/{id}` shows of `job`: counts over every shard, and its first `limit` shards.

    Costs O(limit), never O(shards): the counts are kept as shards change.
    """
    supervisor = job.supervisor
    states = supervisor.state_counts()
    undurable = job.undurable_commits()  # DONE only once a restart would keep it
    states[ShardState.DONE] -= undurable
    states[ShardState.RUNNING] += undurable
    return JobView(
        id=job.id,
        state=job.state,
        spec=job.spec,
        size=job.size,
        etag=job.record.etag,
        shards=shard_views(job, 0, limit),
        created_at=job.record.created_at,
        finished_at=job.finished_at,
        error=job.error,
        output=job.spec.output,
        retries=supervisor.retries,
        shards_done=states[ShardState.DONE],
        bytes_emitted=supervisor.bytes_emitted,
        shard_states=states,
        shards_offset=0,
    )


def shard_views(job: Job, offset: int, limit: int) -> tuple[ShardView, ...]:
    """Shards [offset, offset + limit) of `job` (fewer at the end), as views show them."""
    views = []
    for index in range(max(offset, 0), min(offset + limit, len(job.supervisor))):
        status = job.supervisor.status(index)
        committed = status.committed
        state = status.state
        if state is ShardState.DONE and not job.commit_durable(index):
            state = ShardState.RUNNING  # DONE only once a restart would keep it
        views.append(
            ShardView(
                index=index,
                state=state,
                attempt=status.attempt,
                bytes=status.bytes,
                emitted=(committed.emitted_start, committed.emitted_end) if committed else None,
                tail_sources=committed.tail_sources if committed else (),
                error=status.error,
            )
        )
    return tuple(views)


def shard_task(job: Job, shard: int, attempt: int) -> ShardTask:
    """What attempt `attempt` of `shard` is given to run."""
    host, port = job.context.exchange_address
    settings = job.context.settings
    return ShardTask(
        job_id=job.id,
        shard=shard,
        shards=job.spec.shards,
        attempt=attempt,
        source=job.spec.source,
        size=job.size,
        etag=job.record.etag or "",
        delimiter=job.spec.delimiter,
        command=job.spec.command,
        output_path=job.output_path(shard, attempt),
        exchange_host=settings.advertise_host or host,
        exchange_port=port,
        exchange_tls=job.context.exchange_tls,
        exchange_ca=settings.exchange_ca if job.context.exchange_tls else None,
        secret=attempt_secret(job.exchange_secret, shard, attempt),
        markers=settings.markers,
        max_line_bytes=job.spec.max_line_bytes,
        part_size_bytes=job.spec.part_size_bytes,
        max_in_flight_bytes=job.spec.max_in_flight_bytes,
        aws=job.aws_task_settings,
        command_env_drop=settings.command_env_drop,
        ok_exit=job.spec.ok_exit,
        header_lines=job.spec.header_lines,
    )
