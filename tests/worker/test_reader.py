"""The worker's ranged reader (`RangedReader`, `fetch_range`) over both sources.

Local files and a real moto server over real sockets; faults are injected
either by `faultproxy.FaultProxy` in front of moto or, where exact control of
what a request delivers is needed, by small ObjectSource implementations.
The sources alone are tested in tests/io/test_sources.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from shardline.errors import (
    ConfigurationError,
    ObjectChangedError,
    RetryableStorageError,
    SourceNotFoundError,
)
from shardline.io.aws import AwsSettings
from shardline.io.retry import RetryPolicy
from shardline.io.sources import LocalFileSource, ObjectInfo, ObjectSource, OnBytes, S3Source
from shardline.worker import RangedReader, ReaderSettings, fetch_range
from shardline.worker._reader import TASK_NAME_PREFIX  # how the reader names its part tasks: private, to spot leaks

from faultproxy import CannedResponse, CutBody, FaultProxy, ProxyRecord, Rule, s3_error
from polling import eventually

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.001, max_delay_s=0.01)

MakeSource = Callable[..., ObjectSource]


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def settings_for(part_size: int, parts_in_flight: int = 3) -> ReaderSettings:
    return ReaderSettings(
        part_size_bytes=part_size,
        max_in_flight_bytes=part_size * parts_in_flight,
        retry=FAST_RETRY,
    )


async def read_all(reader: RangedReader) -> bytes:
    out = bytearray()
    async with reader:
        async for chunk in reader:
            out += chunk
    return bytes(out)


def live_reader_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_NAME_PREFIX) and not t.done()]


@pytest.fixture(params=["local", "s3"])
def make_source(request: pytest.FixtureRequest, tmp_path: Path, aws_settings: AwsSettings) -> MakeSource:
    """Store `data` as a local file or an S3 object and return a source for it."""

    def make(data: bytes, name: str = "object.bin") -> ObjectSource:
        if request.param == "local":
            path = tmp_path / name
            path.write_bytes(data)
            return LocalFileSource(path)
        s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
        s3.put_object(Bucket=bucket, Key=name, Body=data)
        return S3Source(bucket, name, aws=aws_settings)

    return make


# --- settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"part_size_bytes": 0}, "part_size_bytes"),
        ({"part_size_bytes": 10, "max_in_flight_bytes": 9}, "max_in_flight_bytes"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"part_size_bytes": 10, "first_part_bytes": 11}, "first_part_bytes"),
        ({"first_part_bytes": 0}, "first_part_bytes"),
    ],
)
def test_reader_settings_validate(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        ReaderSettings(**kwargs)


# --- exact reads ---------------------------------------------------------------


@pytest.mark.parametrize("part_size", [1, 7, 1000, 64 * 1024])
async def test_random_ranges_read_exactly(make_source: MakeSource, part_size: int) -> None:
    rng = random.Random(part_size)
    # Not a multiple of the part size; few enough parts to keep S3 quick.
    data = rng.randbytes(part_size * 37 + 5)
    settings = settings_for(part_size)
    ranges = [(0, len(data)), (0, 0), (11, 11), (len(data), len(data)), (len(data) - 1, len(data))]
    for _ in range(6):
        a = rng.randrange(len(data) + 1)
        ranges.append((a, rng.randint(a, len(data))))
    async with make_source(data) as source:
        info = await source.stat()
        assert info.size == len(data)
        for a, b in ranges:
            reader = RangedReader(source, start=a, end=b, etag=info.etag, settings=settings)
            assert await read_all(reader) == data[a:b], (a, b)
            assert reader.stats.bytes_fetched == b - a
            assert reader.stats.requests == math.ceil((b - a) / part_size)
            assert reader.stats.retries == 0
            assert await fetch_range(source, a, b, etag=info.etag, retry=FAST_RETRY) == data[a:b]


async def test_empty_object(make_source: MakeSource) -> None:
    async with make_source(b"") as source:
        info = await source.stat()
        assert info.size == 0
        reader = RangedReader(source, start=0, end=0, etag=info.etag, settings=ReaderSettings())
        assert await read_all(reader) == b""
        assert reader.stats.requests == 0
        assert await fetch_range(source, 0, 0, etag=info.etag, retry=FAST_RETRY) == b""


async def test_chunks_are_consecutive_parts(make_source: MakeSource) -> None:
    data = random_bytes(10_000, seed=3)
    async with make_source(data) as source:
        info = await source.stat()
        reader = RangedReader(source, start=123, end=9_000, etag=info.etag, settings=settings_for(4096))
        async with reader:
            sizes = [len(chunk) async for chunk in reader]
    assert sizes == [4096, 4096, 9_000 - 123 - 2 * 4096]


async def test_a_smaller_first_part_comes_first_and_the_rest_follow_whole(make_source: MakeSource) -> None:
    data = random_bytes(10_000, seed=4)
    settings = dataclasses.replace(settings_for(4096), first_part_bytes=100)
    async with make_source(data) as source:
        info = await source.stat()
        reader = RangedReader(source, start=123, end=9_000, etag=info.etag, settings=settings)
        async with reader:
            chunks = [bytes(chunk) async for chunk in reader]
    assert [len(chunk) for chunk in chunks] == [100, 4096, 4096, 9_000 - 123 - 100 - 2 * 4096]
    assert b"".join(chunks) == data[123:9_000]


def test_invalid_range_is_rejected() -> None:
    source = LocalFileSource("unused")
    with pytest.raises(ValueError, match=r"\[5, 4\)"):
        RangedReader(source, start=5, end=4, etag="e", settings=ReaderSettings())


# --- the object changes under us ----------------------------------------------


async def test_s3_overwritten_object_fails_with_object_changed(s3, bucket: str, aws_settings: AwsSettings) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"version one\n" * 100)
    async with S3Source(bucket, "k", aws=aws_settings) as source:
        old = await source.stat()
        s3.put_object(Bucket=bucket, Key="k", Body=b"version two\n" * 100)
        reader = RangedReader(source, start=0, end=old.size, etag=old.etag, settings=settings_for(256))
        with pytest.raises(ObjectChangedError, match="changed"):
            await read_all(reader)
        assert reader.stats.retries == 0
        assert live_reader_tasks() == []
        with pytest.raises(ObjectChangedError):
            await fetch_range(source, 0, 10, etag=old.etag, retry=FAST_RETRY)
        assert (await source.stat()).etag != old.etag


@pytest.mark.parametrize("change", ["append", "rewrite same size"])
async def test_local_file_changed_fails_with_object_changed(tmp_path: Path, change: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"abcdef\n" * 1000)
    async with LocalFileSource(path) as source:
        old = await source.stat()
        if change == "append":
            with path.open("ab") as f:
                f.write(b"more\n")
        else:
            before = path.stat()
            with path.open("r+b") as f:
                f.write(b"ABCDEF")
            # Make the change visible even on file systems with coarse mtimes.
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        with pytest.raises(ObjectChangedError, match=str(path)):
            await fetch_range(source, 0, 10, etag=old.etag, retry=FAST_RETRY)
        assert (await source.stat()).etag != old.etag


# --- a missing object ----------------------------------------------------------


async def test_missing_key(s3, bucket: str, aws_settings: AwsSettings) -> None:
    async with S3Source(bucket, "missing/key.txt", aws=aws_settings) as source:
        with pytest.raises(SourceNotFoundError) as caught:
            await source.stat()
        assert str(caught.value) == f"no such key 'missing/key.txt' in bucket '{bucket}'"
        # A GET for a missing key is not retried either.
        reader = RangedReader(source, start=0, end=10, etag='"x"', settings=settings_for(4))
        with pytest.raises(SourceNotFoundError):
            await read_all(reader)
        assert reader.stats.retries == 0


# --- backpressure, early exit, cancellation -------------------------------------


@pytest.mark.parametrize("budget_parts", [1, 4, 3.5])
async def test_slow_consumer_bounds_memory_and_requests(make_source: MakeSource, budget_parts: float) -> None:
    part = 4096
    budget = int(part * budget_parts)
    data = random_bytes(30 * part + 123, seed=7)
    settings = ReaderSettings(part_size_bytes=part, max_in_flight_bytes=budget, retry=FAST_RETRY)
    async with make_source(data) as source:
        info = await source.stat()
        out = bytearray()
        async with RangedReader(source, start=0, end=len(data), etag=info.etag, settings=settings) as reader:
            async for chunk in reader:
                # Bytes requested so far (no retries here): at most the bytes
                # consumed before this chunk plus the budget.
                assert min(len(data), reader.stats.requests * part) <= len(out) + budget
                out += chunk
                await asyncio.sleep(0.002)
    assert bytes(out) == data
    # The first __anext__ fills the budget with whole parts; never more.
    assert (budget // part) * part <= reader.stats.max_reserved_bytes <= budget


async def test_released_part_buffers_are_filled_again(make_source: MakeSource) -> None:
    # A new buffer costs page faults; a released one is refilled instead.  The
    # bytes are still right, and no more buffers exist than the budget holds.
    part = 4096
    data = random_bytes(20 * part + 321, seed=8)
    async with make_source(data) as source:
        info = await source.stat()
        out = bytearray()
        buffers: list[object] = []  # kept alive, so distinct buffers have distinct ids
        async with RangedReader(
            source, start=0, end=len(data), etag=info.etag, settings=settings_for(part, 3)
        ) as reader:
            async for chunk in reader:
                if len(chunk) == part:
                    buffers.append(chunk.obj)
                out += chunk
    assert bytes(out) == data
    assert len(buffers) == 20
    assert len({id(buffer) for buffer in buffers}) <= 3


async def read_keeping_buffers(source: ObjectSource, etag: str, size: int, part: int) -> tuple[bytes, list[object]]:
    """All bytes of [0, size), and every full part's buffer (kept alive, so ids differ)."""
    out, buffers = bytearray(), []
    async with RangedReader(source, start=0, end=size, etag=etag, settings=settings_for(part, 2)) as reader:
        async for chunk in reader:
            if len(chunk) == part:
                buffers.append(chunk.obj)
            out += chunk
    return bytes(out), buffers


