"""Outputs are never written over or mixed with an earlier job's files (DESIGN §9).

Whole jobs through the real Coordinator, exchange, DynamoDB markers and
in-process workers, writing to real directories and to moto's S3.  The
earlier output in a destination is always the real output of an earlier,
larger job (8 shards and a reduce), beside a user's own file.  Ordering is
proved without timing: a shard held at a gate cannot be published, so
what the destination holds while it waits was done before its first part;
on S3 the fault proxy's request log gives the order of every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shardline.coordinator import Backend, Coordinator, CoordinatorSettings, OutputPolicy, WorkerExit
from shardline.coordinator._release import written_by_earlier_runs  # a step of resuming a job, private to it
from shardline.embedded import InProcessBackend
from shardline.errors import ConfigurationError
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import DynamoJobStore, JobStore, ensure_jobs_table
from shardline.protocol import CommittedAttempt, JobSpec, JobView, ShardRecord, ShardState, ShardTask, shards_as_stored

from faultproxy import FaultProxy
from jobs import running_coordinator, sequential_reference
from polling import eventually
from reference import reference_split
from servers import Endpoint

DATA = b"".join(b"line %05d %s\n" % (i, b"q" * (i % 29)) for i in range(4000))
SED = "sed 's/^/>/'"
#: The earlier job: more shards than the new one, and a reduce (so a `result`).
EARLIER = {"shards": 8, "reduce": "wc -l"}
#: What the new jobs' parts hold: shard i's lines through SED.
NEW_PARTS = [sequential_reference(part, SED) for part in reference_split(DATA, 4, b"\n")]
ANYWHERE = OutputPolicy(anywhere=True)
#: Bound on every wait for something to happen (a hang guard, not a timing check).
PATIENCE_S = 120.0


def fail_on(shard: int) -> str:
    """SED, except that `shard` fails on every attempt."""
    return f'if [ "$SHARDLINE_SHARD" = {shard} ]; then echo "shard {shard} says no" >&2; exit 4; fi; {SED}'


class Gated(InProcessBackend):
    """In-process workers; every attempt of shard `held` waits for `gate` first
    (open to begin with, so that an earlier job can run; `close()` it)."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.held = held
        self.gate = asyncio.Event()
        self.gate.set()

    def close(self) -> None:
        self.gate.clear()

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        if task.shard == self.held:
            await self.gate.wait()
        return await super().run(task, on_started=on_started)


def coordinator(
    aws: AwsSettings,
    backend: Backend | None = None,
    *,
    policy: OutputPolicy = ANYWHERE,
    store: JobStore | None = None,
    spool_dir: str | None = None,
) -> contextlib.AbstractAsyncContextManager[Coordinator]:
    settings = CoordinatorSettings(
        retry_backoff_s=0.05, supervise_interval_s=0.05, spool_dir=spool_dir, output_policy=policy
    )
    return running_coordinator(aws, backend or InProcessBackend(), settings=settings, store=store)


async def finished(service: Coordinator, job_id: str) -> JobView:
    async with asyncio.timeout(PATIENCE_S):
        return await service.wait(job_id)


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "input"
    path.write_bytes(DATA)
    return str(path)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, and the directory's own."""
    files = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in directory.iterdir()}
    return {**files, ".": (b"", directory.stat().st_mtime_ns)}


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def earlier_output(service: Coordinator, source: str, output: str) -> None:
    """The real output of an earlier, larger job with a reduce."""
    view = await service.submit(JobSpec(source=source, output=output, **EARLIER))
    assert (await finished(service, view.id)).state.value == "succeeded"


async def local_earlier_output(service: Coordinator, source: str, directory: Path) -> dict[str, bytes]:
    """`earlier_output` in `directory` plus a user's own file; returns every file's bytes."""
    await earlier_output(service, source, str(directory))
    (directory / "notes.txt").write_bytes(b"the user's own file\n")
    files = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert sorted(files) == ["_manifest.json", "notes.txt", *(f"part-{i:05d}" for i in range(8)), "result"]
    return files


# --- refused at submit ------------------------------------------------------------------------


