# One job with an in-process coordinator (what `shardline run` does, and
# tests): submit, stream the ordered output to a file object, report.

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from ..io import COPY_CHUNK_BYTES
from ..io.aws import AwsSettings, ClientPool
from ..io.store import MemoryJobStore
from ..protocol import (
    JobSpec,
)
from ._backends import Backend
from ._context import CoordinatorSettings
from ._exchange import ExchangeServer
from ._release import OutputPiece
from ._service import Coordinator

__all__ = ["JobProgress", "JobReport", "ShardReport", "copy_piece", "run_job"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardReport:
    index: int
    attempt: int
    emitted: tuple[int, int]
    bytes: int
    checksum: str
    output_bytes: int
    tail_sources: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobReport:
    job_id: str
    size: int
    etag: str
    shards: tuple[ShardReport, ...]
    output_bytes: int
    elapsed_s: float
    retries: int
    #: Output bytes that passed through the coordinator, by way (fetched from
    #: remote workers, uploaded to the destination): zero for remote workers
    #: writing to an S3 destination.
    relayed_output_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def tail_source_counts(self) -> dict[str, int]:
        return dict(Counter(source for shard in self.shards for source in shard.tail_sources))


@dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot for progress displays."""

    shards: int
    shards_done: int
    bytes_emitted: int
    size: int
    elapsed_s: float


async def run_job(
    spec: JobSpec,
    *,
    aws: AwsSettings,
    backend: Backend,
    exchange: ExchangeServer,
    out: BinaryIO,
    settings: CoordinatorSettings = CoordinatorSettings(),
    on_start: Callable[[Callable[[], JobProgress]], None] | None = None,
    clients: ClientPool | None = None,
    ready: Awaitable[object] | None = None,
) -> JobReport:
    """Run one job with an in-process coordinator, writing its ordered output to `out`.

    `clients`: the caller's AWS clients to use (and leave open), if any.
    `ready`: awaited after the object's stat, before any attempt starts
    (see `Coordinator.submit`).

    `on_start` receives a function returning a JobProgress snapshot.  Raises
    JobFailedError (naming the shard and cause) or a ShardlineError about the
    input; never returns with unverified output.
    """
    started = time.monotonic()
    async with Coordinator(
        aws=aws,
        backends={backend.name: backend},
        store=MemoryJobStore(),
        exchange=exchange,
        settings=settings,
        clients=clients,
    ) as coordinator:
        await coordinator.sweep_spools()  # what earlier runs, killed, left behind
        view = await coordinator.submit(spec, ready=ready)
        job_id = view.id
        if on_start is not None:

            def progress() -> JobProgress:
                current = coordinator.view(job_id, limit=0)
                return JobProgress(
                    shards=current.spec.shards,
                    shards_done=current.shards_done,
                    bytes_emitted=current.bytes_emitted,
                    size=current.size or 0,
                    elapsed_s=time.monotonic() - started,
                )

            on_start(progress)
        written = 0
        try:
            async for piece in coordinator.output(job_id, consume=True):
                if _copies_at_once(out, piece.end - piece.start):
                    written += copy_piece(piece, out)  # a thread hop per shard would cost more
                else:
                    written += await asyncio.to_thread(copy_piece, piece, out)
            final = coordinator.view(job_id)
            supervisor = coordinator._job(job_id).supervisor
            committed = [supervisor.committed(index) for index in range(len(supervisor))]
            relayed = dict(coordinator.metrics.output_bytes_relayed)  # this coordinator runs only this job
        finally:
            await coordinator.cancel(job_id)  # no-op once finished; stops workers on error
            coordinator.forget(job_id)
    return JobReport(
        job_id=job_id,
        size=final.size or 0,
        etag=final.etag or "",
        shards=tuple(
            ShardReport(
                index=index,
                attempt=c.attempt,
                emitted=(c.emitted_start, c.emitted_end),
                bytes=c.bytes,
                checksum=c.checksum,
                output_bytes=c.output_bytes,
                tail_sources=c.tail_sources,
            )
            for index, c in enumerate(committed)
            if c is not None
        ),
        output_bytes=written,
        elapsed_s=time.monotonic() - started,
        retries=final.retries,
        relayed_output_bytes=relayed,
    )


#: A piece up to this size is copied on the event loop when the copy cannot
#: wait on a reader (`_copies_at_once`); larger ones, and any other `out`, in a thread.
_COPY_ON_LOOP_BYTES = 64 * 1024


def _copies_at_once(out: BinaryIO, size: int) -> bool:
    """Whether copying `size` bytes to `out` returns without waiting: a small
    piece into a regular file (the page cache takes it).  Not a pipe, however
    empty it looks: pieces are spliced into it page by page, and a pipe
    holding 16 small pieces is full, so a slow reader would stall the loop."""
    if size > _COPY_ON_LOOP_BYTES:
        return False
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def copy_piece(piece: OutputPiece, out: BinaryIO) -> int:
    """Copy one output piece to `out`; sendfile when both ends allow it."""
    with open(piece.path, "rb") as f:
        out.flush()
        try:
            out_fd: int | None = out.fileno()
        except (AttributeError, OSError, ValueError):
            out_fd = None
        position = piece.start
        if out_fd is not None:
            try:
                while position < piece.end:
                    sent = os.sendfile(out_fd, f.fileno(), position, piece.end - position)
                    if sent == 0:
                        break
                    position += sent
            except OSError as exc:
                if exc.errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
                    raise
        f.seek(position)
        while position < piece.end:
            chunk = f.read(min(COPY_CHUNK_BYTES, piece.end - position))
            if not chunk:
                raise OSError(f"{piece.path} is shorter than expected ({position} < {piece.end} bytes)")
            out.write(chunk)
            position += len(chunk)
        out.flush()
    return piece.end - piece.start
