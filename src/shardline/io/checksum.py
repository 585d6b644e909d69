"""The checksum of the bytes a shard emits and of the outputs it writes:
CRC32C, the one S3 itself offers (``x-amz-checksum-crc32c``).

`crc32c` (the package) computes it with the CPU's CRC32 instruction
(SSE 4.2, ARMv8) straight from any buffer, a memoryview of a part buffer
included, and releases the GIL on large ones.  CPU time on one core here
(8 MiB): ~30 GiB/s on a memoryview; google-crc32c is as fast on bytes but
takes only read-only bytes, so a part buffer would cost a copy first
(~19 GiB/s); zlib's CRC32 ~6.7 GiB/s.
"""

from __future__ import annotations

import asyncio

from crc32c import crc32c

from ..errors import StorageError
from . import COPY_CHUNK_BYTES

__all__ = ["CHECKSUM_ALGORITHM", "Crc32c", "file_checksum", "format_checksum"]

#: The algorithm's name in reports and manifests: "crc32c:%08x".
CHECKSUM_ALGORITHM = "crc32c"


def format_checksum(value: int) -> str:
    """`value` as reports and manifests carry it: "crc32c:%08x"."""
    return f"{CHECKSUM_ALGORITHM}:{value:08x}"


class Crc32c:
    """A running CRC32C over consecutive chunks (bytes, bytearray or memoryview)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.value = crc32c(data, self.value)

    def hexdigest(self) -> str:
        """The checksum as reports carry it ("crc32c:%08x")."""
        return format_checksum(self.value)


async def file_checksum(path: str) -> str:
    """The whole file's CRC32C as reports carry it ("crc32c:%08x").

    One helper for both sides: a remote worker (Lambda) reports its output's
    checksum in DONE, so the coordinator need not read the bytes to write the
    manifest; for outputs on its own disk the coordinator computes it here."""
    return await asyncio.to_thread(_file_checksum, path)


def _file_checksum(path: str) -> str:
    crc = Crc32c()
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                crc.update(view[:count])
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return crc.hexdigest()
