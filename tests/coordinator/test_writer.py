"""The record writer: one job's records reach the store in order, batched,
under the job's lease; a lost lease stops it for good."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from shardline.coordinator._writer import RecordWriter  # the job's own helper; no public spelling
from shardline.errors import LeaseLostError, StorageError
from shardline.io.store import Lease, MemoryJobStore
from shardline.protocol import JobRecord, ShardRecord, ShardState

from records import job_record, shard_records


class GatedStore(MemoryJobStore):
    """A memory store whose saves wait for a gate, and are counted (and may fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.saves: list[tuple[JobRecord | None, list[ShardRecord]]] = []
        self.fail_next: Exception | None = None

    async def save(self, lease: Lease, *, job: JobRecord | None = None, shards: Sequence[ShardRecord] = ()) -> None:
        self.saves.append((job, list(shards)))
        await self.gate.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        await super().save(lease, job=job, shards=shards)


async def setup(count: int = 3) -> tuple[GatedStore, Lease, dict[int, ShardRecord], list[str]]:
    store = GatedStore()
    job = job_record()
    current = {record.index: record for record in shard_records(job.job_id, count)}
    lease = await store.create_job(job, list(current.values()), owner="me", lease_s=30)
    return store, lease, current, []


def writer_for(store, lease, current, lost) -> RecordWriter:
    return RecordWriter(
        store,
        lease,
        shard_record=lambda index: current[index],
        job_record=lambda: job_record(lease.job_id),
        on_saved=lambda record: None,
        on_lost=lambda exc: lost.append(str(exc)),
    )


def version_of(current, index: int, attempt: int) -> None:
    current[index] = ShardRecord(
        job_id=current[index].job_id, index=index, state=ShardState.RUNNING, next_attempt=attempt
    )


async def test_changes_made_during_a_save_go_together_in_the_next_one() -> None:
    store, lease, current, lost = await setup()
    writer = writer_for(store, lease, current, lost)
    store.gate.clear()
    first = writer.mark_shard(0)
    await asyncio.sleep(0)  # the first save is in flight, held at the gate
    for attempt in range(2, 12):
        version_of(current, 1, attempt)
        last = writer.mark_shard(1)
    writer.mark_job()
    store.gate.set()
    await writer.wait_durable(last)
    assert writer.durable >= first
    # Two saves: the first change alone, then everything marked meanwhile, once each, at its newest.
    assert len(store.saves) == 2
    job, shards = store.saves[1]
    assert job is not None and [(s.index, s.next_attempt) for s in shards] == [(1, 11)]
    assert (await store.load_job(lease.job_id))[1][1].next_attempt == 11
    await writer.aclose()


async def test_a_failed_save_fails_its_waiters_and_the_next_save_carries_its_records() -> None:
    store, lease, current, lost = await setup()
    writer = writer_for(store, lease, current, lost)
    store.fail_next = StorageError("the store is down")
    version_of(current, 2, 5)
    with pytest.raises(StorageError, match="down"):
        await writer.wait_durable(writer.mark_shard(2))
    await writer.wait_durable(writer.mark_shard(0))  # the next batch carries shard 2 again
    assert sorted(s.index for s in store.saves[-1][1]) == [0, 2]
    assert (await store.load_job(lease.job_id))[1][2].next_attempt == 5
    await writer.aclose()


async def test_a_lost_lease_stops_the_writer_and_tells_the_job() -> None:
    store, lease, current, lost = await setup()
    writer = writer_for(store, lease, current, lost)
    await store.renew(lease, lease_s=-1)
    taken = await store.acquire(lease.job_id, owner="someone else", lease_s=30)
    assert taken is not None
    with pytest.raises(LeaseLostError):
        await writer.wait_durable(writer.mark_shard(0))
    assert len(lost) == 1 and writer.lost is not None
    saves = len(store.saves)
    with pytest.raises(LeaseLostError):
        await writer.wait_durable(writer.mark_shard(1))  # nothing more is even tried
    assert len(store.saves) == saves
    await writer.aclose()
