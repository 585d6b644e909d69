"""One set of S3 and DynamoDB clients per process (`ClientPool`): every shard
attempt a process runs uses them, concurrently, and they stay open between
shards until the pool's owner closes them."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from shardline.embedded import InProcessBackend
from shardline.io.aws import ClientPool
from shardline.io.store import sqlite_location
from shardline.protocol import ShardTask
from shardline.worker import run_task

from polling import eventually
from reference import reference_crc32c, reference_split
from tasks import DATA


def s3_tasks(make_task, s3, bucket: str, shards: int) -> list[ShardTask]:
    s3.put_object(Bucket=bucket, Key="input", Body=DATA)
    etag = s3.head_object(Bucket=bucket, Key="input")["ETag"]
    first = make_task(shards=shards)
    return [
        dataclasses.replace(
            first,
            shard=index,
            source=f"s3://{bucket}/input",
            etag=etag,
            output_path=f"{first.output_path}-{index}",
        )
        for index in range(shards)
    ]


async def test_concurrent_shards_share_one_client_per_service(make_task, s3, bucket, aws_settings):
    tasks = s3_tasks(make_task, s3, bucket, shards=6)
    async with ClientPool(shards_at_once=len(tasks)) as clients:
        shared_s3 = await clients.get(aws_settings, "s3")
        results = await asyncio.gather(*(run_task(task, clients=clients) for task in tasks))
        # Six shards, each with an S3 source and a DynamoDB marker store: two clients in all.
        assert clients.clients_open == 2
        assert await clients.get(aws_settings, "s3") is shared_s3
        # Still open after the shards ended: a later shard reuses them.
        again = dataclasses.replace(tasks[0], attempt=1, output_path=tasks[0].output_path + "-again")
        later = await run_task(again, clients=clients)
        assert (later.emitted_start, later.emitted_end) == (results[0].emitted_start, results[0].emitted_end)
        assert clients.clients_open == 2
    assert clients.clients_open == 0
    expected = reference_split(DATA, len(tasks), b"\n")
    for task, result, part in zip(tasks, results, expected, strict=True):
        with open(task.output_path, "rb") as output:
            assert output.read() == part
        assert result.bytes == len(part)
        assert result.checksum == f"crc32c:{reference_crc32c(part):08x}"


async def test_a_closed_pool_refuses_new_clients(aws_settings):
    clients = ClientPool()
    lazy = clients.lazy(aws_settings, "s3")
    await lazy.get()
    await clients.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await lazy.get()
    with pytest.raises(RuntimeError, match="closed"):
        clients.lazy(aws_settings, "dynamodb")


async def test_in_process_backend_runs_shards_on_shared_clients(make_task, s3, bucket):
    backend = InProcessBackend(max_concurrent=4)
    tasks = s3_tasks(make_task, s3, bucket, shards=4)
    try:
        exits = await asyncio.gather(*(backend.run(task, on_started=lambda: None) for task in tasks))
    finally:
        await backend.aclose()
    assert all(exit.ok for exit in exits), exits
    outputs = []
    for task in tasks:
        with open(task.output_path, "rb") as output:
            outputs.append(output.read())
    assert b"".join(outputs) == DATA


def sqlite_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("shardline-sqlite")}


async def test_shards_share_one_sqlite_connection_per_process(make_task, tmp_path):
    markers = sqlite_location(str(tmp_path / "markers.db"))
    first = make_task(shards=5, markers=markers)
    tasks = [dataclasses.replace(first, shard=i, output_path=f"{first.output_path}-{i}") for i in range(5)]
    before = sqlite_threads()
    async with ClientPool(shards_at_once=len(tasks)) as clients:
        results = await asyncio.gather(*(run_task(task, clients=clients) for task in tasks))
        # One database thread (and connection) served every shard's markers, and outlives them.
        ours = sqlite_threads() - before
        assert len(ours) == 1
        assert all(thread.is_alive() for thread in ours)
    expected = reference_split(DATA, len(tasks), b"\n")
    assert [result.bytes for result in results] == [len(part) for part in expected]
    await eventually(lambda: not any(thread.is_alive() for thread in ours), "the database thread to end")
