"""Shard tasks as a coordinator builds them, over one small local input: for
the tests that hand tasks straight to a worker or a backend.  Their commands
report pids through files (`$PPID` of the shell is the worker process), so
every check is on real processes, found again through /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

from shardline.io.aws import AwsSettings
from shardline.io.sources import LocalFileSource
from shardline.protocol import ShardTask

from polling import eventually

#: The input of every task.
DATA = b"".join(b"line %04d\n" % i for i in range(200))
#: A command that records its worker's pid and a background grandchild's pid, then waits for it.
SLEEPER = "echo $PPID > {dir}/worker.pid; sleep 300 & echo $! > {dir}/sleep.pid; wait"


async def task_maker(directory: Path, aws_settings: AwsSettings, marker_table: str) -> Callable[..., ShardTask]:
    """A function making tasks over DATA (written to `directory`) as the
    coordinator would build them, with no exchange unless given."""
    path = directory / "input"
    path.write_bytes(DATA)
    async with LocalFileSource(path) as source:
        etag = (await source.stat()).etag
    names = iter(range(1_000_000))

    def make(*, command: str | None = None, shards: int = 1, index: int = 0, **fields: object) -> ShardTask:
        return ShardTask(
            **{  # type: ignore[arg-type]
                "job_id": uuid.uuid4().hex,
                "shard": index,
                "shards": shards,
                "attempt": 0,
                "source": str(path),
                "size": len(DATA),
                "etag": etag,
                "command": command,
                "output_path": str(directory / f"out-{next(names)}"),
                "markers": f"dynamodb:{marker_table}",
                "aws": aws_settings.to_dict(),
                **fields,
            }
        )

    return make


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):  # not yet, or half written
        return None


async def pid_from(path: Path) -> int:
    """The pid in `path`, once it has been written."""
    pid: int = await eventually(lambda: read_pid(path), f"{path.name} written")
    return pid


def kill_group_quietly(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
