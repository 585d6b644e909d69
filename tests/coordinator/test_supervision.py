"""Deadlines, retries, fencing, speculation, cancel and resume (DESIGN §5).

Jobs run through the real Coordinator, exchange, DynamoDB markers and
worker code against the moto server.  Failures come from real causes: a
worker process killed with SIGKILL, a command that hangs or fails, an
attempt whose runtime never starts (a backend that reports it started and
then never runs it, as a Lambda stuck before its handler would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from shardline.coordinator import (
    Backend,
    Coordinator,
    CoordinatorSettings,
    LocalProcessBackend,
    OutputPolicy,
    WorkerExit,
)
from shardline.embedded import InProcessBackend
from shardline.errors import JobCancelledError, JobFailedError, NotAcceptingJobsError, StaleAttemptError
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import (
    DynamoJobStore,
    DynamoMarkerStore,
    JobStore,
    SqliteDatabase,
    SqliteJobStore,
    ensure_jobs_table,
)
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    Boundary,
    Error,
    ExchangeSession,
    JobSpec,
    JobState,
    Marker,
    ShardState,
    ShardTask,
    ShardTimeouts,
    shards_as_stored,
)
from shardline.worker import run_task

from jobs import only_in_attempt, running_coordinator, sequential_reference
from polling import eventually

DATA = b"".join(b"row %06d %s\n" % (i, b"x" * (i % 37)) for i in range(3000))
FAST = CoordinatorSettings(
    retry_backoff_s=0.05,
    retry_backoff_max_s=0.2,
    supervise_interval_s=0.05,
    output_policy=OutputPolicy(anywhere=True),  # outputs go to the test's tmp_path
)


class Scripted(Backend):
    """A real backend, except that listed (shard, attempt)s are reported as
    started and then never run, and `gated` ones wait for `gate`."""

    def __init__(
        self, inner: Backend, *, hang: set[tuple[int, int]] = frozenset(), gated: set[tuple[int, int]] = frozenset()
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.hang = set(hang)
        self.gated = set(gated)
        self.gate = asyncio.Event()
        self.tasks: list[ShardTask] = []

    async def run(self, task: ShardTask, *, on_started) -> WorkerExit:
        self.tasks.append(task)
        if (task.shard, task.attempt) in self.hang:
            on_started()
            await asyncio.Event().wait()
        if (task.shard, task.attempt) in self.gated:
            await self.gate.wait()
        return await self.inner.run(task, on_started=on_started)

    async def aclose(self) -> None:
        await self.inner.aclose()


def coordinator(
    aws: AwsSettings, backend: Backend, *, store: JobStore | None = None, settings: CoordinatorSettings = FAST
) -> contextlib.AbstractAsyncContextManager[Coordinator]:
    return running_coordinator(aws, backend, settings=settings, store=store)


async def collect(service: Coordinator, job_id: str) -> bytes:
    out = bytearray()
    async for piece in service.output(job_id):
        with open(piece.path, "rb") as f:
            f.seek(piece.start)
            out += f.read(piece.end - piece.start)
    return bytes(out)


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "input"
    path.write_bytes(DATA)
    return str(path)


async def test_worker_process_killed_mid_stream_is_retried(source, aws_settings):
    # The command kills its own worker process (SIGKILL) after taking some input.
    command = only_in_attempt(1, 0, "head -c 5000 >/dev/null; kill -9 $PPID; exit 1") + "; cat"
    async with coordinator(aws_settings, LocalProcessBackend(max_processes=2)) as service:
        view = await service.submit(JobSpec(source=source, shards=4, command=command))
        assert await collect(service, view.id) == DATA
        view = service.view(view.id)
    assert view.state.value == "succeeded"
    attempts = [shard.attempt for shard in view.shards]
    # A pool process runs several shards: any other shard it was running when
    # it died is retried as well, and only those.
    assert attempts[1] == 1 and set(attempts) <= {0, 1}
    assert view.retries == attempts.count(1)


async def test_worker_that_never_connects_hits_the_start_deadline(source, aws_settings):
    backend = Scripted(InProcessBackend(), hang={(1, 0)})
    spec = JobSpec(source=source, shards=3, timeouts=ShardTimeouts(start_s=1.0))
    async with coordinator(aws_settings, backend) as service:
        view = await service.submit(spec)
        assert await collect(service, view.id) == DATA
        view = service.view(view.id)
        assert service.metrics.deadline_misses["start"] == 1
        assert service.metrics.retries["start"] == 1
    assert [shard.attempt for shard in view.shards] == [0, 1, 0]


async def test_hung_command_hits_the_total_deadline(source, aws_settings):
    command = only_in_attempt(2, 0, "sleep 600") + "; cat"
    spec = JobSpec(source=source, shards=3, command=command, timeouts=ShardTimeouts(total_s=5.0))
    async with coordinator(aws_settings, InProcessBackend()) as service:
        view = await service.submit(spec)
        assert await collect(service, view.id) == DATA
        assert service.metrics.deadline_misses["total"] == 1
        assert service.view(view.id).shards[2].attempt == 1


async def test_stale_attempt_writes_are_rejected(source, aws_settings):
    # Attempt 0 of shard 1 never starts; after its start deadline attempt 1
    # is launched (held at a gate while we act as the stale attempt 0).
    backend = Scripted(InProcessBackend(), hang={(1, 0)}, gated={(1, 1)})
    spec = JobSpec(source=source, shards=3, timeouts=ShardTimeouts(start_s=0.5))
    async with coordinator(aws_settings, backend) as service:
        view = await service.submit(spec)
        await eventually(lambda: any((t.shard, t.attempt) == (1, 1) for t in backend.tasks), "attempt 1 launched")
        stale = next(t for t in backend.tasks if (t.shard, t.attempt) == (1, 0))

        # The exchange refuses the stale attempt's session.
        session = ExchangeSession.client(job_id=stale.job_id, shard=1, attempt=0, secret=stale.secret)
        reader, writer = await asyncio.open_connection(*service.exchange.address)
        writer.write(session.send(session.hello))
        session.receive_data(await asyncio.wait_for(reader.read(), 15))
        writer.close()
        session.receive_data(b"")
        frames = [session.next_frame(), session.next_frame()]
        assert isinstance(frames[1], Error) and "not current" in frames[1].message

        # Its marker write is fenced off once the coordinator raised the fence.
        async with client(aws_settings, "dynamodb") as dynamodb:
            markers = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
            boundary = Boundary(start=stale.range.start, head_end=stale.range.start, line_start=True)
            marker = Marker(job_id=stale.job_id, shard=1, attempt=0, boundary=boundary, etag=stale.etag)

            async def fenced() -> bool:
                try:
                    await markers.publish(marker)
                except StaleAttemptError as exc:
                    assert "attempt 0" in str(exc)
                    return True
                return False

            # The fence is raised in the background.
            await eventually(fenced, "the stale marker write is fenced", interval_s=0.05)

        # The stale worker itself, run for real, is stopped and commits nothing.
        with pytest.raises(StaleAttemptError):
            await run_task(stale)

        backend.gate.set()
        assert await collect(service, view.id) == DATA
        view = service.view(view.id)
        assert service.metrics.fenced_writes >= 1
    assert view.shards[1].attempt == 1
    assert not os.path.exists(stale.output_path)


async def test_straggler_gets_a_speculative_attempt_and_the_first_commit_wins(source, aws_settings):
    command = only_in_attempt(2, 0, "sleep 600") + "; cat"
    settings = CoordinatorSettings(
        retry_backoff_s=0.05,
        speculate_after_fraction=0.5,
        speculate_slowdown=1.0,
        speculate_min_s=1.0,
        supervise_interval_s=0.05,
    )
    async with coordinator(aws_settings, InProcessBackend(), settings=settings) as service:
        view = await service.submit(JobSpec(source=source, shards=4, command=command))
        assert await collect(service, view.id) == DATA
        view = service.view(view.id)
        assert service.metrics.retries["speculative"] == 1
    assert view.shards[2].attempt == 1
    assert view.retries == 1


async def test_command_failing_on_every_attempt_fails_the_job_naming_shard_and_stderr(source, aws_settings):
    command = 'if [ "$SHARDLINE_SHARD" = 1 ]; then echo "boom: disk on fire" >&2; exit 3; fi; cat'
    spec = JobSpec(source=source, shards=3, command=command, max_attempts=2, command_retries=5)
    async with coordinator(aws_settings, InProcessBackend()) as service:
        view = await service.submit(spec)
        with pytest.raises(JobFailedError) as info:
            await collect(service, view.id)
        view = service.view(view.id)
    message = str(info.value)
    assert "shard 1 failed" in message and "status 3" in message and "boom: disk on fire" in message
    assert "(2 attempts)" in message
    assert view.state.value == "failed" and view.error == message


async def test_input_errors_are_not_retried(tmp_path, aws_settings):
    path = tmp_path / "input"
    path.write_bytes(b"short\n" + b"y" * 5000 + b"\nshort\n")
    spec = JobSpec(source=str(path), shards=2, max_line_bytes=100)
    async with coordinator(aws_settings, InProcessBackend()) as service:
        view = await service.submit(spec)
        with pytest.raises(JobFailedError, match="longer than max_line_bytes=100"):
            await collect(service, view.id)
        assert service.view(view.id).retries == 0


async def test_cancel_stops_workers_and_removes_outputs(source, aws_settings, tmp_path):
    marker = tmp_path / "still-running"
    command = f"touch {marker}; sleep 600; rm {marker}"
    async with coordinator(aws_settings, LocalProcessBackend(max_processes=2)) as service:
        view = await service.submit(JobSpec(source=source, shards=2, command=command))
        await eventually(marker.exists, "a command is running")
        spool = service._jobs[view.id].record.spool_dir
        cancelled = await service.cancel(view.id)
        assert cancelled.state.value == "cancelled"
        with pytest.raises(JobCancelledError):
            await collect(service, view.id)
    assert not os.path.exists(spool)
    assert all(shard.state.value in ("cancelled", "done") for shard in cancelled.shards)


async def test_resume_after_the_coordinator_stops_keeps_committed_shards(source, aws_settings, tmp_path):
    runs = tmp_path / "runs.log"
    # Shard 3's first attempt hangs, so the coordinator stops mid-job.
    command = f'echo "$SHARDLINE_SHARD $SHARDLINE_ATTEMPT" >> {runs}; ' + only_in_attempt(3, 0, "sleep 600") + "; cat"
    settings = CoordinatorSettings(spool_dir=str(tmp_path / "spool"), retry_backoff_s=0.05, supervise_interval_s=0.05)
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_jobs_table(dynamodb, "resume-jobs")
        store = DynamoJobStore(dynamodb, "resume-jobs", retry_policy=RetryPolicy())
        async with coordinator(aws_settings, InProcessBackend(), store=store, settings=settings) as first:
            view = await first.submit(JobSpec(source=source, shards=4, command=command))
            await eventually(lambda: first.view(view.id).shards_done >= 3, "three shards committed")
        # `first` is gone without finishing the job; a new coordinator resumes it.
        async with coordinator(aws_settings, InProcessBackend(), store=store, settings=settings) as second:
            assert await second.resume() == [view.id]
            assert await collect(second, view.id) == sequential_reference(DATA, "cat")
            resumed = second.view(view.id)
    assert resumed.state.value == "succeeded"
    assert [shard.attempt for shard in resumed.shards][:3] == [0, 0, 0]
    assert resumed.shards[3].attempt >= 1
    lines = runs.read_text().split("\n")
    assert sorted(line for line in lines if line and line.split()[0] != "3") == ["0 0", "1 0", "2 0"]


#: Only against a hang: these tests assert on what happens, never on how fast.
HANG_GUARD_S = 60.0


class GatedCreateStore(SqliteJobStore):
    """The real SQLite store, whose `create_job` waits for `gate` after it has
    written the job: a submission caught at its commit point."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(str(path)), retry_policy=RetryPolicy())
        self.created = asyncio.Event()
        self.gate = asyncio.Event()

    async def create_job(self, job, shards, *, owner, lease_s):
        lease = await super().create_job(job, shards, owner=owner, lease_s=lease_s)
        self.created.set()
        await self.gate.wait()
        return lease


