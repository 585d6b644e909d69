"""Helpers that run whole jobs through the real coordinator and workers."""

from __future__ import annotations

import io
import ssl
import subprocess

from shardline.aws import AwsSettings, client
from shardline.coordinator import (
    Backend,
    CoordinatorSettings,
    ExchangeServer,
    JobReport,
    JobSpec,
    ensure_marker_table,
    run_job,
)
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


async def run_job_on_exchange(
    spec: JobSpec,
    *,
    aws: AwsSettings,
    backend: Backend,
    settings: CoordinatorSettings = CoordinatorSettings(),
    tls: ssl.SSLContext | None = None,
) -> tuple[bytes, JobReport]:
    """Run a job with an in-process coordinator on an exchange of the test's
    choosing (TLS or not); closes `backend`."""
    out = io.BytesIO()
    async with client(aws, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, settings.markers_table)
    async with ExchangeServer(host="127.0.0.1", tls=tls) as exchange:
        try:
            report = await run_job(spec, aws=aws, backend=backend, exchange=exchange, out=out, settings=settings)
        finally:
            await backend.aclose()
    return out.getvalue(), report


def sequential_reference(data: bytes, command: str | None) -> bytes:
    """What `cat object | command` gives: the answer every job must match."""
    if command is None:
        return data
    return subprocess.run(["sh", "-c", command], input=data, stdout=subprocess.PIPE, check=True).stdout
