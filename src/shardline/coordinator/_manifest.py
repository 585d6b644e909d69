# The manifest: a job's proof of exactness, written last to its destination
# (every shard's nominal and emitted range, input bytes and checksum, the
# attempt and part it came from, output bytes and checksum), and the
# checksums it records.

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ShardlineError
from ..io.checksum import file_checksum
from ..io.s3bucket import S3Buckets
from ..io.urls import is_s3_url
from ..protocol import check_tiling

__all__ = [
    "MANIFEST_VERSION",
    "ManifestShard",
    "build_manifest",
    "file_checksum",
    "manifest_bytes",
    "output_problem",
    "output_size",
]

#: Version of the `_manifest.json` layout; bump on any incompatible change.
MANIFEST_VERSION = 1


async def output_size(location: str, buckets: S3Buckets) -> int | None:
    """Size of an attempt's output, a local file or an ``s3://`` object; None if missing."""
    if is_s3_url(location):
        bucket, key = buckets.for_url(location)
        return await bucket.size_of(key)
    try:
        return os.path.getsize(location)
    except FileNotFoundError:
        return None


async def output_problem(location: str, output_bytes: int, buckets: S3Buckets) -> str | None:
    """Why the attempt's output at `location` does not match DONE, or None."""
    try:
        size = await output_size(location, buckets)
    except (OSError, ShardlineError) as exc:
        return f"output unreadable: {exc}"
    if size is None:
        return f"output {location} does not exist"
    if size != output_bytes:
        return f"output {location} has {size} bytes, DONE says {output_bytes}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestShard:
    """One shard's line in the manifest: what it read and what it wrote."""

    index: int
    #: Nominal byte range [s_i, s_{i+1}).
    range: tuple[int, int]
    #: Input bytes the shard owned and emitted, [h_i, h_{i+1}).
    emitted: tuple[int, int]
    #: Input bytes emitted (emitted[1] - emitted[0]) and their checksum.
    bytes: int
    checksum: str
    #: The attempt whose output was committed.
    attempt: int
    #: Where the part went (what `put_part` returned).
    part: str
    output_bytes: int
    output_checksum: str

    def __post_init__(self) -> None:
        for name in ("range", "emitted"):
            start, end = getattr(self, name)
            if not 0 <= start <= end:
                raise ValueError(f"shard {self.index}: {name} [{start}, {end}) is not a byte range")
        if self.bytes != self.emitted[1] - self.emitted[0]:
            raise ValueError(f"shard {self.index}: {self.bytes} bytes emitted but emitted range is {self.emitted}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "range": list(self.range),
            "emitted": list(self.emitted),
            "bytes": self.bytes,
            "checksum": self.checksum,
            "attempt": self.attempt,
            "part": self.part,
            "output_bytes": self.output_bytes,
            "output_checksum": self.output_checksum,
        }


def build_manifest(
    *,
    job_id: str,
    source: str,
    size: int,
    etag: str,
    delimiter: bytes,
    command: str | None,
    reduce: str | None,
    shards: Sequence[ManifestShard],
    result: str | None,
    result_bytes: int | None,
) -> dict[str, Any]:
    """The `_manifest.json` document.

    Refuses (CoverageError) shards whose emitted ranges do not tile
    [0, size) in index order: a manifest is the job's proof of exactness.
    """
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one byte, got {delimiter!r}")
    if (result is None) != (result_bytes is None):
        raise ValueError("result and result_bytes go together")
    ordered = sorted(shards, key=lambda shard: shard.index)
    if [shard.index for shard in ordered] != list(range(len(ordered))):
        raise ValueError(f"shard indexes must be 0..{len(ordered) - 1}, got {[s.index for s in ordered]}")
    check_tiling(size, ((shard.index, shard.range, shard.emitted) for shard in ordered))
    return {
        "version": MANIFEST_VERSION,
        "job_id": job_id,
        "source": source,
        "size": size,
        "etag": etag,
        "delimiter": chr(delimiter[0]),
        "command": command,
        "reduce": reduce,
        "shards": [shard.to_dict() for shard in ordered],
        "result": {"name": result, "bytes": result_bytes} if result is not None else None,
        "created_at": time.time(),
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()
