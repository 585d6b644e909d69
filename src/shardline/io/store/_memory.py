# A job store in this process only: `shardline run`'s in-process
# coordinator, whose jobs end with it.  It follows the contract all the same
# (leases included), so the same code runs on every store.

from __future__ import annotations

import time
from collections.abc import Sequence

from ...errors import LeaseLostError
from ...protocol import JobRecord, ShardRecord
from ._contract import JobStore, Lease, StoredJob

__all__ = ["MemoryJobStore"]


class MemoryJobStore(JobStore):
    """Job and shard records and leases in a dict."""

    durable = False

    def __init__(self) -> None:
        self.identity = f"memory {id(self):x}"
        self._jobs: dict[str, JobRecord] = {}
        self._shards: dict[str, dict[int, ShardRecord]] = {}
        self._leases: dict[str, Lease | None] = {}

    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord], *, owner: str, lease_s: float) -> Lease:
        lease = Lease(job_id=job.job_id, owner=owner, epoch=1, expires_at=time.time() + lease_s)
        self._jobs[job.job_id] = job
        self._shards[job.job_id] = {shard.index: shard for shard in shards}
        self._leases[job.job_id] = lease
        return lease

    def _check(self, lease: Lease) -> None:
        current = self._leases.get(lease.job_id)
        if current is None or (current.owner, current.epoch) != (lease.owner, lease.epoch):
            raise LeaseLostError(f"job {lease.job_id} is no longer ours ({lease.owner}, epoch {lease.epoch})")

    async def save(self, lease: Lease, *, job: JobRecord | None = None, shards: Sequence[ShardRecord] = ()) -> None:
        self._check(lease)
        if job is not None:
            self._jobs[job.job_id] = job
        stored = self._shards.setdefault(lease.job_id, {})
        for shard in shards:
            stored[shard.index] = shard

    async def acquire(self, job_id: str, *, owner: str, lease_s: float) -> Lease | None:
        if job_id not in self._jobs:
            return None
        now = time.time()
        current = self._leases.get(job_id)
        if current is not None and current.owner != owner and current.valid(now):
            return None
        lease = Lease(job_id=job_id, owner=owner, epoch=(current.epoch if current else 0) + 1, expires_at=now + lease_s)
        self._leases[job_id] = lease
        return lease

    async def renew(self, lease: Lease, *, lease_s: float) -> Lease:
        self._check(lease)
        renewed = Lease(job_id=lease.job_id, owner=lease.owner, epoch=lease.epoch, expires_at=time.time() + lease_s)
        self._leases[lease.job_id] = renewed
        return renewed

    async def release(self, lease: Lease) -> None:
        current = self._leases.get(lease.job_id)
        if current is not None and (current.owner, current.epoch) == (lease.owner, lease.epoch):
            self._leases[lease.job_id] = Lease(job_id=lease.job_id, owner=lease.owner, epoch=lease.epoch, expires_at=0)

    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        shards = self._shards.get(job_id, {})
        return job, [shards[index] for index in sorted(shards)]

    async def list_jobs(self) -> list[StoredJob]:
        jobs = sorted(self._jobs.values(), key=lambda job: job.created_at)
        return [StoredJob(record=job, lease=self._leases.get(job.job_id)) for job in jobs]

    async def delete_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._shards.pop(job_id, None)
        self._leases.pop(job_id, None)