async def test_a_submission_still_checking_when_the_close_begins_is_refused(source, aws_settings, tmp_path):
    store = GatedCreateStore(tmp_path / "jobs.db")
    store.gate.set()  # a submission that reached the store would go through
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with coordinator(aws_settings, InProcessBackend(), store=store) as service:
        submitting = asyncio.create_task(service.submit(JobSpec(source=source, shards=2), ready=ready))
        await eventually(lambda: service.accepting and not submitting.done() and _awaits(submitting), "stat done")
        closing = asyncio.create_task(service.aclose())
        await eventually(lambda: not service.accepting, "the close began")
        ready.set_result(None)
        with pytest.raises(NotAcceptingJobsError, match="shutting down"):
            await asyncio.wait_for(submitting, HANG_GUARD_S)
        await asyncio.wait_for(closing, HANG_GUARD_S)
    assert await store.list_jobs() == []  # nothing was created that nobody runs
    assert not store.created.is_set()


async def test_a_submission_at_its_commit_when_the_close_begins_is_suspended_and_resumable(
    source, aws_settings, tmp_path
):
    store = GatedCreateStore(tmp_path / "jobs.db")
    settings = CoordinatorSettings(spool_dir=str(tmp_path / "spool"), retry_backoff_s=0.05, supervise_interval_s=0.05)
    async with coordinator(aws_settings, InProcessBackend(), store=store, settings=settings) as first:
        submitting = asyncio.create_task(first.submit(JobSpec(source=source, shards=3, command="cat")))
        await store.created.wait()  # the store holds the job; its submission has not returned
        closing = asyncio.create_task(first.aclose())
        await eventually(lambda: not first.accepting, "the close began")
        assert not closing.done()  # it waits for the submission in flight
        store.gate.set()
        view = await asyncio.wait_for(submitting, HANG_GUARD_S)  # accepted: the job is the store's, to resume
        await asyncio.wait_for(closing, HANG_GUARD_S)
    (stored,) = await store.list_jobs()
    assert stored.record.job_id == view.id and not stored.record.state.is_final
    assert stored.lease is None or not stored.lease.valid(time.time())  # given up by the close
    async with coordinator(aws_settings, InProcessBackend(), store=store, settings=settings) as second:
        assert await second.resume() == [view.id]
        assert await collect(second, view.id) == sequential_reference(DATA, "cat")


