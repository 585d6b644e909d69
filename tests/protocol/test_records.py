"""The records a coordinator keeps in its store (`JobRecord`, `ShardRecord`):
their JSON round trips, and malformed records refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from shardline.errors import StorageError
from shardline.protocol import (
    JobRecord,
    JobSpec,
    JobState,
    ShardRecord,
    ShardState,
    ShardTimeouts,
    fresh_shard,
    shards_as_stored,
)

from records import committed, job_record


def test_job_record_json_round_trip() -> None:
    spec = JobSpec(
        source="/data/in.txt",
        shards=7,
        delimiter=b"\0",
        command="sort",
        output="s3://b/p/",
        reduce="sort -m",
        backend="local",
        timeouts=ShardTimeouts(start_s=5, heartbeat_s=2.5, total_s=99),
        max_attempts=5,
        max_line_bytes=4096,
        part_size_bytes=1024,
        max_in_flight_bytes=4096,
    )
    for record in (
        job_record(),
        job_record(
            spec=spec,
            state=JobState.FAILED,
            finished_at=1_700_000_009.0,
            size=None,
            etag=None,
            error="shard 2 failed: boom",
            result_path="/tmp/result",
            manifest="s3://b/p/_manifest.json",
        ),
    ):
        assert JobRecord.from_json(record.to_json()) == record


def test_job_record_keeps_no_secret() -> None:
    # Job secrets are derived from the coordinator's key, never stored.
    assert "secret" not in {field.name for field in dataclasses.fields(JobRecord)}
    assert "secret" not in job_record().to_json()


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(ShardRecord(job_id="j", index=0, state=ShardState.PENDING, next_attempt=0), id="fresh"),
        pytest.param(
            ShardRecord(
                job_id="j",
                index=5,
                state=ShardState.DONE,
                next_attempt=3,
                committed=committed(published="s3://b/p/part-00005", output_checksum="crc32c:00000001"),
                retries=2,
            ),
            id="committed",
        ),
        pytest.param(
            ShardRecord(job_id="j", index=1, state=ShardState.FAILED, next_attempt=3, error="boom", retries=2),
            id="failed",
        ),
    ],
)
def test_shard_record_json_round_trip(record: ShardRecord) -> None:
    assert ShardRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("[]", id="list"),
        pytest.param(job_record().to_json().replace('"running"', '"sleeping"'), id="bad-state"),
        pytest.param(job_record().to_json().replace('"shards":3', '"shards":0'), id="bad-spec"),
        pytest.param(job_record().to_json().replace('"size":1234,', ""), id="missing-field"),
        pytest.param(job_record().to_json().replace('"size":1234,', '"size":1234,"colour":1,'), id="unknown-field"),
    ],
)
def test_malformed_job_record(text: str) -> None:
    with pytest.raises(StorageError, match="malformed job record"):
        JobRecord.from_json(text)


def test_malformed_shard_record() -> None:
    text = ShardRecord(job_id="j", index=1, state=ShardState.DONE, next_attempt=2, committed=committed()).to_json()
    with pytest.raises(StorageError, match="malformed shard record"):
        ShardRecord.from_json(text.replace('"tail_sources"', '"tails"'))


def test_shards_as_stored_fills_fresh_shards_and_cancels_the_unfinished_ones_of_an_ended_job():
    job = JobRecord(
        job_id="j",
        spec=JobSpec(source="/tmp/x", shards=4),
        state=JobState.RUNNING,
        created_at=1.0,
        updated_at=1.0,
        finished_at=None,
        size=10,
        etag="e",
        spool_dir="/tmp/spool",
    )
    stored = [
        ShardRecord(job_id="j", index=2, state=ShardState.PENDING, next_attempt=3, retries=2),
        ShardRecord(job_id="j", index=0, state=ShardState.FAILED, next_attempt=2, error="boom"),
    ]
    running = shards_as_stored(job, stored)
    assert [shard.index for shard in running] == [0, 1, 2, 3]
    assert running[1] == fresh_shard("j", 1)
    assert fresh_shard("j", 1) == ShardRecord(job_id="j", index=1, state=ShardState.PENDING, next_attempt=1)
    assert running[0] == stored[1] and running[2] == stored[0]
    ended = shards_as_stored(dataclasses.replace(job, state=JobState.CANCELLED), stored)
    assert [shard.state for shard in ended] == [
        ShardState.FAILED,
        ShardState.CANCELLED,
        ShardState.CANCELLED,
        ShardState.CANCELLED,
    ]
    assert ended[2].next_attempt == 3 and ended[2].retries == 2  # only the state is implied
