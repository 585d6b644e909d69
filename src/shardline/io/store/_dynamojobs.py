# Job state in DynamoDB.  The jobs table shares the marker table's key
# schema (job S HASH, shard N RANGE).  A job is one partition: its record at
# shard = JOB_RECORD_SHARD, each shard's record at shard = its index, as JSON
# (a new field needs no schema change).  The job record item also holds the
# lease (owner, epoch, expiry) and a `kind` attribute that puts it, and only
# it, in the sparse index JOBS_INDEX, so listing jobs reads job records, not
# every shard of every job.  Writes under a lease are TransactWriteItems
# whose first element checks (or updates) the job record item's lease, so a
# stale owner's writes are refused as a whole.  Expired items read as absent.

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ...errors import LeaseLostError, StorageThrottledError
from ...protocol import (
    MARKER_TTL_ATTRIBUTE,
    JobRecord,
    ShardRecord,
    marker_expired,
    marker_key,
)
from ..aws import error_code, translate_error
from ..retry import RetryPolicy, retry
from ._contract import ACTIVE_RECORD_TTL_S, DEFAULT_RECORD_TTL_S, JobStore, Lease, StoredJob, record_expiry

__all__ = ["DEFAULT_JOBS_TABLE", "JOBS_INDEX", "JOB_RECORD_SHARD", "DynamoJobStore"]

DEFAULT_JOBS_TABLE = "shardline-jobs"
#: The sort key of a job's own record; shard records use their index (>= 0).
JOB_RECORD_SHARD = -1
#: The sparse global secondary index of job record items (partition key `kind`).
JOBS_INDEX = "jobs-by-kind"
_KIND = "job"
_RECORD = "record"
#: BatchWriteItem's and TransactWriteItems' limits per request.
_BATCH_WRITE_ITEMS = 25
_TRANSACTION_ITEMS = 100
_CONDITION_FAILED = "ConditionalCheckFailedException"


#: Names for `_LEASE_IS` (DynamoDB refuses names an expression does not use).
_LEASE_NAMES = {"#owner": "lease_owner", "#epoch": "lease_epoch"}
_LEASE_IS = "#owner = :owner AND #epoch = :epoch"
_EXPIRES_NAME = {"#lease_expires": "lease_expires"}


def _lease_values(lease: Lease) -> dict[str, Any]:
    return {":owner": {"S": lease.owner}, ":epoch": {"N": str(lease.epoch)}}


