"""Running a whole job inside one process: the composition root of `shardline run`.

This module wires the coordinator to workers and, with no AWS configuration,
to an embedded DynamoDB-compatible endpoint (moto's server, in-process, on
127.0.0.1).  It is the one place allowed to import both `coordinator` and
`worker`: `InProcessBackend` runs shards as asyncio tasks in this process
(same worker code, no process start-up cost), which benchmarks and tests
with many shards use; `shardline run` uses local worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO

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
from .io.aws import AwsSettings, client
from .io.tables import ensure_marker_table
from .protocol import JobSpec, ShardTask

if TYPE_CHECKING:
    from .worker import WorkerSettings

__all__ = ["EmbeddedDynamoDB", "InProcessBackend", "run_embedded"]

log = logging.getLogger("shardline.embedded")

_EMBEDDED_KEY = "shardline-embedded"
#: In-process shards share one event loop and CPU; more at once only queues.
DEFAULT_INPROCESS_CONCURRENCY = 64


class EmbeddedDynamoDB:
    """moto's DynamoDB-compatible server on 127.0.0.1, in a thread of this process."""

    def __init__(self) -> None:
        self._server: Any = None  # moto.server.ThreadedMotoServer, imported lazily
        self.url: str | None = None

    def start(self) -> str:
        from moto.server import ThreadedMotoServer

        # moto logs every request through werkzeug at INFO; keep our stderr clean.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        log.info("embedded DynamoDB endpoint on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving.  Returns at once: the server thread notices within
        its poll interval (0.5 s) and nothing waits for it to do so."""
        server, self._server = self._server, None
        if server is not None:
            threading.Thread(target=server.stop, name="embedded-dynamodb-stop", daemon=True).start()

    def settings(self, base: AwsSettings) -> AwsSettings:
        """`base` with DynamoDB pointed here (S3 keeps its own configuration)."""
        assert self.url is not None, "start() first"
        return replace(
            base,
            dynamodb_endpoint_url=self.url,
            dynamodb_access_key_id=_EMBEDDED_KEY,
            dynamodb_secret_access_key=_EMBEDDED_KEY,
            region=base.region or "us-east-1",
        )


class InProcessBackend(Backend):
    """Runs each shard attempt as an asyncio task in this process."""

    name = "inprocess"

    def __init__(
        self, *, max_concurrent: int = DEFAULT_INPROCESS_CONCURRENCY, worker_settings: WorkerSettings | None = None
    ) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._worker_settings = worker_settings

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        from .worker import run_task

        async with self._slots:
            on_started()
            try:
                await run_task(task, settings=self._worker_settings)
            except ShardlineError as exc:
                return WorkerExit(ok=False, detail=f"worker failed: {exc}")
            # In this process a worker's unexpected exception must not take the
            # coordinator down with it; it fails the attempt like a crash would.
            except Exception as exc:
                log.exception("in-process worker for shard %d crashed", task.shard)
                return WorkerExit(ok=False, detail=f"worker crashed: {type(exc).__name__}: {exc}")
        return WorkerExit(ok=True, detail="finished")


async def run_embedded(
    spec: JobSpec,
    *,
    out: BinaryIO,
    aws: AwsSettings,
    embedded_dynamodb: bool,
    backend: Backend | None = None,
    settings: CoordinatorSettings = CoordinatorSettings(),
    create_tables: bool = True,
    on_start: Callable[[Callable[[], JobProgress]], None] | None = None,
) -> JobReport:
    """Run one job with an in-process coordinator.

    With `embedded_dynamodb`, markers go to a moto server started for this
    job; otherwise to the DynamoDB that `aws` (or the standard AWS
    configuration) names.  The backend defaults to local worker processes;
    either way this job owns it and closes it when it ends, so give each run
    a new one.
    """
    embedded: EmbeddedDynamoDB | None = None
    try:
        if embedded_dynamodb:
            embedded = EmbeddedDynamoDB()
            await asyncio.to_thread(embedded.start)
            aws = embedded.settings(aws)
        async with client(aws, "dynamodb") as dynamodb:
            await ensure_marker_table(dynamodb, settings.markers_table, create=create_tables)
        backend = backend or LocalProcessBackend()
        async with ExchangeServer(host="127.0.0.1") as exchange:
            try:
                return await run_job(
                    spec, aws=aws, backend=backend, exchange=exchange, out=out, settings=settings, on_start=on_start
                )
            finally:
                await backend.aclose()
    finally:
        if embedded is not None:
            embedded.stop()
