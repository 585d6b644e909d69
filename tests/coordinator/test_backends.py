"""The local backend's process pool, and the worker's side of the exchange contract.

Pool: real ``python -m shardline.worker --pool`` processes run real tasks
(local input files, markers in the moto server's DynamoDB).  Commands report
their own pids through files (`$PPID` of the shell is the worker process),
so every check is on real processes, found again through /proc.

Worker side: a real ExchangeServer with test hooks refuses attempts as stale,
records FAILED reports, or has its sessions cut by a TCP relay.

Nothing here asserts on time: waits are "until it happens", bounded only so
that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from shardline.coordinator import ExchangeServer, LocalProcessBackend, WorkerExit
from shardline.errors import CommandFailedError, LineTooLongError, StaleAttemptError
from shardline.io.aws import AwsSettings, client
from shardline.io.sources import LocalFileSource
from shardline.io.tables import ensure_marker_table
from shardline.protocol import (
    DEFAULT_MARKER_TABLE,
    Done,
    Error,
    Failed,
    Head,
    Hello,
    Progress,
    ShardTask,
    attempt_secret,
)
from shardline.worker import WorkerSettings, run_task

from reference import reference_split

DATA = b"".join(b"line %04d\n" % i for i in range(200))
#: Bound on every wait for something to happen (a hang guard, not a timing check).
PATIENCE_S = 10.0
#: A command that records its worker's pid and a background grandchild's pid, then waits for it.
SLEEPER = "echo $PPID > {dir}/worker.pid; sleep 300 & echo $! > {dir}/sleep.pid; wait"


@pytest.fixture
async def marker_table(aws_settings: AwsSettings) -> str:
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
    return DEFAULT_MARKER_TABLE


@pytest.fixture
async def make_task(tmp_path: Path, aws_settings: AwsSettings, marker_table: str) -> Callable[..., ShardTask]:
    """Tasks over DATA as the coordinator would build them (no exchange unless given)."""
    path = tmp_path / "input"
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
                "output_path": str(tmp_path / f"out-{next(names)}"),
                "markers_table": marker_table,
                "aws": aws_settings.to_dict(),
                **fields,
            }
        )

    return make


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), PATIENCE_S)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def pool_processes() -> set[int]:
    """Live ``shardline.worker --pool`` children of this test process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == os.getpid() and b"shardline.worker" in cmdline and b"--pool" in cmdline and alive(int(entry)):
            found.add(int(entry))
    return found


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):  # not yet, or half written
        return None


async def pid_from(path: Path) -> int:
    await eventually(lambda: read_pid(path) is not None, f"{path.name} written")
    pid = read_pid(path)
    assert pid is not None
    return pid