async def test_the_next_reader_of_the_process_starts_with_the_buffers_one_left(make_source: MakeSource) -> None:
    part = 4099  # a size no other test uses: the spares are the process's
    data = random_bytes(6 * part, seed=9)
    async with make_source(data) as source:
        info = await source.stat()
        first, first_buffers = await read_keeping_buffers(source, info.etag, len(data), part)
        second, second_buffers = await read_keeping_buffers(source, info.etag, len(data), part)
    assert first == second == data
    assert {id(b) for b in second_buffers} <= {id(b) for b in first_buffers}


async def test_a_reader_left_early_leaves_no_buffer_still_in_use(make_source: MakeSource) -> None:
    # The part the consumer holds (and any part cancelled in flight) may still
    # be used by someone: never handed to a later reader.
    part = 4111
    data = random_bytes(8 * part, seed=10)
    async with make_source(data) as source:
        info = await source.stat()
        async with RangedReader(
            source, start=0, end=len(data), etag=info.etag, settings=settings_for(part, 4)
        ) as reader:
            async for chunk in reader:
                held = chunk.obj
                break
        again, buffers = await read_keeping_buffers(source, info.etag, len(data), part)
    assert again == data
    assert all(buffer is not held for buffer in buffers)


async def test_stopping_early_cancels_in_flight_requests(make_source: MakeSource) -> None:
    data = random_bytes(64 * 1024, seed=11)
    async with make_source(data) as source:
        info = await source.stat()
        async with RangedReader(
            source, start=0, end=len(data), etag=info.etag, settings=settings_for(1024, 4)
        ) as reader:
            async for chunk in reader:
                assert chunk == data[:1024]
                break
        assert live_reader_tasks() == []
        assert reader.stats.requests <= 4


