"""The one parser of shardline's storage URLs: ``s3://bucket/key`` and ``s3://bucket/prefix/``.

Everything else is a local path.  Errors say what was expected; callers
name the flag or field the URL came from.
"""

from __future__ import annotations

import re

from ..errors import ConfigurationError

__all__ = ["S3_SCHEME", "is_s3_url", "parse_s3_prefix", "parse_s3_url", "s3_url"]

S3_SCHEME = "s3://"
#: botocore's own bucket-name check (it accepts legacy names too).
_S3_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


def s3_url(bucket: str, key: str) -> str:
    """The URL of object `key` in `bucket`."""
    return f"{S3_SCHEME}{bucket}/{key}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split "s3://bucket/key" into (bucket, key); the key may contain '/'."""
    if not url.startswith(S3_SCHEME):
        raise ConfigurationError(f"not an S3 URL (expected s3://bucket/key): {url!r}")
    bucket, slash, key = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ConfigurationError(f"S3 URL has no bucket (expected s3://bucket/key): {url!r}")
    if not slash or not key:
        raise ConfigurationError(f"S3 URL has no key (expected s3://bucket/key): {url!r}")
    return bucket, key


def is_s3_url(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def parse_s3_prefix(url: str, *, what: str) -> tuple[str, str]:
    """Split "s3://bucket/prefix/" into (bucket, prefix); the prefix may be
    empty, and a missing trailing slash is added.  Errors name `what` (the
    field or flag the URL came from)."""
    bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
    if not is_s3_url(url) or not _S3_BUCKET.fullmatch(bucket):
        raise ConfigurationError(f"{what}: not a valid S3 bucket name in {url!r} (expected s3://bucket/prefix/)")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix
