# The embedded store: one SQLite file (standard library `sqlite3`, WAL) in
# the state directory, holding markers, job and shard records and leases.
#
# Several processes share it safely: every write is one `BEGIN IMMEDIATE`
# transaction (the file's write lock, waited for up to `busy_timeout_s`),
# so the marker put rule, a lease check and the records it guards are
# decided and written atomically.  WAL with `synchronous=NORMAL` keeps every
# committed transaction through a `kill -9` of any or all processes (only
# an OS crash may lose the last few).  Calls run in one thread per store
# object, so the event loop never waits on the file.
#
# Expired rows read as absent and are written over; rows that expired more
# than a day ago are deleted when a store opens the file.

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ...errors import ConfigurationError, LeaseLostError, StorageError, StorageTimeoutError
from ...protocol import MARKER_TTL_S, Boundary, JobRecord, Marker, ShardRecord
from ..retry import RetryPolicy, retry
from ._contract import (
    ACTIVE_RECORD_TTL_S,
    DEFAULT_RECORD_TTL_S,
    JobStore,
    Lease,
    MarkerStore,
    StoredJob,
    record_expiry,
)

__all__ = ["SqliteDatabase", "SqliteJobStore", "SqliteMarkerStore"]

T = TypeVar("T")

#: How long a writer waits for another process's transaction before the retry loop takes over.
DEFAULT_BUSY_TIMEOUT_S = 10.0
#: Rows this long past their expiry are deleted when the file is opened.
_PURGE_AFTER_S = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS markers (
    job TEXT NOT NULL, shard INTEGER NOT NULL,
    attempt INTEGER, start INTEGER, head_end INTEGER, line_start INTEGER, etag TEXT,
    fence INTEGER NOT NULL DEFAULT 0, expires_at INTEGER NOT NULL,
    PRIMARY KEY (job, shard)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, record TEXT NOT NULL, created_at REAL NOT NULL,
    lease_owner TEXT, lease_epoch INTEGER NOT NULL DEFAULT 0, lease_expires REAL NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS shards (
    job TEXT NOT NULL, shard INTEGER NOT NULL, record TEXT NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (job, shard)
) WITHOUT ROWID;
"""


class SqliteDatabase:
    """One SQLite file, opened on first use, used from one thread of its own."""

    def __init__(self, path: str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = os.path.abspath(path)
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardline-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    async def run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """`operation(connection)` in the database's thread; SQLite errors become StorageErrors."""
        if self._closed:
            raise RuntimeError(f"the SQLite store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, operation)

    def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return operation(self._connect())
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StorageTimeoutError(f"SQLite store {self.path}: {exc}") from exc
            raise StorageError(f"SQLite store {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"SQLite store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            directory = os.path.dirname(self.path)
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                # Private: the records name commands and paths.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
                os.close(fd)
            except OSError as exc:
                raise ConfigurationError(f"cannot open the SQLite store {self.path}: {exc.strerror or exc}") from exc
            # Autocommit: every write opens its own BEGIN IMMEDIATE transaction.
            connection = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            with _transaction(connection):
                cutoff = int(time.time() - _PURGE_AFTER_S)
                for table in ("markers", "jobs", "shards"):
                    connection.execute(f"DELETE FROM {table} WHERE expires_at < ?", (cutoff,))
            self._connection = connection
        return self._connection

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock, now) ... COMMIT, or ROLLBACK on any error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


# --- markers --------------------------------------------------------------------


class SqliteMarkerStore(MarkerStore):
    """Markers in a SQLite file; the put rule (`Marker.must_write`) runs inside the write transaction."""

    def __init__(self, database: SqliteDatabase, *, retry_policy: RetryPolicy, ttl_s: int = MARKER_TTL_S) -> None:
        self._db = database
        self._retry = retry_policy
        self._ttl_s = ttl_s

    async def publish(self, marker: Marker) -> None:
        now = int(time.time())

        def put(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                fence, stored = _marker_row(connection, marker.job_id, marker.shard, now)
                if not marker.must_write(stored=stored, fence=fence):
                    return
                b = marker.boundary
                connection.execute(
                    "INSERT INTO markers (job, shard, attempt, start, head_end, line_start, etag, fence, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, shard) DO UPDATE SET"
                    " attempt = excluded.attempt, start = excluded.start, head_end = excluded.head_end,"
                    " line_start = excluded.line_start, etag = excluded.etag, expires_at = excluded.expires_at",
                    (
                        marker.job_id,
                        marker.shard,
                        marker.attempt,
                        b.start,
                        b.head_end,
                        int(b.line_start),
                        marker.etag,
                        fence,
                        now + self._ttl_s,
                    ),
                )

        what = f"marker write for job {marker.job_id} shard {marker.shard} attempt {marker.attempt}"
        await retry(lambda: self._db.run(put), policy=self._retry, describe=what)

    async def lookup(self, job_id: str, shard: int) -> Marker | None:
        now = int(time.time())
        _, stored = await retry(
            lambda: self._db.run(lambda c: _marker_row(c, job_id, shard, now)),
            policy=self._retry,
            describe=f"marker read for job {job_id} shard {shard}",
        )
        return stored

    async def raise_fence(self, job_id: str, shard: int, min_attempt: int) -> None:
        now = int(time.time())

        def fence(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                current, _ = _marker_row(connection, job_id, shard, now)
                if min_attempt <= current:
                    return
                connection.execute(
                    "INSERT INTO markers (job, shard, fence, expires_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (job, shard) DO UPDATE SET fence = excluded.fence",
                    (job_id, shard, min_attempt, now + self._ttl_s),
                )

        what = f"raising the marker fence of job {job_id} shard {shard} to attempt {min_attempt}"
        await retry(lambda: self._db.run(fence), policy=self._retry, describe=what)

    async def forget(self, job_id: str) -> None:
        def delete(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute("DELETE FROM markers WHERE job = ?", (job_id,))

        await retry(lambda: self._db.run(delete), policy=self._retry, describe=f"deleting the markers of job {job_id}")

    async def aclose(self) -> None:
        await self._db.aclose()


def _marker_row(connection: sqlite3.Connection, job_id: str, shard: int, now: int) -> tuple[int, Marker | None]:
    """The (fence, marker) stored for a shard; an expired row is deleted and reads as (0, None)."""
    row = connection.execute(
        "SELECT attempt, start, head_end, line_start, etag, fence, expires_at FROM markers WHERE job = ? AND shard = ?",
        (job_id, shard),
    ).fetchone()
    if row is None:
        return 0, None
    attempt, start, head_end, line_start, etag, fence, expires_at = row
    if expires_at < now:
        if connection.in_transaction:
            connection.execute("DELETE FROM markers WHERE job = ? AND shard = ?", (job_id, shard))
        return 0, None
    if head_end is None:
        return fence, None  # only a fence: no marker yet
    boundary = Boundary(start=start, head_end=head_end, line_start=bool(line_start))
    return fence, Marker(job_id=job_id, shard=shard, attempt=attempt, boundary=boundary, etag=etag)


# --- jobs -------------------------------------------------------------------------


class SqliteJobStore(JobStore):
    """Job and shard records and their leases in a SQLite file."""

    durable = True

    def __init__(
        self, database: SqliteDatabase, *, retry_policy: RetryPolicy, ttl_s: float = DEFAULT_RECORD_TTL_S
    ) -> None:
        self._db = database
        self._retry = retry_policy
        self._ttl_s = ttl_s
        self.identity = f"sqlite {database.path}"

    async def _run(self, operation: Callable[[sqlite3.Connection], T], what: str) -> T:
        return await retry(lambda: self._db.run(operation), policy=self._retry, describe=what)

    async def create_job(self, job: JobRecord, shards: Sequence[ShardRecord], *, owner: str, lease_s: float) -> Lease:
        now = time.time()
        lease = Lease(job_id=job.job_id, owner=owner, epoch=1, expires_at=now + lease_s)

        def create(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute(
                    "INSERT INTO jobs (job, record, created_at, lease_owner, lease_epoch, lease_expires, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.job_id,
                        job.to_json(),
                        job.created_at,
                        owner,
                        lease.epoch,
                        lease.expires_at,
                        record_expiry(job, ttl_s=self._ttl_s),
                    ),
                )
                _put_shards(connection, shards, now)

        await self._run(create, f"creating job {job.job_id}")
        return lease

    async def save(self, lease: Lease, *, job: JobRecord | None = None, shards: Sequence[ShardRecord] = ()) -> None:
        now = time.time()

        def save(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                _check_lease(connection, lease)
                if job is not None:
                    connection.execute(
                        "UPDATE jobs SET record = ?, expires_at = ? WHERE job = ?",
                        (job.to_json(), record_expiry(job, ttl_s=self._ttl_s), job.job_id),
                    )
                _put_shards(connection, shards, now)

        await self._run(save, f"saving job {lease.job_id}")

    async def acquire(self, job_id: str, *, owner: str, lease_s: float) -> Lease | None:
        def acquire(connection: sqlite3.Connection) -> Lease | None:
            now = time.time()
            with _transaction(connection):
                row = connection.execute(
                    "SELECT lease_owner, lease_epoch, lease_expires FROM jobs WHERE job = ? AND expires_at >= ?",
                    (job_id, int(now)),
                ).fetchone()
                if row is None:
                    return None
                holder, epoch, expires = row
                if holder is not None and holder != owner and expires > now:
                    return None
                lease = Lease(job_id=job_id, owner=owner, epoch=epoch + 1, expires_at=now + lease_s)
                connection.execute(
                    "UPDATE jobs SET lease_owner = ?, lease_epoch = ?, lease_expires = ? WHERE job = ?",
                    (owner, lease.epoch, lease.expires_at, job_id),
                )
                return lease

        return await self._run(acquire, f"acquiring job {job_id}")

    async def renew(self, lease: Lease, *, lease_s: float) -> Lease:
        def renew(connection: sqlite3.Connection) -> Lease:
            with _transaction(connection):
                _check_lease(connection, lease)
                renewed = Lease(
                    job_id=lease.job_id, owner=lease.owner, epoch=lease.epoch, expires_at=time.time() + lease_s
                )
                connection.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE job = ?", (renewed.expires_at, lease.job_id)
                )
                return renewed

        return await self._run(renew, f"renewing the lease on job {lease.job_id}")

    async def release(self, lease: Lease) -> None:
        def release(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute(
                    "UPDATE jobs SET lease_owner = NULL, lease_expires = 0"
                    " WHERE job = ? AND lease_owner = ? AND lease_epoch = ?",
                    (lease.job_id, lease.owner, lease.epoch),
                )

        await self._run(release, f"releasing job {lease.job_id}")

    async def load_job(self, job_id: str) -> tuple[JobRecord, list[ShardRecord]] | None:
        def load(connection: sqlite3.Connection) -> tuple[str, list[str]] | None:
            now = int(time.time())
            row = connection.execute(
                "SELECT record FROM jobs WHERE job = ? AND expires_at >= ?", (job_id, now)
            ).fetchone()
            if row is None:
                return None
            shards = connection.execute(
                "SELECT record FROM shards WHERE job = ? AND expires_at >= ? ORDER BY shard", (job_id, now)
            ).fetchall()
            return row[0], [text for (text,) in shards]

        loaded = await self._run(load, f"loading job {job_id}")
        if loaded is None:
            return None
        job, shards = loaded
        return JobRecord.from_json(job), [ShardRecord.from_json(text) for text in shards]

    async def list_jobs(self) -> list[StoredJob]:
        def rows(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(
                "SELECT job, record, lease_owner, lease_epoch, lease_expires FROM jobs"
                " WHERE expires_at >= ? ORDER BY created_at",
                (int(time.time()),),
            ).fetchall()

        return [
            StoredJob(
                record=JobRecord.from_json(record),
                lease=Lease(job_id=job, owner=owner, epoch=epoch, expires_at=expires) if owner else None,
            )
            for job, record, owner, epoch, expires in await self._run(rows, "listing jobs")
        ]

    async def delete_job(self, job_id: str) -> None:
        def delete(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute("DELETE FROM shards WHERE job = ?", (job_id,))
                connection.execute("DELETE FROM jobs WHERE job = ?", (job_id,))

        await self._run(delete, f"deleting job {job_id}")

    async def aclose(self) -> None:
        await self._db.aclose()


def _check_lease(connection: sqlite3.Connection, lease: Lease) -> None:
    row = connection.execute("SELECT lease_owner, lease_epoch FROM jobs WHERE job = ?", (lease.job_id,)).fetchone()
    if row is None or tuple(row) != (lease.owner, lease.epoch):
        holder = "nobody" if row is None or row[0] is None else f"{row[0]} (epoch {row[1]})"
        raise LeaseLostError(
            f"job {lease.job_id} is no longer ours ({lease.owner}, epoch {lease.epoch}): it is held by {holder}"
        )


def _put_shards(connection: sqlite3.Connection, shards: Sequence[ShardRecord], now: float) -> None:
    expires_at = int(now + ACTIVE_RECORD_TTL_S)
    connection.executemany(
        "INSERT INTO shards (job, shard, record, expires_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (job, shard) DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at",
        [(shard.job_id, shard.index, shard.to_json(), expires_at) for shard in shards],
    )