class DynamoJobStore(JobStore):
    """Job records, shard records and leases in one DynamoDB table (see the module comment)."""

    durable = True

    def __init__(
        self, dynamodb: Any, table: str, *, retry_policy: RetryPolicy, ttl_s: float = DEFAULT_RECORD_TTL_S
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._ttl_s = ttl_s
        self._retry = retry_policy
        where = getattr(getattr(dynamodb, "meta", None), "endpoint_url", "") or "aws"
        self.identity = f"dynamodb {where} {table}"

    async def _request(self, operation: Callable[..., Awaitable[Any]], what: str, **kwargs: Any) -> Any:
        """One request on the table through the retry loop, its errors translated."""

        async def attempt() -> Any:
            try:
                return await operation(TableName=self._table, **kwargs)
            except Exception as exc:
                raise translate_error(exc, what=what) from exc

        return await retry(attempt, policy=self._retry, describe=what)

    def _job_key(self, job_id: str) -> dict[str, Any]:
        return marker_key(job_id, JOB_RECORD_SHARD)

    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord], *, owner: str, lease_s: float) -> Lease:
        items = [self._shard_item(shard) for shard in shards]
        for start in range(0, len(items), _BATCH_WRITE_ITEMS):
            await self._batch_write(
                [{"PutRequest": {"Item": item}} for item in items[start : start + _BATCH_WRITE_ITEMS]],
                what=f"creating shard records of job {job.job_id}",
            )
        # Last: a job record that can be listed always has its shard records.
        lease = Lease(job_id=job.job_id, owner=owner, epoch=1, expires_at=time.time() + lease_s)
        item = {
            **self._job_key(job.job_id),
            _RECORD: {"S": job.to_json()},
            "kind": {"S": _KIND},
            "created_at": {"N": repr(job.created_at)},
            "lease_owner": {"S": owner},
            "lease_epoch": {"N": "1"},
            "lease_expires": {"N": repr(lease.expires_at)},
            MARKER_TTL_ATTRIBUTE: {"N": str(record_expiry(job, ttl_s=self._ttl_s))},
        }
        await self._request(
            self._dynamodb.put_item,
            f"creating job {job.job_id}",
            Item=item,
            ConditionExpression="attribute_not_exists(#job)",
            ExpressionAttributeNames={"#job": "job"},
        )
        return lease

    async def save(self, lease: Lease, *, job: JobRecord | None = None, shards: Sequence[ShardRecord] = ()) -> None:
        puts = [{"Put": {"TableName": self._table, "Item": self._shard_item(shard)}} for shard in shards]
        per_transaction = _TRANSACTION_ITEMS - 1  # and the lease's check or update
        chunks = [puts[i : i + per_transaction] for i in range(0, len(puts), per_transaction)] or [[]]
        for number, chunk in enumerate(chunks):
            head = self._lease_update(lease, job) if number == 0 and job is not None else self._lease_check(lease)
            await self._transact([head, *chunk], lease)

    def _lease_check(self, lease: Lease) -> dict[str, Any]:
        return {
            "ConditionCheck": {
                "TableName": self._table,
                "Key": self._job_key(lease.job_id),
                "ConditionExpression": _LEASE_IS,
                "ExpressionAttributeNames": _LEASE_NAMES,
                "ExpressionAttributeValues": _lease_values(lease),
            }
        }

    def _lease_update(self, lease: Lease, job: JobRecord) -> dict[str, Any]:
        """The job record's new value, written only under `lease` (the lease attributes stay as they are)."""
        return {
            "Update": {
                "TableName": self._table,
                "Key": self._job_key(lease.job_id),
                "UpdateExpression": "SET #record = :record, #expires_at = :expires_at",
                "ConditionExpression": _LEASE_IS,
                "ExpressionAttributeNames": {**_LEASE_NAMES, "#record": _RECORD, "#expires_at": MARKER_TTL_ATTRIBUTE},
                "ExpressionAttributeValues": {
                    **_lease_values(lease),
                    ":record": {"S": job.to_json()},
                    ":expires_at": {"N": str(record_expiry(job, ttl_s=self._ttl_s))},
                },
            }
        }

    async def _transact(self, items: list[dict[str, Any]], lease: Lease) -> None:
        what = f"saving job {lease.job_id}"

        async def attempt() -> None:
            try:
                await self._dynamodb.transact_write_items(TransactItems=items)
            except Exception as exc:
                reasons = getattr(exc, "response", {}).get("CancellationReasons") or []
                codes = [reason.get("Code") for reason in reasons]
                if codes and codes[0] == "ConditionalCheckFailed":
                    raise LeaseLostError(
                        f"job {lease.job_id} is no longer ours ({lease.owner}, epoch {lease.epoch}): "
                        "another coordinator took it over"
                    ) from exc
                if error_code(exc) == "TransactionCanceledException":
                    raise StorageThrottledError(f"{what}: transaction cancelled ({codes})") from exc
                raise translate_error(exc, what=what) from exc

        await retry(attempt, policy=self._retry, describe=what)

    async def acquire(self, job_id: str, *, owner: str, lease_s: float) -> Lease | None:
        now = time.time()
        expires_at = now + lease_s
        try:
            response = await self._request(
                self._dynamodb.update_item,
                f"acquiring job {job_id}",
                Key=self._job_key(job_id),
                UpdateExpression="SET #owner = :owner, #epoch = if_not_exists(#epoch, :zero) + :one, "
                "#lease_expires = :lease_expires",
                ConditionExpression="attribute_exists(#record) AND #expires_at >= :now_s AND "
                "(attribute_not_exists(#owner) OR #lease_expires < :now OR #owner = :owner)",
                ExpressionAttributeNames={
                    **_LEASE_NAMES,
                    **_EXPIRES_NAME,
                    "#record": _RECORD,
                    "#expires_at": MARKER_TTL_ATTRIBUTE,
                },
                ExpressionAttributeValues={
                    ":owner": {"S": owner},
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                    ":lease_expires": {"N": repr(expires_at)},
                    ":now": {"N": repr(now)},
                    ":now_s": {"N": str(int(now))},
                },
                ReturnValues="ALL_NEW",
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED or _cause_code(exc) == _CONDITION_FAILED:
                return None
            raise
        epoch = int(response["Attributes"]["lease_epoch"]["N"])
        return Lease(job_id=job_id, owner=owner, epoch=epoch, expires_at=expires_at)

    async def renew(self, lease: Lease, *, lease_s: float) -> Lease:
        renewed = Lease(job_id=lease.job_id, owner=lease.owner, epoch=lease.epoch, expires_at=time.time() + lease_s)
        try:
            await self._request(
                self._dynamodb.update_item,
                f"renewing the lease on job {lease.job_id}",
                Key=self._job_key(lease.job_id),
                UpdateExpression="SET #lease_expires = :lease_expires",
                ConditionExpression=_LEASE_IS,
                ExpressionAttributeNames={**_LEASE_NAMES, **_EXPIRES_NAME},
                ExpressionAttributeValues={**_lease_values(lease), ":lease_expires": {"N": repr(renewed.expires_at)}},
            )
        except Exception as exc:
            if _cause_code(exc) == _CONDITION_FAILED:
                raise LeaseLostError(
                    f"job {lease.job_id} is no longer ours ({lease.owner}, epoch {lease.epoch})"
                ) from exc
            raise
        return renewed

    async def release(self, lease: Lease) -> None:
        try:
            await self._request(
                self._dynamodb.update_item,
                f"releasing job {lease.job_id}",
                Key=self._job_key(lease.job_id),
                UpdateExpression="REMOVE #owner SET #lease_expires = :zero",
                ConditionExpression=_LEASE_IS,
                ExpressionAttributeNames={**_LEASE_NAMES, **_EXPIRES_NAME},
                ExpressionAttributeValues={**_lease_values(lease), ":zero": {"N": "0"}},
            )
        except Exception as exc:
            if _cause_code(exc) != _CONDITION_FAILED:
                raise

    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        job: JobRecord | None = None
        shards: list[ShardRecord] = []
        now = int(time.time())
        # Query returns the partition in sort-key order: the job record (-1) first, then shards by index.
        for item in await self._query(job_id, what=f"loading job {job_id}"):
            if marker_expired(item, now):
                continue
            text = item[_RECORD]["S"]
            if int(item["shard"]["N"]) == JOB_RECORD_SHARD:
                job = JobRecord.from_json(text)
            else:
                shards.append(ShardRecord.from_json(text))
        return None if job is None else (job, shards)

    async def list_jobs(self) -> list[StoredJob]:
        jobs: list[StoredJob] = []
        start_key: dict[str, Any] | None = None
        now = int(time.time())
        while True:
            page = await self._request(
                self._dynamodb.query,
                f"listing jobs in {self._table}",
                IndexName=JOBS_INDEX,
                KeyConditionExpression="#kind = :kind",
                ExpressionAttributeNames={"#kind": "kind"},
                ExpressionAttributeValues={":kind": {"S": _KIND}},
                **({"ExclusiveStartKey": start_key} if start_key else {}),
            )
            for item in page.get("Items", ()):
                if marker_expired(item, now):
                    continue
                record = JobRecord.from_json(item[_RECORD]["S"])
                lease = None
                if "lease_owner" in item:
                    lease = Lease(
                        job_id=record.job_id,
                        owner=item["lease_owner"]["S"],
                        epoch=int(item["lease_epoch"]["N"]),
                        expires_at=float(item["lease_expires"]["N"]),
                    )
                jobs.append(StoredJob(record=record, lease=lease))
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return sorted(jobs, key=lambda stored: stored.record.created_at)

    async def delete_job(self, job_id: str) -> None:
        what = f"deleting job {job_id}"
        keys = [marker_key(job_id, int(item["shard"]["N"])) for item in await self._query(job_id, what=what)]
        for start in range(0, len(keys), _BATCH_WRITE_ITEMS):
            await self._batch_write(
                [{"DeleteRequest": {"Key": key}} for key in keys[start : start + _BATCH_WRITE_ITEMS]], what=what
            )

    # -- items and requests ------------------------------------------------------------

    def _shard_item(self, shard: ShardRecord) -> dict[str, Any]:
        return {
            **marker_key(shard.job_id, shard.index),
            _RECORD: {"S": shard.to_json()},
            MARKER_TTL_ATTRIBUTE: {"N": str(int(time.time() + ACTIVE_RECORD_TTL_S))},
        }

    async def _query(self, job_id: str, *, what: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        start_key: dict[str, Any] | None = None
        while True:
            page = await self._request(
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


def _cause_code(exc: BaseException) -> str:
    """The DynamoDB error code behind a translated error (its cause), or ''."""
    while exc is not None:
        code = error_code(exc)
        if code:
            return code
        exc = exc.__cause__  # type: ignore[assignment]
    return ""
