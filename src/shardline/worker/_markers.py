# Boundary markers in DynamoDB, the worker's side (DESIGN §3 steps 2 and 4).
#
# publish() is a conditional write (protocol PUT_CONDITION): the first
# attempt to find a shard's boundary writes it; any later attempt must find
# the same value (idempotent across retries), a different value is
# corruption, reported loudly, and an attempt below the shard's fence (the
# coordinator gave up on it) is refused with StaleAttemptError.  lookup() is
# a strongly consistent read, so a marker published before the read started
# is always seen; an item holding only a fence reads as no marker.

from __future__ import annotations

import logging
import time
from typing import Any

from ..aws import error_code, translate_error
from ..protocol import Marker, marker_key
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
