"""Job and shard records as a coordinator keeps them: for the tests of the
records themselves (protocol) and of the stores that keep them (coordinator)."""

from __future__ import annotations

import uuid
from typing import Any

from shardline.protocol import CommittedAttempt, JobRecord, JobSpec, JobState, ShardRecord, ShardState


def job_record(job_id: str | None = None, **changes: Any) -> JobRecord:
    fields: dict[str, Any] = {
        "job_id": job_id or uuid.uuid4().hex[:16],
        "spec": JobSpec(source="s3://bucket/key", shards=3, command="wc -l"),
        "state": JobState.RUNNING,
        "created_at": 1_700_000_000.25,
        "updated_at": 1_700_000_001.5,
        "finished_at": None,
        "size": 1234,
        "etag": '"abc"',
        "spool_dir": "/tmp/spool/job",
    }
    fields.update(changes)
    return JobRecord(**fields)


def committed(attempt: int = 1, **changes: Any) -> CommittedAttempt:
    fields: dict[str, Any] = {
        "attempt": attempt,
        "emitted_start": 10,
        "emitted_end": 20,
        "line_start": True,
        "bytes": 10,
        "checksum": "crc32c:0000abcd",
        "output_bytes": 4,
        "output_path": "/tmp/spool/job/shard-1.1",
        "tail_sources": ("pushed", "marker"),
    }
    fields.update(changes)
    return CommittedAttempt(**fields)


def shard_records(job_id: str, count: int, **changes: Any) -> list[ShardRecord]:
    base: dict[str, Any] = {"state": ShardState.PENDING, "next_attempt": 1}
    base.update(changes)
    return [ShardRecord(job_id=job_id, index=index, **base) for index in range(count)]
