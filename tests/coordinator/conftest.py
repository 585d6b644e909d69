"""Fixtures of the coordinator's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shardline.coordinator import Coordinator

from apiservice import in_process_coordinator


@pytest.fixture
async def coordinator(aws_settings, marker_table, tmp_path) -> AsyncIterator[Coordinator]:
    """A started in-process Coordinator: in-process workers, the memory job
    store, the session's marker table (`apiservice.in_process_coordinator`)."""
    async with in_process_coordinator(aws_settings, tmp_path / "spool") as service:
        yield service
