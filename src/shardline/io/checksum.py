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
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable

from ..errors import StorageError
from . import COPY_CHUNK_BYTES

__all__ = ["CHECKSUM_ALGORITHM", "Crc32c", "file_checksum", "format_checksum"]

#: The algorithm's name in reports and manifests: "crc32c:%08x".
CHECKSUM_ALGORITHM = "crc32c"


def _load_crc32c() -> Callable[[bytes | bytearray | memoryview, int], int]:
    """`crc32c.crc32c`, from the package's extension module alone.

    The package's ``__init__`` imports ``importlib.metadata`` (and argparse,
    for its command line) to set ``__version__``: about 10 ms of CPU, a
    tenth of a local run's whole start.  The extension module needs none of
    it, so it is loaded under a bare stand-in for the package, which is then
    dropped: a later ``import crc32c`` runs the real ``__init__``, finding
    the extension already loaded.
    """
    if "crc32c" in sys.modules:
        from crc32c import crc32c

        return crc32c
    package = importlib.util.find_spec("crc32c")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the crc32c package is not installed")
    stand_in = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("crc32c", None, is_package=True))
    stand_in.__path__ = list(package.submodule_search_locations)
    sys.modules["crc32c"] = stand_in
    try:
        from crc32c._crc32c import crc32c
    finally:
        del sys.modules["crc32c"]
    return crc32c


crc32c = _load_crc32c()


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
