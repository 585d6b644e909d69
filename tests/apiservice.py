"""A real in-process `Coordinator` for the HTTP tests: in-process workers,
the memory job store, the session's moto server for markers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shardline.coordinator import Coordinator, CoordinatorSettings, ExchangeServer
from shardline.embedded import InProcessBackend
from shardline.io.aws import AwsSettings
from shardline.io.store import MemoryJobStore, dynamodb_location
from shardline.protocol import DEFAULT_MARKER_TABLE


@contextlib.asynccontextmanager
async def in_process_coordinator(aws: AwsSettings, spool_dir: Path, **settings: Any) -> AsyncIterator[Coordinator]:
    backend = InProcessBackend()
    coordinator_settings = CoordinatorSettings(
        markers=dynamodb_location(DEFAULT_MARKER_TABLE), spool_dir=str(spool_dir), **settings
    )
    try:
        async with (
            ExchangeServer(host="127.0.0.1") as exchange,
            Coordinator(
                aws=aws,
                backends={"inprocess": backend},
                store=MemoryJobStore(),
                exchange=exchange,
                settings=coordinator_settings,
            ) as service,
        ):
            yield service
    finally:
        await backend.aclose()
