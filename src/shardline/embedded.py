"""Running a whole job inside one process: the composition root of `shardline run`.

This module wires an in-process coordinator to workers, with its boundary
markers in the SQLite store unless told otherwise.  It is the one place
allowed to import both `coordinator` and
`worker`: `InProcessBackend` runs shards as asyncio tasks in this process
(same worker code, no process start-up cost), which `shardline run` uses
for a local file (and benchmarks and tests with many shards); for S3 it
uses local worker processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from .coordinator import (
    Backend,
    CoordinatorSettings,
    ExchangeServer,
    JobProgress,
    JobReport,
    LocalProcessBackend,
    WorkerExit,
    run_job,
)
from .errors import ShardlineError
from .io.aws import AwsSettings, ClientPool
from .io.store import ensure_marker_table, parse_location
from .protocol import JobSpec, ShardTask

if TYPE_CHECKING:
    from .worker import WorkerSettings

__all__ = ["InProcessBackend", "run_embedded"]

log = logging.getLogger("shardline.embedded")

#: In-process shards share one event loop and CPU; more at once only queues.
DEFAULT_INPROCESS_CONCURRENCY = 64


class InProcessBackend(Backend):
    """Runs each shard attempt as an asyncio task in this process, all of
    them sharing one set of S3 and DynamoDB clients (closed by `aclose`)."""

    name = "inprocess"

    def __init__(
        self, *, max_concurrent: int = DEFAULT_INPROCESS_CONCURRENCY, worker_settings: WorkerSettings | None = None
    ) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._worker_settings = worker_settings
        self._clients = ClientPool(shards_at_once=max_concurrent)

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        from .worker import run_task

        async with self._slots:
            on_started()
            try:
                await run_task(task, settings=self._worker_settings, clients=self._clients)
            except ShardlineError as exc:
                return WorkerExit(ok=False, detail=f"worker failed: {exc}")
            # In this process a worker's unexpected exception must not take the
            # coordinator down with it; it fails the attempt like a crash would.
            except Exception as exc:
                log.exception("in-process worker for shard %d crashed", task.shard)
                return WorkerExit(ok=False, detail=f"worker crashed: {type(exc).__name__}: {exc}")
        return WorkerExit(ok=True, detail="finished")

    async def aclose(self) -> None:
        await self._clients.aclose()


async def run_embedded(
    spec: JobSpec,
    *,
    out: BinaryIO,
    aws: AwsSettings,
    backend: Backend | None = None,
    settings: CoordinatorSettings = CoordinatorSettings(),
    create_tables: bool = True,
    on_start: Callable[[Callable[[], JobProgress]], None] | None = None,
) -> JobReport:
    """Run one job with an in-process coordinator (its job records in memory).

    Markers go where `settings.markers` says: a SQLite file (the embedded
    default) or a DynamoDB table, created if missing and `create_tables`.
    The backend defaults to local worker processes; either way this job owns
    it and closes it when it ends, so give each run a new one.
    """
    kind, table = parse_location(settings.markers)
    backend = backend or LocalProcessBackend()
    # The coordinator's few AWS calls (the stat, the table check, the markers'
    # fences) go through blocking botocore clients in threads: this process
    # then never imports aiohttp and aiobotocore for them, a fifth of a
    # second of CPU on `shardline run`'s path to its first task.
    async with ClientPool(blocking=True) as clients, ExchangeServer(host="127.0.0.1") as exchange:
        table_check: asyncio.Future[None] | None = None
        try:
            if kind == "dynamodb":
                # Beside the object's stat, not before it: the two round trips
                # (and one client's set-up) overlap; no attempt starts before
                # both have succeeded (`ready`).
                table_check = asyncio.ensure_future(_check_marker_table(clients, aws, table, create=create_tables))
            return await run_job(
                spec,
                aws=aws,
                backend=backend,
                exchange=exchange,
                out=out,
                settings=settings,
                on_start=on_start,
                clients=clients,
                ready=table_check,
            )
        finally:
            if table_check is not None and not table_check.done():  # the stat failed first
                table_check.cancel()
            if table_check is not None:
                await asyncio.gather(table_check, return_exceptions=True)
            await backend.aclose()


async def _check_marker_table(clients: ClientPool, aws: AwsSettings, table: str, *, create: bool) -> None:
    await ensure_marker_table(await clients.get(aws, "dynamodb"), table, create=create)
