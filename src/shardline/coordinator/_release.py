# A job's output, released in order (DESIGN §1, §2).
#
# Shards are *released* in index order, each only once its commit is durable
# and its emitted range passed the tiling check, so nothing unverified is
# ever shown.  Released shards are published to the destination
# (`spec.output`), several at a time, and fed to the reduce command; the
# manifest is written last.
#
# A remote worker's committed output (Lambda: an S3 object) takes no detour
# through the coordinator when it need not: an S3 destination copies it
# server-side (S3 CopyObject) and records the checksum the worker reported.
# Only what the coordinator itself must read -- stdout, a reduce, a local
# destination -- is fetched into the spool, and that as soon as the shard
# commits, several at once, not at its release turn (with a reduce and an S3
# destination the parts are still copied by S3).  Every byte that does
# pass through is counted (`CoordinatorMetrics.output_bytes_relayed`).
#
# A destination is never mixed with an earlier job's files (DESIGN §9).  A
# job that may overwrite removes the earlier output's manifest before it
# writes anything, and the rest of that output only once its own manifest is
# in place; a job that fails removes only the names it may have written, so
# it never deletes an earlier job's files.

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Self

from ..errors import CommandFailedError, JobCancelledError, JobFailedError, ShardlineError, StorageError
from ..io import COPY_CHUNK_BYTES
from ..io.aio import wait_uncancellable
from ..io.command import CommandOutput
from ..io.urls import is_s3_url
from ..protocol import CommittedAttempt, Coverage, JobSpec, JobState, ShardRecord
from ._destination import MANIFEST_NAME, RESULT_NAME, Destination, part_name
from ._manifest import ManifestShard, build_manifest, file_checksum
from ._spool import LOCK_FILE

if TYPE_CHECKING:
    from ._job import Job

__all__ = ["OutputPiece", "ReduceRunner", "Release", "written_by_earlier_runs"]

log = logging.getLogger("shardline.coordinator.release")

#: How often a reader following a growing reduce result looks for more.
_FOLLOW_INTERVAL_S = 0.05
#: Remote outputs fetched, and parts written to a destination, at once per job.
_CONCURRENT_TRANSFERS = 8
#: A consumed output up to this size is unlinked on the loop (freeing its pages
#: takes microseconds); a larger one in a thread.
_UNLINK_ON_LOOP_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class OutputPiece:
    """Bytes [start, end) of the file at `path`, the next part of a job's output.

    Read it before asking the iterator for the next piece: a piece of the
    streaming head shard names a descriptor (``/dev/fd/N``) that the
    iterator closes when it moves past that shard."""

    path: str
    start: int
    end: int


