"""The coordinator's job stores (`MemoryJobStore`, `DynamoJobStore`): one
contract, and DynamoDB's own concerns, against the session's moto server.

Every test uses a table of its own, so scans see only its own jobs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from shardline.coordinator import DEFAULT_JOBS_TABLE, DynamoJobStore, JobStore, MemoryJobStore
from shardline.coordinator._store import JOB_RECORD_SHARD  # the store's own item layout, private to it
from shardline.errors import ConfigurationError, StorageError
from shardline.io.retry import RetryPolicy
from shardline.io.tables import ensure_jobs_table
from shardline.protocol import MARKER_TTL_ATTRIBUTE, JobSpec, JobState, ShardRecord, ShardState, marker_key

from polling import eventually
from records import committed, job_record, shard_records

DAY_S = 24 * 3600


@pytest.fixture
async def table(dynamodb) -> str:
    name = f"jobs-{uuid.uuid4().hex[:12]}"
    await ensure_jobs_table(dynamodb, name)
    return name


def test_shard_index_may_not_take_the_job_records_place() -> None:
    with pytest.raises(ConfigurationError, match="shard index"):
        ShardRecord(job_id="j", index=JOB_RECORD_SHARD, state=ShardState.PENDING, next_attempt=0)


def test_default_jobs_table_name() -> None:
    assert DEFAULT_JOBS_TABLE == "shardline-jobs"


# --- both stores, the same contract --------------------------------------------------


@pytest.fixture(params=["memory", "dynamodb"])
async def store(request, dynamodb, table) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy())


def test_durability() -> None:
    assert MemoryJobStore.durable is False
    assert DynamoJobStore.durable is True


async def test_create_load_round_trip(store: JobStore) -> None:
    job = job_record()
    shards = shard_records(job.job_id, 60)  # more than one BatchWriteItem (25 items)
    await store.create_job(job, shards)
    assert await store.load_job(job.job_id) == (job, shards)
    assert await store.load_job("no-such-job") is None


async def test_saves_replace_records(store: JobStore) -> None:
    job = job_record()
    shards = shard_records(job.job_id, 3)
    await store.create_job(job, shards)
    done = ShardRecord(job_id=job.job_id, index=1, state=ShardState.DONE, next_attempt=2, committed=committed())
    await store.save_shard(done)
    finished = job_record(job.job_id, state=JobState.SUCCEEDED, finished_at=1_700_000_100.0, result_path="/r")
    await store.save_job(finished)
    assert await store.load_job(job.job_id) == (finished, [shards[0], done, shards[2]])


async def test_list_and_delete(store: JobStore) -> None:
    jobs = [job_record(created_at=1_700_000_000.0 + n) for n in (3, 1, 2)]
    for job in jobs:
        await store.create_job(job, shard_records(job.job_id, 30))
    assert await store.list_jobs() == sorted(jobs, key=lambda job: job.created_at)
    await store.delete_job(jobs[0].job_id)
    await store.delete_job(jobs[0].job_id)  # already gone: a no-op
    await store.delete_job("no-such-job")
    assert await store.load_job(jobs[0].job_id) is None
    assert [job.job_id for job in await store.list_jobs()] == [jobs[1].job_id, jobs[2].job_id]
    loaded = await store.load_job(jobs[1].job_id)
    assert loaded is not None and len(loaded[1]) == 30


async def test_concurrent_saves_of_one_shard_end_with_the_last(store: JobStore) -> None:
    job = job_record()
    await store.create_job(job, shard_records(job.job_id, 2))
    versions = [ShardRecord(job_id=job.job_id, index=1, state=ShardState.RUNNING, next_attempt=n) for n in range(40)]
    await asyncio.gather(*(store.save_shard(version) for version in versions))
    loaded = await store.load_job(job.job_id)
    assert loaded is not None and loaded[1][1] == versions[-1]


# --- DynamoDB specifics ----------------------------------------------------------------


class SlowPuts:
    """A DynamoDB client whose PutItems are delayed and counted, and optionally fail.

    The delays are uneven so that, were writes of one key not serialised, an
    older PutItem could complete after a newer one.
    """

    def __init__(self, dynamodb: Any, *, fail_first: int = 0) -> None:
        self._dynamodb = dynamodb
        self.puts: list[dict[str, Any]] = []
        self._fail = fail_first

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dynamodb, name)

    async def put_item(self, **kwargs: Any) -> Any:
        number = len(self.puts)
        self.puts.append(kwargs["Item"])
        await asyncio.sleep(0.02 if number % 2 == 0 else 0.0)
        if number < self._fail:
            raise ClientError({"Error": {"Code": "ValidationException", "Message": "refused"}}, "PutItem")
        return await self._dynamodb.put_item(**kwargs)


async def test_saves_are_coalesced_latest_wins(dynamodb, table) -> None:
    slow = SlowPuts(dynamodb)
    store = DynamoJobStore(slow, table, retry_policy=RetryPolicy())
    job = job_record()
    await store.create_job(job, shard_records(job.job_id, 2))
    slow.puts.clear()
    versions = [ShardRecord(job_id=job.job_id, index=0, state=ShardState.RUNNING, next_attempt=n) for n in range(30)]
    jobs = [job_record(job.job_id, updated_at=float(n)) for n in range(30)]
    await asyncio.gather(*(store.save_shard(v) for v in versions), *(store.save_job(j) for j in jobs))
    untouched = ShardRecord(job_id=job.job_id, index=1, state=ShardState.PENDING, next_attempt=1)
    assert await DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy()).load_job(job.job_id) == (
        jobs[-1],
        [versions[-1], untouched],
    )
    assert len(slow.puts) < len(versions) + len(jobs)  # superseded records were never written


async def test_a_failed_write_fails_its_callers_and_later_records_are_still_written(dynamodb, table) -> None:
    slow = SlowPuts(dynamodb, fail_first=1)
    store = DynamoJobStore(slow, table, retry_policy=RetryPolicy())
    job = job_record()
    await DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy()).create_job(job, shard_records(job.job_id, 1))
    versions = [ShardRecord(job_id=job.job_id, index=0, state=ShardState.RUNNING, next_attempt=n) for n in range(5)]
    results = await asyncio.gather(*(store.save_shard(v) for v in versions), return_exceptions=True)
    # The first write carried only the first record; its failure is reported to that caller alone.
    assert isinstance(results[0], StorageError) and "refused" in str(results[0])
    assert results[1:] == [None] * 4
    assert (await store.load_job(job.job_id))[1] == [versions[-1]]
    # The store recovers: the next save is written normally.
    await store.save_shard(versions[2])
    assert (await store.load_job(job.job_id))[1] == [versions[2]]


async def test_a_cancelled_save_does_not_disturb_later_ones(dynamodb, table) -> None:
    slow = SlowPuts(dynamodb)
    store = DynamoJobStore(slow, table, retry_policy=RetryPolicy())
    job = job_record()
    await DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy()).create_job(job, shard_records(job.job_id, 1))
    old = ShardRecord(job_id=job.job_id, index=0, state=ShardState.STARTING, next_attempt=1)
    new = ShardRecord(job_id=job.job_id, index=0, state=ShardState.RUNNING, next_attempt=2)
    first = asyncio.ensure_future(store.save_shard(old))
    # Looked for at every turn of the loop, so that the PutItem is still in flight.
    await eventually(lambda: slow.puts, "its PutItem was sent", interval_s=0)
    first.cancel()
    await store.save_shard(new)
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await store.load_job(job.job_id))[1] == [new]


async def test_items_carry_a_ttl(dynamodb, table) -> None:
    store = DynamoJobStore(dynamodb, table, ttl_s=DAY_S, retry_policy=RetryPolicy())
    job = job_record()
    await store.create_job(job, shard_records(job.job_id, 2))

    async def expires_at(shard: int) -> int:
        response = await dynamodb.get_item(TableName=table, Key=marker_key(job.job_id, shard), ConsistentRead=True)
        return int(response["Item"][MARKER_TTL_ATTRIBUTE]["N"])

    far = time.time() + 300 * DAY_S  # running jobs are not reaped
    assert all([await expires_at(shard) > far for shard in (JOB_RECORD_SHARD, 0, 1)])
    finished_at = time.time() - 10
    await store.save_job(job_record(job.job_id, state=JobState.CANCELLED, finished_at=finished_at))
    assert await expires_at(JOB_RECORD_SHARD) == int(finished_at + DAY_S)


async def test_pagination_beyond_one_megabyte(dynamodb, table) -> None:
    # DynamoDB pages Scan and Query at 1 MB; moto does too.  ~1.6 MB of job
    # records and ~1.2 MB of one job's shard records each need several pages.
    store = DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy())
    big = "x" * 100_000
    jobs = [
        job_record(spec=JobSpec(source="s3://b/k", shards=1, command=f"echo {n}; : {big}"), created_at=float(n))
        for n in range(16)
    ]
    for job in jobs:
        await store.create_job(job, [])
    assert await store.list_jobs() == jobs
    many = jobs[0]
    shards = shard_records(many.job_id, 40, error=big[:30_000])
    for shard in shards:
        await store.save_shard(shard)
    assert await store.load_job(many.job_id) == (many, shards)
    await store.delete_job(many.job_id)
    response = await dynamodb.query(
        TableName=table,
        KeyConditionExpression="#job = :job",
        ExpressionAttributeNames={"#job": "job"},
        ExpressionAttributeValues={":job": {"S": many.job_id}},
    )
    assert response["Items"] == []
    assert len(await store.list_jobs()) == len(jobs) - 1


async def test_storage_errors_are_translated(dynamodb) -> None:
    store = DynamoJobStore(dynamodb, f"missing-{uuid.uuid4().hex[:12]}", retry_policy=RetryPolicy())
    with pytest.raises(StorageError, match="listing jobs"):
        await store.list_jobs()
    with pytest.raises(StorageError, match="saving job"):
        await store.save_job(job_record())
