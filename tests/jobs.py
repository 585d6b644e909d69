"""Helpers that run whole jobs through the real coordinator and workers."""

from __future__ import annotations

import io
import subprocess

from shardline.aws import AwsSettings
from shardline.coordinator import Backend, CoordinatorSettings, JobReport, JobSpec
from shardline.embedded import InProcessBackend, run_embedded


async def run_job_inprocess(
    source: str,
    shards: int,
    *,
    aws: AwsSettings,
    command: str | None = None,
    delimiter: bytes = b"\n",
    backend: Backend | None = None,
    **spec_fields,
) -> tuple[bytes, JobReport]:
    """Run a job with an in-process coordinator; markers in the test's DynamoDB."""
    out = io.BytesIO()
    spec = JobSpec(source=source, shards=shards, delimiter=delimiter, command=command, **spec_fields)
    report = await run_embedded(
        spec,
        out=out,
        aws=aws,
        embedded_dynamodb=False,
        backend=backend or InProcessBackend(),
        settings=CoordinatorSettings(),
    )
    return out.getvalue(), report


def sequential_reference(data: bytes, command: str | None) -> bytes:
    """What `cat object | command` gives: the answer every job must match."""
    if command is None:
        return data
    return subprocess.run(["sh", "-c", command], input=data, stdout=subprocess.PIPE, check=True).stdout
