"""Workers that share no disk with the coordinator (Lambda) upload each
attempt's output to S3; the coordinator checks the object on DONE, fetches
the committed one, and removes them all.  Run here with in-process workers
whose backend hands out S3 output locations, against moto."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from crc32c import crc32c

from shardline.coordinator import Coordinator, CoordinatorSettings, OutputPolicy, WorkerExit
from shardline.embedded import InProcessBackend
from shardline.errors import JobFailedError
from shardline.protocol import JobSpec, ShardTask
from shardline.worker import WorkerSettings

from corpus import random_mix
from faultproxy import Fault, FaultProxy, Rule, s3_error
from jobs import only_in_attempt, run_job_inprocess, running_coordinator, sequential_reference
from polling import eventually
from reference import reference_split
from servers import free_ports

#: Bound on waiting for a job (a hang guard, not a timing check).
PATIENCE_S = 120.0


class StagedInProcessBackend(InProcessBackend):
    """In-process workers told to write their outputs to S3, as Lambda workers are."""

    def __init__(self, staging: str) -> None:
        super().__init__()
        self.staging = staging

    def output_location(self, job_id: str, shard: int, attempt: int) -> str:
        return f"{self.staging}{job_id}/shard-{shard:05d}.attempt-{attempt}.out"


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.mark.parametrize("command", [None, "sed 's/^/>/'", "grep -c a"])
async def test_outputs_uploaded_by_workers_are_fetched_in_order(s3, bucket, aws_settings, command):
    data = random_mix(21, 300_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    backend = StagedInProcessBackend(f"s3://{bucket}/staging/")
    output, report = await run_job_inprocess(
        f"s3://{bucket}/in.txt", 7, aws=aws_settings, command=command, backend=backend
    )
    assert output == sequential_reference(data, command) if command != "grep -c a" else output.count(b"\n") == 7
    if command == "grep -c a":  # per-shard counts add up to the whole file's
        assert sum(int(n) for n in output.split()) == int(sequential_reference(data, command))
    assert _keys(s3, bucket, "staging/") == []  # each fetched object is removed
    assert len(report.shards) == 7


async def test_an_output_missing_from_s3_is_not_committed(s3, bucket, aws_settings):
    """A worker whose DONE names bytes S3 does not hold is retried, then fails the job."""
    s3.put_object(Bucket=bucket, Key="in.txt", Body=b"line\n" * 100)
    # The worker uploads to a bucket that does not exist: its upload fails,
    # and the failure names the location.
    backend = StagedInProcessBackend("s3://no-such-staging-bucket/staging/")
    with pytest.raises(JobFailedError, match="no-such-staging-bucket"):
        await run_job_inprocess(f"s3://{bucket}/in.txt", 2, aws=aws_settings, backend=backend, max_attempts=2)


# --- outputs that need not pass through the coordinator ----------------------------------


class GatedStagedBackend(StagedInProcessBackend):
    """Staged workers; shard `held` does not start until `gate` is set."""

    def __init__(self, staging: str, *, held: int) -> None:
        super().__init__(staging)
        self.held = held
        self.gate = asyncio.Event()

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        if task.shard == self.held:
            await self.gate.wait()
        return await super().run(task, on_started=on_started)


def _coordinator(aws_settings, backend):
    settings = CoordinatorSettings(output_policy=OutputPolicy(anywhere=True), supervise_interval_s=0.05)
    return running_coordinator(aws_settings, backend, settings=settings)


async def _succeeded(service: Coordinator, job_id: str) -> None:
    async with asyncio.timeout(PATIENCE_S):
        view = await service.wait(job_id)
    assert view.state.value == "succeeded", view.error


@pytest.mark.parametrize("command", [None, "sed 's/^/>/'"])
async def test_an_s3_destination_copies_remote_outputs_server_side(s3, bucket, aws_settings, command):
    """Each committed attempt's object is copied into the destination by S3:
    no output byte is fetched or uploaded by the coordinator, and the
    manifest's output checksums (the workers') are those of the parts."""
    data = random_mix(22, 250_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    async with _coordinator(aws_settings, StagedInProcessBackend(f"s3://{bucket}/staging/")) as service:
        spec = JobSpec(source=f"s3://{bucket}/in.txt", shards=5, command=command, output=f"s3://{bucket}/out/")
        view = await service.submit(spec)
        await _succeeded(service, view.id)
        metrics = service.metrics
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(5)]
    assert parts == [sequential_reference(piece, command) for piece in reference_split(data, 5, b"\n")]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/_manifest.json")["Body"].read())
    assert [shard["output_checksum"] for shard in manifest["shards"]] == [
        f"crc32c:{crc32c(part):08x}" for part in parts
    ]
    assert [shard["part"] for shard in manifest["shards"]] == [f"s3://{bucket}/out/part-{i:05d}" for i in range(5)]
    assert metrics.output_bytes_relayed["fetched"] == metrics.output_bytes_relayed["uploaded"] == 0
    assert metrics.output_bytes_copied == sum(map(len, parts)) > 0
    assert _keys(s3, bucket, "staging/") == []  # every attempt's object is removed


async def test_a_reduce_fetches_remote_outputs_it_must_read(s3, bucket, aws_settings):
    """With a reduce the coordinator reads every shard's output: those bytes
    are fetched (and counted); the parts are still copied by S3, and exact."""
    data = random_mix(23, 120_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    async with _coordinator(aws_settings, StagedInProcessBackend(f"s3://{bucket}/staging/")) as service:
        spec = JobSpec(source=f"s3://{bucket}/in.txt", shards=3, reduce="wc -l", output=f"s3://{bucket}/out/")
        view = await service.submit(spec)
        await _succeeded(service, view.id)
        metrics = service.metrics
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(3)]
    assert b"".join(parts) == data
    result = s3.get_object(Bucket=bucket, Key="out/result")["Body"].read()
    assert int(result) == data.count(b"\n")
    assert metrics.output_bytes_relayed["fetched"] == len(data)
    assert metrics.output_bytes_relayed["uploaded"] == len(result)  # made here: nowhere else to copy it from
    assert metrics.output_bytes_copied == len(data)
    assert _keys(s3, bucket, "staging/") == []


async def test_remote_outputs_for_stdout_are_fetched_as_they_commit(s3, bucket, aws_settings):
    """Shard 0 has not even started, so nothing can be released, yet every
    other shard's output is already in the spool: fetched on commit, not at
    its release turn."""
    data = b"".join(b"row %05d\n" % i for i in range(6000))
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    pieces = reference_split(data, 4, b"\n")
    backend = GatedStagedBackend(f"s3://{bucket}/staging/", held=0)
    async with _coordinator(aws_settings, backend) as service:
        view = await service.submit(JobSpec(source=f"s3://{bucket}/in.txt", shards=4))
        fetched = service.metrics.output_bytes_relayed
        await eventually(
            lambda: fetched["fetched"] == sum(map(len, pieces[1:])) and _keys(s3, bucket, "staging/") == [],
            lambda: f"shards 1-3 fetched while shard 0 waits ({fetched['fetched']} bytes so far)",
        )
        assert service.view(view.id).shards_done == 3
        backend.gate.set()
        out = bytearray()
        async with asyncio.timeout(PATIENCE_S):
            async for piece in service.output(view.id):
                with open(piece.path, "rb") as file:
                    file.seek(piece.start)
                    out += file.read(piece.end - piece.start)
        await _succeeded(service, view.id)
    assert bytes(out) == data
    assert fetched["fetched"] == len(data)


def _copy_into(part: str, fault: Fault, **conditions: Any) -> Rule:
    """`fault` for the server-side copy into `part` (a PUT with x-amz-copy-source)."""
    return Rule(fault=fault, method="PUT", path_contains=f"/out/{part}", header="x-amz-copy-source", **conditions)


async def test_a_retried_shard_commits_its_second_attempts_object(s3, bucket, aws_settings):
    """Shard 1's first attempt fails; the part is the second attempt's
    output, copied by S3, and the manifest names that attempt."""
    data = random_mix(24, 150_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    command = only_in_attempt(1, 0, "exit 3") + "; tr a-f A-F"
    async with _coordinator(aws_settings, StagedInProcessBackend(f"s3://{bucket}/staging/")) as service:
        spec = JobSpec(
            source=f"s3://{bucket}/in.txt", shards=3, command=command, output=f"s3://{bucket}/out/", command_retries=1
        )
        view = await service.submit(spec)
        await _succeeded(service, view.id)
        relayed = service.metrics.output_bytes_relayed
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(3)]
    assert b"".join(parts) == sequential_reference(data, "tr a-f A-F")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/_manifest.json")["Body"].read())
    assert [shard["attempt"] for shard in manifest["shards"]] == [0, 1, 0]
    assert relayed["fetched"] == relayed["uploaded"] == 0
    assert _keys(s3, bucket, "staging/") == []


async def test_a_throttled_copy_is_retried(moto, s3, bucket):
    data = random_mix(25, 80_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    throttled = _copy_into("part-00001", s3_error("SlowDown", "Reduce your request rate."), times=2)
    async with FaultProxy(moto.url, [throttled]) as proxy:
        via_proxy = moto.aws_settings(s3_endpoint_url=proxy.url, read_timeout_s=10.0)
        async with _coordinator(via_proxy, StagedInProcessBackend(f"s3://{bucket}/staging/")) as service:
            spec = JobSpec(source=f"s3://{bucket}/in.txt", shards=3, output=f"s3://{bucket}/out/")
            view = await service.submit(spec)
            await _succeeded(service, view.id)
    assert proxy.applied == [2]
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(3)]
    assert b"".join(parts) == data


async def test_a_refused_copy_fails_the_job_and_leaves_no_output(moto, s3, bucket):
    """S3 refuses the copy into one part for good: the job fails naming it,
    and what it wrote is removed -- no manifest, no part."""
    data = random_mix(26, 80_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    denied = _copy_into("part-00002", s3_error("AccessDenied", "Access Denied", status=403, reason="Forbidden"))
    async with FaultProxy(moto.url, [denied]) as proxy:
        via_proxy = moto.aws_settings(s3_endpoint_url=proxy.url, read_timeout_s=10.0)
        async with _coordinator(via_proxy, StagedInProcessBackend(f"s3://{bucket}/staging/")) as service:
            spec = JobSpec(source=f"s3://{bucket}/in.txt", shards=4, output=f"s3://{bucket}/out/")
            view = await service.submit(spec)
            async with asyncio.timeout(PATIENCE_S):
                final = await service.wait(view.id)
    assert proxy.applied[0] >= 1
    assert final.state.value == "failed" and "part-00002" in (final.error or ""), final.error
    assert _keys(s3, bucket, "out/") == []


class LostReportBackend(StagedInProcessBackend):
    """Shard 1's first attempt cannot reach the exchange: it runs, uploads
    its object, then fails to report DONE -- an uncommitted attempt whose
    object exists."""

    def __init__(self, staging: str) -> None:
        super().__init__(staging)
        self._worker_settings = WorkerSettings(report_timeout_s=0.5)

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        if task.shard == 1 and task.attempt == 0:
            (nobody_listens,) = free_ports(1)
            task = dataclasses.replace(task, exchange_port=nobody_listens)
        return await super().run(task, on_started=on_started)


async def test_an_uncommitted_attempts_object_is_removed(s3, bucket, aws_settings):
    """In-process backends sweep no staging prefix: only the removal at the
    attempt's end takes the lost attempt's object away."""
    data = random_mix(27, 60_000)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=data)
    async with _coordinator(aws_settings, LostReportBackend(f"s3://{bucket}/staging/")) as service:
        spec = JobSpec(source=f"s3://{bucket}/in.txt", shards=3, output=f"s3://{bucket}/out/")
        view = await service.submit(spec)
        await _succeeded(service, view.id)
        assert service.view(view.id).shards[1].attempt == 1
    parts = [s3.get_object(Bucket=bucket, Key=f"out/part-{i:05d}")["Body"].read() for i in range(3)]
    assert b"".join(parts) == data
    assert _keys(s3, bucket, "staging/") == []
