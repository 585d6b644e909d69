# The DynamoDB boundary-marker item schema (DESIGN §3 step 2).  No I/O: the
# worker's marker store turns these dicts into PutItem / GetItem calls.
#
# One item per (job, shard).  The put is conditional on the item not existing;
# when it exists, the stored boundary must equal ours (an idempotent retry) or
# the job is corrupt.  The attempt is recorded for diagnosis and fencing but is
# not part of the comparison: every attempt of a shard must find the same
# boundary because the object is pinned by ETag.

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, MarkerConflictError, RemoteProtocolError
from ._ranges import Boundary

__all__ = [
    "DEFAULT_MARKER_TABLE",
    "MARKER_ATTRIBUTE_DEFINITIONS",
    "MARKER_KEY_SCHEMA",
    "MARKER_TTL_ATTRIBUTE",
    "PUT_CONDITION",
    "Marker",
    "marker_key",
]

DEFAULT_MARKER_TABLE = "shardline-markers"
MARKER_TTL_ATTRIBUTE = "expires_at"
MARKER_KEY_SCHEMA = [
    {"AttributeName": "job", "KeyType": "HASH"},
    {"AttributeName": "shard", "KeyType": "RANGE"},
]
MARKER_ATTRIBUTE_DEFINITIONS = [
    {"AttributeName": "job", "AttributeType": "S"},
    {"AttributeName": "shard", "AttributeType": "N"},
]
#: PutItem condition: write only if no marker exists for this (job, shard).
PUT_CONDITION = "attribute_not_exists(job)"


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

    def check_agrees(self, stored: Marker) -> None:
        """Raise MarkerConflictError unless `stored` records the same boundary."""
        if stored.boundary != self.boundary or stored.etag != self.etag:
            raise MarkerConflictError(
                f"marker for job {self.job_id} shard {self.shard} already records "
                f"{stored.boundary} (etag {stored.etag}, attempt {stored.attempt}); "
                f"attempt {self.attempt} found {self.boundary} (etag {self.etag})"
            )


def _typed(item: dict[str, Any], name: str, tag: str, kind: type) -> Any:
    value = item[name][tag]
    if not isinstance(value, kind):
        raise TypeError(f"{name}.{tag} is not a {kind.__name__}")
    return value


def _count(item: dict[str, Any], name: str) -> int:
    value = _typed(item, name, "N", str)
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name}.N {value!r} is not a non-negative integer")
    return int(value)


def marker_key(job_id: str, shard: int) -> dict[str, Any]:
    return {"job": {"S": job_id}, "shard": {"N": str(shard)}}
