"""Time stamps around a shardline worker's steps, for `bench/delivery.py`.

`instrument()` wraps the worker's functions (nothing else changes): the
exchange session, each S3 GET (issued, first byte, last byte), the boundary
publication, the own range, the tail, each output write and checksum update,
DONE, and the first use of a shared client.  Events are kept per shard in
`EVENTS`.  In a worker process started with SHARDLINE_BENCH_TIMELINE=FILE
(and the `sitecustomize` of `site_dir()` on PYTHONPATH),
every attempt's events are appended to FILE as one JSON line when it ends.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import _sitehook

from shardline.io import aws, checksum, shardoutput, sources
from shardline.worker import _exchange, _main, _shard

MiB = 1024 * 1024
ENV = "SHARDLINE_BENCH_TIMELINE"
#: While the file this names exists, the feature it names is off in the next
#: attempts: "preallocation" (outputs not pre-allocated).  For the A/B runs of
#: `delivery.py --compare FEATURE`, worker processes included.
WITHOUT_ENV = "SHARDLINE_BENCH_WITHOUT"

#: (label, monotonic time) per shard index.
EVENTS: dict[int, list[tuple[str, float]]] = defaultdict(list)
#: (bytes, seconds, whether the file's pages were already allocated for
#: all of it) of every output write; seconds of every checksum update.
WRITES: list[tuple[int, float, bool]] = []
CRCS: list[float] = []
#: The shard the current task works for (so a GET knows whose it is).
_SHARD: contextvars.ContextVar[int] = contextvars.ContextVar("shard", default=-1)


def clear() -> None:
    EVENTS.clear()
    WRITES.clear()
    CRCS.clear()


def _stamp(label: str, index: int | None = None) -> None:
    EVENTS[_SHARD.get() if index is None else index].append((label, time.monotonic()))


def site_dir(parent: str) -> str:
    """A new directory under `parent` holding a `sitecustomize.py` that instruments
    a worker process when SHARDLINE_BENCH_TIMELINE is set; put it on the
    process's PYTHONPATH."""
    return _sitehook.site_dir(parent, prefix="timeline-site-", env=ENV, module="_timeline", call="instrument")


def instrument() -> None:
    """Wrap the worker's steps with time stamps (instrumentation only)."""
    original_read_into = sources.S3Source.read_into

    async def read_into(self, start, view, *, etag, on_bytes=None):  # type: ignore[no-untyped-def]
        first = True

        def counted(count: int) -> None:
            nonlocal first
            if first:
                _stamp(f"part {start // MiB:4d} MiB first byte")
                first = False
            if on_bytes is not None:
                on_bytes(count)

        _stamp(f"part {start // MiB:4d} MiB GET")
        await original_read_into(self, start, view, etag=etag, on_bytes=counted)
        _stamp(f"part {start // MiB:4d} MiB last byte")

    sources.S3Source.read_into = read_into  # type: ignore[method-assign]

    def wrap(cls: type, name: str, label: str) -> None:
        original = getattr(cls, name)

        async def wrapped(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            _stamp(f"{label} begin")
            try:
                return await original(self, *args, **kwargs)
            finally:
                _stamp(f"{label} end")

        setattr(cls, name, wrapped)

    wrap(_exchange.ExchangeClient, "connect", "exchange connect")
    wrap(_exchange.ExchangeClient, "report", "DONE report")
    wrap(_shard._ShardRun, "execute", "execute")
    wrap(_shard._ShardRun, "_stream_own_range", "own range")
    wrap(_shard._ShardRun, "_complete_tail", "tail")
    wrap(_shard._ShardRun, "_publish", "publish")

    original_write = shardoutput.PassthroughOutput.write

    async def write(self, data, **kwargs):  # type: ignore[no-untyped-def]
        size = memoryview(data).nbytes
        allocated = self.preallocated_bytes >= self.bytes_in + size
        t = time.monotonic()
        try:
            return await original_write(self, data, **kwargs)
        finally:
            WRITES.append((size, time.monotonic() - t, allocated))

    shardoutput.PassthroughOutput.write = write  # type: ignore[method-assign]
    original_update = checksum.Crc32c.update

    def update(self, data):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return original_update(self, data)
        finally:
            CRCS.append(time.monotonic() - t)

    checksum.Crc32c.update = update  # type: ignore[method-assign]
    original_lazy_get = aws.LazyClient.get

    async def lazy_get(self):  # type: ignore[no-untyped-def]
        if self._client is not None:
            return self._client
        t = time.monotonic()
        try:
            return await original_lazy_get(self)
        finally:
            _stamp(f"{self._service} client made ({(time.monotonic() - t) * 1000:.1f} ms)")

    aws.LazyClient.get = lazy_get  # type: ignore[method-assign]
    original_run_task = _shard.run_task
    dump = os.environ.get(ENV)
    fallocate = shardoutput._fallocate

    async def run_task(task, **kwargs):  # type: ignore[no-untyped-def]
        _SHARD.set(task.shard)
        if flag := os.environ.get(WITHOUT_ENV):
            try:
                without = Path(flag).read_text()
            except FileNotFoundError:
                without = ""
            shardoutput._fallocate = None if without == "preallocation" else fallocate
        _stamp("run_task begin")
        try:
            return await original_run_task(task, **kwargs)
        finally:
            _stamp("run_task end")
            if dump:
                line = {"shard": task.shard, "events": EVENTS.pop(task.shard), "writes": WRITES, "crcs": CRCS}
                with open(dump, "a") as file:
                    file.write(json.dumps(line) + "\n")
                WRITES.clear()
                CRCS.clear()

    _shard.run_task = run_task
    _main.run_task = run_task  # type: ignore[attr-defined]
    import shardline.worker as worker_package

    worker_package.run_task = run_task  # type: ignore[attr-defined]
