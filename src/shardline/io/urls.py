"""The one parser of shardline's storage URLs: ``s3://bucket/key`` and ``s3://bucket/prefix/``,
and the one answer to "does this host stay on this machine?".

Everything else is a local path.  Errors say what was expected; callers
name the flag or field the URL came from.  The host checks serve both the
daemon (which may serve loopback without `--token-file`) and its clients
(which send a local daemon's token to loopback only), so they live here,
where a client needs no coordinator module to reach them.
"""

from __future__ import annotations

import ipaddress
import re

from ..errors import ConfigurationError

__all__ = ["S3_SCHEME", "ip_literal", "is_loopback_host", "is_s3_url", "parse_s3_prefix", "parse_s3_url", "s3_url"]

S3_SCHEME = "s3://"
#: botocore's own bucket-name check (it accepts legacy names too).
_S3_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")
_LOOPBACK_NAMES = frozenset({"localhost"})


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


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or name to bind or dial) stays on this machine."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:  # not *.localhost: some resolvers ask DNS for those
        return True
    address = ip_literal(name)
    return address is not None and address.is_loopback


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `text` spells (an IPv4-mapped IPv6 address as IPv4, a
    zone index dropped), or None when `text` is a name."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