def _awaits(task: asyncio.Task) -> bool:
    """Whether `task` is parked on an await (it has started and is not running)."""
    return bool(task.get_stack())


async def test_reduce_and_output_directory(source, aws_settings, tmp_path):
    destination = tmp_path / "out"
    spec = JobSpec(
        source=source, shards=4, command="wc -l", reduce="awk '{s+=$1} END {print s}'", output=str(destination)
    )
    async with coordinator(aws_settings, InProcessBackend()) as service:
        view = await service.submit(spec)
        result = await collect(service, view.id)
    assert result == b"%d\n" % DATA.count(b"\n")
    manifest = json.loads((destination / "_manifest.json").read_text())
    assert [shard["index"] for shard in manifest["shards"]] == [0, 1, 2, 3]
    counts = [int(Path(shard["part"]).read_text()) for shard in manifest["shards"]]
    assert sum(counts) == DATA.count(b"\n")
    assert (destination / "result").read_bytes() == result


async def test_submit_and_cancel_write_only_the_records_that_changed(source, aws_settings, tmp_path):
    """Submitting stores the job's record and no shard records (a shard without
    one is fresh); cancelling stores the job's final record, not one per
    cancelled shard: read back, the unfinished shards are cancelled."""
    shards = 6
    backend = Scripted(InProcessBackend(), gated={(index, 0) for index in range(1, shards)})
    settings = CoordinatorSettings(spool_dir=str(tmp_path / "spool"), supervise_interval_s=0.05)
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_jobs_table(dynamodb, "cancel-jobs")
        store = DynamoJobStore(dynamodb, "cancel-jobs", retry_policy=RetryPolicy())
        async with coordinator(aws_settings, backend, store=store, settings=settings) as service:
            view = await service.submit(JobSpec(source=source, shards=shards))
            loaded = await store.load_job(view.id)
            assert loaded is not None and loaded[1] == []
            await eventually(lambda: service.view(view.id).shards_done == 1, "shard 0 committed")
            cancelled = await service.cancel(view.id)
            assert cancelled.shard_states[ShardState.CANCELLED] == shards - 1
        loaded = await store.load_job(view.id)
    assert loaded is not None
    record, stored = loaded
    assert record.state is JobState.CANCELLED
    assert [shard.index for shard in stored] == [0]  # the commit; nothing per cancelled shard
    states = [shard.state for shard in shards_as_stored(record, stored)]
    assert states == [ShardState.DONE] + [ShardState.CANCELLED] * (shards - 1)
