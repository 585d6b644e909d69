# The progress line `shardline run` shows on a terminal's stderr: shards
# done, bytes emitted, rate and ETA, redrawn in place.  An embedded run
# hands the display the coordinator's own progress; a run on a daemon
# polls GET /jobs/{id} for it (`RemoteProgress`, `poll_progress`).

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ShardlineError
from ._format import human_size

if TYPE_CHECKING:
    from ..client import CoordinatorClient

__all__ = ["ProgressDisplay", "RemoteProgress", "poll_progress"]

log = logging.getLogger("shardline.cli")

#: How often the progress line asks the coordinator for the job's state.
_PROGRESS_POLL_S = 1.0


class ProgressDisplay:
    """One self-overwriting status line on a terminal's stderr."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._task: asyncio.Task[None] | None = None

    def attach(self, snapshot: Callable[[], Any]) -> None:
        """Start redrawing from `snapshot()` (shards, shards_done, bytes_emitted, size, elapsed_s)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(snapshot))

    async def _loop(self, snapshot: Callable[[], Any]) -> None:
        while True:
            p = snapshot()
            rate = p.bytes_emitted / p.elapsed_s if p.elapsed_s > 0 else 0.0
            remaining = max(p.size - p.bytes_emitted, 0)
            eta = f"{remaining / rate:5.0f}s" if rate > 0 else "    ?"
            self._stream.write(
                f"\r\x1b[K[shardline] shards {p.shards_done}/{p.shards}  "
                f"{human_size(p.bytes_emitted)}/{human_size(p.size)}  {human_size(rate)}/s  ETA {eta}"
            )
            self._stream.flush()
            await asyncio.sleep(0.25)

    async def close(self) -> None:
        """Stop redrawing and clear the line."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._stream.write("\r\x1b[K")
            self._stream.flush()


@dataclass(slots=True)
class RemoteProgress:
    """What the progress line shows, from the latest GET /jobs/{id}."""

    shards: int
    started: float
    shards_done: int = 0
    bytes_emitted: int = 0
    size: int = 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


async def poll_progress(coordinator: CoordinatorClient, job_id: str, progress: RemoteProgress) -> None:
    """Keep `progress` up to date with job `job_id` until cancelled."""
    while True:
        try:
            view = await coordinator.job(job_id)
        except ShardlineError as exc:  # the output stream reports real trouble; the display just waits
            log.debug("progress poll failed: %s", exc)
        else:
            progress.shards_done = view["shards_done"]
            progress.bytes_emitted = view["bytes_emitted"]
            progress.size = view["size"] or 0
        await asyncio.sleep(_PROGRESS_POLL_S)
