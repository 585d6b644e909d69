# Process entry points shared by ``python -m shardline.worker`` and the
# ``shardline worker`` CLI command.
#
# Two modes:
#
# - One task (`run_task_file`): read a task JSON, run it, print a summary,
#   exit 0 / 1 / 2.  What ``shardline worker --task FILE`` and a plain
#   ``python -m shardline.worker < task.json`` do.
# - Pool (`serve_pool`, ``python -m shardline.worker --pool``): the
#   coordinator's local backend keeps about one such process per core, and
#   each runs many tasks at once: ``run ID TASK_JSON`` on a stdin line starts
#   one, ``cancel ID`` cancels it (its command and what that started end
#   before the answer), and every task is answered by one stdout line
#   ``{"id": ID, "ok": bool, "detail": str}`` when it ends.  Importing
#   aiobotocore costs about a quarter of a CPU-second (paid by the first task that
#   needs AWS), so a process is reused rather than started per shard.  The
#   parent's end of stdin is the lifeline: EOF (the coordinator exited, even
#   by SIGKILL) cancels every running task and exits; SIGTERM does the same.
#   Cancelling a task aborts its command, which kills the command's whole
#   process group, so nothing outlives the worker.

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection, Coroutine
from typing import Any, BinaryIO

from ..errors import ConfigurationError, ShardlineError
from ..io.aws import AwsSettings, ClientPool, import_libraries
from ..io.processes import adopt_orphans, hide_environment
from ..protocol import DEFAULT_TASKS_PER_PROCESS, ShardTask
from ._shard import WorkerSettings, run_task

__all__ = ["main", "run_task_file", "serve_pool"]

log = logging.getLogger("shardline.worker")

#: Longest task line accepted in pool mode (a task is a few KiB; the command
#: string is the only part of unbounded length).
_MAX_TASK_LINE_BYTES = 16 * 1024 * 1024

#: Nice value of the thread that imports the AWS stack ahead of the tasks.
_WARM_NICE = 10


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


async def _answer(task_json: bytes, settings: WorkerSettings, clients: ClientPool) -> dict[str, object]:
    """Run the task in `task_json`.  Its failure is an answer; any other
    exception is a bug and ends the process with a traceback, which the
    parent reports."""
    try:
        task = ShardTask.from_json(task_json)
    except ConfigurationError as exc:
        return {"ok": False, "detail": f"worker got {exc}"}
    try:
        result = await run_task(task, settings=settings, clients=clients)
    except ShardlineError as exc:
        return {"ok": False, "detail": f"worker failed: {exc}"}
    committed = "" if result.committed is None else (" (committed)" if result.committed else " (not committed)")
    return {"ok": True, "detail": f"worker finished shard {task.shard} attempt {task.attempt}{committed}"}


