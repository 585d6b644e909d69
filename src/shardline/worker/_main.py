# Process entry points shared by ``python -m shardline.worker`` and the
# ``shardline worker`` CLI command.
#
# Two modes:
#
# - One task (`run_task_file`): read a task JSON, run it, print a summary,
#   exit 0 / 1 / 2.  What ``shardline worker --task FILE`` and a plain
#   ``python -m shardline.worker < task.json`` do.
# - Pool (`serve_pool`, ``python -m shardline.worker --pool``): the
#   coordinator's local backend keeps such processes and hands each one task
#   after another, one JSON line on stdin per task, one answer line
#   ``{"ok": bool, "detail": str}`` on stdout per task.  Importing aioboto3
#   costs about half a CPU-second, so a process is reused rather than started
#   per shard.  The parent's end of stdin is the lifeline: EOF (the
#   coordinator exited, even by SIGKILL) cancels the running task and exits;
#   SIGTERM does the same.  Cancelling a task aborts its command, which kills
#   the command's whole process group, so nothing outlives the worker.

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, BinaryIO

from ..errors import ConfigurationError, ShardlineError
from ..io.aws import ClientPool
from ..io.processes import adopt_orphans, hide_environment
from ..protocol import ShardTask
from ._shard import WorkerSettings, run_task

__all__ = ["main", "run_task_file", "serve_pool"]

log = logging.getLogger("shardline.worker")

#: Longest task line accepted in pool mode (a task is a few KiB; the command
#: string is the only part of unbounded length).
_MAX_TASK_LINE_BYTES = 16 * 1024 * 1024


def _run_loop(go: Callable[[], Coroutine[Any, Any, int]], *, use_uvloop: bool) -> int:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(go())
        except ImportError:
            pass
    return asyncio.run(go())


def _become_command_runner() -> None:
    """This process runs commands and nothing else in sessions of their own:
    it reaps (and ends) whatever they leave behind, and keeps the credentials
    in its environment out of their reach (processes.py)."""
    adopt_orphans(dedicated=True)
    hide_environment()


def run_task_file(stream: BinaryIO, *, use_uvloop: bool = True) -> int:
    """Read one task as JSON from `stream` and run it; returns the exit status."""
    _become_command_runner()
    try:
        task = ShardTask.from_json(stream.read())
    except ConfigurationError as exc:
        print(f"shardline worker: {exc}", file=sys.stderr)
        return 2

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

    return _run_loop(go, use_uvloop=use_uvloop)


async def _answer(line: bytes, settings: WorkerSettings, clients: ClientPool) -> dict[str, object]:
    """Run the task on `line`.  Its failure is an answer; any other exception
    is a bug and ends the process with a traceback, which the parent reports."""
    try:
        task = ShardTask.from_json(line)
    except ConfigurationError as exc:
        return {"ok": False, "detail": f"worker got {exc}"}
    try:
        result = await run_task(task, settings=settings, clients=clients)
    except ShardlineError as exc:
        return {"ok": False, "detail": f"worker failed: {exc}"}
    committed = "" if result.committed is None else (" (committed)" if result.committed else " (not committed)")
    return {"ok": True, "detail": f"worker finished shard {task.shard} attempt {task.attempt}{committed}"}


async def serve_pool() -> int:
    """Serve tasks from stdin until EOF or SIGTERM (see the module comment); returns the exit status."""
    _become_command_runner()
    settings = WorkerSettings()
    loop = asyncio.get_running_loop()
    serving = asyncio.current_task()
    assert serving is not None
    stopping = False

    def stop() -> None:
        # Cancel once: a second cancel could cut the first one's cleanup short.
        nonlocal stopping
        if not stopping:
            stopping = True
            serving.cancel()

    # Answers get a descriptor of their own, and fd 1 becomes a copy of
    # stderr, so a stray print can never corrupt the answer stream.
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    stdin = asyncio.StreamReader(limit=_MAX_TASK_LINE_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    # stdin is read even while a task runs: that is how EOF is noticed.
    reader = asyncio.ensure_future(_read_task_lines(stdin, lines, stop))
    loop.add_signal_handler(signal.SIGTERM, stop)
    # S3 and DynamoDB clients live as long as the process: every task reuses them.
    clients = ClientPool()
    try:
        while True:
            answer = await _answer(await lines.get(), settings, clients)
            # A short line into a pipe the parent keeps reading: the write
            # cannot block for long, so it need not leave the event loop.
            answers.write(json.dumps(answer).encode() + b"\n")
    except asyncio.CancelledError:
        return 0  # stop(): the running task, if any, was cancelled and cleaned up
    except BrokenPipeError:
        return 0  # the parent is gone
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await clients.aclose()
        reader.cancel()
        transport.close()
        answers.close()


async def _read_task_lines(stdin: asyncio.StreamReader, lines: asyncio.Queue[bytes], stop: Callable[[], None]) -> None:
    """Queue every non-blank line of stdin; at EOF call `stop`."""
    try:
        while line := await stdin.readline():
            if line.strip():
                lines.put_nowait(line)
    except ValueError:
        log.error("task line longer than %d bytes; stopping", _MAX_TASK_LINE_BYTES)
    stop()


def _no_inherited_descriptors() -> None:
    """Keep descriptors we inherited by accident out of our commands.

    A uvloop parent hands its child copies of the child's stdio sockets above
    fd 2, without close-on-exec, and a uvloop worker would pass them on to its
    commands: a command left running would then hold the parent's pipes open
    after we are gone.
    """
    for name in os.listdir("/dev/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Import the heavy libraries before blocking on stdin: a pre-started
    # worker is then warm by the time the coordinator sends its task.
    import aioboto3  # noqa: F401
    import aiobotocore.session  # noqa: F401

    if args == ["--pool"]:
        _no_inherited_descriptors()
        status = _run_loop(serve_pool, use_uvloop=True)
        # Every task's resources are released by now.  Skipping the
        # interpreter's teardown (botocore's modules) makes the exit ~15x
        # faster: the end of every job waits for its workers to exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args:
        print("usage: python -m shardline.worker [--pool] < TASK", file=sys.stderr)
        return 2
    return run_task_file(sys.stdin.buffer)
