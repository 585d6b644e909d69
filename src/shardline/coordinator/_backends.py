# Backends start shard attempts somewhere and tell the coordinator when the
# attempt's runtime is gone.  Results never come from here: they arrive over
# the exchange (DONE / FAILED), the same way from every backend, so a backend
# only needs to start, watch and stop.

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ..protocol import ShardTask

__all__ = ["Backend", "LocalProcessBackend", "WorkerExit"]

log = logging.getLogger("shardline.coordinator.backends")

_STDERR_TAIL_BYTES = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExit:
    """How an attempt's runtime ended; `detail` is for error messages."""

    ok: bool
    detail: str


class Backend(abc.ABC):
    """Runs shard attempts.  `run` returns when the attempt's runtime has ended."""

    name: str

    @abc.abstractmethod
    async def run(self, task: ShardTask) -> WorkerExit:
        """Start `task`, wait for its runtime to end; cancellation stops it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""


class LocalProcessBackend(Backend):
    """One ``python -m shardline.worker`` process per shard attempt.

    At most `max_processes` run at once; the rest wait for a slot.  That is
    safe because no worker ever waits on another: a shard whose neighbour has
    not started yet finds its tail by itself.

    A worker process imports its libraries before it reads its task, so
    `prestart()` lets the first processes warm up while the coordinator is
    still statting the object and planning; `run()` hands them tasks first.
    """

    name = "local"

    def __init__(
        self, *, max_processes: int | None = None, python: str = sys.executable, env: Mapping[str, str] | None = None
    ) -> None:
        self.max_processes = max_processes or max(2, 2 * (os.cpu_count() or 1))
        self._slots = asyncio.Semaphore(self.max_processes)
        self._python = python
        self._env = dict(os.environ if env is None else env)
        self._warm: list[asyncio.subprocess.Process] = []

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "shardline.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,  # so stopping it also stops its command
        )

    async def prestart(self, count: int) -> None:
        """Start up to `count` idle worker processes now (at most max_processes)."""
        wanted = min(count, self.max_processes) - len(self._warm)
        for _ in range(max(wanted, 0)):
            self._warm.append(await self._spawn())

    async def run(self, task: ShardTask) -> WorkerExit:
        async with self._slots:
            process = self._warm.pop(0) if self._warm else await self._spawn()
            stderr_tail = bytearray()
            try:
                assert process.stdin is not None and process.stderr is not None
                process.stdin.write(task.to_json().encode())
                process.stdin.close()
                while chunk := await process.stderr.read(65536):
                    stderr_tail += chunk
                    del stderr_tail[:-_STDERR_TAIL_BYTES]
                returncode = await process.wait()
            except BaseException:
                await asyncio.shield(_kill_group(process))
                raise
        if returncode == 0:
            return WorkerExit(ok=True, detail="exited 0")
        lines = stderr_tail.decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
        return WorkerExit(ok=False, detail=f"worker process {how}" + (f": {last}" if last else ""))

    async def aclose(self) -> None:
        warm, self._warm = self._warm, []
        await asyncio.shield(asyncio.gather(*(_kill_group(process) for process in warm)))


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await process.wait()
