"""The store contract, run unchanged against SQLite, moto's DynamoDB and DynamoDB Local
(and, for jobs and leases, the memory store of in-process runs).

Conditional marker writes, fences, leases and expiry must behave the same
on all three: these tests are the definition of "the same".
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from shardline.errors import LeaseLostError, MarkerConflictError, StaleAttemptError
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import (
    DynamoJobStore,
    DynamoMarkerStore,
    JobStore,
    MarkerStore,
    MemoryJobStore,
    SqliteDatabase,
    SqliteJobStore,
    SqliteMarkerStore,
    ensure_jobs_table,
    ensure_marker_table,
)
from shardline.protocol import Boundary, JobRecord, JobSpec, JobState, Marker, ShardRecord, ShardState

from dynamodblocal import DynamoDBLocal, find_emulator

RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)
#: The stores that keep state beyond the process: markers live only there.
DURABLE = ("sqlite", "moto", "dynamodb-local")


@pytest.fixture(scope="session")
def dynamodb_local_url() -> AsyncIterator[str]:
    emulator = find_emulator()
    if emulator is None:
        if os.environ.get("SHARDLINE_REQUIRE_DYNAMODB_LOCAL"):
            pytest.fail("DynamoDB Local is required (SHARDLINE_REQUIRE_DYNAMODB_LOCAL) but was not found")
        pytest.skip("DynamoDB Local not installed (set SHARDLINE_DYNAMODB_LOCAL to its emulator directory)")
    server = DynamoDBLocal(emulator)
    url = server.start()
    yield url
    server.stop()


class Backend:
    """Makes marker and job stores of one kind, each on fresh tables (or a fresh file)."""

    def __init__(self, kind: str, stack: AsyncExitStack, *, aws: AwsSettings | None, path: str) -> None:
        self.kind = kind
        self._stack = stack
        self._aws = aws
        self._path = path
        self._dynamodb = None
        self._tables: dict[str, str] = {}

    async def _client(self):
        if self._dynamodb is None:
            assert self._aws is not None
            self._dynamodb = await self._stack.enter_async_context(client(self._aws, "dynamodb"))
        return self._dynamodb

    async def markers(self, *, ttl_s: int = 3600) -> MarkerStore:
        assert self.kind != "memory", "markers live in SQLite or DynamoDB: workers in other processes reach them"
        if self.kind == "sqlite":
            return SqliteMarkerStore(SqliteDatabase(self._path), retry_policy=RETRY, ttl_s=ttl_s)
        dynamodb = await self._client()
        if "markers" not in self._tables:
            self._tables["markers"] = f"markers-{uuid.uuid4().hex[:10]}"
            await ensure_marker_table(dynamodb, self._tables["markers"])
        return DynamoMarkerStore(dynamodb, self._tables["markers"], retry_policy=RETRY, ttl_s=ttl_s)

    async def jobs(self, *, ttl_s: float = 3600) -> JobStore:
        if self.kind == "memory":
            return MemoryJobStore()
        if self.kind == "sqlite":
            return SqliteJobStore(SqliteDatabase(self._path), retry_policy=RETRY, ttl_s=ttl_s)
        dynamodb = await self._client()
        if "jobs" not in self._tables:
            self._tables["jobs"] = f"jobs-{uuid.uuid4().hex[:10]}"
            await ensure_jobs_table(dynamodb, self._tables["jobs"])
        return DynamoJobStore(dynamodb, self._tables["jobs"], retry_policy=RETRY, ttl_s=ttl_s)


async def _backend(request, tmp_path, aws_settings) -> AsyncIterator[Backend]:
    kind = request.param
    aws = None
    if kind == "moto":
        aws = aws_settings
    elif kind == "dynamodb-local":
        url = request.getfixturevalue("dynamodb_local_url")
        aws = AwsSettings(
            region="us-east-1", dynamodb_endpoint_url=url, access_key_id="contract", secret_access_key="contract"
        )
    async with AsyncExitStack() as stack:
        yield Backend(kind, stack, aws=aws, path=str(tmp_path / "state" / "shardline.db"))


@pytest.fixture(params=DURABLE)
async def backend(request, tmp_path, aws_settings) -> AsyncIterator[Backend]:
    """A store that keeps state beyond the process (markers, expiry)."""
    async for made in _backend(request, tmp_path, aws_settings):
        yield made


@pytest.fixture(params=(*DURABLE, "memory"))
async def any_store(request, tmp_path, aws_settings) -> AsyncIterator[Backend]:
    """Any store, the memory one of in-process runs included (jobs and leases)."""
    async for made in _backend(request, tmp_path, aws_settings):
        yield made


def marker(attempt: int = 1, head_end: int = 105, *, job: str = "job-a", shard: int = 1) -> Marker:
    return Marker(
        job_id=job,
        shard=shard,
        attempt=attempt,
        boundary=Boundary(start=100, head_end=head_end, line_start=True),
        etag='"abc"',
    )


# --- markers --------------------------------------------------------------------


async def test_a_published_marker_reads_back(backend: Backend) -> None:
    store = await backend.markers()
    assert await store.lookup("job-a", 1) is None
    await store.publish(marker())
    assert await store.lookup("job-a", 1) == marker()


async def test_the_same_boundary_again_is_fine_and_the_first_writer_is_kept(backend: Backend) -> None:
    store = await backend.markers()
    await store.publish(marker(attempt=1))
    await store.publish(marker(attempt=2))
    stored = await store.lookup("job-a", 1)
    assert stored is not None and stored.attempt == 1 and stored.boundary == marker().boundary


async def test_another_boundary_is_a_conflict(backend: Backend) -> None:
    store = await backend.markers()
    await store.publish(marker(head_end=105))
    with pytest.raises(MarkerConflictError, match="already records"):
        await store.publish(marker(attempt=2, head_end=107))
    assert (await store.lookup("job-a", 1)) == marker(head_end=105)


async def test_a_fence_refuses_older_attempts_and_never_moves_down(backend: Backend) -> None:
    store = await backend.markers()
    await store.raise_fence("job-a", 1, 3)
    assert await store.lookup("job-a", 1) is None  # a fence alone is no marker
    await store.raise_fence("job-a", 1, 1)  # lower: nothing to do
    with pytest.raises(StaleAttemptError, match="fenced at attempt 3"):
        await store.publish(marker(attempt=2))
    await store.publish(marker(attempt=3))
    with pytest.raises(StaleAttemptError):
        await store.publish(marker(attempt=2))  # the fence outlives the marker's publication
    await store.raise_fence("job-a", 1, 5)
    assert (await store.lookup("job-a", 1)) == marker(attempt=3)  # fencing keeps the marker


async def test_markers_of_other_shards_and_jobs_are_apart(backend: Backend) -> None:
    store = await backend.markers()
    await store.publish(marker(shard=1))
    await store.raise_fence("job-b", 1, 9)
    await store.publish(marker(shard=2, head_end=109))
    assert (await store.lookup("job-a", 2)).boundary.head_end == 109
    assert await store.lookup("job-b", 1) is None


async def test_an_expired_marker_reads_as_absent_and_is_written_over(backend: Backend) -> None:
    expired = await backend.markers(ttl_s=-60)  # everything it writes has expired already
    await expired.publish(marker(head_end=105))
    await expired.raise_fence("job-a", 2, 7)
    store = await backend.markers()
    assert await store.lookup("job-a", 1) is None
    await store.publish(marker(attempt=2, head_end=107))  # no conflict: the old one is gone
    assert (await store.lookup("job-a", 1)) == marker(attempt=2, head_end=107)
    await store.publish(marker(attempt=1, shard=2))  # the expired fence refuses nothing
    assert (await store.lookup("job-a", 2)) is not None


# --- jobs and leases ----------------------------------------------------------------


def job_record(job_id: str, *, state: JobState = JobState.RUNNING, finished_at: float | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=job_id,
        spec=JobSpec(source="/data/in.txt", shards=3, command="wc -l"),
        state=state,
        created_at=now,
        updated_at=now,
        finished_at=finished_at,
        size=1000,
        etag="local-1",
        spool_dir="/spool/x",
    )


def shards(job_id: str, count: int, *, next_attempt: int = 1) -> list[ShardRecord]:
    return [
        ShardRecord(job_id=job_id, index=i, state=ShardState.PENDING, next_attempt=next_attempt) for i in range(count)
    ]


async def test_a_created_job_loads_and_lists_with_its_owner(any_store: Backend) -> None:
    store = await any_store.jobs()
    job_id = uuid.uuid4().hex
    lease = await store.create_job(job_record(job_id), shards(job_id, 3), owner="coord-1", lease_s=30)
    assert (lease.owner, lease.epoch) == ("coord-1", 1)
    loaded = await store.load_job(job_id)
    assert loaded is not None
    record, stored = loaded
    assert record.job_id == job_id and [s.index for s in stored] == [0, 1, 2]
    listed = [job for job in await store.list_jobs() if job.record.job_id == job_id]
    assert len(listed) == 1 and listed[0].lease is not None and listed[0].lease.owner == "coord-1"


async def test_saves_under_the_lease_are_kept_together(any_store: Backend) -> None:
    store = await any_store.jobs()
    job_id = uuid.uuid4().hex
    lease = await store.create_job(job_record(job_id), shards(job_id, 250), owner="coord-1", lease_s=30)
    done = job_record(job_id, state=JobState.SUCCEEDED, finished_at=time.time())
    await store.save(lease, job=done, shards=shards(job_id, 250, next_attempt=4))
    record, stored = await store.load_job(job_id)
    assert record.state is JobState.SUCCEEDED
    assert len(stored) == 250 and {s.next_attempt for s in stored} == {4}


async def test_a_current_lease_cannot_be_taken_and_an_expired_one_can(any_store: Backend) -> None:
    store = await any_store.jobs()
    job_id = uuid.uuid4().hex
    first = await store.create_job(job_record(job_id), shards(job_id, 2), owner="coord-1", lease_s=30)
    assert await store.acquire(job_id, owner="coord-2", lease_s=30) is None
    expiring = await store.renew(first, lease_s=-1)  # as if coord-1 stalled past its lease
    taken = await store.acquire(job_id, owner="coord-2", lease_s=30)
    assert taken is not None and taken.owner == "coord-2" and taken.epoch == expiring.epoch + 1
    # The stalled owner wakes up: fenced, and nothing it tries is stored.
    with pytest.raises(LeaseLostError):
        await store.save(first, shards=shards(job_id, 2, next_attempt=9))
    with pytest.raises(LeaseLostError):
        await store.save(first, job=job_record(job_id, state=JobState.FAILED, finished_at=1.0))
    with pytest.raises(LeaseLostError):
        await store.renew(first, lease_s=30)
    record, stored = await store.load_job(job_id)
    assert record.state is JobState.RUNNING and {s.next_attempt for s in stored} == {1}
    await store.save(taken, shards=shards(job_id, 2, next_attempt=5))
    assert {s.next_attempt for s in (await store.load_job(job_id))[1]} == {5}


async def test_an_owner_may_take_its_own_lease_again_and_a_released_one_is_free(any_store: Backend) -> None:
    store = await any_store.jobs()
    job_id = uuid.uuid4().hex
    first = await store.create_job(job_record(job_id), shards(job_id, 1), owner="coord-1", lease_s=30)
    again = await store.acquire(job_id, owner="coord-1", lease_s=30)  # a restart of the same coordinator
    assert again is not None and again.epoch == first.epoch + 1
    with pytest.raises(LeaseLostError):
        await store.save(first, shards=shards(job_id, 1))  # the older epoch is fenced all the same
    await store.release(again)
    other = await store.acquire(job_id, owner="coord-2", lease_s=30)
    assert other is not None and other.epoch == again.epoch + 1
    await store.release(again)  # a lost lease: releasing it is a no-op
    assert await store.acquire(job_id, owner="coord-3", lease_s=30) is None


async def test_unknown_and_deleted_jobs_are_absent(any_store: Backend) -> None:
    store = await any_store.jobs()
    assert await store.acquire("no-such-job", owner="coord-1", lease_s=30) is None
    assert await store.load_job("no-such-job") is None
    job_id = uuid.uuid4().hex
    await store.create_job(job_record(job_id), shards(job_id, 3), owner="coord-1", lease_s=30)
    await store.delete_job(job_id)
    assert await store.load_job(job_id) is None
    assert job_id not in {job.record.job_id for job in await store.list_jobs()}
    await store.delete_job(job_id)  # again: a no-op


async def test_an_expired_finished_job_reads_as_absent(backend: Backend) -> None:
    store = await backend.jobs(ttl_s=-3600)  # a finished job expires at once
    job_id = uuid.uuid4().hex
    lease = await store.create_job(job_record(job_id), shards(job_id, 1), owner="coord-1", lease_s=30)
    await store.save(lease, job=job_record(job_id, state=JobState.SUCCEEDED, finished_at=time.time()))
    assert await store.load_job(job_id) is None
    assert job_id not in {job.record.job_id for job in await store.list_jobs()}
    assert await store.acquire(job_id, owner="coord-2", lease_s=30) is None