async def test_a_non_empty_directory_is_refused_and_left_untouched(source, aws_settings, tmp_path):
    directory = tmp_path / "out"
    async with coordinator(aws_settings) as service:
        await local_earlier_output(service, source, directory)
        before = snapshot(directory)
        with pytest.raises(ConfigurationError, match=rf"field 'output': {directory} is not empty.*overwrite"):
            await service.submit(JobSpec(source=source, shards=4, output=str(directory)))
        assert len(service.views()) == 1  # only the earlier job
    assert snapshot(directory) == before


async def test_a_non_empty_s3_prefix_is_refused_and_left_untouched(source, aws_settings, s3, bucket):
    s3.put_object(Bucket=bucket, Key="out/someone/else.txt", Body=b"not ours")
    async with coordinator(aws_settings) as service:
        with pytest.raises(ConfigurationError, match=rf"field 'output': s3://{bucket}/out/ is not empty"):
            await service.submit(JobSpec(source=source, shards=4, output=f"s3://{bucket}/out/"))
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["out/someone/else.txt"]


async def test_a_destination_a_running_job_writes_is_refused(source, aws_settings, tmp_path):
    directory = tmp_path / "out"
    backend = Gated(held=0)
    async with coordinator(aws_settings, backend) as service:
        backend.close()
        first = await service.submit(JobSpec(source=source, shards=4, output=str(directory)))
        # Not even with overwrite: the two outputs would be mixed.
        with pytest.raises(ConfigurationError, match=rf"job {first.id} is still writing to {directory}"):
            await service.submit(JobSpec(source=source, shards=2, output=str(directory), overwrite=True))
        backend.gate.set()
        assert (await finished(service, first.id)).state.value == "succeeded"
        second = await service.submit(JobSpec(source=source, shards=2, output=str(directory), overwrite=True))
        assert (await finished(service, second.id)).state.value == "succeeded"
    assert names(directory) == ["_manifest.json", "part-00000", "part-00001"]


# --- overwrite ----------------------------------------------------------------------------------


async def test_overwrite_replaces_a_larger_earlier_output_manifest_first(source, aws_settings, tmp_path):
    directory = tmp_path / "out"
    backend = Gated(held=0)
    async with coordinator(aws_settings, backend) as service:
        earlier = await local_earlier_output(service, source, directory)
        spec = JobSpec(source=source, shards=4, command=SED, output=str(directory), overwrite=True)
        backend.close()
        view = await service.submit(spec)
        # Shard 0 is held, so no part of the new output can have been written;
        # the earlier manifest must already be gone.
        await eventually(
            lambda: not (directory / "_manifest.json").exists(),
            "the earlier manifest was removed",
            timeout_s=PATIENCE_S,
        )
        assert {path.name: path.read_bytes() for path in directory.iterdir()} == {
            name: data for name, data in earlier.items() if name != "_manifest.json"
        }
        backend.gate.set()
        assert (await finished(service, view.id)).state.value == "succeeded"
    # Exactly the new output (the earlier parts 4..7 and result are gone), and the user's file.
    assert names(directory) == ["_manifest.json", "notes.txt", "part-00000", "part-00001", "part-00002", "part-00003"]
    assert [(directory / f"part-{i:05d}").read_bytes() for i in range(4)] == NEW_PARTS
    assert b"".join(path.read_bytes() for path in sorted(directory.glob("part-*"))) == sequential_reference(DATA, SED)
    manifest = json.loads((directory / "_manifest.json").read_text())
    assert manifest["job_id"] == view.id and manifest["result"] is None
    assert (directory / "notes.txt").read_bytes() == earlier["notes.txt"]


