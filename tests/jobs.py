"""Helpers that run whole jobs through the real coordinator and workers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable

from shardline.coordinator import (
    Backend,
    Coordinator,
    CoordinatorSettings,
    ExchangeServer,
    JobReport,
    WorkerExit,
    run_job,
)
from shardline.embedded import InProcessBackend, run_embedded
from shardline.io.aws import AwsSettings, client
from shardline.io.store import JobStore, MemoryJobStore, ensure_marker_table, parse_location
from shardline.protocol import JobSpec, ShardTask
from shardline.worker import WorkerSettings


class OrderedBackend(Backend):
    """Runs attempts through `inner`, one at a time, in the given shard order."""

    name = "ordered"

    def __init__(self, order: list[int], inner: Backend) -> None:
        self._order = order
        self._finished = {shard: asyncio.Event() for shard in order}
        self._inner = inner

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        position = self._order.index(task.shard)
        if position:
            await self._finished[self._order[position - 1]].wait()
        try:
            return await self._inner.run(task, on_started=on_started)
        finally:
            self._finished[task.shard].set()

    async def aclose(self) -> None:
        await self._inner.aclose()


class GatedBackend(InProcessBackend):
    """Holds every attempt until `gate` is set, so the job is live meanwhile."""

    def __init__(self, *, worker_settings: WorkerSettings | None = None) -> None:
        super().__init__(worker_settings=worker_settings)
        self.gate = asyncio.Event()
        self.tasks: list[ShardTask] = []

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        self.tasks.append(task)
        await self.gate.wait()
        return await super().run(task, on_started=on_started)


#: A Python program that reads stdin like a busy command: takes a first
#: chunk, stops reading for argv[1] seconds, then copies the rest at argv[2]
#: bytes/s.
PACED_READER = """\
import sys, time
pause, rate = float(sys.argv[1]), float(sys.argv[2])
src, dst = sys.stdin.buffer, sys.stdout.buffer
first = True
while chunk := src.read1(65536):
    dst.write(chunk)
    time.sleep(pause if first else len(chunk) / rate)
    first = False
dst.flush()
"""


def only_in_attempt(shard: int, attempt: int, then: str) -> str:
    """A shell snippet that runs `then` only in the given shard attempt."""
    return f'if [ "$SHARDLINE_SHARD" = {shard} ] && [ "$SHARDLINE_ATTEMPT" = {attempt} ]; then {then}; fi'


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
    await ensure_markers(aws, settings)
    async with ExchangeServer(host="127.0.0.1", tls=tls) as exchange:
        try:
            report = await run_job(spec, aws=aws, backend=backend, exchange=exchange, out=out, settings=settings)
        finally:
            await backend.aclose()
    return out.getvalue(), report


async def ensure_markers(aws: AwsSettings, settings: CoordinatorSettings) -> None:
    """Create the DynamoDB marker table `settings.markers` names (nothing for SQLite)."""
    kind, name = parse_location(settings.markers)
    if kind == "dynamodb":
        async with client(aws, "dynamodb") as dynamodb:
            await ensure_marker_table(dynamodb, name)


def sequential_reference(data: bytes, command: str | None) -> bytes:
    """What `cat object | command` gives: the answer every job must match."""
    if command is None:
        return data
    return subprocess.run(["sh", "-c", command], input=data, stdout=subprocess.PIPE, check=True).stdout


@contextlib.asynccontextmanager
async def running_coordinator(
    aws: AwsSettings, backend: Backend, *, settings: CoordinatorSettings, store: JobStore | None = None
) -> AsyncIterator[Coordinator]:
    """A started Coordinator with `backend` as its only backend, on its own
    exchange (the marker table created first); closes `backend` after it."""
    await ensure_markers(aws, settings)
    try:
        async with (
            ExchangeServer() as exchange,
            Coordinator(
                aws=aws,
                backends={backend.name: backend},
                store=store or MemoryJobStore(),
                exchange=exchange,
                settings=settings,
            ) as service,
        ):
            yield service
    finally:
        await backend.aclose()
