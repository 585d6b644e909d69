"""The six ways to process one line-oriented S3 object with N workers, timed alike.

Every strategy runs its N workers as asyncio tasks in this process (the
harness's), each worker with its own S3 client, the same part size and the
same number of ranged GETs in flight (shardline's `RangedReader` with the
same `ReaderSettings`), and writes each shard's output to a spool file that
an ordered assembler copies to the sink as soon as the shard is final --
what `shardline run` does.  So the strategies differ only in how they find
line boundaries and who waits for whom:

* naive          -- worker i emits [s_i, s_{i+1}) as is (lines cut in two:
                    wrong output, the lower bound of any correct method);
* download-split -- one downloader (one worker's GET concurrency) reads the
                    whole object in order and routes every line to the shard
                    that owns it;
* prescan        -- the coordinator finds every h_i with small ranged GETs
                    (4 KiB, doubling), `inflight` at a time, then workers read
                    exactly [h_i, h_{i+1});
* chain          -- worker i reads [s_i - 1, s_{i+1}) and its tail, then waits
                    for worker i-1's tail offset (a DynamoDB item, polled)
                    before it may finish and publish its own;
* overread       -- worker i reads [s_i - 1, s_{i+1}), then keeps reading past
                    s_{i+1} (64 KiB, doubling) until the next delimiter;
* shardline      -- `shardline.embedded.run_embedded` with `InProcessBackend`:
                    the real coordinator, exchange, markers and workers.

Each run returns a `RunResult`: wall seconds (stat to the last byte in the
sink), the time to the last resolved boundary, per-worker spans, and every
shard's emitted range and CRC32C for the correctness check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from crc32c import crc32c

from shardline.coordinator import (
    Backend,
    CoordinatorSettings,
    LocalProcessBackend,
    OutputPiece,
    choose_spool_dir,
    copy_piece,
)
from shardline.embedded import InProcessBackend, run_embedded
from shardline.io.aws import AwsSettings, client
from shardline.io.shardoutput import PassthroughOutput
from shardline.io.sources import ObjectSource, open_source
from shardline.protocol import JobSpec
from shardline.worker import _shard as shard_module
from shardline.worker._reader import RangedReader, ReaderSettings, fetch_range

__all__ = ["CORRECT", "STRATEGIES", "Plan", "RunResult", "Sink", "WarmProcessPool", "run_strategy"]

STRATEGIES = ("naive", "download-split", "prescan", "chain", "overread", "shardline")
CORRECT = tuple(s for s in STRATEGIES if s != "naive")
#: First window of a prescan probe; doubles up to the part size.
PRESCAN_WINDOW_BYTES = 4 * 1024
#: First window of an overread/chain tail read (shardline's own scan uses the same); doubles.
TAIL_WINDOW_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One run: which object, how many workers, how they read."""

    bucket: str
    key: str
    shards: int
    aws: AwsSettings
    part_bytes: int
    inflight: int
    delimiter: bytes = b"\n"
    chain_table: str = "bench-chain"
    chain_poll_s: float = 0.025
    markers_table: str = "shardline-markers"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def reader(self) -> ReaderSettings:
        return ReaderSettings(part_size_bytes=self.part_bytes, max_in_flight_bytes=self.part_bytes * self.inflight)


@dataclass(slots=True)
class RunResult:
    strategy: str
    seconds: float = 0.0
    #: Seconds from the start to the moment the last boundary h_i (i >= 1) was known (None: naive).
    boundary_s: float | None = None
    #: Per worker: (start, end) in seconds from the run's start.
    spans: list[tuple[float, float]] = field(default_factory=list)
    #: Per shard: (emitted_start, emitted_end, crc32c), the checksum shardline reports.
    shards: list[tuple[int, int, int]] = field(default_factory=list)
    out_bytes: int = 0
    out_crc: int = 0
    notes: dict = field(default_factory=dict)


