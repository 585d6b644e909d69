"""`run_embedded`'s set-up before the first attempt: the marker-table check
runs beside the object's stat, and no attempt starts unless both succeed.

Against the moto server (S3 and DynamoDB), with the real coordinator and
in-process workers.
"""

from __future__ import annotations

import io
import uuid

import pytest

from shardline.coordinator import CoordinatorSettings
from shardline.embedded import InProcessBackend, run_embedded
from shardline.errors import ConfigurationError, SourceNotFoundError
from shardline.io.store import dynamodb_location
from shardline.protocol import JobSpec

from reference import reference_split

DATA = b"".join(b"line %04d\n" % i for i in range(200))


class RecordingBackend(InProcessBackend):
    """In-process workers that remember which shards they were asked to run."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[int] = []

    async def run(self, task, *, on_started):  # type: ignore[no-untyped-def]
        self.started.append(task.shard)
        return await super().run(task, on_started=on_started)


def _settings(table: str, tmp_path) -> CoordinatorSettings:
    return CoordinatorSettings(markers=dynamodb_location(table), spool_dir=str(tmp_path / "spool"))


async def _run_starting_nothing(spec: JobSpec, table: str, tmp_path, aws_settings) -> None:
    """`run_embedded` without creating tables; it must fail before any attempt starts."""
    backend = RecordingBackend()
    try:
        await run_embedded(
            spec,
            out=io.BytesIO(),
            aws=aws_settings,
            backend=backend,
            settings=_settings(table, tmp_path),
            create_tables=False,
        )
    finally:
        assert backend.started == []


async def test_a_missing_marker_table_fails_the_job_before_any_attempt_starts(tmp_path, aws_settings, s3, bucket):
    s3.put_object(Bucket=bucket, Key="input", Body=DATA)
    table = f"missing-{uuid.uuid4().hex[:8]}"
    spec = JobSpec(source=f"s3://{bucket}/input", shards=4, min_shard_bytes=None)
    with pytest.raises(ConfigurationError, match=f"DynamoDB table '{table}' does not exist"):
        await _run_starting_nothing(spec, table, tmp_path, aws_settings)


async def test_a_missing_object_is_named_even_when_the_table_is_missing_too(tmp_path, aws_settings, bucket):
    table = f"missing-{uuid.uuid4().hex[:8]}"
    spec = JobSpec(source=f"s3://{bucket}/no-such-key", shards=4)
    with pytest.raises(SourceNotFoundError, match="no-such-key"):
        await _run_starting_nothing(spec, table, tmp_path, aws_settings)


async def test_a_missing_marker_table_is_created_and_the_job_runs(tmp_path, aws_settings, s3, bucket):
    s3.put_object(Bucket=bucket, Key="input", Body=DATA)
    table = f"created-{uuid.uuid4().hex[:8]}"
    out = io.BytesIO()
    spec = JobSpec(source=f"s3://{bucket}/input", shards=4, min_shard_bytes=None)
    report = await run_embedded(
        spec, out=out, aws=aws_settings, backend=RecordingBackend(), settings=_settings(table, tmp_path)
    )
    assert out.getvalue() == DATA
    assert [shard.emitted for shard in report.shards] == [
        (start, start + len(piece)) for start, piece in _pieces(reference_split(DATA, 4, b"\n"))
    ]


def _pieces(parts: list[bytes]) -> list[tuple[int, bytes]]:
    at, pieces = 0, []
    for part in parts:
        pieces.append((at, part))
        at += len(part)
    return pieces
