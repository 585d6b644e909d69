"""`run_job` with a real exchange: rogue and replayed sessions are dropped
while a real job runs through it, and a backend that cannot start a shard
fails the job naming it."""

from __future__ import annotations

import asyncio
import io

import pytest

from shardline.coordinator import ExchangeServer, WorkerExit, run_job
from shardline.embedded import InProcessBackend
from shardline.errors import JobFailedError
from shardline.io.aws import client
from shardline.io.store import ensure_marker_table
from shardline.protocol import ExchangeSession, JobSpec, ShardTask, Want

from jobs import GatedBackend
from polling import eventually
from reference import reference_split

DATA = b"".join(b"row %05d\n" % i for i in range(500))


async def _rogue(address: tuple[str, int], payload: bytes) -> bytes:
    """Send `payload`, then return whatever the exchange answers before closing."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    return answer


async def test_rogue_clients_are_dropped_and_the_job_is_unaffected(tmp_path, aws_settings):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    backend = GatedBackend()
    out = io.BytesIO()
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, "shardline-markers")
    async with ExchangeServer() as exchange:
        job = asyncio.create_task(
            run_job(JobSpec(source=str(path), shards=4), aws=aws_settings, backend=backend, exchange=exchange, out=out)
        )
        await eventually(lambda: len(backend.tasks) == 4, "all attempts launched")
        task = backend.tasks[1]
        wrong_secret = ExchangeSession.client(job_id=task.job_id, shard=1, attempt=0, secret=b"x" * 32)
        unknown_job = ExchangeSession.client(job_id="no-such-job", shard=1, attempt=0, secret=task.secret)
        # Attempt 0's secret opens attempt 0's session only.
        other_attempt = ExchangeSession.client(job_id=task.job_id, shard=1, attempt=7, secret=task.secret)
        oversized = b"SL\x01\x03" + (1 << 30).to_bytes(4, "big")
        answers = [
            await _rogue(exchange.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            await _rogue(exchange.address, oversized),
            await _rogue(exchange.address, wrong_secret.send(wrong_secret.hello)),
            await _rogue(exchange.address, unknown_job.send(unknown_job.hello)),
            await _rogue(exchange.address, other_attempt.send(other_attempt.hello)),
        ]
        assert answers == [b""] * 5  # dropped without a word
        refused = {cause: count for cause, count in exchange.refused.items() if count}
        assert refused == {"bad_frame": 1, "preauth_oversized": 1, "auth_failed": 3}
        backend.gate.set()
        report = await job
    assert out.getvalue() == DATA
    assert [s.bytes for s in report.shards] == [len(p) for p in reference_split(DATA, 4, b"\n")]


async def test_replayed_session_is_dropped(tmp_path, aws_settings):
    # Bytes recorded from a genuine worker session (HELLO, then WANT), replayed
    # on a new connection: the exchange remembers the HELLO's nonce and refuses
    # the session before WELCOME, so nothing is pushed and the replay cannot
    # pass for the attempt's liveness either.
    path = tmp_path / "input"
    path.write_bytes(DATA)
    backend = GatedBackend()
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, "shardline-markers")
    async with ExchangeServer() as exchange:
        spec = JobSpec(source=str(path), shards=2)
        job = asyncio.create_task(run_job(spec, aws=aws_settings, backend=backend, exchange=exchange, out=io.BytesIO()))
        await eventually(lambda: len(backend.tasks) == 2, "all attempts launched")
        task = backend.tasks[0]
        genuine = ExchangeSession.client(job_id=task.job_id, shard=0, attempt=0, secret=task.secret)
        reader, writer = await asyncio.open_connection(*exchange.address)
        recorded = genuine.send(genuine.hello)
        writer.write(recorded)
        welcome = await reader.read(65536)
        genuine.receive_data(welcome)
        assert genuine.next_frame().TYPE.name == "WELCOME"
        recorded += genuine.send(Want(shard=1))
        writer.close()
        answer = await _rogue(exchange.address, recorded)
        assert answer == b""  # not even a WELCOME
        assert exchange.refused["replayed_hello"] == 1 and sum(exchange.refused.values()) == 1
        backend.gate.set()
        await job


class BrokenForShardOne(InProcessBackend):
    """A backend that cannot start shard 1 (as when spawning fails)."""

    async def run(self, task: ShardTask, *, on_started) -> WorkerExit:
        if task.shard == 1:
            raise OSError(24, "Too many open files")
        return await super().run(task, on_started=on_started)


async def test_backend_that_cannot_start_a_shard_fails_the_job(tmp_path, aws_settings):
    path = tmp_path / "input"
    path.write_bytes(DATA)
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, "shardline-markers")
    out = io.BytesIO()
    async with ExchangeServer() as exchange:
        spec = JobSpec(source=str(path), shards=3)
        run = run_job(spec, aws=aws_settings, backend=BrokenForShardOne(), exchange=exchange, out=out)
        with pytest.raises(JobFailedError, match=r"shard 1 failed: backend inprocess could not run .*open files"):
            await asyncio.wait_for(run, 60)


@pytest.mark.parametrize("shards", [2, 40], ids=["pieces over 64 KiB: in a thread", "small pieces: on the loop"])
async def test_output_into_a_regular_file_is_exact(tmp_path, aws_settings, shards):
    data = b"".join(b"line %06d %s\n" % (i, b"x" * (i % 90)) for i in range(4000))  # ~230 KiB
    path = tmp_path / "input"
    path.write_bytes(data)
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, "shardline-markers")
    backend = InProcessBackend()
    try:
        with open(tmp_path / "out", "wb") as out:
            async with ExchangeServer() as exchange:
                report = await run_job(
                    JobSpec(source=str(path), shards=shards, min_shard_bytes=1),
                    aws=aws_settings,
                    backend=backend,
                    exchange=exchange,
                    out=out,
                )
    finally:
        await backend.aclose()
    assert (tmp_path / "out").read_bytes() == data
    assert report.output_bytes == len(data)
    assert [s.bytes for s in report.shards] == [len(p) for p in reference_split(data, shards, b"\n")]