class _PoolTasks:
    """The tasks one pool process runs at once, by the parent's task id."""

    def __init__(self, answers: BinaryIO, settings: WorkerSettings, clients: ClientPool) -> None:
        self._answers = answers
        self._settings = settings
        self._clients = clients
        self._running: dict[str, asyncio.Task[None]] = {}
        self.crashed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def handle(self, line: bytes) -> None:
        """``run ID TASK_JSON`` or ``cancel ID``; anything else is answered as invalid."""
        verb, _, rest = line.strip().partition(b" ")
        task_id, _, task_json = rest.partition(b" ")
        key = task_id.decode(errors="replace")
        if verb == b"run" and key and key not in self._running:
            self._running[key] = asyncio.ensure_future(self._run(key, task_json))
        elif verb == b"cancel" and key:
            running = self._running.get(key)
            if running is not None:
                running.cancel()
        else:
            self._write({"id": key, "ok": False, "detail": f"worker got an invalid line {line[:200]!r}"})

    async def _run(self, key: str, task_json: bytes) -> None:
        try:
            answer = await _answer(task_json, self._settings, self._clients)
        except asyncio.CancelledError:
            # Its command and everything that command started have ended by
            # now (the task's cleanup ran): the parent may reuse us.
            answer = {"ok": False, "detail": "worker cancelled the task"}
        except BaseException as exc:
            if not self.crashed.done():
                self.crashed.set_result(exc)
            raise
        finally:
            del self._running[key]
        self._write({"id": key, **answer})

    def _write(self, answer: dict[str, object]) -> None:
        # A short line into a pipe the parent keeps reading: the write cannot
        # block for long, so it need not leave the event loop.
        self._answers.write(json.dumps(answer).encode() + b"\n")

    async def aclose(self) -> None:
        """Cancel every running task and wait for their cleanup."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def serve_pool(*, warm_services: Collection[str] = ()) -> int:
    """Serve tasks from stdin until EOF or SIGTERM (see the module comment); returns the exit status.

    `warm_services` ("s3", "dynamodb"): make those clients, for the AWS
    settings of our environment, while no task has arrived yet; a task with
    the same settings (an embedded run's) then finds them made."""
    _become_command_runner()
    # Several attempts share our stderr; a few at once: an exec is waited for
    # on the loop, cheaper than a thread hop (measured: bench/README.md).
    settings = WorkerSettings(route_stderr=True, spawn_off_loop=False)
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def stop() -> None:
        if not stopped.done():
            stopped.set_result(None)

    # Answers get a descriptor of their own, and fd 1 becomes a copy of
    # stderr, so a stray print can never corrupt the answer stream.
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    stdin = asyncio.StreamReader(limit=_MAX_TASK_LINE_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    # S3 and DynamoDB clients live as long as the process: every task reuses them.
    clients = ClientPool(shards_at_once=DEFAULT_TASKS_PER_PROCESS)
    tasks = _PoolTasks(answers, settings, clients)
    warming = [asyncio.ensure_future(_warm(clients, warm_services))] if warm_services else []
    # stdin is read even while tasks run: that is how EOF is noticed.
    reader = asyncio.ensure_future(_read_task_lines(stdin, tasks.handle, stop))
    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        await asyncio.wait({stopped, tasks.crashed}, return_when=asyncio.FIRST_COMPLETED)
        if tasks.crashed.done():
            raise tasks.crashed.result()  # a bug: the traceback goes to the parent
        return 0
    except BrokenPipeError:
        return 0  # the parent is gone
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        reader.cancel()
        # Cancel once: a second cancel could cut the first one's cleanup short.
        with contextlib.suppress(BrokenPipeError):
            await tasks.aclose()
        for warm in warming:
            warm.cancel()
        await asyncio.gather(*warming, return_exceptions=True)
        await clients.aclose()  # after the tasks that use them
        transport.close()
        answers.close()


async def _warm(clients: ClientPool, services: Collection[str]) -> None:
    """Import the AWS stack in a thread the scheduler serves last, then make
    the clients: we run beside the coordinator, which is importing the same
    stack to stat the object, and it must not wait for our head start."""
    loop = asyncio.get_running_loop()
    imported: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not imported.done():  # not cancelled: we are not stopping
            imported.set_result(None)

    def import_at_low_priority() -> None:
        # A thread of its own, never reused: its nice value stays with it.
        if sys.platform == "linux":  # a thread's own nice value (elsewhere the call would name a process)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WARM_NICE)
        try:
            import_libraries()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we have stopped
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=import_at_low_priority, name="import-aws", daemon=True).start()
    await imported
    for service in services:
        try:
            await clients.get(AwsSettings(), service)
        except Exception as exc:  # only a head start: a task makes its own and reports what fails
            log.debug("could not make a %s client ahead of the tasks: %s", service, exc)


async def _read_task_lines(
    stdin: asyncio.StreamReader, handle: Callable[[bytes], None], stop: Callable[[], None]
) -> None:
    """Hand every non-blank line of stdin to `handle`; at EOF call `stop`."""
    try:
        while line := await stdin.readline():
            if line.strip():
                handle(line)
    except ValueError:
        log.error("task line longer than %d bytes; stopping", _MAX_TASK_LINE_BYTES)
    stop()


def _warm_services(options: list[str]) -> tuple[str, ...]:
    """The services of ``--warm-aws=s3,dynamodb`` (none without it)."""
    if not options:
        return ()
    name, _, value = options[0].partition("=")
    services = tuple(service for service in value.split(",") if service)
    if name != "--warm-aws" or not set(services) <= {"s3", "dynamodb"}:
        raise SystemExit(f"unknown pool option {options[0]!r} (--warm-aws=s3,dynamodb)")
    return services


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # aiobotocore (about a quarter of a CPU-second of imports) is not imported here: a
    # task that reads S3 or DynamoDB loads it on first use, once per process,
    # and a local file's task (the first run a newcomer makes) never does --
    # unless the coordinator, starting us ahead of an AWS job, asks us to make
    # its clients now (--warm-aws), while it still stats the object.

    if args[:1] == ["--pool"] and len(args) <= 2:
        warm_services = _warm_services(args[1:])
        status = _run_loop(functools.partial(serve_pool, warm_services=warm_services), use_uvloop=True)
        # Every task's resources are released by now.  Skipping the
        # interpreter's teardown (botocore's modules) makes the exit ~15x
        # faster: the end of every job waits for its workers to exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args:
        print("usage: python -m shardline.worker [--pool [--warm-aws=s3,dynamodb]] < TASK", file=sys.stderr)
        return 2
    return run_task_file(sys.stdin.buffer)