class Release:
    """The ordered release of one job's output, its destination and its reduce."""

    def __init__(self, job: Job, destination: Destination | None, *, written_earlier: Collection[str]) -> None:
        self.job = job
        self.destination = destination
        succeeded = job.state is JobState.SUCCEEDED
        #: Shards [0, released) are verified and may be read.
        self.released = len(job.supervisor) if succeeded else 0
        self.result_path: str | None = job.record.result_path if succeeded else None
        self.result_done = succeeded
        #: Destination names this job may have written: what its failure removes.
        self._written = set(written_earlier)
        #: Remote outputs being brought into the spool, by shard, each started as it commits.
        self._fetches: dict[int, asyncio.Task[CommittedAttempt]] = {}
        self._fetching = True  # until run() ends: no fetch starts after it
        #: Fetched outputs whose S3 object is kept for a server-side copy into the destination.
        self._staged: dict[int, str] = {}
        self._fetch_slots = asyncio.Semaphore(_CONCURRENT_TRANSFERS)
        self._publish_slots = asyncio.Semaphore(_CONCURRENT_TRANSFERS)

    # -- releasing -------------------------------------------------------------------

    async def run(self) -> None:
        """Release every shard in order, then run the reduce and write the manifest."""
        job, supervisor = self.job, self.job.supervisor
        spec = job.spec
        if self.destination is not None and spec.overwrite:
            # Before any part is replaced: the earlier output stops claiming to be complete.
            await self.destination.remove_manifest()
        for index in range(len(supervisor)):  # what a resumed job committed before
            self.on_commit(index)
        coverage = Coverage(job.size)
        publishing: set[asyncio.Task[None]] = set()
        try:
            for index in range(len(supervisor)):
                committed = await job.committed_durably(index)
                shard_range = supervisor.range(index)
                coverage.admit(
                    index,
                    nominal=(shard_range.start, shard_range.end),
                    emitted=(committed.emitted_start, committed.emitted_end),
                )
                if index in self._fetches or self._needs_fetch(committed):
                    committed = await self._fetched(index)
                self.released = index + 1
                job.notify()
                if self.destination is not None and committed.published is None:
                    self._written.add(part_name(index))  # before: a failed write may still have landed
                    publishing.add(asyncio.create_task(self._publish_part(index, committed)))
                _raise_first_failure(publishing)
            coverage.finish()
            if publishing:
                await asyncio.wait(publishing)
                _raise_first_failure(publishing)
        finally:
            # A part's write must end before anything can remove it (Destination).
            await _cancel_all([*publishing, *self._fetches.values()])
            self._fetching = False
        result_bytes = await self._reduce() if spec.reduce is not None else None
        if self.destination is not None:
            await self._publish_manifest(result_bytes)
            if spec.overwrite:
                # Only now that this output is complete: whatever the earlier one had beyond it.
                await self.destination.remove_others(self._output_names())
        self.result_done = True

    # -- remote outputs and parts -------------------------------------------------------

    def on_commit(self, index: int) -> None:
        """Shard `index` committed: fetch its output now if it is remote and
        must come here (stdout, a reduce, a local destination), concurrently
        with the others, rather than at its release turn."""
        committed = self.job.supervisor.committed(index)
        if self._fetching and committed is not None and index not in self._fetches and self._needs_fetch(committed):
            self._fetches[index] = asyncio.create_task(self._fetch(index), name=f"fetch-{self.job.id}-{index}")

    def _needs_fetch(self, committed: CommittedAttempt) -> bool:
        """Whether a committed output must be brought into the spool.  Not when
        S3 can copy it into an S3 destination and nothing else here reads it:
        then no byte of it passes through the coordinator."""
        if not is_s3_url(committed.output_path):
            return False
        copied = self.destination is not None and self.destination.copies_remote_parts
        return not copied or self.job.spec.reduce is not None or committed.output_checksum is None

    async def _fetched(self, index: int) -> CommittedAttempt:
        if index not in self._fetches:
            self._fetches[index] = asyncio.create_task(self._fetch(index), name=f"fetch-{self.job.id}-{index}")
        return await self._fetches[index]

    async def _fetch(self, index: int) -> CommittedAttempt:
        """Bring a remote worker's committed output into the spool."""
        committed = await self.job.committed_durably(index)
        async with self._fetch_slots:
            local = self.job.spool_path(index, committed.attempt)
            bucket, key = self.job.context.s3_buckets.for_url(committed.output_path)
            await bucket.download_file(key, local, expected_bytes=committed.output_bytes)
            self.job.context.metrics.output_bytes_relayed["fetched"] += committed.output_bytes
            if self.destination is not None and self.destination.copies_remote_parts:
                self._staged[index] = committed.output_path  # its part is still copied by S3
            else:
                await self._delete_staged(committed.output_path)
            fetched = replace(committed, output_path=local)
            await self.job.update_committed(index, fetched)
        return fetched

    async def _publish_part(self, index: int, committed: CommittedAttempt) -> None:
        """Write shard `index`'s verified output to the destination: one still
        in S3 is copied by S3 (its checksum from the worker), a local file uploaded."""
        assert self.destination is not None
        metrics = self.job.context.metrics
        async with self._publish_slots:
            remote = committed.output_path if is_s3_url(committed.output_path) else self._staged.pop(index, None)
            # A remote output is fetched when its worker reported no checksum, so this reads a local file.
            checksum = committed.output_checksum or await file_checksum(committed.output_path)
            if remote is None:
                where = await self.destination.put_part(index, committed.output_path)
                metrics.output_bytes_relayed["uploaded"] += committed.output_bytes
                await self.job.update_committed(index, replace(committed, published=where, output_checksum=checksum))
                return
            where = await self.destination.copy_part(index, remote, size=committed.output_bytes)
            metrics.output_bytes_copied += committed.output_bytes
            # An output that was not fetched is the part from now on (a resumed job
            # finds it there), so the attempt's own object can go at once.
            output_path = where if committed.output_path == remote else committed.output_path
            published = replace(committed, output_path=output_path, published=where, output_checksum=checksum)
            await self.job.update_committed(index, published)
            await self._delete_staged(remote)

    async def _delete_staged(self, location: str) -> None:
        bucket, key = self.job.context.s3_buckets.for_url(location)
        with contextlib.suppress(ShardlineError):  # the job's staging sweep gets it otherwise
            await bucket.request("delete_object", Key=key)

    def _outputs(self) -> list[CommittedAttempt]:
        supervisor = self.job.supervisor
        return [c for c in (supervisor.committed(i) for i in range(len(supervisor))) if c is not None]

    async def _reduce(self) -> int:
        """Run the reduce command over every shard's output, in order: on its
        stdin, and as its arguments for merges (``sort -m "$@"``)."""
        job = self.job
        assert job.spec.reduce is not None
        outputs = [committed.output_path for committed in self._outputs()]
        path = os.path.join(job.record.spool_dir, f"result.{os.getpid()}.{time.monotonic_ns()}.out")
        env = {"SHARDLINE_JOB_ID": job.id, "SHARDLINE_SHARDS": str(job.spec.shards)}
        drop = job.context.settings.command_env_drop
        async with ReduceRunner(job.spec.reduce, path, env=env, drop_env=drop, args=outputs) as reduce:
            self.result_path = path  # readers follow it as it grows
            job.notify()
            for output in outputs:
                await reduce.feed_file(output)
            try:
                result_bytes = await reduce.finish()
            except CommandFailedError as exc:
                raise ShardlineError(f"reduce {exc}") from exc
        job.record = replace(job.record, result_path=path)
        return result_bytes

    async def _publish_manifest(self, result_bytes: int | None) -> None:
        job, supervisor = self.job, self.job.supervisor
        assert self.destination is not None
        result = None
        if self.result_path is not None:
            self._written.add(RESULT_NAME)
            result = await self.destination.put_result(self.result_path)
            job.context.metrics.output_bytes_relayed["uploaded"] += result_bytes or 0
        shards = []
        for index in range(len(supervisor)):
            committed = supervisor.committed(index)
            assert committed is not None and committed.published is not None
            shard_range = supervisor.range(index)
            shards.append(
                ManifestShard(
                    index=index,
                    range=(shard_range.start, shard_range.end),
                    emitted=(committed.emitted_start, committed.emitted_end),
                    bytes=committed.bytes,
                    checksum=committed.checksum,
                    attempt=committed.attempt,
                    part=committed.published,
                    output_bytes=committed.output_bytes,
                    output_checksum=committed.output_checksum or "",
                )
            )
        manifest = build_manifest(
            job_id=job.id,
            source=job.spec.source,
            size=job.size,
            etag=job.record.etag or "",
            delimiter=job.spec.delimiter,
            command=job.spec.command,
            reduce=job.spec.reduce,
            shards=shards,
            result=result,
            result_bytes=result_bytes,
        )
        self._written.add(MANIFEST_NAME)
        where = await self.destination.put_manifest(manifest)
        job.record = replace(job.record, manifest=where)

    def _output_names(self) -> set[str]:
        """The destination names of this job's complete output."""
        names = {part_name(index) for index in range(self.job.spec.shards)} | {MANIFEST_NAME}
        if self.job.spec.reduce is not None:
            names.add(RESULT_NAME)
        return names

    # -- cleaning up -------------------------------------------------------------------

    async def discard_outputs(self) -> None:
        """A failed or cancelled job leaves nothing that could pass for its
        output, and removes nothing it did not write."""
        if self.destination is not None:
            try:
                await self.destination.remove(self._written)
            except ShardlineError as exc:
                log.error("job %s: could not remove partial output at %s: %s", self.job.id, self.destination.url, exc)
        self.discard_spool()

    def sweep_spool(self) -> None:
        """Delete whatever stale attempts left in the spool: only committed
        outputs (and the reduce result) are kept."""
        spool = self.job.record.spool_dir
        keep = {committed.output_path for committed in self._outputs()}
        keep |= {self.result_path or "", os.path.join(spool, LOCK_FILE)}
        with contextlib.suppress(OSError), os.scandir(spool) as entries:
            for entry in entries:
                if entry.path not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def discard_spool(self) -> None:
        shutil.rmtree(self.job.record.spool_dir, ignore_errors=True)

    # -- reading the output ------------------------------------------------------------

    async def output(self, *, consume: bool = False) -> AsyncIterator[OutputPiece]:
        """The job's output in order, as it becomes available; raises at the
        end unless the job succeeded.  `consume` deletes each shard's file once
        the caller has taken it (a single reader that needs no replay)."""
        job = self.job
        if job.spec.reduce is not None:
            async for piece in self._follow_result():
                yield piece
        elif job.spec.output is None:
            for index in range(len(job.supervisor)):
                with _HeadStream(job, index) as head:
                    # The head of the order: its running attempt's output as it grows.
                    while not self._released_or_finished(index):
                        grown = head.more()
                        if grown is not None:
                            yield grown
                        await job.until(
                            functools.partial(self._released_or_finished, index), timeout_s=_FOLLOW_INTERVAL_S
                        )
                    if self.released <= index:
                        break
                    committed = job.supervisor.committed(index)
                    assert committed is not None
                    start = await head.resume_in(committed)
                if committed.output_bytes > start:
                    yield OutputPiece(committed.output_path, start, committed.output_bytes)
                if consume:
                    with contextlib.suppress(OSError):
                        if committed.output_bytes <= _UNLINK_ON_LOOP_BYTES:
                            os.unlink(committed.output_path)  # microseconds: cheaper than a thread hop
                        else:
                            # In a thread: freeing a big file's pages takes ~30 ms per 128 MiB
                            # on tmpfs, which would stall every shard still on this loop.
                            await asyncio.to_thread(os.unlink, committed.output_path)
        await job.finished.wait()
        self._raise_unless_succeeded()

    def _released_or_finished(self, index: int) -> bool:
        return self.released > index or self.job.finished.is_set()

    async def _follow_result(self) -> AsyncIterator[OutputPiece]:
        """Follow the reduce command's output file while it grows."""
        job = self.job
        await job.until(lambda: self.result_path is not None or job.finished.is_set())
        position = 0
        while True:
            complete = self.result_done or job.finished.is_set()
            path = self.result_path
            if path is None:
                return
            try:
                size = os.path.getsize(path)
            except OSError:
                size = position
            if size > position:
                yield OutputPiece(path, position, size)
                position = size
            if complete:
                return
            await job.until(lambda: self.result_done or job.finished.is_set(), timeout_s=_FOLLOW_INTERVAL_S)

    def _raise_unless_succeeded(self) -> None:
        job = self.job
        if job.state is JobState.SUCCEEDED:
            return
        if job.state is JobState.CANCELLED:
            raise JobCancelledError(job.error or f"job {job.id} was cancelled")
        raise JobFailedError(job.error or f"job {job.id} failed")


