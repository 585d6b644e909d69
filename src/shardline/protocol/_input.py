# What an object must be for byte ranges to split it, decided from bytes and
# sizes only: compressed streams cannot be split (refused for N > 1), a
# location that looks like a mistyped S3 URL is refused before anything is
# created, and N is lowered to what the object can use.

from __future__ import annotations

import re

from ..errors import ConfigurationError

__all__ = [
    "COMPRESSION_MAGIC_BYTES",
    "DEFAULT_MIN_SHARD_BYTES",
    "check_location",
    "compressed_input_message",
    "compression_format",
    "usable_shards",
]

#: Below this many bytes per shard, more shards cost more (a worker, its
#: requests, its markers) than they save: `shards` is lowered unless exact.
DEFAULT_MIN_SHARD_BYTES = 1024 * 1024

#: Each format's magic number, as its first bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
#: How many leading bytes `compression_format` needs.
COMPRESSION_MAGIC_BYTES = max(len(magic) for magic, _ in _MAGIC)

#: "s3:/x", "S3://x", "s3//x", "s3:x": meant as S3, but not "s3://" exactly.
_S3_LOOKALIKE = re.compile(r"(?i)s3(:|//)")


def compression_format(prefix: bytes) -> str | None:
    """The compression format whose magic number `prefix` (an object's first bytes) starts with, or None."""
    return next((name for magic, name in _MAGIC if prefix.startswith(magic)), None)


def compressed_input_message(source: str, name: str) -> str:
    """Why a `name`-compressed `source` cannot be split into byte ranges."""
    return (
        f"{source} is {name}-compressed: a compressed stream can only be decoded from its start, so shards "
        "cut at byte ranges would be fed fragments that do not decompress; run it as one shard (-n 1), or "
        "store it uncompressed"
    )


def check_location(location: str, *, what: str) -> None:
    """Refuse `location` (a source or output) that looks like a mistyped S3 URL or is stdin.

    Such a string would otherwise be taken for a local path (and, for an
    output, a directory created under that name).
    """
    if location == "-":
        raise ConfigurationError(
            f"{what}: '-' (stdin) is not supported: shards read byte ranges of a file or an S3 object at once, "
            "which a pipe cannot give; save the input to a file first"
        )
    if _S3_LOOKALIKE.match(location) and not location.startswith("s3://"):
        rest = re.sub(r"(?i)^s3[:/]*", "", location)
        raise ConfigurationError(f"{what}: {location!r} is not an S3 URL; did you mean 's3://{rest}'?")


def usable_shards(size: int, shards: int, min_shard_bytes: int | None) -> int:
    """`shards`, lowered so each gets at least `min_shard_bytes` of a `size`-byte object (one at least)."""
    if min_shard_bytes is None:
        return shards
    return max(1, min(shards, size // min_shard_bytes))
