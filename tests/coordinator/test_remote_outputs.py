"""Workers that share no disk with the coordinator (Lambda) upload each
attempt's output to S3; the coordinator checks the object on DONE, fetches
the committed one, and removes them all.  Run here with in-process workers
whose backend hands out S3 output locations, against moto."""

from __future__ import annotations

import pytest

from shardline.embedded import InProcessBackend
from shardline.errors import JobFailedError

from corpus import random_mix
from jobs import run_job_inprocess, sequential_reference


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