class StallingSource(ObjectSource):
    """Every read hangs until cancelled; counts starts and cancellations."""

    description = "stalling source"

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def stat(self) -> ObjectInfo:
        return ObjectInfo(size=1 << 20, etag="e")

    async def read_into(self, start: int, view: memoryview, *, etag: str, on_bytes: OnBytes | None = None) -> None:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def aclose(self) -> None:
        pass


async def test_cancelled_consumer_cancels_and_awaits_requests() -> None:
    source = StallingSource()

    async def consume() -> None:
        async with RangedReader(source, start=0, end=1 << 20, etag="e", settings=settings_for(1024, 5)) as reader:
            async for _ in reader:
                pass

    consumer = asyncio.create_task(consume())
    await eventually(lambda: source.started == 5, "five reads started")
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert source.cancelled == source.started == 5
    assert live_reader_tasks() == []


class GatedSource(ObjectSource):
    """Serves `data`; each read waits until the test resolves its gate."""

    description = "gated source"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gates: dict[int, asyncio.Future[None]] = {}

    async def stat(self) -> ObjectInfo:
        return ObjectInfo(size=len(self.data), etag="e")

    async def read_into(self, start: int, view: memoryview, *, etag: str, on_bytes: OnBytes | None = None) -> None:
        gate = self.gates[start] = asyncio.get_running_loop().create_future()
        await gate
        view[:] = self.data[start : start + len(view)]
        if on_bytes is not None:
            on_bytes(len(view))

    async def aclose(self) -> None:
        pass


