# One job's records on their way to the store, under the job's lease.
#
# The job marks what changed (a shard's record, its own record) and gets a
# version number back; one writer task saves everything marked so far in a
# single `JobStore.save` (one transaction), then the next batch.  So writes
# never overtake each other, a burst of changes costs one round trip rather
# than one per change, and "this change is durable" is a version to wait
# for: an attempt number is reserved before the attempt starts, and a commit
# is durable before its shard is released.
#
# A save the store refuses because the lease is gone (LeaseLostError) stops
# the writer for good and tells the job, which must stop too: another
# coordinator owns it now.  Any other failure fails the waiters of that
# batch and leaves its records marked, so the next batch carries them again.

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..errors import LeaseLostError, ShardlineError
from ..io.store import JobStore, Lease
from ..protocol import JobRecord, ShardRecord

__all__ = ["RecordWriter"]

log = logging.getLogger("shardline.coordinator.writer")


class RecordWriter:
    """Saves one job's marked records in order, batched, under `lease`."""

    def __init__(
        self,
        store: JobStore,
        lease: Lease,
        *,
        shard_record: Callable[[int], ShardRecord],
        job_record: Callable[[], JobRecord],
        on_saved: Callable[[ShardRecord], None],
        on_lost: Callable[[LeaseLostError], None],
    ) -> None:
        self.store = store
        #: The lease every save is made under; the coordinator replaces it as it renews.
        self.lease = lease
        self._shard_record = shard_record
        self._job_record = job_record
        self._on_saved = on_saved
        self._on_lost = on_lost
        self._dirty: dict[int, None] = {}  # ordered: shards in the order they changed
        self._job_dirty = False
        self._version = 0  # changes marked so far
        self.durable = 0  # changes known stored
        self._failure: ShardlineError | None = None  # of the last batch, for its waiters
        self.lost: LeaseLostError | None = None
        self._wake = asyncio.Event()
        self._saved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- marking -----------------------------------------------------------------

    def mark_shard(self, shard: int) -> int:
        """Note that `shard`'s record changed; returns the version that makes it durable."""
        self._dirty[shard] = None
        return self._marked()

    def mark_job(self) -> int:
        """Note that the job's own record changed."""
        self._job_dirty = True
        return self._marked()

    def _marked(self) -> int:
        self._version += 1
        if self._task is None and self.lost is None:
            self._task = asyncio.create_task(self._write(), name="record-writer")
        self._wake.set()
        return self._version

    # -- waiting -----------------------------------------------------------------

    async def wait_durable(self, version: int) -> None:
        """Until every change up to `version` is stored; raises why not (the lease is lost, the store failed)."""
        while self.durable < version:
            if self.lost is not None:
                raise self.lost
            self._saved.clear()
            await self._saved.wait()
            if self._failure is not None and self.durable < version:
                raise self._failure

    async def flush(self) -> None:
        """Until everything marked so far is stored."""
        await self.wait_durable(self._version)

    async def aclose(self) -> None:
        """Stop writing (what is not flushed by now is not saved)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- the writer task -----------------------------------------------------------

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._dirty and not self._job_dirty:
                continue
            version = self._version
            indexes = list(self._dirty)
            self._dirty.clear()
            shards = [self._shard_record(index) for index in indexes]
            job = self._job_record() if self._job_dirty else None
            self._job_dirty = False
            try:
                await self.store.save(self.lease, job=job, shards=shards)
            except LeaseLostError as exc:
                log.warning("job %s: %s", self.lease.job_id, exc)
                self.lost = exc
                self._saved.set()
                self._on_lost(exc)
                return
            except ShardlineError as exc:
                log.error("job %s: saving %d record(s) failed: %s", self.lease.job_id, len(shards) + bool(job), exc)
                for index in indexes:  # carried again by the next batch
                    self._dirty.setdefault(index, None)
                self._job_dirty = self._job_dirty or job is not None
                self._failure = exc
                self._saved.set()
                continue
            self._failure = None
            for record in shards:
                self._on_saved(record)
            self.durable = max(self.durable, version)
            self._saved.set()
