"""The three ways a worker completes its tail (DESIGN §3 step 4), each forced.

Which path a worker takes depends only on what its neighbours have done
before it reaches its tail, so ordering the workers makes each path
deterministic:

* pushed  -- the neighbour ran first through the coordinator's exchange, so
             its head fragment is pushed the moment we ask;
* marker  -- the neighbour ran first without an exchange: only its DynamoDB
             marker exists, and we read the fragment with one exact GET;
* scan    -- the neighbour has not run at all: we scan forward ourselves.

All of it runs the real worker, exchange and coordinator code against the
moto server; the report's `tail_sources` says which path was taken.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shardline.embedded import InProcessBackend
from shardline.errors import MarkerConflictError
from shardline.io.aws import AwsSettings, client
from shardline.io.sources import open_source
from shardline.io.store import dynamodb_location
from shardline.protocol import DEFAULT_MARKER_TABLE, Boundary, Marker, ShardTask, TailSource
from shardline.worker import WorkerSettings, run_task

from jobs import OrderedBackend, run_job_inprocess
from reference import reference_split

# Lines of 10 bytes; with 4 shards of 25 bytes no shard starts on a line start.
DATA = b"".join(b"line %04d\n" % i for i in range(10))


def ordered(order: list[int]) -> OrderedBackend:
    # Generous: on an overloaded machine the exchange's answer to WANT must
    # still arrive before the worker gives up waiting for it.
    return OrderedBackend(order, InProcessBackend(worker_settings=WorkerSettings(want_answer_timeout_s=60)))


async def _standalone_task(
    path: Path, shards: int, index: int, *, job_id: str, aws: AwsSettings, out: Path
) -> ShardTask:
    """A task as the coordinator would build it, but with no exchange."""
    async with open_source(str(path), aws) as source:
        info = await source.stat()
    return ShardTask(
        job_id=job_id,
        shard=index,
        shards=shards,
        attempt=0,
        source=str(path),
        size=info.size,
        etag=info.etag,
        output_path=str(out / f"shard-{index}.out"),
        markers=dynamodb_location(DEFAULT_MARKER_TABLE),
        aws=aws.to_dict(),
    )


async def test_tail_by_own_scan_when_neighbour_has_not_run(tmp_path, aws_settings, marker_table):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    task = await _standalone_task(path, 4, 0, job_id=uuid.uuid4().hex, aws=aws_settings, out=tmp_path)
    result = await run_task(task)
    assert result.tail_sources == (TailSource.SCAN,)
    assert Path(task.output_path).read_bytes() == reference_split(DATA, 4, b"\n")[0]


async def test_tail_by_marker_when_neighbour_ran_without_exchange(tmp_path, aws_settings, marker_table):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    job_id = uuid.uuid4().hex
    neighbour = await _standalone_task(path, 4, 1, job_id=job_id, aws=aws_settings, out=tmp_path)
    await run_task(neighbour)  # publishes shard 1's marker, nothing else
    task = await _standalone_task(path, 4, 0, job_id=job_id, aws=aws_settings, out=tmp_path)
    result = await run_task(task)
    assert result.tail_sources == (TailSource.MARKER,)
    expected = reference_split(DATA, 4, b"\n")
    assert Path(task.output_path).read_bytes() == expected[0]
    assert Path(neighbour.output_path).read_bytes() == expected[1]


async def test_tail_by_pushed_fragment_when_neighbour_ran_first(tmp_path, aws_settings, marker_table):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    output, report = await run_job_inprocess(str(path), 4, aws=aws_settings, backend=ordered([3, 2, 1, 0]))
    assert output == DATA
    assert {s.index: s.tail_sources for s in report.shards} == {
        0: (TailSource.PUSHED,),
        1: (TailSource.PUSHED,),
        2: (TailSource.PUSHED,),
        3: (),
    }


async def test_pushed_tail_runs_across_shards_without_line_start(tmp_path, aws_settings, marker_table):
    # One 120-byte line covers shards 1 and 2 entirely: shard 0 must take the
    # fragments of shards 1, 2 and the head of 3 to finish its last line.
    data = b"a\n" + b"x" * 120 + b"\n" + b"tail line\n" * 3
    path = tmp_path / "input"
    path.write_bytes(data)
    output, report = await run_job_inprocess(str(path), 4, aws=aws_settings, backend=ordered([3, 2, 1, 0]))
    assert output == data
    shard0 = next(s for s in report.shards if s.index == 0)
    assert shard0.tail_sources == (TailSource.PUSHED,) * 3
    assert [s.bytes for s in sorted(report.shards, key=lambda s: s.index)] == [
        len(part) for part in reference_split(data, 4, b"\n")
    ]


async def test_fragment_over_push_limit_is_announced_and_read_exactly(tmp_path, aws_settings, marker_table):
    # A head fragment larger than the push limit travels as an offset only;
    # the predecessor reads the bytes with one exact GET ("marker" path).
    data = b"short\n" + b"y" * 4000 + b"\n" + b"end\n"
    path = tmp_path / "input"
    path.write_bytes(data)
    job_id = uuid.uuid4().hex
    settings = WorkerSettings(fragment_push_limit_bytes=100)
    tasks = [await _standalone_task(path, 2, i, job_id=job_id, aws=aws_settings, out=tmp_path) for i in (0, 1)]
    await run_task(tasks[1], settings=settings)
    result = await run_task(tasks[0], settings=settings)
    assert result.tail_sources == (TailSource.MARKER,)
    assert Path(tasks[0].output_path).read_bytes() + Path(tasks[1].output_path).read_bytes() == data


async def test_conflicting_marker_fails_the_shard(tmp_path, aws_settings, marker_table):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    task = await _standalone_task(path, 4, 1, job_id=uuid.uuid4().hex, aws=aws_settings, out=tmp_path)
    wrong = Marker(
        job_id=task.job_id,
        shard=1,
        attempt=0,
        boundary=Boundary(start=25, head_end=26, line_start=True),  # the real h_1 is 30
        etag=task.etag,
    )
    async with client(aws_settings, "dynamodb") as dynamodb:
        await dynamodb.put_item(TableName=marker_table, Item=wrong.to_item(expires_at=2**31))
    with pytest.raises(MarkerConflictError, match="shard 1"):
        await run_task(task)


async def test_retried_attempt_with_same_boundary_is_idempotent(tmp_path, aws_settings, marker_table):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    job_id = uuid.uuid4().hex
    first = await _standalone_task(path, 4, 2, job_id=job_id, aws=aws_settings, out=tmp_path)
    await run_task(first)
    second = ShardTask.from_json(first.to_json().replace('"attempt":0', '"attempt":1'))
    result = await run_task(second)
    assert result.boundary == Boundary(start=50, head_end=50, line_start=True)
