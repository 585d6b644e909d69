# The store contract (DESIGN §2): boundary markers with their conditional put
# and fence, job and shard records, and leases -- one contract, two real
# implementations (SQLite, embedded; DynamoDB, on AWS) and a memory one for
# runs whose state need not outlive the process.
#
# Markers: a worker publishes its shard's boundary (first writer wins; the
# same value again is fine; another value is corruption; an attempt below
# the shard's fence is refused) and reads its neighbour's; the coordinator
# raises fences past attempts it gave up on.
#
# Jobs: a job is owned by one coordinator under a *lease* (owner, epoch,
# expiry).  Every write of a job's records names the lease it is made under
# and is refused (LeaseLostError) once another coordinator holds a newer
# epoch, so a stalled owner that wakes up is fenced.  An owner renews its
# leases while it lives; once one expires, any coordinator sharing the store
# may acquire it (the epoch goes up) and resume the job.
#
# Expiry (TTL): an expired item reads as absent and may be written over, in
# every store alike; DynamoDB deletes expired items lazily, SQLite when it
# opens, memory never has to.

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from ...protocol import JobRecord, Marker, ShardRecord

__all__ = ["DEFAULT_LEASE_S", "DEFAULT_RECORD_TTL_S", "JobStore", "Lease", "MarkerStore", "StoredJob"]

#: How long a lease lasts unless renewed; the owner renews it every third of that.
DEFAULT_LEASE_S = 30.0
#: How long a final job's records are kept after it finished.
DEFAULT_RECORD_TTL_S = 30 * 24 * 3600
#: Expiry of a running job's records: no job runs this long, yet an abandoned store is still reaped.
ACTIVE_RECORD_TTL_S = 365 * 24 * 3600


class MarkerStore(abc.ABC):
    """Boundary markers of every job, keyed by (job, shard)."""

    @abc.abstractmethod
    async def publish(self, marker: Marker) -> None:
        """Write `marker`, or confirm that an equal one is stored.

        Raises MarkerConflictError if another boundary is stored and
        StaleAttemptError if the shard is fenced above `marker.attempt`.
        """

    @abc.abstractmethod
    async def lookup(self, job_id: str, shard: int) -> Marker | None:
        """The stored marker of `shard`, or None if none is published (or it expired)."""

    @abc.abstractmethod
    async def raise_fence(self, job_id: str, shard: int, min_attempt: int) -> None:
        """Refuse marker writes of attempts below `min_attempt` from now on; the fence never moves down."""

    async def forget(self, job_id: str) -> None:  # noqa: B027 - expiry reaps them otherwise
        """Delete a finished job's markers now, where that is cheap (SQLite); otherwise their expiry reaps them."""

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """`owner`'s claim on `job_id` until `expires_at` (unix time); `epoch` counts the owners it had."""

    job_id: str
    owner: str
    epoch: int
    expires_at: float

    def valid(self, now: float, *, margin_s: float = 0.0) -> bool:
        """Whether the lease still holds at `now`, with `margin_s` to spare (our own clock)."""
        return now + margin_s < self.expires_at


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredJob:
    """A job's record as listed, with the lease on it (None: nobody holds one)."""

    record: JobRecord
    lease: Lease | None


class JobStore(abc.ABC):
    """Job and shard records, under leases."""

    #: True if the records survive the process (a restarted coordinator resumes).
    durable: bool
    #: Names where the records live, e.g. "sqlite /var/lib/shardline/shardline.db":
    #: two coordinators with the same identity share their jobs.
    identity: str

    @abc.abstractmethod
    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord], *, owner: str, lease_s: float) -> Lease:
        """Store a new job with `shards` (the coordinator gives none: a shard without
        a record is fresh, `protocol.shards_as_stored`), owned by `owner` from now on."""

    @abc.abstractmethod
    async def save(self, lease: Lease, *, job: JobRecord | None = None, shards: Sequence[ShardRecord] = ()) -> None:
        """Store `job` and/or `shards` under `lease`; LeaseLostError (and nothing stored) if it is not current.

        Records given together are stored together (in one transaction where
        the store has them; DynamoDB: in groups of 100).
        """

    @abc.abstractmethod
    async def acquire(self, job_id: str, *, owner: str, lease_s: float) -> Lease | None:
        """Take the job's lease if nobody holds it, it expired, or `owner` holds it already
        (a new epoch either way); None if another owner's lease is current or there is no such job."""

    @abc.abstractmethod
    async def renew(self, lease: Lease, *, lease_s: float) -> Lease:
        """Extend `lease`; LeaseLostError if another owner has taken the job over."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> None:
        """Give the job up (another coordinator may take it at once); a lost lease is a no-op."""

    @abc.abstractmethod
    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        """The job and its shards ordered by index, or None if unknown."""

    @abc.abstractmethod
    async def list_jobs(self) -> list[StoredJob]:
        """Every job's record and lease, oldest first (no shard records)."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its shards; a no-op for an unknown job."""

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def record_expiry(job: JobRecord, *, ttl_s: float) -> int:
    """When a job's records may be reaped: `ttl_s` after it finished, or far away while it runs."""
    if job.state.is_final:
        return int((job.finished_at if job.finished_at is not None else job.updated_at) + ttl_s)
    return int(time.time() + ACTIVE_RECORD_TTL_S)
