# Boundary markers in DynamoDB (DESIGN §3 steps 2 and 4): the one store both
# sides use -- the worker publishes and looks up, the coordinator fences.
#
# publish() is a conditional write (protocol PUT_CONDITION): the first
# attempt to find a shard's boundary writes it; any later attempt must find
# the same value (idempotent across retries), a different value is
# corruption, reported loudly, and an attempt below the shard's fence (the
# coordinator gave up on it) is refused with StaleAttemptError.  lookup() is
# a strongly consistent read, so a marker published before the read started
# is always seen; an item holding only a fence reads as no marker.
# raise_fence() makes a shard refuse marker writes from attempts below a
# number; the fence never moves down.

from __future__ import annotations

import logging
import time
from typing import Any

from ..protocol import MARKER_TTL_S, Marker, marker_fence_request, marker_key
from .aws import error_code, translate_error
from .retry import RetryPolicy, retry

__all__ = ["MarkerStore"]

log = logging.getLogger("shardline.io.markers")


class MarkerStore:
    """Reads, writes and fences boundary markers in one DynamoDB table."""

    def __init__(
        self,
        dynamodb: Any,
        table: str,
        *,
        retry_policy: RetryPolicy,
        ttl_s: int = MARKER_TTL_S,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._retry = retry_policy
        self._ttl_s = ttl_s

    async def publish(self, marker: Marker) -> None:
        """Write `marker`, or confirm that an equal one is already stored.

        Raises MarkerConflictError if another boundary is stored and
        StaleAttemptError if the shard is fenced above `marker.attempt`.
        """
        request = marker.put_request(expires_at=int(time.time()) + self._ttl_s)
        what = f"marker write for job {marker.job_id} shard {marker.shard} attempt {marker.attempt}"

        async def put() -> bool:
            try:
                await self._dynamodb.update_item(TableName=self._table, **request)
                return True
            except Exception as exc:
                if error_code(exc) == "ConditionalCheckFailedException":
                    return False
                raise translate_error(exc, what=what) from exc

        if await retry(put, policy=self._retry, describe=what):
            return
        marker.check_refused(await self._read(marker.job_id, marker.shard))
        log.debug("%s: identical marker already stored", what)

    async def lookup(self, job_id: str, shard: int) -> Marker | None:
        """The stored marker of `shard`, or None if it has not been published yet."""
        return Marker.from_stored(await self._read(job_id, shard))

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

    async def raise_fence(self, job_id: str, shard: int, min_attempt: int) -> None:
        """Make `shard`'s marker refuse writes from attempts below `min_attempt`.

        The fence never moves down; a missing item is created holding only the
        fence (which reads as "no marker yet"), an existing one keeps its expiry.
        """
        request = marker_fence_request(job_id, shard, min_attempt, expires_at=int(time.time()) + self._ttl_s)
        what = f"raising the marker fence of job {job_id} shard {shard} to attempt {min_attempt}"

        async def update() -> None:
            try:
                await self._dynamodb.update_item(TableName=self._table, **request)
            except Exception as exc:
                if error_code(exc) == "ConditionalCheckFailedException":
                    return  # already fenced at min_attempt or higher
                raise translate_error(exc, what=what) from exc

        await retry(update, policy=self._retry, describe=what)