async def test_overwrite_of_an_s3_prefix_removes_the_manifest_first_and_the_rest_last(
    source, aws_settings, moto: Endpoint, s3, bucket
):
    async with FaultProxy(moto.url) as proxy:
        via_proxy = moto.aws_settings(s3_endpoint_url=proxy.url, read_timeout_s=10.0)
        async with coordinator(via_proxy) as service:
            await earlier_output(service, source, f"s3://{bucket}/out/")
            s3.put_object(Bucket=bucket, Key="out/notes.txt", Body=b"the user's own object")
            first_request = len(proxy.records)
            spec = JobSpec(source=source, shards=4, command=SED, output=f"s3://{bucket}/out/", overwrite=True)
            view = await service.submit(spec)
            assert (await finished(service, view.id)).state.value == "succeeded"
    writes = []
    for record in proxy.records[first_request:]:
        path, _, query = record.target.partition("?")
        name = path.removeprefix(f"/{bucket}/out/")
        if record.method == "POST" and "delete" in query:
            writes.append("DeleteObjects")
        elif record.method in ("PUT", "DELETE") and not name.startswith(".shardline-write-check"):
            writes.append(f"{record.method} {name}")
    first_part = min(index for index, write in enumerate(writes) if write.startswith("PUT part-"))
    assert "DELETE _manifest.json" in writes[:first_part]  # the earlier manifest went first
    manifest_put = writes.index("PUT _manifest.json")
    # Parts are written several at a time, so in any order, but all before the manifest.
    assert sorted(writes[first_part:manifest_put]) == [f"PUT part-{i:05d}" for i in range(4)]
    # The earlier parts 4..7 and result only once the new output is complete.
    assert "DeleteObjects" in writes[manifest_put:] and "DeleteObjects" not in writes[:manifest_put]
    listed = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert listed == ["out/_manifest.json", "out/notes.txt", *(f"out/part-{i:05d}" for i in range(4))]
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(4)]
    assert parts == NEW_PARTS


# --- failures remove only what the job wrote ---------------------------------------------------


async def test_a_failed_overwrite_removes_only_what_it_wrote(source, aws_settings, tmp_path):
    """The earlier output was invalidated as the job started (its manifest
    went first); what the job did not overwrite is still the earlier job's,
    so the failed job leaves it -- without a manifest, nothing claims it is
    complete -- and removes the parts it had written."""
    directory = tmp_path / "out"
    backend = Gated(held=2)
    async with coordinator(aws_settings, backend) as service:
        earlier = await local_earlier_output(service, source, directory)
        spec = JobSpec(
            source=source, shards=4, command=fail_on(2), output=str(directory), overwrite=True, max_attempts=1
        )
        backend.close()
        view = await service.submit(spec)

        def parts_0_and_1_are_new() -> bool:
            return [(directory / f"part-{i:05d}").read_bytes() for i in range(2)] == NEW_PARTS[:2]

        await eventually(parts_0_and_1_are_new, "shards 0 and 1 were published", timeout_s=PATIENCE_S)
        backend.gate.set()
        failed = await finished(service, view.id)
    assert failed.state.value == "failed" and "shard 2 failed" in (failed.error or "")
    left = {path.name: path.read_bytes() for path in directory.iterdir()}
    untouched = ["notes.txt", "result", *(f"part-{i:05d}" for i in range(2, 8))]
    assert left == {name: earlier[name] for name in untouched}


async def test_a_failed_job_never_deletes_files_it_did_not_write(source, aws_settings, tmp_path):
    directory = tmp_path / "out"
    backend = Gated(held=1)
    async with coordinator(aws_settings, backend) as service:
        backend.close()
        view = await service.submit(JobSpec(source=source, shards=4, command=fail_on(1), output=str(directory)))
        # Written by someone else after the submit: names the job could have
        # written, and one it never writes.
        (directory / "part-00002").write_bytes(b"someone else's part\n")
        (directory / "result").write_bytes(b"someone else's result\n")
        (directory / "notes.txt").write_bytes(b"someone else's notes\n")
        await eventually(lambda: (directory / "part-00000").exists(), "shard 0 was published", timeout_s=PATIENCE_S)
        backend.gate.set()
        assert (await finished(service, view.id)).state.value == "failed"
    assert names(directory) == ["notes.txt", "part-00002", "result"]
    assert (directory / "part-00002").read_bytes() == b"someone else's part\n"


