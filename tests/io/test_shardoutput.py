"""`PassthroughOutput`'s pre-allocation: a hint that changes where the
kernel's page allocation happens, never what the file holds.

Each case writes real files (the test's directory, and tmpfs, where the
shard outputs usually live) and checks the bytes and the size, whatever
the expected size said; nothing is asserted about how long anything took.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from crc32c import crc32c

from shardline.io import shardoutput
from shardline.io.checksum import Crc32c
from shardline.io.shardoutput import PREALLOCATE_AHEAD_BYTES, PREALLOCATE_CHUNK_BYTES, PassthroughOutput

from polling import eventually

MIB = 1024 * 1024

needs_fallocate = pytest.mark.skipif(shardoutput._fallocate is None, reason="needs Linux fallocate(2)")


@pytest.fixture(params=["tmp_path", "tmpfs"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The test's directory, or one on tmpfs (/dev/shm, the memory spool's file system)."""
    if request.param == "tmp_path":
        yield tmp_path
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    shm = Path(tempfile.mkdtemp(prefix="shardline-test-", dir="/dev/shm"))
    try:
        yield shm
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@needs_fallocate
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 16 * MIB),  # nothing written at all
        (3 * MIB + 5, 24 * MIB),  # far less than expected
        (16 * MIB, 16 * MIB),  # exactly as expected
        (20 * MIB + 1, 8 * MIB),  # more than expected: the writes allocate the rest
    ],
    ids=["empty", "smaller", "exact", "larger"],
)
async def test_a_preallocated_output_holds_exactly_what_was_written(directory: Path, size: int, expected: int) -> None:
    data = random.Random(size).randbytes(size)
    path = directory / "out"
    path.write_bytes(b"stale content, longer than nothing" * 1000)
    async with PassthroughOutput(path, expected_bytes=expected) as output:
        for index, offset in enumerate(range(0, size, 3 * MIB)):
            await output.write(memoryview(data)[offset : offset + 3 * MIB])
            if index == 0:  # the next writes go into allocated pages, the later ones race the allocation
                await eventually(lambda: output.preallocated_bytes >= PREALLOCATE_CHUNK_BYTES, "a chunk was allocated")
        assert await output.finish() == size
    assert path.stat().st_size == size
    assert path.read_bytes() == data


@needs_fallocate
@pytest.mark.parametrize("directory", ["tmpfs"], indirect=True)
async def test_pages_allocated_past_the_end_are_freed_at_finish(directory: Path) -> None:
    path = directory / "out"
    async with PassthroughOutput(path, expected_bytes=64 * MIB) as output:
        await output.write(b"x" * MIB)
        await eventually(lambda: output.preallocated_bytes >= PREALLOCATE_AHEAD_BYTES, "a budget was allocated")
        assert path.stat().st_size == MIB  # KEEP_SIZE: the size is what was written
        assert path.stat().st_blocks * 512 >= PREALLOCATE_AHEAD_BYTES
        await output.finish()
    # tmpfs counts the pages it holds; past the end there are none left.
    assert path.stat().st_blocks * 512 <= MIB + PREALLOCATE_CHUNK_BYTES // 8


@needs_fallocate
async def test_an_abort_waits_for_the_preallocation_and_keeps_the_written_bytes(directory: Path) -> None:
    path = directory / "out"
    output = PassthroughOutput(path, expected_bytes=256 * MIB)
    await output.start()
    await output.write(b"partial\n")
    await output.aclose()  # while the allocation may still be running
    await output.aclose()
    assert path.read_bytes() == b"partial\n"
    allocated = output.preallocated_bytes - len(b"partial\n")  # from the end of the first write
    assert allocated % PREALLOCATE_CHUNK_BYTES == 0 and allocated <= 256 * MIB


async def test_nothing_is_allocated_before_the_first_write(directory: Path) -> None:
    async with PassthroughOutput(directory / "out", expected_bytes=64 * MIB) as output:
        assert output.preallocated_bytes == 0
        await output.write(b"")  # nothing written, nothing started
        assert output.preallocated_bytes == 0
        await output.finish()
    assert (directory / "out").stat().st_blocks == 0


async def test_small_or_unknown_outputs_are_not_preallocated(tmp_path: Path) -> None:
    for expected in (None, 0, PREALLOCATE_CHUNK_BYTES - 1):
        async with PassthroughOutput(tmp_path / "out", expected_bytes=expected) as output:
            await output.write(b"line\n")
            await output.finish()
            assert output.preallocated_bytes == 0
        assert (tmp_path / "out").read_bytes() == b"line\n"


async def test_without_fallocate_the_output_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shardoutput, "_fallocate", None)  # as on a platform without it
    data = random.Random(7).randbytes(9 * MIB)
    async with PassthroughOutput(tmp_path / "out", expected_bytes=16 * MIB) as output:
        await output.write(data)
        await output.finish()
        assert output.preallocated_bytes == 0
    assert (tmp_path / "out").read_bytes() == data


async def test_a_write_with_a_checksum_adds_exactly_the_written_bytes(directory: Path) -> None:
    data = random.Random(3).randbytes(10 * MIB + 3)
    crc = Crc32c()
    buffer = bytearray(MIB)
    async with PassthroughOutput(directory / "out", expected_bytes=len(data)) as output:
        await output.write(b"")  # nothing written, nothing added
        for offset in range(0, len(data), MIB):
            piece = data[offset : offset + MIB]
            buffer[: len(piece)] = piece  # one reused buffer, as the reader's parts
            await output.write(memoryview(buffer)[: len(piece)], checksum=crc)
        await output.finish()
    assert crc.value == crc32c(data)
    assert (directory / "out").read_bytes() == data


@needs_fallocate
async def test_the_allocation_follows_the_writes_at_most_a_budget_ahead(directory: Path) -> None:
    expected = 4 * PREALLOCATE_AHEAD_BYTES
    chunk = bytes(3 * MIB)

    def bound(output: PassthroughOutput) -> int:
        return min(expected, output.bytes_in + PREALLOCATE_AHEAD_BYTES + PREALLOCATE_CHUNK_BYTES)

    async with PassthroughOutput(directory / "out", expected_bytes=expected) as output:
        await output.write(chunk)
        await eventually(lambda: output.preallocated_bytes >= PREALLOCATE_AHEAD_BYTES, "the first budget")
        assert output.preallocated_bytes <= bound(output)
        while output.bytes_in < expected - len(chunk):
            await output.write(chunk)
            assert output.preallocated_bytes <= bound(output)
        # It keeps up: everything expected ends up allocated.
        await eventually(lambda: output.preallocated_bytes == expected, "the whole expected size")
        await output.finish()
    assert (directory / "out").stat().st_size == output.bytes_in
