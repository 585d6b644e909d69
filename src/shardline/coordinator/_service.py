# The coordinator service: many jobs, one exchange, one store.
#
# `Coordinator` is what `shardline serve` exposes over HTTP and what
# `shardline run` drives in-process.  It accepts jobs (statting the object
# once: size and ETag pin every later read), persists them before any worker
# starts, resumes unfinished ones after a restart, keeps finished jobs'
# outputs for `retain_s`, and drains on shutdown.  Each job's life is in
# `_job.Job`.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace

from ..errors import (
    ConfigurationError,
    JobNotFoundError,
    LeaseLostError,
    NotAcceptingJobsError,
    ShardlineError,
)
from ..io.aws import AwsSettings, ClientPool
from ..io.retry import retry
from ..io.s3bucket import S3Buckets
from ..io.sources import ObjectInfo, open_source
from ..io.store import JobStore, Lease, open_marker_store
from ..protocol import (
    COORDINATOR_KEY_BYTES,
    SHARDS_PAGE_DEFAULT,
    JobRecord,
    JobSpec,
    JobState,
    JobView,
    ShardRecord,
    ShardState,
    ShardView,
    new_coordinator_key,
    shards_as_stored,
    usable_shards,
)
from ._backends import Backend
from ._context import CoordinatorSettings, JobContext
from ._destination import Destination
from ._exchange import ExchangeServer
from ._job import Job, job_view, shard_views
from ._manifest import output_size
from ._metrics import CoordinatorMetrics, render_prometheus
from ._release import OutputPiece, written_by_earlier_runs
from ._spool import SpoolDir, choose_spool_dir, sweep_spools

__all__ = [
    "Coordinator",
]

log = logging.getLogger("shardline.coordinator")

#: Candidates an ambiguous job id prefix lists (the error must stay one line).
_MAX_LISTED_CANDIDATES = 10