async def test_parts_completing_out_of_order_are_yielded_in_order() -> None:
    data = random_bytes(4000, seed=12)
    source = GatedSource(data)
    async with RangedReader(source, start=0, end=4000, etag="e", settings=settings_for(1000, 4)) as reader:
        first = asyncio.create_task(reader.__anext__())
        await eventually(lambda: len(source.gates) == 4, "four reads started")
        for start in (3000, 2000, 1000):
            source.gates[start].set_result(None)
            await asyncio.sleep(0.001)
        assert not first.done()
        source.gates[0].set_result(None)
        chunks = [bytes(await first)] + [bytes(chunk) async for chunk in reader]
    assert chunks == [data[0:1000], data[1000:2000], data[2000:3000], data[3000:4000]]


async def test_a_later_part_failing_fails_the_read_at_once() -> None:
    source = GatedSource(random_bytes(4000, seed=13))
    async with RangedReader(source, start=0, end=4000, etag="e", settings=settings_for(1000, 4)) as reader:
        first = asyncio.create_task(reader.__anext__())
        await eventually(lambda: len(source.gates) == 4, "four reads started")
        source.gates[2000].set_exception(ObjectChangedError("changed under us"))
        with pytest.raises(ObjectChangedError, match="changed under us"):
            await first
        # The reader closed itself: the stalled head part was cancelled, not awaited.
        assert source.gates[0].cancelled()
        assert live_reader_tasks() == []


# --- retry and resume, with exact control over what each request delivers -------


class FlakySource(ObjectSource):
    """Serves `data`; the first `failures` requests deliver up to `cut` bytes, then fail."""

    description = "flaky source"

    def __init__(self, data: bytes, *, failures: int, cut: int, error: type[Exception] = RetryableStorageError) -> None:
        self.data = data
        self.failures_left = failures
        self.cut = cut
        self.error = error
        self.requests: list[tuple[int, int]] = []

    async def stat(self) -> ObjectInfo:
        return ObjectInfo(size=len(self.data), etag="e")

    async def read_into(self, start: int, view: memoryview, *, etag: str, on_bytes: OnBytes | None = None) -> None:
        self.requests.append((start, start + len(view)))
        await asyncio.sleep(0)
        count = len(view)
        failing = self.failures_left > 0
        if failing:
            self.failures_left -= 1
            count = min(self.cut, len(view) - 1)
        view[:count] = self.data[start : start + count]
        if on_bytes is not None and count:
            on_bytes(count)
        if failing:
            raise self.error(f"injected failure after {count} bytes")

    async def aclose(self) -> None:
        pass


async def test_failed_request_resumes_after_last_received_byte() -> None:
    data = random_bytes(1000, seed=5)
    source = FlakySource(data, failures=3, cut=100)
    reader = RangedReader(source, start=0, end=1000, etag="e", settings=settings_for(1000, 1))
    assert await read_all(reader) == data
    assert source.requests == [(0, 1000), (100, 1000), (200, 1000), (300, 1000)]
    assert (reader.stats.requests, reader.stats.retries, reader.stats.bytes_fetched) == (4, 3, 1000)


async def test_fetch_range_resumes_too() -> None:
    data = random_bytes(500, seed=6)
    source = FlakySource(data, failures=2, cut=30)
    assert await fetch_range(source, 50, 450, etag="e", retry=FAST_RETRY) == data[50:450]
    assert source.requests == [(50, 450), (80, 450), (110, 450)]


async def test_resume_with_many_parts_in_flight() -> None:
    data = random_bytes(10_000, seed=8)
    source = FlakySource(data, failures=12, cut=150)
    reader = RangedReader(source, start=17, end=9_999, etag="e", settings=settings_for(1000, 4))
    assert await read_all(reader) == data[17:9_999]
    assert reader.stats.retries == 12
    assert reader.stats.bytes_fetched == 9_999 - 17
    by_end: dict[int, list[int]] = defaultdict(list)
    for start, end in source.requests:
        by_end[end].append(start)
    for starts in by_end.values():
        assert all(b - a == 150 for a, b in itertools.pairwise(starts))


