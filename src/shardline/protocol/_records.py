# What a coordinator keeps of a job so that it, or another coordinator
# sharing its store, can resume the job: the job's record, one record per
# shard that has changed since the job was submitted, and the attempt a shard
# committed.  A shard with no record is as submitted (`fresh_shard`), and a
# shard left unfinished by a job that ended is cancelled (`shards_as_stored`):
# so submitting and cancelling a job of 20,000 shards writes one record, not
# 20,000.  Every store (SQLite, DynamoDB,
# memory) keeps them as the JSON these classes read and write, so a new field
# needs no schema change.  No I/O here.

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigurationError, StorageError
from ._spec import JobSpec
from ._states import JobState, ShardState

__all__ = ["CommittedAttempt", "JobRecord", "ShardRecord", "fresh_shard", "shards_as_stored"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommittedAttempt:
    """The attempt whose result a shard committed: what its DONE reported, and where its output is."""

    attempt: int
    emitted_start: int
    emitted_end: int
    line_start: bool
    bytes: int
    checksum: str
    output_bytes: int
    output_path: str
    tail_sources: tuple[str, ...]
    #: Where the part went for spec.output (None until written).
    published: str | None = None
    output_checksum: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "emitted_start": self.emitted_start,
            "emitted_end": self.emitted_end,
            "line_start": self.line_start,
            "bytes": self.bytes,
            "checksum": self.checksum,
            "output_bytes": self.output_bytes,
            "output_path": self.output_path,
            "tail_sources": list(self.tail_sources),
            "published": self.published,
            "output_checksum": self.output_checksum,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CommittedAttempt:
        return cls(**{**data, "tail_sources": tuple(data["tail_sources"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRecord:
    job_id: str
    index: int
    state: ShardState
    #: Attempt numbers below this may have been launched: a restarted
    #: coordinator starts here and fences everything below.
    next_attempt: int
    committed: CommittedAttempt | None = None
    error: str | None = None
    retries: int = 0

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ConfigurationError(f"shard index must be >= 0, got {self.index}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "index": self.index,
                "state": self.state.value,
                "next_attempt": self.next_attempt,
                "committed": self.committed.to_dict() if self.committed is not None else None,
                "error": self.error,
                "retries": self.retries,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        def parse() -> ShardRecord:
            data = json.loads(text)
            committed = data["committed"]
            return cls(
                **{
                    **data,
                    "state": ShardState(data["state"]),
                    "committed": CommittedAttempt.from_dict(committed) if committed is not None else None,
                }
            )

        return _parse("shard record", text, parse)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    job_id: str
    spec: JobSpec
    state: JobState
    created_at: float  # unix time, like the other *_at fields
    updated_at: float
    finished_at: float | None
    #: Of the source object, once known.
    size: int | None
    etag: str | None
    spool_dir: str
    error: str | None = None
    #: The reduce output file, once complete.
    result_path: str | None = None
    #: Where _manifest.json went, once written.
    manifest: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "spec": self.spec.to_dict(),
                "state": self.state.value,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "finished_at": self.finished_at,
                "size": self.size,
                "etag": self.etag,
                "spool_dir": self.spool_dir,
                "error": self.error,
                "result_path": self.result_path,
                "manifest": self.manifest,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        def parse() -> JobRecord:
            data = json.loads(text)
            return cls(
                **{
                    **data,
                    "spec": JobSpec.from_dict(data["spec"]),
                    "state": JobState(data["state"]),
                }
            )

        return _parse("job record", text, parse)


def _parse(what: str, text: str, parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
        raise StorageError(f"malformed {what} in the job store ({exc!r}): {text[:200]!r}") from None


def fresh_shard(job_id: str, index: int) -> ShardRecord:
    """Shard `index` as submitted: pending, attempt 0 reserved by the job's creation."""
    return ShardRecord(job_id=job_id, index=index, state=ShardState.PENDING, next_attempt=1)


def shards_as_stored(job: JobRecord, stored: Sequence[ShardRecord]) -> list[ShardRecord]:
    """Every shard of `job`, in index order, from the records a store holds
    (`stored`, any order, only those that changed since submit): a shard
    with no record is fresh, and one left unfinished by a job that ended is
    cancelled."""
    by_index = {record.index: record for record in stored}
    shards = [by_index.get(index) or fresh_shard(job.job_id, index) for index in range(job.spec.shards)]
    if job.state.is_final:
        shards = [shard if shard.state.is_final else replace(shard, state=ShardState.CANCELLED) for shard in shards]
    return shards