class Coordinator:
    """Accepts jobs and runs them to verified output.  Use as an async context manager.

    The first of `backends` is the default; a job's `spec.backend` picks
    another by name.  The caller owns the backends and the exchange.
    Every job's exchange secret is derived from `coordinator_key` (random
    when None): a daemon passes the one kept in its state directory, so that
    an orphaned worker from before a restart is still told it is stale.

    Jobs are owned under leases in `store` by `owner` (random when None; a
    daemon passes the id kept in its state directory, so that when it
    restarts it takes its own jobs back at once).  Several coordinators may
    share one store: each renews its leases while it lives, and takes over
    unfinished jobs whose lease has run out.
    """

    def __init__(
        self,
        *,
        aws: AwsSettings,
        backends: Mapping[str, Backend],
        store: JobStore,
        exchange: ExchangeServer,
        settings: CoordinatorSettings = CoordinatorSettings(),
        coordinator_key: bytes | None = None,
        owner: str | None = None,
        clients: ClientPool | None = None,
    ) -> None:
        if not backends:
            raise ConfigurationError("the coordinator needs at least one backend")
        if coordinator_key is not None and len(coordinator_key) != COORDINATOR_KEY_BYTES:
            raise ConfigurationError(f"the coordinator key must be {COORDINATOR_KEY_BYTES} bytes")
        self.aws = aws
        self.backends = dict(backends)
        self.store = store
        self.exchange = exchange
        self.settings = settings
        self._coordinator_key = coordinator_key or new_coordinator_key()
        self.owner = owner or f"coordinator-{os.urandom(6).hex()}"
        self.metrics = CoordinatorMetrics()
        self.accepting = True
        self._jobs: dict[str, Job] = {}
        #: Destinations of submissions in progress (not yet in `_jobs`).
        self._claimed_destinations: set[str] = set()
        self._stack = AsyncExitStack()
        #: The S3 client that stats each submitted object and the marker
        #: store's DynamoDB client, made once (the caller's pool, if given).
        self._clients = clients
        self._s3_buckets = S3Buckets(aws, retry_policy=settings.retry)
        self._context: JobContext | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # jobs lost to other coordinators, stopping
        #: Submissions past their last `accepting` check whose job the store
        #: may already hold, not yet in `_jobs`: the close waits for them, so
        #: that it suspends every job it let in (none is left running).
        self._committing = 0
        self._none_committing = asyncio.Event()
        self._none_committing.set()
        #: Locked for as long as the job is known here (see _spool.py).
        self._spools: dict[str, SpoolDir] = {}

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._stack.push_async_callback(self._s3_buckets.aclose)
        if self._clients is None:
            self._clients = await self._stack.enter_async_context(ClientPool())
        markers = await self._stack.enter_async_context(
            open_marker_store(
                self.settings.markers, aws=self.aws, retry_policy=self.settings.retry, clients=self._clients
            )
        )
        self._context = JobContext(
            aws=self.aws,
            store=self.store,
            settings=self.settings,
            metrics=self.metrics,
            exchange_address=self.exchange.address,
            exchange_tls=self.exchange.tls,
            coordinator_key=self._coordinator_key,
            markers=markers,
            s3_buckets=self._s3_buckets,
        )
        self._janitor = asyncio.create_task(self._expire_finished_jobs(), name="coordinator-janitor")
        self._keeper = asyncio.create_task(self._keep_leases(), name="coordinator-leases")

    async def aclose(self) -> None:
        """Stop every running job's workers, leaving the jobs resumable (their leases
        are given up, so another coordinator sharing the store may take them at once)."""
        self.accepting = False
        for task in (self._janitor, self._keeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # A submission that got past its check is registered before the snapshot.
        await self._none_committing.wait()
        # A snapshot: a job lost to another coordinator meanwhile leaves
        # `_jobs` from its own stopping task (`_lost`), which is awaited too.
        jobs = list(self._jobs.values())
        await asyncio.gather(*(job.suspend() for job in jobs))
        for stopped in await asyncio.gather(*list(self._stopping), return_exceptions=True):
            if isinstance(stopped, Exception):
                log.warning("stopping a job lost to another coordinator failed: %s", stopped)
        for job in jobs:
            if not job.finished.is_set() and job.writer.lost is None:
                with contextlib.suppress(ShardlineError):
                    await self.store.release(job.writer.lease)
        for job in jobs:
            self.exchange.unregister(job.id)
            if job.destination is not None:
                await job.destination.aclose()
            if not self.store.durable:
                job.release.discard_spool()  # nothing will ever resume it or serve its output
        for spool in self._spools.values():
            spool.release()  # a durable store's jobs: left for the next coordinator to resume
        self._spools.clear()
        await self._stack.aclose()

    @property
    def context(self) -> JobContext:
        assert self._context is not None, "start() first"
        return self._context

    # -- jobs ---------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, ready: Awaitable[object] | None = None) -> JobView:
        """Accept `spec` and start it; errors about the request name the field.

        `ready`, if given, is awaited after the object's stat and before the
        job is created: what else must succeed before any attempt starts (an
        embedded run's marker-table check, made concurrently with the stat);
        its error is the submission's."""
        self._refuse_if_closing()
        self.settings.job_limits.check(spec)  # what was asked for, before -n is lowered to fit
        backend = self._backend(spec.backend)
        async with open_source(spec.source, self.aws, clients=self._clients) as source:
            # A throttled or briefly unreachable store is no reason to refuse
            # the job: the same retry loop as every other storage call.
            info = await retry(source.stat, policy=self.settings.retry, describe=f"stat {spec.source}")
            spec = replace(spec, shards=usable_shards(info.size, spec.shards, spec.min_shard_bytes))
        if ready is not None:
            await ready
        destination = await self._destination(spec, submitting=True)
        try:
            return await self._start_new_job(spec, info, backend, destination)
        except BaseException:
            if destination is not None:
                with contextlib.suppress(Exception):
                    await destination.remove(())  # a directory created by its check, if still empty
                await destination.aclose()
            raise
        finally:
            if destination is not None:
                self._claimed_destinations.discard(destination.url)

    def _refuse_if_closing(self) -> None:
        if not self.accepting:
            raise NotAcceptingJobsError("the coordinator is shutting down and accepts no new jobs")

    async def _start_new_job(
        self, spec: JobSpec, info: ObjectInfo, backend: Backend, destination: Destination | None
    ) -> JobView:
        # Checked again after the stat: a close that began meanwhile refuses
        # the job before the store has it (and the submitter is told so).
        self._refuse_if_closing()
        job_id = os.urandom(8).hex()
        # Chosen and created with no await in between: the next job's choice sees this one's reservation.
        root = self.settings.spool_dir or choose_spool_dir(
            info.size,
            memory_dir=self.settings.memory_spool_dir,
            memory_limit_bytes=self.settings.memory_spool_limit_bytes,
        )
        spool = SpoolDir.create(
            root,
            job_id=job_id,
            reserved_bytes=2 * info.size,
            resumable=self.store.durable,
            store=self.store.identity,
        )
        now = time.time()
        record = JobRecord(
            job_id=job_id,
            spec=spec,
            state=JobState.PENDING,
            created_at=now,
            updated_at=now,
            finished_at=None,
            size=info.size,
            etag=info.etag,
            spool_dir=spool.path,
        )
        # No shard records: a shard without one is fresh (one write, whatever the number of shards).
        shards = shards_as_stored(record, ())
        # From here the store may hold the job: the close waits until it is in `_jobs`.
        self._committing += 1
        self._none_committing.clear()
        try:
            try:
                lease = await self.store.create_job(record, (), owner=self.owner, lease_s=self.settings.lease_s)
            except BaseException:
                spool.remove()
                raise
            self._spools[job_id] = spool
            job = self._make_job(record, shards, backend, destination, lease, fresh=True)
            self._start(job)
        finally:
            self._committing -= 1
            if not self._committing:
                self._none_committing.set()
        log.info("job %s: %s, %d bytes, etag %s, %d shards", job_id, spec.source, info.size, info.etag, spec.shards)
        return job_view(job)

    async def resume(self) -> list[str]:
        """Load every job the store knows that is not here yet: finished ones to be
        shown, unfinished ones whose lease is free, run out or ours, to be resumed
        under a new lease.  Returns the resumed jobs' ids."""
        resumed = []
        now = time.time()
        for stored in await self.store.list_jobs():
            job_id = stored.record.job_id
            if job_id in self._jobs:
                continue
            lease = None
            if not stored.record.state.is_final:
                held = stored.lease
                if held is not None and held.owner != self.owner and held.valid(now):
                    continue  # another coordinator's, for now
                lease = await self.store.acquire(job_id, owner=self.owner, lease_s=self.settings.lease_s)
                if lease is None:
                    continue
            if await self._load(job_id, lease):
                resumed.append(job_id)
        if resumed:
            log.warning("resumed %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
        return resumed

    async def _load(self, job_id: str, lease: Lease | None) -> bool:
        """Load one job; run it again if `lease` (ours now) is given.  True if it runs."""
        loaded = await self.store.load_job(job_id)
        if loaded is None:
            return False
        record, stored = loaded
        shards = shards_as_stored(record, stored)
        # A job whose spool another live coordinator holds (one that lost the
        # job and has not noticed yet) gets a new spool: the old one's outputs
        # are not ours to read, so its committed shards run again.
        if not self._relock_spool(record):
            if lease is None:
                return False
            record, shards = await self._new_spool(record, shards, lease)
        # From the records as stored: a shard whose output must be redone was still published.
        written = written_by_earlier_runs(record.spec, shards)
        shards = [await self._check_kept_output(record, shard) for shard in shards]
        try:
            backend = self._backend(record.spec.backend)
            destination = await self._destination(record.spec, submitting=False) if lease is not None else None
        except ConfigurationError as exc:
            log.error("job %s cannot be resumed: %s", record.job_id, exc)
            return False
        job = self._make_job(record, shards, backend, destination, lease, fresh=False, written_earlier=written)
        self._jobs[job.id] = job
        if lease is None:
            return False
        self._start(job)
        done = sum(shard.state is ShardState.DONE for shard in shards)
        log.info(
            "job %s resumed (lease epoch %d): %d of %d shards already committed", job.id, lease.epoch, done, len(shards)
        )
        return True

    async def _new_spool(
        self, record: JobRecord, shards: list[ShardRecord], lease: Lease
    ) -> tuple[JobRecord, list[ShardRecord]]:
        old = record.spool_dir
        root = self.settings.spool_dir or choose_spool_dir(
            record.size or 0,
            memory_dir=self.settings.memory_spool_dir,
            memory_limit_bytes=self.settings.memory_spool_limit_bytes,
        )
        spool = SpoolDir.create(
            root,
            job_id=record.job_id,
            reserved_bytes=2 * (record.size or 0),
            resumable=self.store.durable,
            store=self.store.identity,
        )
        self._spools[record.job_id] = spool
        record = replace(record, spool_dir=spool.path)
        kept = [
            shard
            if shard.committed is None or not shard.committed.output_path.startswith(old + os.sep)
            else replace(shard, state=ShardState.PENDING, committed=None, error=None)
            for shard in shards
        ]
        await self.store.save(lease, job=record)
        log.warning("job %s: its spool %s is still held by another process; using %s", record.job_id, old, spool.path)
        return record, kept

    async def _keep_leases(self) -> None:
        """Renew our jobs' leases every third of their length, and take over jobs whose lease ran out."""
        interval_s = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(interval_s)
            for job in list(self._jobs.values()):
                if job.finished.is_set() or job.writer.lost is not None:
                    continue
                try:
                    await job.renew_lease()
                except LeaseLostError:
                    pass  # the job stops itself (_lost)
                except ShardlineError as exc:  # the store is unreachable for now: the lease may still hold
                    log.warning("job %s: renewing its lease failed: %s", job.id, exc)
            if self.accepting:
                try:
                    await self.resume()
                except ShardlineError as exc:
                    log.warning("looking for jobs to take over failed: %s", exc)

    def _make_job(
        self,
        record: JobRecord,
        shards: list[ShardRecord],
        backend: Backend,
        destination: Destination | None,
        lease: Lease | None,
        *,
        fresh: bool,
        written_earlier: Collection[str] = (),
    ) -> Job:
        return Job(
            record=record,
            shards=shards,
            backend=backend,
            destination=destination,
            context=self.context,
            lease=lease,
            fresh=fresh,
            written_earlier=written_earlier,
            on_lost=self._lost,
        )

    def _lost(self, job: Job, exc: LeaseLostError) -> None:
        """`job` is another coordinator's now: stop it here without deciding anything."""

        async def stop() -> None:
            await job.suspend()
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]
                self.exchange.unregister(job.id)
            spool = self._spools.pop(job.id, None)
            if spool is not None:
                spool.release()  # the files stay: the new owner may not read them, nor may we delete them

        task = asyncio.create_task(stop(), name=f"lost-{job.id}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _relock_spool(self, record: JobRecord) -> bool:
        """Take the lock of a resumed job's spool (an unfinished job's is
        created if missing); False if another live coordinator holds it."""
        if record.job_id in self._spools:
            return True  # held since an earlier resume()
        if record.state.is_final and not os.path.isdir(record.spool_dir):
            return True  # nothing kept (a failed job's outputs are removed)
        spool = SpoolDir.relock(
            record.spool_dir,
            job_id=record.job_id,
            reserved_bytes=2 * (record.size or 0),
            resumable=self.store.durable,
            store=self.store.identity,
        )
        if spool is None:
            log.warning("job %s not resumed: another coordinator holds its spool %s", record.job_id, record.spool_dir)
            return False
        self._spools[record.job_id] = spool
        return True

    async def sweep_spools(self) -> list[str]:
        """Remove the spool directories that no live coordinator holds (see
        _spool.py); call it after `resume()`.  Returns the removed paths."""
        roots = [self.settings.memory_spool_dir, tempfile.gettempdir()]
        if self.settings.spool_dir is not None:
            roots.append(self.settings.spool_dir)
        store = self.store.identity if self.store.durable else None
        return await asyncio.to_thread(sweep_spools, roots, store=store)

    async def _check_kept_output(self, record: JobRecord, shard: ShardRecord) -> ShardRecord:
        """A committed shard whose output is gone (e.g. the spool did not
        survive a reboot) must run again."""
        committed = shard.committed
        if committed is None or record.state.is_final:
            return shard
        try:
            intact = await output_size(committed.output_path, self._s3_buckets) == committed.output_bytes
        except (OSError, ShardlineError):
            intact = False
        if intact:
            return shard
        log.warning(
            "job %s shard %d: committed output %s is gone; running it again",
            record.job_id,
            shard.index,
            committed.output_path,
        )
        return replace(shard, state=ShardState.PENDING, committed=None, error=None)

    def _start(self, job: Job) -> None:
        self._jobs[job.id] = job
        self.exchange.register(job.id, job.exchange_secret, job)
        job.start()

    def _backend(self, name: str | None) -> Backend:
        if name is None:
            return next(iter(self.backends.values()))
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(self.backends)
            raise ConfigurationError(
                f"field 'backend': unknown backend {name!r} (this coordinator has: {known})"
            ) from None

    async def _destination(self, spec: JobSpec, *, submitting: bool) -> Destination | None:
        """The job's destination, once the output policy allows it and (when
        `submitting`) no running job writes it and it is empty or may be overwritten."""
        if spec.output is None:
            return None
        from ._outputs import open_destination  # S3 and directory writers: only a job with an output loads them

        destination = open_destination(spec.output, self.aws, retry_policy=self.settings.retry)
        try:
            await asyncio.to_thread(self.settings.output_policy.check, spec.output)
            if submitting:
                self._claim_destination(destination.url)
            try:
                await destination.check(require_empty=submitting and not spec.overwrite)
            except BaseException:
                self._claimed_destinations.discard(destination.url)
                raise
        except BaseException:
            await destination.aclose()
            raise
        return destination

    def _claim_destination(self, url: str) -> None:
        """Refuse a destination that another unfinished job of this coordinator writes."""
        for job in self._jobs.values():
            if job.destination is not None and job.destination.url == url and not job.finished.is_set():
                raise ConfigurationError(
                    f"field 'output': job {job.id} is still writing to {url}; wait for it to finish or cancel it"
                )
        if url in self._claimed_destinations:
            raise ConfigurationError(f"field 'output': another job being submitted writes to {url}")
        self._claimed_destinations.add(url)

    def _job(self, job_id: str) -> Job:
        """Job `job_id`, or the one job whose id starts with it (ids are long to type)."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        candidates = sorted(known for known in self._jobs if job_id and known.startswith(job_id))
        if len(candidates) == 1:
            return self._jobs[candidates[0]]
        if not candidates:
            raise JobNotFoundError(f"no job {job_id!r}")
        shown = ", ".join(candidates[:_MAX_LISTED_CANDIDATES])
        more = (
            f" and {len(candidates) - _MAX_LISTED_CANDIDATES} more" if len(candidates) > _MAX_LISTED_CANDIDATES else ""
        )
        raise ConfigurationError(f"job id prefix {job_id!r} is ambiguous: it starts {shown}{more}")

    def view(self, job_id: str, *, limit: int = SHARDS_PAGE_DEFAULT) -> JobView:
        """The job's counts and its first `limit` shards."""
        return job_view(self._job(job_id), limit=limit)

    def command_logs(self, job_id: str, shard: int | None = None) -> str:
        """The stderr its commands printed, per shard attempt (as far as the backend saw it and it is kept)."""
        job = self._job(job_id)  # a unique prefix names it too
        if shard is not None and not 0 <= shard < job.spec.shards:
            raise ConfigurationError(f"shard {shard}: job {job.id} has shards 0 to {job.spec.shards - 1}")
        return job.backend.command_stderr(job.id, shard)

    def views(self) -> list[JobView]:
        """Every job known here, newest first, without shards (their counts only)."""
        jobs = sorted(self._jobs.values(), key=lambda job: job.record.created_at, reverse=True)
        return [job_view(job, limit=0) for job in jobs]

    def shards(self, job_id: str, *, offset: int, limit: int) -> tuple[ShardView, ...]:
        """Shards [offset, offset + limit) of the job, as its view shows them (fewer at the end)."""
        return shard_views(self._job(job_id), offset, limit)

    async def cancel(self, job_id: str) -> JobView:
        job = self._job(job_id)
        await job.cancel()
        return job_view(job)

    async def wait(self, job_id: str) -> JobView:
        job = self._job(job_id)
        await job.finished.wait()
        return job_view(job)

    async def output(self, job_id: str, *, consume: bool = False) -> AsyncIterator[OutputPiece]:
        """The job's ordered output (or reduce result) as it is produced.

        Raises JobNotFoundError at once, and JobFailedError or
        JobCancelledError after the last piece unless the job succeeded.
        """
        job = self._job(job_id)
        async for piece in job.release.output(consume=consume):
            yield piece

    # -- operations -------------------------------------------------------------------

    def metrics_text(self) -> str:
        jobs = Counter(job.state.value for job in self._jobs.values())
        shards: Counter[ShardState] = Counter()
        for job in self._jobs.values():  # O(jobs x states): the counts are kept as shards change
            shards.update(job.supervisor.state_counts())
        return render_prometheus(
            self.metrics,
            jobs_by_state={state.value: jobs.get(state.value, 0) for state in JobState},
            shards_by_state={state.value: shards[state] for state in ShardState},
            exchange_refused=self.exchange.refused,
            handshake_wait_s=self.exchange.handshake_wait_s,
        )

    async def drain(self, timeout_s: float) -> None:
        """Take no new jobs; give running ones `timeout_s` to finish, then stop
        their workers and leave them to be resumed by the next start."""
        self.accepting = False
        running = [job.finished.wait() for job in self._jobs.values() if not job.finished.is_set()]
        if running:
            log.info("draining: waiting up to %.0fs for %d running job(s)", timeout_s, len(running))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*running), timeout_s)
        await asyncio.gather(*(job.suspend() for job in self._jobs.values()))

    async def _expire_finished_jobs(self) -> None:
        interval_s = min(60.0, max(self.settings.retain_s / 4, 0.05))
        while True:
            await asyncio.sleep(interval_s)
            now = time.time()
            for job in list(self._jobs.values()):
                if job.finished_at is not None and now - job.finished_at > self.settings.retain_s:
                    self.forget(job.id)
                    with contextlib.suppress(Exception):
                        await self.store.delete_job(job.id)

    def forget(self, job_id: str) -> None:
        """Drop a finished job and its kept output."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self.exchange.unregister(job_id)
            job.release.discard_spool()
            forgetting = asyncio.ensure_future(self.context.markers.forget(job_id))
            forgetting.add_done_callback(lambda task: task.cancelled() or task.exception())
        spool = self._spools.pop(job_id, None)
        if spool is not None:
            spool.release()
