# Durable job state (DESIGN §2, §5: a restarted coordinator resumes its jobs),
# and the coordinator's side of marker fencing.
#
# Layout of the jobs table: the marker table's schema (job S HASH, shard N
# RANGE).  A job is one partition: its JobRecord at shard = JOB_RECORD_SHARD,
# each ShardRecord at shard = its index, each as a JSON string attribute (a
# new field needs no schema change).  `expires_at` is the TTL: a running
# job's items are kept for a year, a final job record for `ttl_s` after it
# finished.  The coordinator deletes jobs itself once their retention ends;
# the TTL only reaps what a lost coordinator left behind, so a final job's
# shard records may outlive its (invisible without it) job record.
#
# Ordering: the coordinator saves one shard's record from several tasks
# (exchange hooks, the supervisor).  Writes of one key are serialised and
# coalesced, so a slow older PutItem can never land after a newer one.

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StorageThrottledError
from ..io.aws import translate_error
from ..io.retry import RetryPolicy, retry
from ..protocol import MARKER_TTL_ATTRIBUTE, JobRecord, ShardRecord, marker_key

__all__ = [
    "DEFAULT_JOBS_TABLE",
    "DEFAULT_RECORD_TTL_S",
    "JOB_RECORD_SHARD",
    "DynamoJobStore",
    "JobStore",
    "MemoryJobStore",
]

DEFAULT_JOBS_TABLE = "shardline-jobs"
#: The sort key of a job's own record; shard records use their index (>= 0).
JOB_RECORD_SHARD = -1
#: How long a final job's record is kept after it finished.
DEFAULT_RECORD_TTL_S = 30 * 24 * 3600
#: Expiry of a running job's items: no job runs this long, yet an abandoned table is still reaped.
_ACTIVE_EXPIRY_S = 365 * 24 * 3600
_RECORD_ATTRIBUTE = "record"
#: BatchWriteItem's limit per request.
_BATCH_WRITE_ITEMS = 25


# --- stores -------------------------------------------------------------------------


class JobStore(abc.ABC):
    """Where the coordinator keeps job and shard state."""

    #: True if the state survives a coordinator restart.
    durable: bool
    #: Names where the state lives: recorded with each job's spool, so that
    #: only a coordinator of the same store removes a resumable job's spool.
    identity: str = ""

    @abc.abstractmethod
    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord]) -> None:
        """Store a new job with all its shards (before any save_* call for it)."""

    @abc.abstractmethod
    async def save_job(self, job: JobRecord) -> None:
        """Store `job`; concurrent calls for one job follow save_shard's latest-wins rule."""

    @abc.abstractmethod
    async def save_shard(self, shard: ShardRecord) -> None:
        """Store `shard`; returns once it, or a record saved later for the same shard, is stored.

        Concurrent calls for one shard never leave an older record stored
        after a newer one (call order decides which is newer).
        """

    @abc.abstractmethod
    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        """The job and its shards ordered by index, or None if unknown."""

    @abc.abstractmethod
    async def list_jobs(self) -> list[JobRecord]:
        """Every job record, oldest first (no shard records)."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its shards; a no-op for an unknown job."""


class MemoryJobStore(JobStore):
    """Job state in this process only (embedded runs, tests)."""

    durable = False

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._shards: dict[str, dict[int, ShardRecord]] = {}

    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord]) -> None:
        self._shards[job.job_id] = {shard.index: shard for shard in shards}
        self._jobs[job.job_id] = job

    async def save_job(self, job: JobRecord) -> None:
        self._jobs[job.job_id] = job

    async def save_shard(self, shard: ShardRecord) -> None:
        self._shards.setdefault(shard.job_id, {})[shard.index] = shard

    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        shards = self._shards.get(job_id, {})
        return job, [shards[index] for index in sorted(shards)]

    async def list_jobs(self) -> list[JobRecord]:
        return sorted(self._jobs.values(), key=lambda job: job.created_at)

    async def delete_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._shards.pop(job_id, None)


