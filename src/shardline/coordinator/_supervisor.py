# Supervision of one job's shards, as a sans-I/O state machine (DESIGN §5).
#
# The supervisor takes events -- a backend started an attempt or saw it end,
# a worker said HELLO, HEAD, PROGRESS, DONE (its output already verified by
# the caller) or FAILED, the clock ticked, the job was cancelled -- and
# returns actions: launch an attempt, stop one, raise a shard's marker fence,
# save a shard's record, a shard committed, the job failed.  It never awaits
# and never touches a socket, a process or a store; `_job.Job` performs the
# actions.  Every decision about an event is taken in the one synchronous
# call that receives it, so no decision is re-checked after an await.
#
# Rules (unchanged from the design):
# - Every shard runs as one or more attempts, each watched against three
#   deadlines: start (the backend started it, the worker must reach the
#   exchange), heartbeat (a connected worker must not go silent) and total.
# - An attempt that fails, ends without a committed result or misses a
#   deadline is stopped, the shard's marker fence is raised past it, and the
#   shard is retried after a backoff with the next attempt number, up to
#   `max_attempts` failures; a failure no retry can fix fails the job.  A
#   command's own exit status is such a failure (the same bytes give the same
#   status) unless the job allows `command_retries`; its signals are not.
# - A straggler may get one speculative attempt beside it once most shards
#   are done; the first to commit wins and the other is stopped.
# - Attempt numbers are reserved in the store before they are used (a
#   Launch says when its record must be saved first), so a restarted
#   coordinator never reuses a number an orphaned worker may still hold.
#
# Cost: every event costs O(log N) at most.  Deadlines, retry times and
# speculation candidates live in heaps whose entries are checked when they
# come due (an entry whose attempt has moved on is dropped or re-queued), so
# a tick touches only what is due, never every shard.

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Sequence

from ..errors import CommandExitError, ShardFailedError, ShardlineError
from ..io.retry import RetryPolicy
from ..protocol import (
    CommittedAttempt,
    Done,
    Error,
    Failed,
    Head,
    Hello,
    Progress,
    ShardEvent,
    ShardRange,
    ShardRecord,
    ShardState,
)
from ._actions import (
    Action,
    AttemptState,
    CommitShard,
    FailJob,
    Launch,
    RaiseFence,
    SaveShard,
    ShardProgress,
    ShardStatus,
    StopAttempt,
    SupervisorSettings,
)
from ._metrics import CoordinatorMetrics, RunningMedian

__all__ = [
    "Action",
    "CommitShard",
    "FailJob",
    "Launch",
    "RaiseFence",
    "SaveShard",
    "StopAttempt",
    "Supervisor",
    "SupervisorSettings",
]

log = logging.getLogger("shardline.coordinator.supervisor")