class _HeadStream:
    """Follows the output file of one running attempt of the head shard (the
    lowest shard not yet released), so a reader sees it as the command writes it.

    Bytes shown this way come from an attempt that has not committed yet; what
    makes that safe is `resume_in`: once the shard commits, the committed
    output must begin with exactly the bytes already shown (the same attempt,
    or another whose output has the same prefix, as a deterministic command's
    retry has), and the reader continues after them.  Otherwise the reader
    fails: what it wrote is incomplete, and says so by the error.  Until a
    byte is shown, an attempt that fails is simply replaced by the next one
    that runs.  The followed file is held open, so it stays readable (for the
    comparison) after a failed attempt's file is deleted.
    """

    def __init__(self, job: Job, index: int) -> None:
        self._job = job
        self._index = index
        self._attempt: int | None = None
        self._fd: int | None = None
        self.shown = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def more(self) -> OutputPiece | None:
        """The followed attempt's output written since the last call, if any."""
        if self._fd is None or (
            self.shown == 0 and self._attempt not in self._job.supervisor.live_attempts(self._index)
        ):
            self._close()
            if not self._follow():
                return None
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size <= self.shown:
            return None
        # The descriptor's own name: readable even after the file is deleted.
        piece = OutputPiece(f"/dev/fd/{self._fd}", self.shown, size)
        self.shown = size
        return piece

    def _follow(self) -> bool:
        """Start following the lowest running attempt whose output is a local file."""
        for attempt in self._job.supervisor.live_attempts(self._index):
            path = self._job.output_path(self._index, attempt)
            if is_s3_url(path):
                continue
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # not created yet, or already gone
            self._attempt = attempt
            return True
        return False

    async def resume_in(self, committed: CommittedAttempt) -> int:
        """Where a reader continues in `committed`'s output: after the bytes
        already shown, once they are proven to be its prefix."""
        shown = self.shown
        if shown == 0:
            return 0
        if shown > committed.output_bytes:
            raise JobFailedError(
                f"shard {self._index}: {shown} output bytes were shown from attempt {self._attempt}, but the "
                f"committed attempt {committed.attempt} has only {committed.output_bytes}: the output is incomplete"
            )
        if committed.attempt != self._attempt:
            assert self._fd is not None
            same = await asyncio.to_thread(_same_prefix, self._fd, committed.output_path, shown)
            if not same:
                raise JobFailedError(
                    f"shard {self._index}: the output shown so far came from attempt {self._attempt}, which did "
                    f"not commit, and differs from committed attempt {committed.attempt}'s: the output is incomplete"
                )
        return shown