def kill_group_quietly(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


# --- the pool -----------------------------------------------------------------


async def test_pool_reuses_a_process_across_tasks(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1)
    starts: list[int] = []
    pids = tmp_path / "pids"
    try:
        tasks = [make_task(command=f"echo $PPID >> {pids}; cat", shards=2, index=i) for i in (0, 1)]
        for index, task in enumerate(tasks):
            exit_ = await backend.run(task, on_started=functools.partial(starts.append, index))
            assert exit_.ok, exit_.detail
    finally:
        await backend.aclose()
    assert starts == [0, 1]
    first, second = pids.read_text().split()
    assert first == second  # the same worker process ran both
    expected = reference_split(DATA, 2, b"\n")
    assert [Path(task.output_path).read_bytes() for task in tasks] == expected


async def test_prestarted_processes_run_tasks_and_aclose_stops_them_all(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=3)
    try:
        await backend.prestart(5)
        prestarted = pool_processes()
        assert len(prestarted) == 3  # capped at max_processes
        exit_ = await backend.run(make_task(command=f"echo $PPID > {tmp_path}/ppid; cat"), on_started=lambda: None)
        assert exit_.ok, exit_.detail
        assert read_pid(tmp_path / "ppid") in prestarted
        # A busy process is stopped too, and its command with it.
        running = asyncio.ensure_future(
            backend.run(make_task(command=SLEEPER.format(dir=tmp_path)), on_started=lambda: None)
        )
        sleeper = await pid_from(tmp_path / "sleep.pid")
    finally:
        await backend.aclose()
    exit_ = await asyncio.wait_for(running, PATIENCE_S)
    assert not exit_.ok
    assert pool_processes() == set()
    await eventually(lambda: not alive(sleeper), "the busy worker's command is killed")
    with pytest.raises(RuntimeError, match="closed"):
        await backend.run(make_task(), on_started=lambda: None)


async def test_worker_killed_mid_task_is_reported_and_replaced(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1)
    shell = None
    try:
        command = f"echo $$ > {tmp_path}/shell.pid; {SLEEPER.format(dir=tmp_path)}"
        running = asyncio.ensure_future(backend.run(make_task(command=command), on_started=lambda: None))
        worker = await pid_from(tmp_path / "worker.pid")
        shell = await pid_from(tmp_path / "shell.pid")
        os.kill(worker, signal.SIGKILL)
        exit_ = await asyncio.wait_for(running, PATIENCE_S)
        assert not exit_.ok and exit_.detail.startswith("worker process killed by signal 9"), exit_.detail
        again = await backend.run(make_task(command=f"echo $PPID > {tmp_path}/again.pid; cat"), on_started=lambda: None)
        assert again.ok, again.detail
        assert read_pid(tmp_path / "again.pid") not in (None, worker)
    finally:
        await backend.aclose()
        # A worker killed from outside cannot stop its command: do it here.
        kill_group_quietly(shell)


async def test_worker_that_dies_is_named_with_its_last_stderr_line(tmp_path, make_task):
    # A stand-in "python" that complains and exits, as a worker failing at start-up would.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'first line' >&2\necho 'ImportError: no aioboto3' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    backend = LocalProcessBackend(python=str(fake_python))
    try:
        exit_ = await backend.run(make_task(), on_started=lambda: None)
    finally:
        await backend.aclose()
    assert exit_ == WorkerExit(ok=False, detail="worker process exited with status 3: ImportError: no aioboto3")


@pytest.mark.parametrize("stuck", [False, True], ids=["responsive", "stuck"])
async def test_cancelling_run_kills_the_command_process_group(tmp_path, make_task, stuck):
    backend = LocalProcessBackend(max_processes=1, stop_grace_s=0.5)
    try:
        running = asyncio.ensure_future(
            backend.run(make_task(command=SLEEPER.format(dir=tmp_path)), on_started=lambda: None)
        )
        worker = await pid_from(tmp_path / "worker.pid")
        sleeper = await pid_from(tmp_path / "sleep.pid")
        if stuck:  # cannot handle SIGTERM: the backend's SIGKILL must reach the command too
            os.kill(worker, signal.SIGSTOP)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert not alive(worker)  # run() returns once its process is gone
        await eventually(lambda: not alive(sleeper), "the command's grandchild is killed")
        assert pool_processes() == set()  # a cancelled attempt's process is never reused
    finally:
        await backend.aclose()


async def test_the_job_secret_reaches_the_worker_on_stdin_only(tmp_path, make_task):
    secret = os.urandom(32)
    # What the command, and (as far as it may read them) its worker, show of themselves.
    command = "env; tr '\\0' '\\n' < /proc/$PPID/cmdline; tr '\\0' '\\n' < /proc/$PPID/environ 2>/dev/null; true"
    backend = LocalProcessBackend(max_processes=1)
    try:
        task = make_task(command=command, secret=secret)
        exit_ = await backend.run(task, on_started=lambda: None)
    finally:
        await backend.aclose()
    assert exit_.ok, exit_.detail
    shown = Path(task.output_path).read_bytes()
    assert b"shardline.worker" in shown and b"SHARDLINE_SHARD=0" in shown
    assert secret.hex().encode() not in shown.lower() and secret not in shown


async def test_a_stuck_workers_commands_and_what_they_daemonised_are_killed(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1, stop_grace_s=0.5)
    command = (
        f"setsid sleep 300 >/dev/null 2>&1 & echo $! > {tmp_path}/setsid.pid; "
        f"(setsid sleep 300 & echo $! > {tmp_path}/orphan.pid); " + SLEEPER.format(dir=tmp_path)
    )
    try:
        running = asyncio.ensure_future(backend.run(make_task(command=command), on_started=lambda: None))
        worker = await pid_from(tmp_path / "worker.pid")
        others = [await pid_from(tmp_path / name) for name in ("setsid.pid", "orphan.pid", "sleep.pid")]
        os.kill(worker, signal.SIGSTOP)  # cannot end its command: the backend must
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        for pid in others:
            await eventually(lambda pid=pid: not alive(pid), f"process {pid} the command left is killed")
    finally:
        await backend.aclose()


# --- the worker process's wire protocol ---------------------------------------------


async def spawn_pool_worker() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardline.worker",
        "--pool",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


async def test_pool_worker_answers_each_task_line_and_exits_at_stdin_eof(tmp_path, make_task):
    process = await spawn_pool_worker()
    assert process.stdin is not None and process.stdout is not None
    try:
        good = make_task(command="cat")
        bad = make_task(command="echo oops >&2; exit 3")
        process.stdin.write(f"\n{good.to_json()}\n{bad.to_json()}\nnot json\n".encode())
        answers = [json.loads(await asyncio.wait_for(process.stdout.readline(), PATIENCE_S)) for _ in range(3)]
        assert answers[0]["ok"] is True
        assert answers[1] == {"ok": False, "detail": "worker failed: command exited with status 3: oops"}
        assert answers[2]["ok"] is False and "invalid shard task" in answers[2]["detail"]
        assert Path(good.output_path).read_bytes() == DATA
        # EOF while a task runs: the task is cancelled, its command killed.
        process.stdin.write(make_task(command=SLEEPER.format(dir=tmp_path)).to_json().encode() + b"\n")
        sleeper = await pid_from(tmp_path / "sleep.pid")
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0
        await eventually(lambda: not alive(sleeper), "the command of a worker whose stdin closed is killed")
    finally:
        kill_group_quietly(process.pid if process.returncode is None else None)
        await process.wait()


async def test_idle_pool_worker_exits_at_stdin_eof():
    process = await spawn_pool_worker()
    assert process.stdin is not None
    process.stdin.close()
    assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0


async def test_single_task_on_stdin_still_runs_and_exits(make_task):
    task = make_task(shards=3, index=1)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shardline.worker"],
        input=task.to_json().encode(),
        capture_output=True,
        timeout=PATIENCE_S,
    )
    assert result.returncode == 0, result.stderr.decode()
    expected = reference_split(DATA, 3, b"\n")[1]
    assert json.loads(result.stdout)["bytes"] == len(expected)
    assert Path(task.output_path).read_bytes() == expected


