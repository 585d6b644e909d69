"""The worker's side of the exchange contract, against a real ExchangeServer
whose test hooks refuse attempts as stale, record FAILED reports, or have
their sessions cut by a TCP relay."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

import pytest

from shardline.coordinator import ExchangeServer
from shardline.errors import CommandExitError, CommandFailedError, LineTooLongError, StaleAttemptError
from shardline.protocol import Done, Error, Failed, Head, Hello, Progress, ShardTask, attempt_secret
from shardline.worker import WorkerSettings, run_task

from leftovers import alive
from polling import PATIENCE_S, eventually
from tasks import SLEEPER, read_pid

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


async def test_an_attempt_connecting_after_its_job_ended_is_told_to_stop(tmp_path, make_task, exchange, caplog):
    hooks = Hooks()
    task = exchange_task(make_task, exchange, hooks, command=SLEEPER.format(dir=tmp_path))
    exchange.unregister(task.job_id)  # the job ended before this attempt's HELLO
    with pytest.raises(StaleAttemptError, match="has ended"):
        await asyncio.wait_for(run_task(task), PATIENCE_S)
    assert hooks.connects == 0 and hooks.done == [] and hooks.failed == []
    # Ours, not a stranger: no refusal is counted or warned about.
    assert sum(exchange.refused.values()) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


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
        # Retryable as far as the worker knows: the supervisor applies the job's command_retries.
        ({"command": "exit 3"}, CommandExitError, True),
        ({"command": "kill -9 $$"}, CommandFailedError, True),
        ({"max_line_bytes": 3}, LineTooLongError, False),
    ],
)
async def test_failed_report_says_whether_a_retry_can_help(make_task, exchange, fields, kind, retryable):
    hooks = Hooks()
    task = exchange_task(make_task, exchange, hooks, **fields)
    with pytest.raises(kind):
        await asyncio.wait_for(run_task(task), PATIENCE_S)
    assert [(f.kind, f.retryable) for f in hooks.failed] == [(kind.__name__, retryable)]
