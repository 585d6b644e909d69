"""The boundary-marker store (`shardline.io.markers`): the worker's conditional
put and read and the coordinator's fence, against the session's moto server.

The condition expressions are only proven by a server evaluating them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest

from shardline.errors import MarkerConflictError, StaleAttemptError
from shardline.io.retry import RetryPolicy
from shardline.io.store import DynamoMarkerStore
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    MARKER_FENCE_ATTRIBUTE,
    MARKER_TTL_ATTRIBUTE,
    Boundary,
    Marker,
    marker_fence,
    marker_key,
)

pytestmark = pytest.mark.usefixtures("marker_table")  # DEFAULT_MARKER_TABLE, shared by the session


def fresh_marker(**changes) -> Marker:
    """A marker of shard 4 in a job of its own, so tests sharing the table never meet."""
    fields = {
        "job_id": uuid.uuid4().hex,
        "shard": 4,
        "attempt": 0,
        "boundary": Boundary(start=100, head_end=117, line_start=True),
        "etag": '"abc123"',
    }
    return Marker(**{**fields, **changes})


async def stored_item(dynamodb, job_id: str, shard: int) -> dict | None:
    response = await dynamodb.get_item(
        TableName=DEFAULT_MARKER_TABLE, Key=marker_key(job_id, shard), ConsistentRead=True
    )
    return response.get("Item")


async def test_publish_then_lookup(dynamodb) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=1)
    assert await store.lookup(marker.job_id, marker.shard) is None
    await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) == marker
    item = await stored_item(dynamodb, marker.job_id, marker.shard)
    assert int(item[MARKER_TTL_ATTRIBUTE]["N"]) > time.time()
    assert MARKER_FENCE_ATTRIBUTE not in item


async def test_republish_is_idempotent_and_keeps_the_first_writer(dynamodb) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    first = fresh_marker(attempt=0)
    await store.publish(first)
    await store.publish(first)
    await store.publish(replace(first, attempt=2))
    assert await store.lookup(first.job_id, first.shard) == first  # attempt 0 found it first


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"boundary": Boundary(start=100, head_end=118, line_start=True)}, id="head_end"),
        pytest.param({"boundary": Boundary(start=100, head_end=117, line_start=False)}, id="line_start"),
        pytest.param({"etag": '"other"'}, id="etag"),
    ],
)
async def test_publish_detects_a_conflicting_marker(dynamodb, changes: dict) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    first = fresh_marker(attempt=0)
    await store.publish(first)
    other = replace(first, attempt=1, **changes)
    with pytest.raises(MarkerConflictError, match=f"job {first.job_id} shard 4"):
        await store.publish(other)
    assert await store.lookup(first.job_id, first.shard) == first


async def test_fence_refuses_lower_attempts_only(dynamodb) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=1)
    await store.raise_fence(marker.job_id, marker.shard, 2)
    with pytest.raises(StaleAttemptError, match=r"shard 4 attempt 1 .*fenced at attempt 2"):
        await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) is None  # the fence alone is no marker
    for attempt in (2, 3):  # equal and higher attempts pass
        await store.publish(replace(marker, attempt=attempt))
    assert (await store.lookup(marker.job_id, marker.shard)).attempt == 2


async def test_fence_refuses_a_stale_republish_of_the_same_boundary(dynamodb) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=0)
    await store.publish(marker)
    await store.raise_fence(marker.job_id, marker.shard, 1)
    with pytest.raises(StaleAttemptError):
        await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) == marker  # the fence does not hide a marker


async def test_a_stale_attempt_with_a_conflicting_boundary_is_reported_stale(dynamodb) -> None:
    # Fenced first: a stale worker's view of the boundary is not evidence of corruption.
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=3)
    await store.publish(marker)
    await store.raise_fence(marker.job_id, marker.shard, 3)
    with pytest.raises(StaleAttemptError):
        await store.publish(replace(marker, attempt=1, etag='"other"'))


async def test_fence_never_lowers_and_keeps_the_expiry(dynamodb) -> None:
    store = DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, ttl_s=1000, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=0)
    await store.publish(marker)
    expires_at = (await stored_item(dynamodb, marker.job_id, marker.shard))[MARKER_TTL_ATTRIBUTE]
    for fence in (3, 1, 3, 0):
        await store.raise_fence(marker.job_id, marker.shard, fence)
    item = await stored_item(dynamodb, marker.job_id, marker.shard)
    assert marker_fence(item) == 3
    assert item[MARKER_TTL_ATTRIBUTE] == expires_at
    assert Marker.from_stored(item) == marker
    await store.raise_fence(marker.job_id, marker.shard, 4)
    assert marker_fence(await stored_item(dynamodb, marker.job_id, marker.shard)) == 4


async def test_fence_creates_an_expiring_fence_only_item(dynamodb) -> None:
    job_id = uuid.uuid4().hex
    await DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy()).raise_fence(job_id, 7, 2)
    item = await stored_item(dynamodb, job_id, 7)
    assert set(item) == {"job", "shard", MARKER_FENCE_ATTRIBUTE, MARKER_TTL_ATTRIBUTE}
    assert int(item[MARKER_TTL_ATTRIBUTE]["N"]) > time.time()
    assert await DynamoMarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy()).lookup(job_id, 7) is None