class Supervisor:
    """Decides what happens to one job's shards; see the module comment.

    `records` are the shards' stored records; `fresh` says they were just
    created (attempt 0 is reserved by creation) rather than loaded after a
    restart (every reserved number is then stale and fenced).
    """

    def __init__(
        self,
        *,
        job_id: str,
        size: int,
        records: Sequence[ShardRecord],
        fresh: bool,
        settings: SupervisorSettings,
        metrics: CoordinatorMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.job_id = job_id
        self.settings = settings
        self.metrics = metrics
        self._rng = rng or random.Random()
        ordered = sorted(records, key=lambda r: r.index)
        count = len(ordered)
        self._shards = [
            ShardProgress(
                index=r.index,
                range=ShardRange.of(size, count, r.index),
                state=r.state,
                saved_next_attempt=r.next_attempt,
                next_attempt=0 if fresh else r.next_attempt,
                committed=r.committed,
                error=r.error,
                retries=r.retries,
                bytes_emitted=r.committed.bytes if r.committed else 0,
            )
            for r in ordered
        ]
        self.failure: ShardlineError | None = None
        # Kept as shards change, so that views and metrics never count every shard.
        self._state_counts = Counter(shard.state for shard in self._shards)
        self._retries_total = sum(shard.retries for shard in self._shards)
        self._bytes_emitted = sum(shard.bytes_emitted for shard in self._shards)
        self.done_count = self._state_counts[ShardState.DONE]
        self._live_count = 0
        self._seq = itertools.count()
        #: (when, seq, shard, attempt): the attempt's next deadline, checked when due.
        self._deadlines: list[tuple[float, int, int, int]] = []
        #: (when, seq, shard): a shard waiting out its retry backoff.
        self._retries: list[tuple[float, int, int]] = []
        #: Shard indexes ready to launch, lowest first (release goes in index order).
        self._ready: list[int] = []
        #: (started_at, seq, shard, attempt): speculation candidates, oldest first.
        self._running: list[tuple[float, int, int, int]] = []
        self._durations_s = RunningMedian()
        self._retry_policy = RetryPolicy(
            base_delay_s=settings.retry_backoff_s, max_delay_s=settings.retry_backoff_max_s
        )

    # -- queries -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._shards)

    def range(self, shard: int) -> ShardRange:
        return self._shards[shard].range

    def committed(self, shard: int) -> CommittedAttempt | None:
        return self._shards[shard].committed

    def live_attempts(self, shard: int) -> list[int]:
        """The numbers of `shard`'s attempts running now, lowest first."""
        return sorted(self._shards[shard].live)

    def state(self, shard: int) -> ShardState:
        return self._shards[shard].state

    def status(self, shard: int) -> ShardStatus:
        s = self._shards[shard]
        attempt = s.committed.attempt if s.committed is not None else max(s.live, default=max(s.next_attempt - 1, 0))
        return ShardStatus(
            index=s.index,
            state=s.state,
            attempt=attempt,
            bytes=s.bytes_emitted,
            committed=s.committed,
            error=s.error,
            retries=s.retries,
        )

    def state_counts(self) -> dict[ShardState, int]:
        """How many shards are in each state (every state named, zeros included); O(1)."""
        return {state: self._state_counts[state] for state in ShardState}

    @property
    def retries(self) -> int:
        """Retries launched so far, over every shard (speculative attempts included)."""
        return self._retries_total

    @property
    def bytes_emitted(self) -> int:
        """Input bytes emitted so far, over every shard (exact for committed ones)."""
        return self._bytes_emitted

    def _move(self, shard: ShardProgress, event: ShardEvent) -> None:
        before = shard.state
        shard.move(event)
        self._counted(before, shard.state)

    def _counted(self, before: ShardState, after: ShardState) -> None:
        self._state_counts[before] -= 1
        self._state_counts[after] += 1

    def _emitted(self, shard: ShardProgress, bytes_emitted: int) -> None:
        self._bytes_emitted += bytes_emitted - shard.bytes_emitted
        shard.bytes_emitted = bytes_emitted

    def record(self, shard: int) -> ShardRecord:
        s = self._shards[shard]
        return ShardRecord(
            job_id=self.job_id,
            index=s.index,
            state=s.state,
            next_attempt=max(s.next_attempt, s.saved_next_attempt),
            committed=s.committed,
            error=s.error,
            retries=s.retries,
        )

    def update_committed(self, shard: int, committed: CommittedAttempt) -> None:
        """Where `shard`'s committed output is now (fetched into the spool, published); the attempt is the same."""
        s = self._shards[shard]
        assert s.committed is not None and s.committed.attempt == committed.attempt
        s.committed = committed

    def saved(self, shard: int, record: ShardRecord) -> None:
        """`record` (from `record(shard)`) is now durable."""
        s = self._shards[shard]
        s.saved_next_attempt = max(s.saved_next_attempt, record.next_attempt)

    # -- the job's life ------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin (or resume): whatever ran before is stale, every unfinished shard is pending."""
        actions: list[Action] = []
        for shard in self._shards:
            if shard.state is ShardState.DONE:
                continue
            self._counted(shard.state, ShardState.PENDING)
            shard.state = ShardState.PENDING
            shard.retry_at = None
            self._raise_fence(shard, actions)
            heapq.heappush(self._ready, shard.index)
        return actions + self.tick(now)

    def fail(self, error: ShardlineError) -> list[Action]:
        """The job fails (or is cancelled) with `error`, unless it already has; stop every attempt."""
        if self.failure is not None:
            return []
        self.failure = error
        actions: list[Action] = [FailJob(error)]
        for shard in self._shards:  # from now on the exchange refuses them as stale
            for number in shard.live:
                actions.append(StopAttempt(shard.index, number))
            shard.live.clear()
        self._live_count = 0
        return actions

    def finish(self, *, succeeded: bool) -> list[Action]:
        """The job ended: forget live attempts; unless it succeeded, unfinished shards are cancelled.

        Nothing to save: the job's final record says it (`protocol.shards_as_stored`
        reads an unfinished shard of an ended job as cancelled), so cancelling
        20,000 shards writes one record, not 20,000.
        """
        for shard in self._shards:
            shard.live.clear()
            if not succeeded and not shard.state.is_final:
                self._move(shard, ShardEvent.CANCEL)
        self._live_count = 0
        return []

    # -- the clock -----------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Deadlines that passed, retries that are due, launches, speculation."""
        actions: list[Action] = []
        if self.failure is not None:
            return actions
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, index, number = heapq.heappop(self._deadlines)
            self._check_deadline(index, number, seq, now, actions)
        while self._retries and self._retries[0][0] <= now:
            _, _, index = heapq.heappop(self._retries)
            shard = self._shards[index]
            if shard.state is ShardState.PENDING and shard.retry_at is not None:
                shard.retry_at = None
                heapq.heappush(self._ready, index)
        self._launch_ready(actions)
        self._maybe_speculate(now, actions)
        return actions

    def _check_deadline(self, index: int, number: int, seq: int, now: float, actions: list[Action]) -> None:
        shard = self._shards[index]
        attempt = shard.live.get(number)
        if attempt is None or attempt.watch != seq or shard.state.is_final:
            return  # ended meanwhile, or a newer entry speaks for it
        due, kind, cause = self._next_deadline(attempt)
        if due > now:
            self._push_deadline(due, attempt, index)  # heard from meanwhile
            return
        self.metrics.deadline_misses[kind] += 1
        self._end_attempt(shard, attempt, cause, retryable=True, reason=kind, now=now, actions=actions)

    def _next_deadline(self, attempt: AttemptState) -> tuple[float, str, str]:
        """When `attempt` misses its first deadline, which one, and why."""
        assert attempt.started_at is not None
        timeouts = self.settings.timeouts
        candidates = [
            (attempt.started_at + timeouts.total_s, "total", f"missed its total deadline ({timeouts.total_s:g}s)")
        ]
        if attempt.connected:
            candidates.append(
                (
                    attempt.last_heard + timeouts.heartbeat_s,
                    "heartbeat",
                    f"worker silent for longer than its heartbeat deadline ({timeouts.heartbeat_s:g}s)",
                )
            )
        else:
            candidates.append(
                (
                    attempt.started_at + timeouts.start_s,
                    "start",
                    f"worker did not reach the exchange within its start deadline ({timeouts.start_s:g}s)",
                )
            )
        return min(candidates, key=lambda c: c[0])

    def _push_deadline(self, due: float, attempt: AttemptState, index: int) -> None:
        attempt.watch = next(self._seq)
        heapq.heappush(self._deadlines, (due, attempt.watch, index, attempt.number))

    # -- launching -----------------------------------------------------------------

    def _launch_ready(self, actions: list[Action]) -> None:
        limit = self.settings.max_live_attempts
        while self._ready and (limit is None or self._live_count < limit):
            index = heapq.heappop(self._ready)
            shard = self._shards[index]
            if shard.state is ShardState.PENDING and shard.retry_at is None and not shard.live:
                self._launch(shard, speculative=False, actions=actions)

    def _launch(self, shard: ShardProgress, *, speculative: bool, actions: list[Action]) -> None:
        number = shard.next_attempt
        shard.next_attempt += 1
        shard.live[number] = AttemptState(number=number, speculative=speculative)
        self._live_count += 1
        shard.retry_at = None
        if shard.state is ShardState.PENDING:
            self._move(shard, ShardEvent.LAUNCH)
        actions.append(
            Launch(shard.index, number, speculative=speculative, reserve=shard.saved_next_attempt < shard.next_attempt)
        )

    def backend_started(self, shard: int, attempt: int, now: float) -> None:
        """The backend really started the attempt (a process slot, an accepted invoke)."""
        found = self._find(shard, attempt)
        if found is None:
            return
        s, a = found
        if a.started_at is None:
            a.started_at = a.last_heard = now
            self._watch(s, a)

    def _watch(self, shard: ShardProgress, attempt: AttemptState) -> None:
        assert attempt.started_at is not None
        due, _, _ = self._next_deadline(attempt)
        self._push_deadline(due, attempt, shard.index)
        heapq.heappush(self._running, (attempt.started_at, next(self._seq), shard.index, attempt.number))

    def attempt_exited(self, shard: int, attempt: int, detail: str, now: float) -> list[Action]:
        """The backend's run of the attempt ended (the worker process exited, or could not be run)."""
        actions: list[Action] = []
        found = self._find(shard, attempt)
        if found is not None:
            s, a = found
            self._end_attempt(s, a, detail, retryable=True, reason="failed", now=now, actions=actions)
        return actions

    # -- ending attempts -----------------------------------------------------------

    def _end_attempt(
        self,
        shard: ShardProgress,
        attempt: AttemptState,
        cause: str,
        *,
        retryable: bool,
        reason: str,
        now: float,
        actions: list[Action],
    ) -> None:
        """`attempt` failed: stop it, and retry the shard or fail the job."""
        if shard.live.pop(attempt.number, None) is None:
            return
        self._live_count -= 1
        actions.append(StopAttempt(shard.index, attempt.number))
        if shard.state.is_final or self.failure is not None:
            return
        shard.failures += 1
        shard.error = f"attempt {attempt.number}: {cause}"
        # INFO: most failures are retried; the job's own failure is what callers report.
        log.info("job %s shard %d attempt %d: %s", self.job_id, shard.index, attempt.number, cause)
        self._raise_fence(shard, actions)
        if shard.live:
            return  # a speculative twin is still running
        if not retryable or shard.failures >= self.settings.max_attempts:
            self._move(shard, ShardEvent.FAIL)
            tries = f"{shard.failures} attempt{'s' if shard.failures > 1 else ''}"
            actions.append(SaveShard(shard.index))
            said = f"{cause} ({tries})" if retryable or shard.failures > 1 else cause
            actions += self.fail(ShardFailedError(shard.index, said))
            return
        self._move(shard, ShardEvent.RETRY)
        settings = self.settings
        # Half the base delay at least, plus the one retry helper's jittered backoff.
        backoff_s = settings.retry_backoff_s / 2 + self._retry_policy.delay_s(shard.failures, self._rng)
        shard.retry_at = now + backoff_s
        heapq.heappush(self._retries, (shard.retry_at, next(self._seq), shard.index))
        shard.retries += 1
        self._retries_total += 1
        self.metrics.retries[reason] += 1
        actions.append(SaveShard(shard.index))

    def _raise_fence(self, shard: ShardProgress, actions: list[Action]) -> None:
        """Refuse marker writes from every attempt below the lowest live one."""
        fence = min([*shard.live, shard.next_attempt])
        if fence > shard.fence:
            shard.fence = fence
            actions.append(RaiseFence(shard.index, fence))

    # -- speculation -----------------------------------------------------------------

    def _maybe_speculate(self, now: float, actions: list[Action]) -> None:
        settings = self.settings
        if not len(self._durations_s) or self.done_count < settings.speculate_after_fraction * len(self._shards):
            return
        threshold = max(settings.speculate_min_s, settings.speculate_slowdown * self._durations_s.median())
        while self._running and self._running[0][0] < now - threshold:
            _started_at, _, index, number = heapq.heappop(self._running)
            shard = self._shards[index]
            if shard.state.is_final or shard.speculated or list(shard.live) != [number]:
                continue  # ended, or already has a twin: never a candidate again
            self.metrics.retries["speculative"] += 1
            shard.speculated = True
            shard.retries += 1
            self._retries_total += 1
            self._launch(shard, speculative=True, actions=actions)

    # -- the exchange's events -------------------------------------------------------

    def _find(self, shard: int, attempt: int) -> tuple[ShardProgress, AttemptState] | None:
        if not 0 <= shard < len(self._shards):
            return None
        s = self._shards[shard]
        a = s.live.get(attempt)
        return None if a is None else (s, a)

    def _refuse(self, hello: Hello, what: str) -> Error:
        self.metrics.fenced_writes += 1
        message = f"{what}: shard {hello.shard} attempt {hello.attempt} is not current (stale) for job {self.job_id}"
        return Error(message=message, stale=True)

    def on_connect(self, hello: Hello, now: float) -> Error | None:
        """A worker opened its session: accept it (None) or refuse a stale attempt."""
        found = self._find(hello.shard, hello.attempt)
        if found is None:
            return self._refuse(hello, "session refused")
        shard, attempt = found
        first = attempt.started_at is None  # a backend that cannot tell when it started
        attempt.connected = True
        attempt.last_heard = now
        if first:
            attempt.started_at = now
            self._watch(shard, attempt)
        else:
            # The start deadline no longer applies; the heartbeat one may come sooner.
            due, _, _ = self._next_deadline(attempt)
            self._push_deadline(due, attempt, shard.index)
        if shard.state is ShardState.STARTING:
            self._move(shard, ShardEvent.CONNECT)
        return None

    def on_head(self, hello: Hello, head: Head, now: float) -> Error | None:
        """A shard's boundary arrived; an ERROR refuses it (and closes the session)."""
        found = self._find(hello.shard, hello.attempt)
        if found is None:
            return self._refuse(hello, "HEAD refused")
        shard, attempt = found
        attempt.last_heard = now
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

    def on_progress(self, hello: Hello, progress: Progress, now: float) -> None:
        found = self._find(hello.shard, hello.attempt)
        if found is not None:
            shard, attempt = found
            attempt.last_heard = now
            if shard.committed is None:
                self._emitted(shard, max(shard.bytes_emitted, progress.bytes_emitted))

    def may_commit(self, hello: Hello, done: Done) -> str | None:
        """Why `done` cannot be committed as it stands (None: it can, once its output is verified).

        A refusal of a stale attempt is counted here; the caller then
        answers it without looking at its output.
        """
        found = self._find(hello.shard, hello.attempt)
        if found is None:
            self._refuse(hello, "DONE refused")
            return "stale"
        shard, _ = found
        if shard.state is not ShardState.RUNNING:
            return "not running"
        return None

    def on_done(
        self, hello: Hello, done: Done, *, output_path: str, output_problem: str | None, now: float
    ) -> tuple[bool, list[Action]]:
        """A worker's result, its output already checked by the caller (`output_problem` says why not).

        Returns whether it is committed, and the actions that follow.
        """
        actions: list[Action] = []
        found = self._find(hello.shard, hello.attempt)
        if found is None:
            self._refuse(hello, "DONE refused")
            return False, actions
        shard, attempt = found
        if shard.state is not ShardState.RUNNING:
            return False, actions
        problem = self._check_done(shard, done) or output_problem
        if problem is not None:
            self._end_attempt(shard, attempt, problem, retryable=True, reason="failed", now=now, actions=actions)
            return False, actions
        shard.committed = CommittedAttempt(
            attempt=attempt.number,
            emitted_start=done.emitted_start,
            emitted_end=done.emitted_end,
            line_start=done.line_start,
            bytes=done.bytes,
            checksum=done.checksum,
            output_bytes=done.output_bytes,
            output_path=output_path,
            tail_sources=tuple(done.tail_sources),
            output_checksum=done.output_checksum,
        )
        self._emitted(shard, done.bytes)
        shard.error = None
        self._move(shard, ShardEvent.COMMIT)
        self.done_count += 1
        for number in list(shard.live):  # the winner leaves live; a slower twin is stopped
            del shard.live[number]
            self._live_count -= 1
            if number != attempt.number:
                actions.append(StopAttempt(shard.index, number))
        if attempt.started_at is not None:
            self._durations_s.add(now - attempt.started_at)
        self.metrics.tail_sources.update(done.tail_sources)
        self.metrics.bytes_emitted += done.bytes
        self.metrics.output_bytes += done.output_bytes
        actions.append(CommitShard(shard.index, attempt.number))
        self._launch_ready(actions)  # a freed slot
        return True, actions

    def on_failed(self, hello: Hello, failed: Failed, now: float) -> list[Action]:
        actions: list[Action] = []
        found = self._find(hello.shard, hello.attempt)
        if found is None:
            self._refuse(hello, "FAILED ignored")
            return actions
        shard, attempt = found
        retryable = failed.retryable
        if failed.kind == CommandExitError.__name__:
            shard.command_failures += 1
            retryable = retryable and shard.command_failures <= self.settings.command_retries
        self._end_attempt(
            shard, attempt, failed.message, retryable=retryable, reason="failed", now=now, actions=actions
        )
        return actions

    def _check_done(self, shard: ShardProgress, done: Done) -> str | None:
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
