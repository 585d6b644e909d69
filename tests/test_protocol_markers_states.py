"""Boundary-marker items (DESIGN §3 step 2) and the job/shard state tables."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.errors import LocalProtocolError, MarkerConflictError, RemoteProtocolError
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
    assert PUT_CONDITION == "attribute_not_exists(job)"


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
    (S.PENDING, SE.CANCEL): S.CANCELLED,
    (S.STARTING, SE.CONNECT): S.RUNNING,
    (S.STARTING, SE.FAIL): S.FAILED,
    (S.STARTING, SE.CANCEL): S.CANCELLED,
    (S.RUNNING, SE.COMMIT): S.DONE,
    (S.RUNNING, SE.FAIL): S.FAILED,
    (S.RUNNING, SE.CANCEL): S.CANCELLED,
    (S.FAILED, SE.RETRY): S.PENDING,
    (S.FAILED, SE.CANCEL): S.CANCELLED,
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
    for state in (S.DONE, S.CANCELLED):
        assert not [e for e in ShardEvent if (state, e) in EXPECTED_SHARD]


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
