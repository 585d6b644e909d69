"""The job stores' own concerns beyond the contract (tests/io/test_store_contract.py):
DynamoDB's expiry attributes, its 1 MB pages and its errors, against the
session's moto server.  Every test uses a table of its own.
"""

from __future__ import annotations

import time
import uuid

import pytest

from shardline.errors import ConfigurationError, StorageError
from shardline.io.retry import RetryPolicy
from shardline.io.store import (
    DEFAULT_JOBS_TABLE,
    JOB_RECORD_SHARD,
    DynamoJobStore,
    MemoryJobStore,
    SqliteJobStore,
    ensure_jobs_table,
)
from shardline.protocol import MARKER_TTL_ATTRIBUTE, JobSpec, JobState, ShardRecord, ShardState, marker_key

from records import job_record, shard_records

DAY_S = 24 * 3600
OWNER = "coordinator-test"


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


def test_durability() -> None:
    assert MemoryJobStore.durable is False
    assert DynamoJobStore.durable is True
    assert SqliteJobStore.durable is True


async def test_items_carry_a_ttl(dynamodb, table) -> None:
    store = DynamoJobStore(dynamodb, table, ttl_s=DAY_S, retry_policy=RetryPolicy())
    job = job_record()
    lease = await store.create_job(job, shard_records(job.job_id, 2), owner=OWNER, lease_s=30)

    async def expires_at(shard: int) -> int:
        response = await dynamodb.get_item(TableName=table, Key=marker_key(job.job_id, shard), ConsistentRead=True)
        return int(response["Item"][MARKER_TTL_ATTRIBUTE]["N"])

    far = time.time() + 300 * DAY_S  # running jobs are not reaped
    assert all([await expires_at(shard) > far for shard in (JOB_RECORD_SHARD, 0, 1)])
    finished_at = time.time() - 10
    await store.save(lease, job=job_record(job.job_id, state=JobState.CANCELLED, finished_at=finished_at))
    assert await expires_at(JOB_RECORD_SHARD) == int(finished_at + DAY_S)


async def test_pagination_beyond_one_megabyte(dynamodb, table) -> None:
    # DynamoDB pages Query at 1 MB; moto does too.  ~1.6 MB of job records and
    # ~1.2 MB of one job's shard records each need several pages.
    store = DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy())
    big = "x" * 100_000
    jobs = [
        job_record(spec=JobSpec(source="s3://b/k", shards=1, command=f"echo {n}; : {big}"), created_at=float(n))
        for n in range(16)
    ]
    leases = [await store.create_job(job, [], owner=OWNER, lease_s=30) for job in jobs]
    assert [stored.record for stored in await store.list_jobs()] == jobs
    many = jobs[0]
    shards = shard_records(many.job_id, 40, error=big[:30_000])
    await store.save(leases[0], shards=shards)
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
    store = DynamoJobStore(dynamodb, f"missing-{uuid.uuid4().hex[:12]}", retry_policy=RetryPolicy(attempts=1))
    with pytest.raises(StorageError, match="listing jobs"):
        await store.list_jobs()
    with pytest.raises(StorageError, match="creating"):
        await store.create_job(job_record(), [], owner=OWNER, lease_s=30)
