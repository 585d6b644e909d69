# Boundary markers in DynamoDB: one item per (job, shard) in the marker
# table, written with an UpdateItem guarded by the protocol's PUT_CONDITION
# (the first writer wins, the same value again is fine, a fence above the
# writer's attempt refuses it); reads are strongly consistent.  The worker
# publishes and looks up; the coordinator raises fences.
#
# Expiry: `expires_at` is the table's TTL attribute.  DynamoDB deletes
# expired items lazily, so reads treat them as absent, and every condition
# fails on an expired item, which is then deleted (if still expired) and the
# write tried again: the same contract as SQLite.

from __future__ import annotations

import logging
import time
from typing import Any

from ...protocol import (
    MARKER_TTL_ATTRIBUTE,
    MARKER_TTL_S,
    Marker,
    marker_expired,
    marker_fence_request,
    marker_key,
)
from ..aws import error_code, translate_error
from ..retry import RetryPolicy, retry
from ._contract import MarkerStore

__all__ = ["DynamoMarkerStore"]

log = logging.getLogger("shardline.io.store")

_CONDITION_FAILED = "ConditionalCheckFailedException"


class DynamoMarkerStore(MarkerStore):
    """Markers in one DynamoDB table, through a client the caller owns."""

    def __init__(self, dynamodb: Any, table: str, *, retry_policy: RetryPolicy, ttl_s: int = MARKER_TTL_S) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._retry = retry_policy
        self._ttl_s = ttl_s

    async def publish(self, marker: Marker) -> None:
        what = f"marker write for job {marker.job_id} shard {marker.shard} attempt {marker.attempt}"
        while True:
            now = int(time.time())
            request = marker.put_request(expires_at=now + self._ttl_s, now=now)
            if await self._conditional_update(request, what):
                return
            item = await self._read(marker.job_id, marker.shard)
            if marker_expired(item, now):
                await self._delete_expired(marker.job_id, marker.shard, now)
                continue  # it read as absent: write again
            marker.check_refused(item)
            log.debug("%s: identical marker already stored", what)
            return

    async def lookup(self, job_id: str, shard: int) -> Marker | None:
        item = await self._read(job_id, shard)
        if marker_expired(item, int(time.time())):
            return None
        return Marker.from_stored(item)

    async def raise_fence(self, job_id: str, shard: int, min_attempt: int) -> None:
        what = f"raising the marker fence of job {job_id} shard {shard} to attempt {min_attempt}"
        while True:
            now = int(time.time())
            request = marker_fence_request(job_id, shard, min_attempt, expires_at=now + self._ttl_s, now=now)
            if await self._conditional_update(request, what):
                return
            item = await self._read(job_id, shard)
            if not marker_expired(item, now):
                return  # fenced at min_attempt or higher already
            await self._delete_expired(job_id, shard, now)

    async def _conditional_update(self, request: dict[str, Any], what: str) -> bool:
        """True if written, False if the condition failed."""

        async def update() -> bool:
            try:
                await self._dynamodb.update_item(TableName=self._table, **request)
                return True
            except Exception as exc:
                if error_code(exc) == _CONDITION_FAILED:
                    return False
                raise translate_error(exc, what=what) from exc

        return await retry(update, policy=self._retry, describe=what)

    async def _delete_expired(self, job_id: str, shard: int, now: int) -> None:
        what = f"deleting the expired marker of job {job_id} shard {shard}"

        async def delete() -> None:
            try:
                await self._dynamodb.delete_item(
                    TableName=self._table,
                    Key=marker_key(job_id, shard),
                    ConditionExpression="#expires_at < :now",
                    ExpressionAttributeNames={"#expires_at": MARKER_TTL_ATTRIBUTE},
                    ExpressionAttributeValues={":now": {"N": str(now)}},
                )
            except Exception as exc:
                if error_code(exc) != _CONDITION_FAILED:  # someone wrote it anew meanwhile: fine
                    raise translate_error(exc, what=what) from exc

        await retry(delete, policy=self._retry, describe=what)

    async def _read(self, job_id: str, shard: int) -> dict[str, Any] | None:
        what = f"marker read for job {job_id} shard {shard}"

        async def get() -> dict[str, Any] | None:
            try:
                response = await self._dynamodb.get_item(
                    TableName=self._table, Key=marker_key(job_id, shard), ConsistentRead=True
                )
            except Exception as exc:
                raise translate_error(exc, what=what) from exc
            item: dict[str, Any] | None = response.get("Item")
            return item

        return await retry(get, policy=self._retry, describe=what)
