"""Boundary-marker items and their fenced writes (DESIGN §3 step 2, §5), and the job/shard state tables.

The marker writes run against the session's moto server: the condition
expressions are only proven by a server evaluating them.
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.errors import (
    ConfigurationError,
    LocalProtocolError,
    MarkerConflictError,
    RemoteProtocolError,
    StaleAttemptError,
)
from shardline.io.aws import AwsSettings, client
from shardline.io.markers import MarkerStore
from shardline.io.retry import RetryPolicy
from shardline.io.tables import ensure_marker_table
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    MARKER_ATTRIBUTE_DEFINITIONS,
    MARKER_KEY_SCHEMA,
    MARKER_TTL_ATTRIBUTE,
    PUT_CONDITION,
    Boundary,
    JobEvent,
    JobState,
    Marker,
    ShardEvent,
    ShardState,
    marker_key,
    next_job_state,
    next_shard_state,
)
from shardline.protocol._markers import MARKER_FENCE_ATTRIBUTE, marker_fence, marker_fence_request

# --- markers ----------------------------------------------------------------------


@st.composite
def boundaries(draw) -> Boundary:
    start = draw(st.integers(0, 2**63))
    line_start = draw(st.booleans())
    return Boundary(start=start, head_end=start + draw(st.integers(0, 2**40)), line_start=line_start)


MARKERS = st.builds(
    Marker,
    job_id=st.text(min_size=1, max_size=40),
    shard=st.integers(0, 10**6),
    attempt=st.integers(0, 1000),
    boundary=boundaries(),
    etag=st.text(max_size=40),
)


def good_marker(**changes) -> Marker:
    fields = {
        "job_id": "job-1",
        "shard": 4,
        "attempt": 0,
        "boundary": Boundary(start=100, head_end=117, line_start=True),
        "etag": '"abc123"',
    }
    fields.update(changes)
    return Marker(**fields)


@settings(max_examples=200, deadline=None)
@given(marker=MARKERS, expires_at=st.integers(0, 2**40))
def test_marker_item_round_trip(marker: Marker, expires_at: int) -> None:
    item = marker.to_item(expires_at=expires_at)
    assert Marker.from_item(item) == marker
    assert Marker.from_item(copy.deepcopy(item)) == marker
    assert {k: item[k] for k in ("job", "shard")} == marker.key() == marker_key(marker.job_id, marker.shard)
    assert item[MARKER_TTL_ATTRIBUTE] == {"N": str(expires_at)}
    # every value is a typed DynamoDB attribute; numbers travel as decimal strings
    for name, value in item.items():
        assert isinstance(value, dict) and len(value) == 1, name
        ((kind, raw),) = value.items()
        assert kind in ("S", "N", "BOOL")
        if kind == "N":
            assert isinstance(raw, str) and raw.isdigit()
    # the item round-trips without the TTL attribute too
    del item[MARKER_TTL_ATTRIBUTE]
    assert Marker.from_item(item) == marker


def test_marker_schema_constants() -> None:
    assert DEFAULT_MARKER_TABLE
    assert MARKER_KEY_SCHEMA == [
        {"AttributeName": "job", "KeyType": "HASH"},
        {"AttributeName": "shard", "KeyType": "RANGE"},
    ]
    types = {d["AttributeName"]: d["AttributeType"] for d in MARKER_ATTRIBUTE_DEFINITIONS}
    key = marker_key("j", 7)
    assert key == {"job": {"S": "j"}, "shard": {"N": "7"}}
    assert {name: next(iter(value)) for name, value in key.items()} == types
    assert MARKER_FENCE_ATTRIBUTE not in types and MARKER_TTL_ATTRIBUTE not in types


def _placeholders(request: dict, sigil: str) -> set[str]:
    text = request["UpdateExpression"] + " " + request["ConditionExpression"]
    return set(re.findall(re.escape(sigil) + r"\w+", text))


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(good_marker().put_request(expires_at=9), id="put"),
        pytest.param(marker_fence_request("job-1", 4, 2, expires_at=9), id="fence"),
    ],
)
def test_marker_requests_name_exactly_what_their_expressions_use(request_: dict) -> None:
    # DynamoDB rejects unused (and missing) expression names and values, and
    # `start` and `shard` are reserved words: every attribute goes through a #name.
    assert set(request_["ExpressionAttributeNames"]) == _placeholders(request_, "#")
    assert set(request_["ExpressionAttributeValues"]) == _placeholders(request_, ":")
    assert request_["Key"] == marker_key("job-1", 4)
    bare = re.sub(r"[#:]\w+", "", request_["UpdateExpression"] + request_["ConditionExpression"])
    assert not {"start", "shard", "attempt", "fence", "etag"} & set(re.findall(r"\w+", bare))


def test_put_request_carries_the_marker() -> None:
    marker = good_marker(attempt=3)
    request = marker.put_request(expires_at=77)
    assert request["ConditionExpression"] == PUT_CONDITION
    body = {name: value for name, value in marker.to_item(expires_at=77).items() if name not in ("job", "shard")}
    assert request["ExpressionAttributeValues"] == {f":{name}": value for name, value in body.items()}


def test_marker_fence_request_rejects_negative_attempts() -> None:
    with pytest.raises(ConfigurationError, match="fence"):
        marker_fence_request("job-1", 4, -1, expires_at=9)


def _without(name: str) -> dict:
    item = good_marker().to_item(expires_at=1)
    del item[name]
    return item


def _with(name: str, value: object) -> dict:
    item = good_marker().to_item(expires_at=1)
    item[name] = value
    return item


MALFORMED_ITEMS = [
    pytest.param(None, id="None"),
    pytest.param([], id="list"),
    pytest.param({}, id="empty"),
    *[
        pytest.param(_without(name), id=f"missing-{name}")
        for name in ("job", "shard", "attempt", "start", "head_end", "line_start", "etag")
    ],
    pytest.param(_with("job", "job-1"), id="job-untyped"),
    pytest.param(_with("job", {"N": "1"}), id="job-wrong-type-tag"),
    pytest.param(_with("shard", {"S": "4"}), id="shard-wrong-type-tag"),
    pytest.param(_with("shard", {"N": "four"}), id="shard-not-a-number"),
    pytest.param(_with("shard", {"N": "4.5"}), id="shard-fraction"),
    pytest.param(_with("attempt", {"N": None}), id="attempt-None"),
    pytest.param(_with("start", {"N": ""}), id="start-empty"),
    pytest.param(_with("head_end", {"N": [1]}), id="head_end-list"),
    pytest.param(_with("line_start", {"S": "true"}), id="line_start-wrong-type-tag"),
    pytest.param(_with("etag", {"N": "5"}), id="etag-wrong-type-tag"),
]


@pytest.mark.parametrize("item", MALFORMED_ITEMS)
def test_malformed_marker_items(item: object) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed marker item"):
        Marker.from_item(item)  # type: ignore[arg-type]


def test_marker_item_with_head_end_before_start() -> None:
    # SRC BUG: Boundary.__post_init__ raises ConfigurationError, which
    # Marker.from_item does not catch (it catches KeyError, TypeError and
    # ValueError only), so a corrupt item escapes as a configuration error.
    item = _with("head_end", {"N": "99"})  # start is 100
    with pytest.raises(RemoteProtocolError, match="malformed marker item"):
        Marker.from_item(item)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(_with("line_start", {"BOOL": "false"}), id="line_start-string"),
        pytest.param(_with("line_start", {"BOOL": 0}), id="line_start-int"),
        pytest.param(_with("job", {"S": 17}), id="job-not-a-string"),
        pytest.param(_with("etag", {"S": None}), id="etag-None"),
        pytest.param(_with("shard", {"N": "-1"}), id="shard-negative"),
        pytest.param(_with("attempt", {"N": " 3 "}), id="attempt-padded"),
        pytest.param(_with("start", {"N": "1_00"}), id="start-underscore"),
    ],
)
def test_marker_item_values_are_type_checked(item: dict) -> None:
    # SRC BUG: from_item coerces instead of validating: bool("false") is True
    # (the boundary silently flips), int() accepts " 3 ", "1_00" and "-1", and
    # the S values are used whatever their type.
    with pytest.raises(RemoteProtocolError, match="malformed marker item"):
        Marker.from_item(item)


def test_check_agrees_same_boundary_other_attempt() -> None:
    mine = good_marker(attempt=2)
    mine.check_agrees(good_marker(attempt=0))
    mine.check_agrees(good_marker(attempt=2))


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(good_marker(boundary=Boundary(start=100, head_end=118, line_start=True)), id="head_end"),
        pytest.param(good_marker(boundary=Boundary(start=100, head_end=117, line_start=False)), id="line_start"),
        pytest.param(good_marker(boundary=Boundary(start=101, head_end=117, line_start=True)), id="start"),
        pytest.param(good_marker(etag='"other"'), id="etag"),
    ],
)
def test_check_agrees_conflicts(stored: Marker) -> None:
    mine = good_marker(attempt=1)
    with pytest.raises(MarkerConflictError) as info:
        mine.check_agrees(stored)
    message = str(info.value)
    assert "job-1" in message and "shard 4" in message
    assert str(stored.boundary) in message and str(mine.boundary) in message


@settings(max_examples=200, deadline=None)
@given(a=MARKERS, b=MARKERS)
def test_check_agrees_iff_boundary_and_etag_match(a: Marker, b: Marker) -> None:
    b = Marker(job_id=a.job_id, shard=a.shard, attempt=b.attempt, boundary=b.boundary, etag=b.etag)
    for stored, mine in ((a, b), (b, a)):
        if a.boundary == b.boundary and a.etag == b.etag:
            mine.check_agrees(stored)
        else:
            with pytest.raises(MarkerConflictError):
                mine.check_agrees(stored)
    same = Marker(job_id=a.job_id, shard=a.shard, attempt=b.attempt, boundary=a.boundary, etag=a.etag)
    same.check_agrees(a)
    a.check_agrees(Marker.from_item(a.to_item(expires_at=0)))


# --- fence and conditions, without I/O ---------------------------------------------


def test_fence_of_an_item() -> None:
    item = good_marker().to_item(expires_at=1)
    assert marker_fence(None) == 0
    assert marker_fence(item) == 0
    assert marker_fence({**item, MARKER_FENCE_ATTRIBUTE: {"N": "5"}}) == 5
    with pytest.raises(RemoteProtocolError, match="fence"):
        marker_fence({**item, MARKER_FENCE_ATTRIBUTE: {"N": "-5"}})


def test_from_stored_reads_a_fence_only_item_as_no_marker() -> None:
    fence_only = {**marker_key("job-1", 4), MARKER_FENCE_ATTRIBUTE: {"N": "3"}, MARKER_TTL_ATTRIBUTE: {"N": "9"}}
    assert Marker.from_stored(None) is None
    assert Marker.from_stored({}) is None
    assert Marker.from_stored(fence_only) is None
    item = {**good_marker().to_item(expires_at=1), MARKER_FENCE_ATTRIBUTE: {"N": "3"}}
    assert Marker.from_stored(item) == good_marker()
    # part of a marker is not "no marker": it is corrupt
    del item["head_end"]
    with pytest.raises(RemoteProtocolError, match="malformed marker item"):
        Marker.from_stored(item)


def test_check_refused() -> None:
    stored = good_marker(attempt=0).to_item(expires_at=1)
    good_marker(attempt=2).check_refused(stored)  # the same boundary is there: nothing to do
    with pytest.raises(StaleAttemptError, match=r"shard 4 attempt 2 .*fenced at attempt 3"):
        good_marker(attempt=2).check_refused({**stored, MARKER_FENCE_ATTRIBUTE: {"N": "3"}})
    with pytest.raises(MarkerConflictError, match="shard 4"):
        good_marker(attempt=2, etag='"other"').check_refused(stored)
    with pytest.raises(MarkerConflictError, match="no marker is stored"):
        good_marker().check_refused(None)


# --- fenced writes against DynamoDB (moto) -------------------------------------------


@pytest.fixture
async def dynamodb(aws_settings: AwsSettings):
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
        yield dynamodb


def fresh_marker(**changes) -> Marker:
    """good_marker() in a job of its own, so tests sharing the table never meet."""
    return good_marker(**{"job_id": uuid.uuid4().hex, **changes})


async def stored_item(dynamodb, job_id: str, shard: int) -> dict | None:
    response = await dynamodb.get_item(
        TableName=DEFAULT_MARKER_TABLE, Key=marker_key(job_id, shard), ConsistentRead=True
    )
    return response.get("Item")


async def test_publish_then_lookup(dynamodb) -> None:
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=1)
    assert await store.lookup(marker.job_id, marker.shard) is None
    await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) == marker
    item = await stored_item(dynamodb, marker.job_id, marker.shard)
    assert int(item[MARKER_TTL_ATTRIBUTE]["N"]) > time.time()
    assert MARKER_FENCE_ATTRIBUTE not in item


async def test_republish_is_idempotent_and_keeps_the_first_writer(dynamodb) -> None:
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
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
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    first = fresh_marker(attempt=0)
    await store.publish(first)
    other = replace(first, attempt=1, **changes)
    with pytest.raises(MarkerConflictError, match=f"job {first.job_id} shard 4"):
        await store.publish(other)
    assert await store.lookup(first.job_id, first.shard) == first


async def test_fence_refuses_lower_attempts_only(dynamodb) -> None:
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=1)
    await store.raise_fence(marker.job_id, marker.shard, 2)
    with pytest.raises(StaleAttemptError, match=r"shard 4 attempt 1 .*fenced at attempt 2"):
        await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) is None  # the fence alone is no marker
    for attempt in (2, 3):  # equal and higher attempts pass
        await store.publish(replace(marker, attempt=attempt))
    assert (await store.lookup(marker.job_id, marker.shard)).attempt == 2


async def test_fence_refuses_a_stale_republish_of_the_same_boundary(dynamodb) -> None:
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=0)
    await store.publish(marker)
    await store.raise_fence(marker.job_id, marker.shard, 1)
    with pytest.raises(StaleAttemptError):
        await store.publish(marker)
    assert await store.lookup(marker.job_id, marker.shard) == marker  # the fence does not hide a marker


async def test_a_stale_attempt_with_a_conflicting_boundary_is_reported_stale(dynamodb) -> None:
    # Fenced first: a stale worker's view of the boundary is not evidence of corruption.
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy())
    marker = fresh_marker(attempt=3)
    await store.publish(marker)
    await store.raise_fence(marker.job_id, marker.shard, 3)
    with pytest.raises(StaleAttemptError):
        await store.publish(replace(marker, attempt=1, etag='"other"'))


async def test_fence_never_lowers_and_keeps_the_expiry(dynamodb) -> None:
    store = MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, ttl_s=1000, retry_policy=RetryPolicy())
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
    await MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy()).raise_fence(job_id, 7, 2)
    item = await stored_item(dynamodb, job_id, 7)
    assert set(item) == {"job", "shard", MARKER_FENCE_ATTRIBUTE, MARKER_TTL_ATTRIBUTE}
    assert int(item[MARKER_TTL_ATTRIBUTE]["N"]) > time.time()
    assert await MarkerStore(dynamodb, DEFAULT_MARKER_TABLE, retry_policy=RetryPolicy()).lookup(job_id, 7) is None


# --- state tables -------------------------------------------------------------------
#
# Written out here independently of _states.py: every legal transition.

J, JE = JobState, JobEvent
EXPECTED_JOB = {
    (J.PENDING, JE.START): J.RUNNING,
    (J.PENDING, JE.FAIL): J.FAILED,
    (J.PENDING, JE.CANCEL): J.CANCELLED,
    (J.RUNNING, JE.SUCCEED): J.SUCCEEDED,
    (J.RUNNING, JE.FAIL): J.FAILED,
    (J.RUNNING, JE.CANCEL): J.CANCELLED,
}
S, SE = ShardState, ShardEvent
EXPECTED_SHARD = {
    (S.PENDING, SE.LAUNCH): S.STARTING,
    (S.PENDING, SE.FAIL): S.FAILED,
    (S.PENDING, SE.CANCEL): S.CANCELLED,
    (S.STARTING, SE.CONNECT): S.RUNNING,
    (S.STARTING, SE.RETRY): S.PENDING,
    (S.STARTING, SE.FAIL): S.FAILED,
    (S.STARTING, SE.CANCEL): S.CANCELLED,
    (S.RUNNING, SE.COMMIT): S.DONE,
    (S.RUNNING, SE.RETRY): S.PENDING,
    (S.RUNNING, SE.FAIL): S.FAILED,
    (S.RUNNING, SE.CANCEL): S.CANCELLED,
}


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(JobEvent), ids=lambda e: e.value)
def test_job_transitions(state: JobState, event: JobEvent) -> None:
    if (state, event) in EXPECTED_JOB:
        assert next_job_state(state, event) is EXPECTED_JOB[(state, event)]
    else:
        with pytest.raises(LocalProtocolError, match=f"job cannot {event.value} in state {state.value}"):
            next_job_state(state, event)


@pytest.mark.parametrize("state", list(ShardState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(ShardEvent), ids=lambda e: e.value)
def test_shard_transitions(state: ShardState, event: ShardEvent) -> None:
    if (state, event) in EXPECTED_SHARD:
        assert next_shard_state(state, event) is EXPECTED_SHARD[(state, event)]
    else:
        with pytest.raises(LocalProtocolError, match=f"shard cannot {event.value} in state {state.value}"):
            next_shard_state(state, event)


def test_final_states() -> None:
    assert {s for s in JobState if s.is_final} == {J.SUCCEEDED, J.FAILED, J.CANCELLED}
    for state in JobState:
        outgoing = [e for e in JobEvent if (state, e) in EXPECTED_JOB]
        assert (not outgoing) == state.is_final
    assert {s for s in ShardState if s.is_final} == {S.DONE, S.FAILED, S.CANCELLED}
    for state in ShardState:
        outgoing = [e for e in ShardEvent if (state, e) in EXPECTED_SHARD]
        assert (not outgoing) == state.is_final


def test_every_state_is_reachable_from_pending() -> None:
    for start, table, states in ((J.PENDING, EXPECTED_JOB, JobState), (S.PENDING, EXPECTED_SHARD, ShardState)):
        seen, todo = {start}, [start]
        while todo:
            state = todo.pop()
            for (src, _), dst in table.items():
                if src is state and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        assert seen == set(states)


def test_state_names_are_stable_strings() -> None:
    # persisted in DynamoDB and shown by the API: values must round-trip
    for enum_cls in (JobState, JobEvent, ShardState, ShardEvent):
        for member in enum_cls:
            assert isinstance(member, str) and enum_cls(member.value) is member
    assert [s.value for s in JobState] == ["pending", "running", "succeeded", "failed", "cancelled"]
    assert [s.value for s in ShardState] == ["pending", "starting", "running", "done", "failed", "cancelled"]
