# The DynamoDB boundary-marker item schema (DESIGN §3 step 2) and the
# requests that write it.  No I/O: the worker's marker store and the
# coordinator send these as UpdateItem / GetItem calls.
#
# One item per (job, shard).  The write is an UpdateItem guarded by
# PUT_CONDITION: it is allowed only while
#   * the item's `fence` (an attempt number, absent = 0) is <= the writer's
#     attempt -- the coordinator raises the fence past attempts it gave up on,
#     so a stale worker cannot write -- and
#   * no boundary is stored yet, or the stored boundary and etag equal ours (an
#     idempotent retry).  A different value for the same shard is corruption.
# `attempt` records the first writer, for diagnosis; it is not compared:
# every attempt of a shard must find the same boundary because the object is
# pinned by ETag.  An item holding only a fence (raised before any attempt
# published) is "no marker yet".
#
# Every attribute is aliased (#name) in expressions: `start` and `shard` are
# DynamoDB reserved words, and aliasing all of them keeps that from biting
# whoever adds the next attribute.

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, MarkerConflictError, RemoteProtocolError, StaleAttemptError
from ._ranges import Boundary

__all__ = [
    "DEFAULT_MARKER_TABLE",
    "MARKER_ATTRIBUTE_DEFINITIONS",
    "MARKER_FENCE_ATTRIBUTE",
    "MARKER_KEY_SCHEMA",
    "MARKER_TTL_ATTRIBUTE",
    "MARKER_TTL_S",
    "PUT_CONDITION",
    "Marker",
    "marker_expired",
    "marker_fence",
    "marker_fence_request",
    "marker_key",
]

DEFAULT_MARKER_TABLE = "shardline-markers"
#: Markers and fences only matter while their job runs; the store's TTL reaps them after.
MARKER_TTL_S = 7 * 24 * 3600
MARKER_TTL_ATTRIBUTE = "expires_at"
MARKER_FENCE_ATTRIBUTE = "fence"
MARKER_KEY_SCHEMA = [
    {"AttributeName": "job", "KeyType": "HASH"},
    {"AttributeName": "shard", "KeyType": "RANGE"},
]
MARKER_ATTRIBUTE_DEFINITIONS = [
    {"AttributeName": "job", "AttributeType": "S"},
    {"AttributeName": "shard", "AttributeType": "N"},
]

#: The attributes a published marker stores besides its key and TTL.
_BODY = ("attempt", "start", "head_end", "line_start", "etag")

#: An item past its expiry fails every condition: the store deletes it (it reads as absent) and writes again.
_NOT_EXPIRED = "(attribute_not_exists(#expires_at) OR #expires_at >= :now)"
#: The marker write's condition: fence allows our attempt, and no boundary or the same one is stored.
PUT_CONDITION = (
    "(attribute_not_exists(#fence) OR #fence <= :attempt) AND (attribute_not_exists(#head_end) OR "
    "(#start = :start AND #head_end = :head_end AND #line_start = :line_start AND #etag = :etag)) AND " + _NOT_EXPIRED
)
_PUT_UPDATE = (
    "SET #attempt = if_not_exists(#attempt, :attempt), #start = :start, #head_end = :head_end, "
    "#line_start = :line_start, #etag = :etag, #expires_at = :expires_at"
)
_PUT_NAMES = {f"#{name}": name for name in (*_BODY, MARKER_FENCE_ATTRIBUTE, MARKER_TTL_ATTRIBUTE)}

# The fence never moves down: a lower or equal request fails its condition,
# which the caller treats as success.  expires_at is kept when the item exists.
_FENCE_CONDITION = "(attribute_not_exists(#fence) OR #fence < :fence) AND " + _NOT_EXPIRED
_FENCE_UPDATE = "SET #fence = :fence, #expires_at = if_not_exists(#expires_at, :expires_at)"
_FENCE_NAMES = {"#fence": MARKER_FENCE_ATTRIBUTE, "#expires_at": MARKER_TTL_ATTRIBUTE}