@dataclass(eq=False)
class _KeyWrites:
    """Writes of one item key: at most one in flight, later ones coalesced into the newest."""

    latest: dict[str, Any]
    #: Sequence number of `latest` (calls so far).
    requested: int = 0
    #: Sequence number of the newest item known stored.
    written: int = 0
    inflight: asyncio.Task[None] | None = None
    #: Sequence number of the item `inflight` carries.
    inflight_seq: int = 0


class DynamoJobStore(JobStore):
    """Job state in a DynamoDB table (see the layout at the top of this module).

    Pass `durable=False` for a table that does not outlive this process (an
    embedded endpoint): nothing is then kept for a restart to resume.
    """

    durable = True

    def __init__(
        self,
        dynamodb: Any,
        table: str,
        *,
        retry_policy: RetryPolicy,
        ttl_s: int = DEFAULT_RECORD_TTL_S,
        durable: bool = True,
    ) -> None:
        self.durable = durable
        meta = getattr(dynamodb, "meta", None)
        where = getattr(meta, "endpoint_url", None) or getattr(meta, "region_name", None) or ""
        self.identity = f"dynamodb {where} {table}"
        self._dynamodb = dynamodb
        self._table = table
        self._retry = retry_policy
        self._ttl_s = ttl_s
        self._writes: dict[tuple[str, int], _KeyWrites] = {}

    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord]) -> None:
        items = [self._shard_item(shard) for shard in shards]
        for start in range(0, len(items), _BATCH_WRITE_ITEMS):
            await self._batch_write(
                [{"PutRequest": {"Item": item}} for item in items[start : start + _BATCH_WRITE_ITEMS]],
                what=f"creating shard records of job {job.job_id}",
            )
        # Last: a job record that can be listed always has its shard records.
        await self.save_job(job)

    async def save_job(self, job: JobRecord) -> None:
        item = self._item(job.job_id, JOB_RECORD_SHARD, job.to_json(), expires_at=self._job_expiry(job))
        await self._save(item, what=f"saving job {job.job_id}")

    async def save_shard(self, shard: ShardRecord) -> None:
        await self._save(self._shard_item(shard), what=f"saving job {shard.job_id} shard {shard.index}")

    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        job: JobRecord | None = None
        shards: list[ShardRecord] = []
        # Query returns the partition in sort-key order: the job record (-1) first, then shards by index.
        for item in await self._query(job_id, what=f"loading job {job_id}"):
            text = item[_RECORD_ATTRIBUTE]["S"]
            if int(item["shard"]["N"]) == JOB_RECORD_SHARD:
                job = JobRecord.from_json(text)
            else:
                shards.append(ShardRecord.from_json(text))
        return None if job is None else (job, shards)

    async def list_jobs(self) -> list[JobRecord]:
        what = f"listing jobs in {self._table}"
        jobs: list[JobRecord] = []
        start_key: dict[str, Any] | None = None
        while True:
            # The filter applies after the 1 MB page is read: a page may hold
            # no job at all and still not be the last one.
            page = await self._call(
                self._dynamodb.scan,
                what,
                ConsistentRead=True,
                FilterExpression="#shard = :job_record",
                ExpressionAttributeNames={"#shard": "shard"},
                ExpressionAttributeValues={":job_record": {"N": str(JOB_RECORD_SHARD)}},
                **({"ExclusiveStartKey": start_key} if start_key else {}),
            )
            jobs.extend(JobRecord.from_json(item[_RECORD_ATTRIBUTE]["S"]) for item in page.get("Items", ()))
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return sorted(jobs, key=lambda job: job.created_at)

    async def delete_job(self, job_id: str) -> None:
        what = f"deleting job {job_id}"
        keys = [marker_key(job_id, int(item["shard"]["N"])) for item in await self._query(job_id, what=what)]
        for start in range(0, len(keys), _BATCH_WRITE_ITEMS):
            await self._batch_write(
                [{"DeleteRequest": {"Key": key}} for key in keys[start : start + _BATCH_WRITE_ITEMS]], what=what
            )

    # -- items -----------------------------------------------------------------------

    def _shard_item(self, shard: ShardRecord) -> dict[str, Any]:
        return self._item(shard.job_id, shard.index, shard.to_json(), expires_at=int(time.time()) + _ACTIVE_EXPIRY_S)

    def _job_expiry(self, job: JobRecord) -> int:
        if job.state.is_final:
            return int((job.finished_at if job.finished_at is not None else job.updated_at) + self._ttl_s)
        return int(time.time()) + _ACTIVE_EXPIRY_S

    @staticmethod
    def _item(job_id: str, shard: int, record_json: str, *, expires_at: int) -> dict[str, Any]:
        # The jobs table shares the marker table's key schema.
        return {
            **marker_key(job_id, shard),
            _RECORD_ATTRIBUTE: {"S": record_json},
            MARKER_TTL_ATTRIBUTE: {"N": str(expires_at)},
        }

    # -- latest-wins writes ------------------------------------------------------------

    async def _save(self, item: dict[str, Any], *, what: str) -> None:
        """PutItem `item`, serialised and coalesced with the other writes of its key."""
        key = (item["job"]["S"], int(item["shard"]["N"]))
        writes = self._writes.get(key)
        if writes is None:
            writes = self._writes[key] = _KeyWrites(latest=item)
        writes.requested += 1
        mine = writes.requested
        writes.latest = item
        while writes.written < mine:
            if writes.inflight is None:
                writes.inflight_seq = writes.requested
                writes.inflight = asyncio.create_task(self._write(key, writes, writes.latest, writes.requested, what))
                # Every waiter may be cancelled; the failure then has no one to report to.
                writes.inflight.add_done_callback(_consume_result)
            inflight, inflight_seq = writes.inflight, writes.inflight_seq
            try:
                # Shielded: a cancelled caller must not abandon a request
                # that could still land after the next one.
                await asyncio.shield(inflight)
            except Exception:
                if inflight_seq >= mine:
                    raise
                # That write carried an older record; ours is still to be written.

    async def _write(self, key: tuple[str, int], writes: _KeyWrites, item: dict[str, Any], seq: int, what: str) -> None:
        try:
            await self._call(self._dynamodb.put_item, what, Item=item)
            writes.written = seq
        finally:
            writes.inflight = None
            if writes.requested == seq:  # nobody waits for a newer record
                del self._writes[key]

    # -- requests ------------------------------------------------------------------------

    async def _call(self, operation: Callable[..., Awaitable[Any]], what: str, **kwargs: Any) -> Any:
        async def attempt() -> Any:
            try:
                return await operation(TableName=self._table, **kwargs)
            except Exception as exc:
                raise translate_error(exc, what=what) from exc

        return await retry(attempt, policy=self._retry, describe=what)

    async def _query(self, job_id: str, *, what: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        start_key: dict[str, Any] | None = None
        while True:
            page = await self._call(
                self._dynamodb.query,
                what,
                ConsistentRead=True,
                KeyConditionExpression="#job = :job",
                ExpressionAttributeNames={"#job": "job"},
                ExpressionAttributeValues={":job": {"S": job_id}},
                **({"ExclusiveStartKey": start_key} if start_key else {}),
            )
            items.extend(page.get("Items", ()))
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return items

    async def _batch_write(self, requests: list[dict[str, Any]], *, what: str) -> None:
        """One BatchWriteItem, resubmitting whatever DynamoDB left unprocessed (throttling)."""
        pending = requests

        async def attempt() -> None:
            nonlocal pending
            try:
                response = await self._dynamodb.batch_write_item(RequestItems={self._table: pending})
            except Exception as exc:
                raise translate_error(exc, what=what) from exc
            pending = response.get("UnprocessedItems", {}).get(self._table, [])
            if pending:
                raise StorageThrottledError(f"{what}: {len(pending)} of {len(requests)} items left unprocessed")

        await retry(attempt, policy=self._retry, describe=what)


def _consume_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
