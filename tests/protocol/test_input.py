"""What byte ranges can split, decided from bytes and sizes: protocol/_input.py, and the JobSpec fields behind it."""

from __future__ import annotations

import pytest

from shardline.errors import ConfigurationError
from shardline.protocol import (
    COMPRESSION_MAGIC_BYTES,
    JobSpec,
    check_location,
    compression_format,
    usable_shards,
)


@pytest.mark.parametrize(
    ("prefix", "name"),
    [
        (b"\x1f\x8b\x08\x00\x00\x00", "gzip"),
        (b"BZh91AY&", "bzip2"),
        (b"\xfd7zXZ\x00\x00", "xz"),
        (b"\x28\xb5\x2f\xfd\x00", "zstd"),
        (b"id,name\n", None),
        (b"\x1f", None),  # too short to be gzip's magic number
        (b"", None),
    ],
)
def test_compression_format_by_magic_number(prefix, name):
    assert compression_format(prefix[:COMPRESSION_MAGIC_BYTES]) == name


@pytest.mark.parametrize(("location", "meant"), [("s3:/x", "s3://x"), ("S3://b/k", "s3://b/k"), ("s3//x", "s3://x")])
def test_s3_lookalikes_are_refused_naming_the_intent(location, meant):
    with pytest.raises(ConfigurationError, match=f"did you mean '{meant}'"):
        check_location(location, what="--output")
    with pytest.raises(ConfigurationError, match="field 'source'"):
        JobSpec(source=location, shards=1)


@pytest.mark.parametrize("location", ["s3://bucket/key", "/data/s3:/x", "./s3:x", "big.log", "S3-notes.txt"])
def test_real_urls_and_paths_pass(location):
    check_location(location, what="SOURCE")


def test_stdin_is_refused_with_the_reason():
    with pytest.raises(ConfigurationError, match=r"'-' \(stdin\) is not supported: shards read byte ranges"):
        JobSpec(source="-", shards=2)


@pytest.mark.parametrize(
    ("size", "shards", "min_bytes", "expected"),
    [
        (100_000, 100_000, 1 << 20, 1),
        (10 << 20, 4, 1 << 20, 4),
        (10 << 20, 64, 1 << 20, 10),
        (0, 8, 1, 1),
        (5, 8, None, 8),
    ],
)
def test_usable_shards(size, shards, min_bytes, expected):
    assert usable_shards(size, shards, min_bytes) == expected


def test_new_spec_fields_round_trip_and_are_checked():
    spec = JobSpec(source="x", shards=2, command="grep a", ok_exit=(0, 1), command_retries=2, header_lines=1)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_dict({"source": "x", "shards": 1}).ok_exit == (0,)
    for bad in ({"ok_exit": []}, {"ok_exit": [256]}, {"ok_exit": [True]}, {"command_retries": -1}):
        with pytest.raises(ConfigurationError, match=f"field '{next(iter(bad))}'"):
            JobSpec.from_dict({"source": "x", "shards": 1, "command": "c", **bad})
    with pytest.raises(ConfigurationError, match="field 'header_lines': needs a 'command'"):
        JobSpec(source="x", shards=1, header_lines=1)
