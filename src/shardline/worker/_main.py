# Process entry point shared by ``python -m shardline.worker`` and the
# ``shardline worker`` CLI command.

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import BinaryIO

from ..errors import ConfigurationError, ShardlineError
from ..protocol import ShardTask
from ._shard import WorkerSettings, run_task

__all__ = ["main", "run_task_file"]

log = logging.getLogger("shardline.worker")


def _run(task: ShardTask, *, use_uvloop: bool) -> int:
    async def go() -> int:
        try:
            result = await run_task(task, settings=WorkerSettings())
        except ShardlineError as exc:
            print(f"shardline worker: shard {task.shard} attempt {task.attempt}: {exc}", file=sys.stderr)
            return 1
        summary = {
            "shard": task.shard,
            "attempt": task.attempt,
            "emitted": [result.emitted_start, result.emitted_end],
            "bytes": result.bytes,
            "checksum": result.checksum,
            "output_bytes": result.output_bytes,
            "tail_sources": list(result.tail_sources),
            "committed": result.committed,
        }
        print(json.dumps(summary), file=sys.stderr if task.output_path == "/dev/stdout" else sys.stdout)
        return 0

    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(go())
        except ImportError:
            pass
    return asyncio.run(go())


def run_task_file(stream: BinaryIO, *, use_uvloop: bool = True) -> int:
    """Read one task as JSON from `stream` and run it; returns the exit status."""
    try:
        task = ShardTask.from_json(stream.read())
    except ConfigurationError as exc:
        print(f"shardline worker: {exc}", file=sys.stderr)
        return 2
    return _run(task, use_uvloop=use_uvloop)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Import the heavy libraries before blocking on stdin: a pre-started
    # worker is then warm by the time the coordinator sends its task.
    import aioboto3  # noqa: F401
    import aiobotocore.session  # noqa: F401

    return run_task_file(sys.stdin.buffer)