async def test_retries_are_bounded() -> None:
    source = FlakySource(b"x" * 100, failures=100, cut=1)
    policy = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.001)
    with pytest.raises(RetryableStorageError, match="gave up after 3 attempts"):
        await fetch_range(source, 0, 100, etag="e", retry=policy)
    assert source.requests == [(0, 100), (1, 100), (2, 100)]


async def test_non_retryable_error_fails_at_once() -> None:
    source = FlakySource(b"x" * 100, failures=1, cut=10, error=ObjectChangedError)
    reader = RangedReader(source, start=0, end=100, etag="e", settings=settings_for(100, 1))
    with pytest.raises(ObjectChangedError):
        await read_all(reader)
    assert source.requests == [(0, 100)]
    assert reader.stats.retries == 0


# --- real faults on the wire, through the fault proxy ----------------------------


def _range_of(record: ProxyRecord) -> tuple[int, int]:
    """The half-open range of a GET's "bytes=a-b" header."""
    first, last = record.headers["range"].removeprefix("bytes=").split("-")
    return int(first), int(last) + 1


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_s3_body_cut_mid_stream_resumes_after_last_received_byte(
    s3, bucket: str, aws_settings: AwsSettings, reset: bool
) -> None:
    data = random_bytes(300_000, seed=9)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    cuts = 3
    rule = Rule(method="GET", header="Range", fault=CutBody(after_bytes=10_000, linger_s=0.1, reset=reset), times=cuts)
    async with FaultProxy(aws_settings.s3_endpoint_url, [rule], seed=1) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Source(bucket, "big", aws=via_proxy) as source:
            info = await source.stat()
            reader = RangedReader(source, start=0, end=len(data), etag=info.etag, settings=settings_for(64 * 1024, 4))
            assert await read_all(reader) == data

    assert proxy.applied == [cuts]
    assert reader.stats.retries == cuts
    gets = [record for record in proxy.records if record.method == "GET"]
    # Every byte crossed the wire once: resumed GETs skipped what was received.
    assert sum(record.body_bytes for record in gets) == len(data)
    by_end: dict[int, list[ProxyRecord]] = defaultdict(list)
    for record in gets:
        by_end[_range_of(record)[1]].append(record)
    for end, attempts in by_end.items():
        for previous, resumed in itertools.pairwise(attempts):
            assert previous.fault is not None
            assert _range_of(resumed)[0] == _range_of(previous)[0] + previous.body_bytes
        assert attempts[-1].fault is None
        assert attempts[-1].body_bytes == end - _range_of(attempts[-1])[0]


async def test_s3_slow_down_is_retried(s3, bucket: str, aws_settings: AwsSettings) -> None:
    data = random_bytes(50_000, seed=10)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    throttled = 4
    rule = Rule(method="GET", fault=s3_error("SlowDown", "Please reduce your request rate."), times=throttled)
    async with FaultProxy(aws_settings.s3_endpoint_url, [rule]) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Source(bucket, "k", aws=via_proxy) as source:
            info = await source.stat()
            # One part, so the throttled requests are consecutive attempts at it.
            reader = RangedReader(source, start=0, end=len(data), etag=info.etag, settings=settings_for(len(data), 1))
            assert await read_all(reader) == data
    assert proxy.applied == [throttled]
    assert [r.status for r in proxy.records if r.method == "GET"] == [503] * throttled + [206]
    assert reader.stats.retries == throttled


async def test_s3_persistent_slow_down_gives_up(s3, bucket: str, aws_settings: AwsSettings) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    rules = [
        Rule(method="HEAD", fault=CannedResponse(status=503, reason="Service Unavailable")),
        Rule(method="GET", fault=s3_error("SlowDown", "Please reduce your request rate.")),
    ]
    policy = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.001)
    async with FaultProxy(aws_settings.s3_endpoint_url, rules) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Source(bucket, "k", aws=via_proxy) as source:
            with pytest.raises(RetryableStorageError, match="503"):
                await source.stat()
            with pytest.raises(RetryableStorageError, match=r"SlowDown.*gave up after 3 attempts"):
                await fetch_range(source, 0, 10, etag='"whatever"', retry=policy)
    assert proxy.applied[1] >= 3