class Sink:
    """Where the ordered output goes: counted and CRC'd, then dropped."""

    def __init__(self) -> None:
        self.bytes = 0
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = crc32c(data, self.crc)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def nominal(size: int, n: int) -> list[int]:
    return [i * size // n for i in range(n + 1)]


# --------------------------------------------------------------------------- shared pieces


class _Shard:
    """One shard's output: spool file, emitted range, CRC, and a 'final' event."""

    def __init__(self, index: int, spool: str) -> None:
        self.index = index
        self.output = PassthroughOutput(os.path.join(spool, f"shard-{index:05d}"))
        self.start: int | None = None
        self.length = 0
        self.crc = 0
        self.final = asyncio.Event()

    async def open(self) -> None:
        await self.output.start()

    async def emit(self, data: bytes | memoryview, at: int) -> None:
        if not len(data):
            return
        if self.start is None:
            self.start = at
        elif at != self.start + self.length:
            raise AssertionError(f"shard {self.index}: emitting at {at}, expected {self.start + self.length}")
        self.crc = crc32c(data, self.crc)
        self.length += len(data)
        await self.output.write(data)

    async def close(self) -> None:
        await self.output.finish()
        self.final.set()

    def record(self) -> tuple[int, int, int]:
        start = self.start if self.start is not None else -1
        return (start, start + self.length if self.start is not None else -1, self.crc)


async def _assemble(shards: list[_Shard], sink: Sink) -> None:
    """Copy shard outputs to the sink in order, each as soon as it is final."""
    for shard in shards:
        await shard.final.wait()
        path = shard.output._path
        await asyncio.to_thread(copy_piece, OutputPiece(path=path, start=0, end=shard.length), sink)
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _stat(plan: Plan) -> tuple[int, str]:
    async with open_source(plan.url, plan.aws) as source:
        info = await source.stat()
    return info.size, info.etag


async def _find_line_start(
    source: ObjectSource,
    position: int,
    size: int,
    *,
    etag: str,
    plan: Plan,
    window: int,
    emit: Callable[[bytes, int], Awaitable[None]] | None = None,
) -> int:
    """The first line start >= `position` (size if none), by growing exact reads from position - 1.

    With `emit`, the bytes [position, result) are passed on as they arrive.
    """
    if position <= 0:
        return 0
    at = position - 1
    while at < size:
        end = min(size, at + window)
        data = await fetch_range(source, at, end, etag=etag, retry=shard_module.WorkerSettings().retry)
        hit = data.find(plan.delimiter)
        stop = end if hit < 0 else at + hit + 1
        if emit is not None and stop > max(at, position):
            low = max(at, position)
            await emit(data[low - at : stop - at], low)
        if hit >= 0:
            return stop
        at = end
        window = min(2 * window, plan.part_bytes)
    return size


async def _read_own_range(
    shard: _Shard, source: ObjectSource, starts: list[int], *, etag: str, plan: Plan, find_head: bool
) -> tuple[int | None, float | None]:
    """Stream [s_i - 1, s_{i+1}); emit from h_i on (or from s_i when not `find_head`).

    Returns (h_i if it lies inside [s_i, s_{i+1}) else None, monotonic time h_i was settled).
    """
    i = shard.index
    s, e = starts[i], starts[i + 1]
    if s == e:
        return None, time.monotonic()
    if not find_head or i == 0:
        head, settled = s, time.monotonic()
        fetch_from = s
    else:
        head, settled = None, None
        fetch_from = s - 1
    position = fetch_from
    async with RangedReader(source, start=fetch_from, end=e, etag=etag, settings=plan.reader) as reader:
        async for chunk in reader:
            chunk_start, position = position, position + len(chunk)
            if head is None:
                hit = bytes(chunk).find(plan.delimiter) if len(chunk) < 65536 else _find(chunk, plan.delimiter)
                if hit < 0:
                    continue
                head, settled = chunk_start + hit + 1, time.monotonic()
                if head >= e:
                    return None, settled
                await shard.emit(chunk[head - chunk_start :], head)
                continue
            await shard.emit(chunk, chunk_start)
    if head is None:
        return None, time.monotonic()
    return head, settled


def _find(view: memoryview, delimiter: bytes) -> int:
    """Index of the first delimiter in a (large) memoryview without copying it all."""
    step = 65536
    for low in range(0, len(view), step):
        hit = bytes(view[low : low + step]).find(delimiter)
        if hit >= 0:
            return low + hit
    return -1


# --------------------------------------------------------------------------- strategies


async def _run_workers(
    plan: Plan, sink: Sink, body: Callable[[_Shard, list[float]], Awaitable[None]], spool: str
) -> tuple[list[_Shard], list[tuple[float, float]]]:
    shards = [_Shard(i, spool) for i in range(plan.shards)]
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * plan.shards

    async def one(shard: _Shard) -> None:
        t = time.monotonic()
        await shard.open()
        await body(shard, spans)  # type: ignore[arg-type]
        await shard.close()
        spans[shard.index] = (t, time.monotonic())

    assembler = asyncio.ensure_future(_assemble(shards, sink))
    try:
        await asyncio.gather(*(one(s) for s in shards))
        await assembler
    finally:
        assembler.cancel()
        for s in shards:
            with contextlib.suppress(Exception):
                await s.output.aclose()
    return shards, spans


async def naive(plan: Plan, sink: Sink, spool: str) -> RunResult:
    size, etag = await _stat(plan)
    starts = nominal(size, plan.shards)

    async def body(shard: _Shard, _spans: list) -> None:
        async with open_source(plan.url, plan.aws) as source:
            await _read_own_range(shard, source, starts, etag=etag, plan=plan, find_head=False)

    shards, spans = await _run_workers(plan, sink, body, spool)
    return RunResult("naive", shards=[s.record() for s in shards], spans=spans)


async def overread(plan: Plan, sink: Sink, spool: str) -> RunResult:
    size, etag = await _stat(plan)
    starts = nominal(size, plan.shards)
    settled: list[float] = []

    async def body(shard: _Shard, _spans: list) -> None:
        async with open_source(plan.url, plan.aws) as source:
            head, when = await _read_own_range(shard, source, starts, etag=etag, plan=plan, find_head=True)
            if when is not None and shard.index > 0:
                settled.append(when)
            if head is None or shard.index == plan.shards - 1:
                return
            await _find_line_start(
                source, starts[shard.index + 1], size, etag=etag, plan=plan, window=TAIL_WINDOW_BYTES, emit=shard.emit
            )

    shards, spans = await _run_workers(plan, sink, body, spool)
    return RunResult("overread", shards=[s.record() for s in shards], spans=spans, boundary_s=_last(settled))


async def chain(plan: Plan, sink: Sink, spool: str) -> RunResult:
    """Worker i finishes only after worker i-1 has published its tail offset (= h_i).

    The offset travels through DynamoDB: PutItem by worker i-1, polled with
    consistent GetItem by worker i every `chain_poll_s`.  Empty polls are
    accounted, not sent: worker i sleeps until the first poll tick at or
    after the moment the item was written, then sends the one GetItem that
    finds it.  The timing is what polling gives, but N idle pollers do not
    burn this small machine's CPU (on AWS they would burn their own).
    """
    size, etag = await _stat(plan)
    starts = nominal(size, plan.shards)
    run_id = f"{time.time_ns()}"
    written = [asyncio.Event() for _ in range(plan.shards)]
    received: list[float] = []
    polls = [0, 0]  # sent, accounted (empty)

    async def wait_for_previous(dynamodb, i: int) -> int:  # type: ignore[no-untyped-def]
        began = time.monotonic()
        await written[i - 1].wait()
        ticks = max(0, -int(-(time.monotonic() - began) // plan.chain_poll_s))  # ceil
        await asyncio.sleep(max(0.0, began + ticks * plan.chain_poll_s - time.monotonic()))
        polls[1] += ticks
        item = await dynamodb.get_item(
            TableName=plan.chain_table, Key={"id": {"S": f"{run_id}/{i - 1}"}}, ConsistentRead=True
        )
        polls[0] += 1
        if "Item" not in item:
            raise AssertionError(f"chain: shard {i - 1}'s offset was written but cannot be read")
        received.append(time.monotonic())
        return int(item["Item"]["end"]["N"])

    async def body(shard: _Shard, _spans: list) -> None:
        i = shard.index
        async with open_source(plan.url, plan.aws) as source, client(plan.aws, "dynamodb") as dynamodb:
            head, _ = await _read_own_range(shard, source, starts, etag=etag, plan=plan, find_head=True)
            tail_end: int | None = None
            if head is not None and i < plan.shards - 1:
                tail_end = await _find_line_start(
                    source, starts[i + 1], size, etag=etag, plan=plan, window=TAIL_WINDOW_BYTES, emit=shard.emit
                )
            elif head is not None:
                tail_end = size
            previous = 0
            if i > 0:  # where our first line starts, says the predecessor
                previous = await wait_for_previous(dynamodb, i)
                if head is not None and previous != head:
                    raise AssertionError(f"chain: shard {i} starts at {head}, predecessor says {previous}")
            mine = tail_end if tail_end is not None else previous  # no line start: pass the offset on
            await dynamodb.put_item(
                TableName=plan.chain_table, Item={"id": {"S": f"{run_id}/{i}"}, "end": {"N": str(mine)}}
            )
            written[i].set()

    shards, spans = await _run_workers(plan, sink, body, spool)
    result = RunResult("chain", shards=[s.record() for s in shards], spans=spans, boundary_s=_last(received))
    result.notes["dynamodb_polls_sent"] = polls[0]
    result.notes["dynamodb_polls_accounted"] = polls[1]
    return result


async def prescan(plan: Plan, sink: Sink, spool: str) -> RunResult:
    size, etag = await _stat(plan)
    starts = nominal(size, plan.shards)
    heads: list[int] = [0] * (plan.shards + 1)
    heads[plan.shards] = size
    scanned = asyncio.Event()
    done_at: list[float] = []

    async def scan_all() -> None:
        slots = asyncio.Semaphore(plan.inflight)
        async with open_source(plan.url, plan.aws) as source:

            async def one(i: int) -> None:
                async with slots:
                    heads[i] = await _find_line_start(
                        source, starts[i], size, etag=etag, plan=plan, window=PRESCAN_WINDOW_BYTES
                    )

            await asyncio.gather(*(one(i) for i in range(1, plan.shards)))
        done_at.append(time.monotonic())
        scanned.set()

    async def body(shard: _Shard, _spans: list) -> None:
        async with open_source(plan.url, plan.aws) as source:
            await scanned.wait()
            low, high = heads[shard.index], heads[shard.index + 1]
            if high <= low:
                return
            position = low
            async with RangedReader(source, start=low, end=high, etag=etag, settings=plan.reader) as reader:
                async for chunk in reader:
                    await shard.emit(chunk, position)
                    position += len(chunk)

    scanner = asyncio.ensure_future(scan_all())
    try:
        shards, spans = await _run_workers(plan, sink, body, spool)
        await scanner
    finally:
        scanner.cancel()
    return RunResult("prescan", shards=[s.record() for s in shards], spans=spans, boundary_s=_last(done_at))


async def download_split(plan: Plan, sink: Sink, spool: str) -> RunResult:
    size, etag = await _stat(plan)
    starts = nominal(size, plan.shards)
    n = plan.shards
    shards = [_Shard(i, spool) for i in range(n)]
    settled: list[float] = []
    assembler = asyncio.ensure_future(_assemble(shards, sink))
    t = time.monotonic()
    try:
        for s in shards:
            await s.open()
        owner, k = 0, 1  # the shard receiving bytes; the next boundary index to find
        position = 0
        async with (
            open_source(plan.url, plan.aws) as source,
            RangedReader(source, start=0, end=size, etag=etag, settings=plan.reader) as reader,
        ):
            async for chunk in reader:
                cs, ce = position, position + len(chunk)
                position = ce
                at = cs
                while at < ce:
                    if k >= n:
                        await shards[owner].emit(chunk[at - cs :], at)
                        break
                    look = max(at, starts[k] - 1)
                    hit = -1 if look >= ce else _find(chunk[look - cs :], plan.delimiter)
                    if hit < 0:
                        await shards[owner].emit(chunk[at - cs :], at)
                        break
                    head = look + hit + 1  # first line start >= s_k
                    await shards[owner].emit(chunk[at - cs : head - cs], at)
                    await shards[owner].close()
                    while k < n and starts[k] <= head:  # shards holding no line start get nothing
                        if k < n - 1 and starts[k + 1] <= head:
                            await shards[k].close()
                        k += 1
                    settled.append(time.monotonic())
                    owner = k - 1
                    at = head
        for s in shards:
            if not s.final.is_set():
                await s.close()
        await assembler
    finally:
        assembler.cancel()
        for s in shards:
            with contextlib.suppress(Exception):
                await s.output.aclose()
    spans = [(t, time.monotonic())]
    return RunResult(
        "download-split", shards=[s.record() for s in shards], spans=spans, boundary_s=_last(settled[: n - 1])
    )


# shardline ------------------------------------------------------------------------------------

#: monotonic time each shard's boundary was settled in the current shardline run (instrumentation:
#: the worker's own `_publish` is wrapped; nothing else changes).
_SETTLED: dict[int, float] = {}
_original_publish = shard_module._ShardRun._publish


async def _timed_publish(self, boundary, fragment):  # type: ignore[no-untyped-def]
    _SETTLED[self.shard.index] = time.monotonic()
    return await _original_publish(self, boundary, fragment)


shard_module._ShardRun._publish = _timed_publish  # type: ignore[method-assign]


class _SpanTimer:
    """Mixed in before a backend: each attempt's (start, end) by shard, in `spans`."""

    spans: dict[int, tuple[float, float]]

    async def run(self, task, *, on_started):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return await super().run(task, on_started=on_started)  # type: ignore[misc]
        finally:
            self.spans[task.shard] = (t, time.monotonic())


class _TimedBackend(_SpanTimer, InProcessBackend):
    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.spans = {}


class WarmProcessPool(_SpanTimer, LocalProcessBackend):
    """One local worker process per shard, kept across jobs as a daemon keeps
    its pool, timing each attempt from the task handed to a process to its
    answer.  Run one untimed job first: the processes import their libraries
    and make their clients then.  `shutdown()` stops them."""

    def __init__(self, processes: int, env: dict[str, str] | None = None) -> None:
        super().__init__(max_processes=processes, max_concurrent=processes, env=env)
        self.spans = {}

    async def aclose(self) -> None:
        """The job's end: the processes stay for the next job."""

    async def shutdown(self) -> None:
        await super().aclose()


async def shardline_embedded(plan: Plan, sink: Sink, spool: str, backend: Backend | None = None) -> RunResult:
    """`run_embedded` with in-process workers, or with `backend` (a `WarmProcessPool`)."""
    _SETTLED.clear()
    spec = JobSpec(
        source=plan.url,
        shards=plan.shards,
        delimiter=plan.delimiter,
        part_size_bytes=plan.part_bytes,
        max_in_flight_bytes=plan.part_bytes * plan.inflight,
    )
    if backend is None:
        backend = _TimedBackend(max_concurrent=plan.shards)
    assert isinstance(backend, _TimedBackend | WarmProcessPool)
    backend.spans.clear()
    settings = CoordinatorSettings(markers=f"dynamodb:{plan.markers_table}", spool_dir=spool)
    report = await run_embedded(spec, out=sink, aws=plan.aws, backend=backend, settings=settings)
    shards = [(s.emitted[0], s.emitted[1], int(s.checksum.split(":")[1], 16)) for s in report.shards]
    result = RunResult(
        "shardline",
        shards=shards,
        spans=[backend.spans[i] for i in sorted(backend.spans)],
        boundary_s=_last([t for i, t in _SETTLED.items() if i > 0]),
    )
    result.notes["tail_sources"] = report.tail_source_counts
    result.notes["retries"] = report.retries
    # Where the last boundary's time goes: workers starting late, or finding h_i late.
    settle_after_start = sorted(_SETTLED[i] - backend.spans[i][0] for i in _SETTLED if i > 0 and i in backend.spans)
    if settle_after_start:
        first_start = min(start for start, _ in backend.spans.values())
        result.notes["first_worker_start_abs"] = first_start
        result.notes["last_worker_start_after_first_s"] = round(
            max(start for start, _ in backend.spans.values()) - first_start, 3
        )
        result.notes["settle_after_start_s"] = {
            "median": round(statistics.median(settle_after_start), 3),
            "max": round(settle_after_start[-1], 3),
        }
    return result


async def shardline_cli(plan: Plan, sink: Sink, spool: str, extra_env: dict[str, str] | None = None) -> RunResult:
    """`shardline run` as a user runs it: local worker processes (one per shard), stdout to the sink;
    `extra_env` is added to its environment (bench/cli_start.py's timeline)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_ENDPOINT_URL_S3": plan.aws.s3_endpoint_url or "",
        "AWS_ENDPOINT_URL_DYNAMODB": plan.aws.dynamodb_endpoint_url or "",
        "AWS_ACCESS_KEY_ID": plan.aws.access_key_id or "",
        "AWS_SECRET_ACCESS_KEY": plan.aws.secret_access_key or "",
        "AWS_DEFAULT_REGION": plan.aws.region or "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **({"AWS_CA_BUNDLE": os.environ["AWS_CA_BUNDLE"]} if "AWS_CA_BUNDLE" in os.environ else {}),
        **(extra_env or {}),
    }
    argv = [
        CLI,
        "run",
        plan.url,
        f"-n{plan.shards}",
        f"--part-size={plan.part_bytes}",
        f"--parts-in-flight={plan.inflight}",
        "--store=dynamodb",
        f"--markers-table={plan.markers_table}",
        "--workers=process",
        f"--max-processes={plan.shards}",
        f"--spool-dir={spool}",
        "--no-progress",
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    try:
        while chunk := await process.stdout.read(1024 * 1024):
            sink.write(chunk)
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()  # our child, by PID
            await process.wait()
    if code != 0:
        raise RuntimeError(f"shardline run exited with {code}: {(await errors).decode(errors='replace')[-1500:]}")
    await errors
    return RunResult("shardline-cli")


#: The CLI next to this Python (the venv's).
CLI = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "shardline")


def _last(times: list[float]) -> float | None:
    return max(times) if times else None


RUNNERS = {
    "naive": naive,
    "download-split": download_split,
    "prescan": prescan,
    "chain": chain,
    "overread": overread,
    "shardline": shardline_embedded,
    "shardline-cli": shardline_cli,
}


async def run_strategy(name: str, plan: Plan, *, pool: WarmProcessPool | None = None) -> RunResult:
    """Run one strategy once; times are made relative to its start.  With
    `pool`, "shardline" runs its workers in that pool's processes."""
    sink = Sink()
    spool = tempfile.mkdtemp(prefix="bench-spool-", dir=choose_spool_dir(0))
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        if pool is not None:
            if name != "shardline":
                raise ValueError(f"only shardline runs in a process pool, not {name}")
            result = await shardline_embedded(plan, sink, spool, pool)
        else:
            result = await RUNNERS[name](plan, sink, spool)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    result.notes["harness_cpu_s"] = round(time.process_time() - cpu0, 3)
    if result.boundary_s is not None:
        result.boundary_s -= t0
    if "first_worker_start_abs" in result.notes:
        result.notes["first_worker_start_s"] = round(result.notes.pop("first_worker_start_abs") - t0, 3)
    result.spans = [(a - t0, b - t0) for a, b in result.spans]
    result.out_bytes, result.out_crc = sink.bytes, sink.crc
    return result