# --- the worker's side of the exchange ------------------------------------------------

STALE = "shard 0 attempt 0 is not current (stale)"


class Hooks:
    """Exchange hooks that record what the worker said; optionally refuse it as stale."""

    def __init__(self, *, refuse_connect: bool = False, refuse_head: bool = False) -> None:
        self.refuse_connect = refuse_connect
        self.refuse_head = refuse_head
        self.connects = 0
        self.progress_after_connect = 0  # PROGRESS frames in the latest session
        self.done: list[Done] = []
        self.failed: list[Failed] = []

    def session_idle_timeout_s(self) -> float:
        return 30.0

    def on_connect(self, hello: Hello) -> Error | None:
        self.connects += 1
        self.progress_after_connect = 0
        return Error(message=f"session refused: {STALE}", stale=True) if self.refuse_connect else None

    def on_head(self, hello: Hello, head: Head) -> Error | None:
        return Error(message=f"HEAD refused: {STALE}", stale=True) if self.refuse_head else None

    def on_progress(self, hello: Hello, progress: Progress) -> None:
        self.progress_after_connect += 1

    async def on_done(self, hello: Hello, done: Done) -> bool:
        self.done.append(done)
        return True

    def on_failed(self, hello: Hello, failed: Failed) -> None:
        self.failed.append(failed)

    def on_disconnect(self, hello: Hello) -> None:
        pass


class CuttableRelay:
    """A TCP relay in front of the exchange whose connections can all be cut at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[:2]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def exchange():
    async with ExchangeServer(host="127.0.0.1") as server:
        yield server


def exchange_task(make_task, exchange: ExchangeServer, hooks: Hooks, *, address=None, **fields) -> ShardTask:
    """A task whose worker talks to `exchange` (directly, or through `address`)."""
    secret = os.urandom(32)
    host, port = address or exchange.address
    task = make_task(exchange_host=host, exchange_port=port, **fields)
    task = dataclasses.replace(task, secret=attempt_secret(secret, task.shard, task.attempt))
    exchange.register(task.job_id, secret, hooks)
    return task


@pytest.mark.parametrize("where", ["connect", "head"])
async def test_stale_refusal_stops_the_attempt_without_done(tmp_path, make_task, exchange, where):
    hooks = Hooks(refuse_connect=where == "connect", refuse_head=where == "head")
    task = exchange_task(make_task, exchange, hooks, command=SLEEPER.format(dir=tmp_path))
    with pytest.raises(StaleAttemptError, match="not current"):
        await asyncio.wait_for(run_task(task), PATIENCE_S)
    assert hooks.done == [] and hooks.failed == []
    sleeper = read_pid(tmp_path / "sleep.pid")
    if sleeper is not None:  # the command may not have got that far
        await eventually(lambda: not alive(sleeper), "the fenced attempt's command is killed")


async def test_heartbeat_reconnects_a_lost_session(tmp_path, make_task, exchange):
    hooks = Hooks()
    relay = CuttableRelay(exchange.address)
    address = await relay.start()
    task = exchange_task(make_task, exchange, hooks, address=address, command=SLEEPER.format(dir=tmp_path))
    settings = WorkerSettings(heartbeat_interval_s=0.05, reconnect_interval_s=0.05)
    running = asyncio.ensure_future(run_task(task, settings=settings))
    try:
        await eventually(lambda: hooks.connects == 1 and hooks.progress_after_connect > 0, "first session heartbeats")
        relay.cut()
        await eventually(lambda: hooks.connects == 2 and hooks.progress_after_connect > 0, "heartbeats after reconnect")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await relay.aclose()


@pytest.mark.parametrize(
    ("fields", "kind", "retryable"),
    [
        ({"command": "exit 3"}, CommandFailedError, True),
        ({"max_line_bytes": 3}, LineTooLongError, False),
    ],
)
async def test_failed_report_says_whether_a_retry_can_help(make_task, exchange, fields, kind, retryable):
    hooks = Hooks()
    task = exchange_task(make_task, exchange, hooks, **fields)
    with pytest.raises(kind):
        await asyncio.wait_for(run_task(task), PATIENCE_S)
    assert [(f.kind, f.retryable) for f in hooks.failed] == [(kind.__name__, retryable)]