def _same_prefix(fd: int, path: str, size: int) -> bool:
    """Whether the first `size` bytes of open file `fd` and of `path` are equal."""
    with open(path, "rb") as other:
        position = 0
        while position < size:
            count = min(COPY_CHUNK_BYTES, size - position)
            mine = os.pread(fd, count, position)
            if not mine or mine != other.read(len(mine)):
                return False
            position += len(mine)
    return True


class ReduceRunner:
    """``sh -c reduce`` run once on the coordinator; its stdout is written to
    `output_path`, its stdin is the shard outputs fed in order, and `args`
    (the shard output files, in order) are its ``"$@"`` so that a merge such
    as ``sort -m "$@"`` can read each shard's output separately.

    Use as an async context manager (entering starts it; leaving aborts it
    unless `finish()` was awaited), or call `start()`, `feed_file()` per
    shard output, then `finish()`.  A reduce that stops reading early
    (``head -1``) is fine: the rest of the input is skipped, not read.
    """

    def __init__(
        self,
        command: str,
        output_path: str,
        *,
        env: Mapping[str, str] | None = None,
        drop_env: Collection[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        self._output = CommandOutput(command, output_path, env=env, drop_env=drop_env, args=args)
        self._started = False

    async def __aenter__(self) -> Self:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._started = True
        await self._output.start()

    async def feed_file(self, path: str) -> None:
        """Stream the file at `path` into the command's stdin; returns once the
        pipe has taken it all (backpressure), or the command stopped reading."""
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, after any read in flight
        except OSError as exc:
            raise StorageError(f"cannot read {path} for the reduce: {exc.strerror or exc}") from exc
        with file:
            buffer = bytearray(COPY_CHUNK_BYTES)
            # Reusing the buffer is safe: write() returns once the pipe has the bytes.
            view = memoryview(buffer)
            while not self._output.bytes_dropped:
                read = asyncio.ensure_future(asyncio.to_thread(file.readinto, buffer))
                try:
                    # Never close the file under a read still running in a thread.
                    await wait_uncancellable(read)
                except OSError as exc:
                    raise StorageError(f"cannot read {path} for the reduce: {exc.strerror or exc}") from exc
                count = read.result()
                if not count:
                    return
                await self._output.write(view[:count])

    async def finish(self) -> int:
        """Close stdin and wait for the command; returns its output's size in bytes.

        Raises CommandFailedError (with its stderr tail) on a non-zero exit.
        """
        return await self._output.finish()

    async def aclose(self) -> None:
        """Kill the command unless finished; idempotent and cancellation-safe."""
        await self._output.aclose()


def written_by_earlier_runs(spec: JobSpec, shards: Sequence[ShardRecord]) -> set[str]:
    """Destination names that runs of this job before a coordinator restart
    may have written, judged from its stored shard records.

    The store records each part once it is written (`published`), and parts
    are written in order: so beyond the recorded ones, only the first
    unrecorded part -- or, once every part is recorded, the result and the
    manifest -- may have been written without the store learning of it.
    Those count only when the job does not overwrite: its destination was
    empty at submit, so whatever bears those names is its own.  With
    overwrite they may be the earlier output's, which a failed job leaves
    (the earlier manifest is removed as each run starts, so it never claims
    completeness again).
    """
    recorded = {shard.index for shard in shards if shard.committed is not None and shard.committed.published}
    names = {part_name(index) for index in recorded}
    if not spec.overwrite:
        first_unrecorded = next((index for index in range(spec.shards) if index not in recorded), None)
        if first_unrecorded is not None:
            names.add(part_name(first_unrecorded))
        else:
            names |= {RESULT_NAME, MANIFEST_NAME} if spec.reduce is not None else {MANIFEST_NAME}
    return names


def _raise_first_failure(tasks: set[asyncio.Task[None]]) -> None:
    """Raise the error of the first finished task that failed; forget the finished ones."""
    finished = [task for task in tasks if task.done()]
    tasks.difference_update(finished)
    errors = [error for task in finished if not task.cancelled() and (error := task.exception()) is not None]
    if errors:
        raise errors[0]


async def _cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended (its errors already seen, or moot)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await wait_uncancellable(asyncio.gather(*pending, return_exceptions=True))
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the release has raised it already, or no longer needs it