@dataclass(frozen=True, slots=True, kw_only=True)
class Marker:
    """Shard `shard`'s boundary for job `job_id`, pinned to the object's `etag`."""

    job_id: str
    shard: int
    attempt: int
    boundary: Boundary
    etag: str

    def key(self) -> dict[str, Any]:
        return marker_key(self.job_id, self.shard)

    def to_item(self, *, expires_at: int) -> dict[str, Any]:
        return {
            **self.key(),
            "attempt": {"N": str(self.attempt)},
            "start": {"N": str(self.boundary.start)},
            "head_end": {"N": str(self.boundary.head_end)},
            "line_start": {"BOOL": self.boundary.line_start},
            "etag": {"S": self.etag},
            MARKER_TTL_ATTRIBUTE: {"N": str(expires_at)},
        }

    def put_request(self, *, expires_at: int, now: int) -> dict[str, Any]:
        """UpdateItem arguments (all but TableName) that write this marker under PUT_CONDITION at `now`."""
        item = self.to_item(expires_at=expires_at)
        values = {f":{name}": item[name] for name in (*_BODY, MARKER_TTL_ATTRIBUTE)}
        return {
            "Key": self.key(),
            "UpdateExpression": _PUT_UPDATE,
            "ConditionExpression": PUT_CONDITION,
            "ExpressionAttributeNames": _PUT_NAMES,
            "ExpressionAttributeValues": {**values, ":now": {"N": str(now)}},
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Marker:
        try:
            return cls(
                job_id=_typed(item, "job", "S", str),
                shard=_count(item, "shard"),
                attempt=_count(item, "attempt"),
                boundary=Boundary(
                    start=_count(item, "start"),
                    head_end=_count(item, "head_end"),
                    line_start=_typed(item, "line_start", "BOOL", bool),
                ),
                etag=_typed(item, "etag", "S", str),
            )
        except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
            raise RemoteProtocolError(f"malformed marker item {item!r}: {exc!r}") from None

    @classmethod
    def from_stored(cls, item: Mapping[str, Any] | None) -> Marker | None:
        """The marker a read returned, or None if nothing, or only a fence, is stored."""
        if not item or not any(name in item for name in _BODY):
            return None
        return cls.from_item(dict(item))

    def check_agrees(self, stored: Marker) -> None:
        """Raise MarkerConflictError unless `stored` records the same boundary."""
        if stored.boundary != self.boundary or stored.etag != self.etag:
            raise MarkerConflictError(
                f"marker for job {self.job_id} shard {self.shard} already records "
                f"{stored.boundary} (etag {stored.etag}, attempt {stored.attempt}); "
                f"attempt {self.attempt} found {self.boundary} (etag {self.etag})"
            )

    def must_write(self, *, stored: Marker | None, fence: int) -> bool:
        """The put rule itself, for a store that evaluates it in a transaction
        (SQLite) rather than as a condition (DynamoDB): True if this marker
        must be written, False if an equal one is stored already.

        Raises StaleAttemptError if `fence` is above our attempt, and
        MarkerConflictError if `stored` records another boundary.
        """
        if fence > self.attempt:
            raise StaleAttemptError(
                f"marker write for job {self.job_id} shard {self.shard} attempt {self.attempt} refused: "
                f"the shard is fenced at attempt {fence}"
            )
        if stored is None:
            return True
        self.check_agrees(stored)
        return False

    def check_refused(self, item: Mapping[str, Any] | None) -> None:
        """Explain why this marker's conditional write was refused, from the item read back.

        Raises StaleAttemptError if the fence is above our attempt, and
        MarkerConflictError if another boundary is stored.  Returns quietly
        only if the item now records our boundary under a fence that allows
        us: the write's effect is already there.
        """
        stored = Marker.from_stored(item)
        if self.must_write(stored=stored, fence=marker_fence(item)):
            raise MarkerConflictError(
                f"marker write for job {self.job_id} shard {self.shard} refused, but no marker is stored"
            )


def marker_expired(item: Mapping[str, Any] | None, now: int) -> bool:
    """Whether a stored item is past its expiry (it then reads as absent)."""
    if not item or MARKER_TTL_ATTRIBUTE not in item:
        return False
    try:
        return _count(item, MARKER_TTL_ATTRIBUTE) < now
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed marker expiry in {item!r}: {exc!r}") from None


def marker_fence(item: Mapping[str, Any] | None) -> int:
    """The lowest attempt number a marker item still accepts writes from (0 if unfenced)."""
    if not item or MARKER_FENCE_ATTRIBUTE not in item:
        return 0
    try:
        return _count(item, MARKER_FENCE_ATTRIBUTE)
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed marker fence in {item!r}: {exc!r}") from None


def marker_fence_request(job_id: str, shard: int, min_attempt: int, *, expires_at: int, now: int) -> dict[str, Any]:
    """UpdateItem arguments (all but TableName) that raise the fence to `min_attempt`.

    Creates a fence-only item when no marker exists.  The call fails with
    ConditionalCheckFailedException when the fence is already that high or
    higher, which means the request has nothing to do.
    """
    if min_attempt < 0:
        raise ConfigurationError(f"marker fence must be a non-negative attempt number, got {min_attempt}")
    return {
        "Key": marker_key(job_id, shard),
        "UpdateExpression": _FENCE_UPDATE,
        "ConditionExpression": _FENCE_CONDITION,
        "ExpressionAttributeNames": _FENCE_NAMES,
        "ExpressionAttributeValues": {
            ":fence": {"N": str(min_attempt)},
            ":expires_at": {"N": str(expires_at)},
            ":now": {"N": str(now)},
        },
    }


def _typed(item: Mapping[str, Any], name: str, tag: str, kind: type) -> Any:
    value = item[name][tag]
    if not isinstance(value, kind):
        raise TypeError(f"{name}.{tag} is not a {kind.__name__}")
    return value


def _count(item: Mapping[str, Any], name: str) -> int:
    value = _typed(item, name, "N", str)
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name}.N {value!r} is not a non-negative integer")
    return int(value)


def marker_key(job_id: str, shard: int) -> dict[str, Any]:
    return {"job": {"S": job_id}, "shard": {"N": str(shard)}}
