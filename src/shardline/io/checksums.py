# The checksum of a whole output file, in the form workers report for the
# input they emit.  One helper for both sides: a remote worker (Lambda)
# reports its output's checksum in DONE, so the coordinator never has to
# read the bytes to write the manifest; for outputs on its own disk the
# coordinator computes the same value itself.

from __future__ import annotations

import asyncio
import zlib

from ..errors import StorageError
from . import COPY_CHUNK_BYTES

__all__ = ["file_checksum"]


async def file_checksum(path: str) -> str:
    """The file's CRC32 as "crc32:%08x", the form workers report for the input they emit."""
    return await asyncio.to_thread(_crc32_file, path)


def _crc32_file(path: str) -> str:
    crc = 0
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                crc = zlib.crc32(view[:count], crc)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return f"crc32:{crc:08x}"