async def test_a_resumed_job_that_fails_removes_what_its_earlier_run_wrote(source, aws_settings, tmp_path):
    """The second coordinator never wrote parts 0..2 itself: it learns from
    the store that the first one did, and removes them; the earlier job's
    parts the failed job never reached stay."""
    directory = tmp_path / "out"
    # Shard 3 hangs in its first attempt (so the first coordinator stops
    # mid-job) and fails in every later one.
    hang_then_fail = f'if [ "$SHARDLINE_SHARD" = 3 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then sleep 600; fi; {fail_on(3)}'
    spool = str(tmp_path / "spool")
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_jobs_table(dynamodb, "output-safety-jobs")
        store = DynamoJobStore(dynamodb, "output-safety-jobs", retry_policy=RetryPolicy())
        async with coordinator(aws_settings, store=store, spool_dir=spool) as first:
            earlier = await local_earlier_output(first, source, directory)
            spec = JobSpec(
                source=source, shards=4, command=hang_then_fail, output=str(directory), overwrite=True, max_attempts=2
            )
            view = await first.submit(spec)

            async def parts_0_to_2_recorded() -> bool:
                loaded = await store.load_job(view.id)
                assert loaded is not None
                shards = shards_as_stored(*loaded)  # the store holds only the shards that changed
                return all(shard.committed and shard.committed.published for shard in shards[:3])

            await eventually(
                parts_0_to_2_recorded, "the store records parts 0..2 as written", timeout_s=PATIENCE_S, interval_s=0.05
            )
        assert [(directory / f"part-{i:05d}").read_bytes() for i in range(3)] == NEW_PARTS[:3]
        async with coordinator(aws_settings, store=store, spool_dir=spool) as second:
            assert await second.resume() == [view.id]
            failed = await finished(second, view.id)
        await store.delete_job(view.id)
    assert failed.state.value == "failed" and "shard 3 failed" in (failed.error or "")
    left = {path.name: path.read_bytes() for path in directory.iterdir()}
    untouched = ["notes.txt", "result", *(f"part-{i:05d}" for i in range(3, 8))]
    assert left == {name: earlier[name] for name in untouched}


def shard_record(index: int, *, published: bool) -> ShardRecord:
    committed = CommittedAttempt(
        attempt=0,
        emitted_start=index,
        emitted_end=index + 1,
        line_start=True,
        bytes=1,
        checksum="crc32c:00000000",
        output_bytes=1,
        output_path=f"/spool/{index}",
        tail_sources=(),
        published=f"/out/part-{index:05d}" if published else None,
    )
    return ShardRecord(job_id="j", index=index, state=ShardState.DONE, next_attempt=1, committed=committed)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("reduce", [None, "wc -l"])
def test_what_earlier_runs_may_have_written(overwrite: bool, reduce: str | None) -> None:
    spec = JobSpec(source="s", shards=4, output="/out", overwrite=overwrite, reduce=reduce)
    halfway = [shard_record(i, published=i < 2) for i in range(4)]
    # The store knows of parts 0 and 1; part 2 may have been written just
    # before the coordinator stopped.  Only a job that found its destination
    # empty can tell that such a file is its own.
    assert written_by_earlier_runs(spec, halfway) == {"part-00000", "part-00001"} | (
        set() if overwrite else {"part-00002"}
    )
    done = [shard_record(i, published=True) for i in range(4)]
    final = {"_manifest.json"} | ({"result"} if reduce else set())
    parts = {f"part-{i:05d}" for i in range(4)}
    assert written_by_earlier_runs(spec, done) == parts | (set() if overwrite else final)


# --- the operator's output policy -------------------------------------------------------------


async def test_a_coordinator_writes_only_where_its_policy_allows(source, aws_settings, tmp_path, s3, bucket):
    root = tmp_path / "outputs"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    policy = OutputPolicy(local_root=str(root), s3_buckets=frozenset({bucket}))
    refused = {
        str(tmp_path / "elsewhere" / "out"): "is not below this coordinator's output root",
        f"{root}/../elsewhere/out": "has a '..' component",
        "outputs/out": "is a relative path",
        "s3://another-bucket/out/": f"only to {bucket}",
    }
    async with coordinator(aws_settings, policy=policy) as service:
        for output, message in refused.items():
            with pytest.raises(ConfigurationError, match=f"field 'output': .*{message}"):
                await service.submit(JobSpec(source=source, shards=2, output=output))
        for output in (str(root / "job" / "out"), f"s3://{bucket}/out/"):
            view = await service.submit(JobSpec(source=source, shards=2, output=output))
            assert (await finished(service, view.id)).state.value == "succeeded"
    assert os.listdir(tmp_path / "elsewhere") == []
    assert names(root / "job" / "out") == ["_manifest.json", "part-00000", "part-00001"]
