# Boundary markers in DynamoDB, the worker's side (DESIGN §3 steps 2 and 4).
#
# publish() is a conditional put: the first attempt to find a shard's boundary
# writes it; any later attempt must find the same value (idempotent across
# retries), and a different value is corruption, reported loudly.  lookup()
# is a strongly consistent read, so a marker published before the read
# started is always seen.

from __future__ import annotations

import logging
import time
from typing import Any

from ..aws import error_code, translate_error
from ..errors import MarkerConflictError
from ..protocol import PUT_CONDITION, Marker, marker_key
from ..retry import RetryPolicy, retry

__all__ = ["DEFAULT_MARKER_TTL_S", "MarkerStore"]

log = logging.getLogger("shardline.worker.markers")

#: Markers only matter while their job runs; DynamoDB's TTL reaps them after.
DEFAULT_MARKER_TTL_S = 7 * 24 * 3600


class MarkerStore:
    """Reads and writes one job's boundary markers through a DynamoDB client."""

    def __init__(
        self,
        dynamodb: Any,
        table: str,
        *,
        retry_policy: RetryPolicy = RetryPolicy(),
        ttl_s: int = DEFAULT_MARKER_TTL_S,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._retry = retry_policy
        self._ttl_s = ttl_s

    async def publish(self, marker: Marker) -> None:
        """Write `marker`, or confirm that an equal one is already stored."""
        item = marker.to_item(expires_at=int(time.time()) + self._ttl_s)
        what = f"marker put for job {marker.job_id} shard {marker.shard}"

        async def put() -> bool:
            try:
                await self._dynamodb.put_item(TableName=self._table, Item=item, ConditionExpression=PUT_CONDITION)
                return True
            except Exception as exc:
                if error_code(exc) == "ConditionalCheckFailedException":
                    return False
                raise translate_error(exc, what=what) from exc

        if await retry(put, policy=self._retry, describe=what):
            return
        stored = await self.lookup(marker.job_id, marker.shard)
        if stored is None:  # pragma: no cover - the item existed a moment ago
            raise MarkerConflictError(f"{what}: condition failed but no marker is stored")
        marker.check_agrees(stored)
        log.debug("%s: identical marker already stored by attempt %d", what, stored.attempt)

    async def lookup(self, job_id: str, shard: int) -> Marker | None:
        """The stored marker of `shard`, or None if it has not been published yet."""
        what = f"marker read for job {job_id} shard {shard}"

        async def get() -> Marker | None:
            try:
                response = await self._dynamodb.get_item(
                    TableName=self._table, Key=marker_key(job_id, shard), ConsistentRead=True
                )
            except Exception as exc:
                raise translate_error(exc, what=what) from exc
            item = response.get("Item")
            return Marker.from_item(item) if item else None

        return await retry(get, policy=self._retry, describe=what)
