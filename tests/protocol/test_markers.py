"""Boundary-marker items (DESIGN §3 step 2, §5): their DynamoDB schema, the
conditional writes they make, and the fence, all without I/O.

The same writes against a server evaluating their conditions are in
tests/io/test_markers.py.
"""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.errors import ConfigurationError, MarkerConflictError, RemoteProtocolError, StaleAttemptError
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    MARKER_ATTRIBUTE_DEFINITIONS,
    MARKER_FENCE_ATTRIBUTE,
    MARKER_KEY_SCHEMA,
    MARKER_TTL_ATTRIBUTE,
    PUT_CONDITION,
    Boundary,
    Marker,
    marker_fence,
    marker_fence_request,
    marker_key,
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
    assert MARKER_FENCE_ATTRIBUTE not in types and MARKER_TTL_ATTRIBUTE not in types


def _placeholders(request: dict, sigil: str) -> set[str]:
    text = request["UpdateExpression"] + " " + request["ConditionExpression"]
    return set(re.findall(re.escape(sigil) + r"\w+", text))


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(good_marker().put_request(expires_at=9, now=1), id="put"),
        pytest.param(marker_fence_request("job-1", 4, 2, expires_at=9, now=1), id="fence"),
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
    request = marker.put_request(expires_at=77, now=1)
    assert request["ConditionExpression"] == PUT_CONDITION
    body = {name: value for name, value in marker.to_item(expires_at=77).items() if name not in ("job", "shard")}
    # `:now` is the condition's clock: an expired marker may be replaced.
    assert request["ExpressionAttributeValues"] == {
        ":now": {"N": "1"},
        **{f":{name}": value for name, value in body.items()},
    }


def test_marker_fence_request_rejects_negative_attempts() -> None:
    with pytest.raises(ConfigurationError, match="fence"):
        marker_fence_request("job-1", 4, -1, expires_at=9, now=1)


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
    # Boundary itself refuses this with a ConfigurationError; read from the
    # store it is a corrupt item, the remote side's fault.
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
    # Validated, never coerced: bool("false") is True (the boundary would
    # silently flip), int() accepts " 3 ", "1_00" and "-1".
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
