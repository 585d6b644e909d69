# Where a job's results go when `spec.output` is set, the manifest that
# describes them, and the reduce step.
#
# A destination is an S3 prefix or a local directory holding, once a job has
# succeeded:
#
#   part-00000 ... part-NNNNN   each shard's committed output, in shard order
#   result                      the reduce command's stdout (jobs with a reduce)
#   _manifest.json              written last, so its presence means "complete"
#
# Every write replaces its name whole (an S3 PUT or a completed multipart
# upload; a local temp file renamed over the name), so a reader never sees a
# half-written file and a retried attempt simply overwrites.  `remove()`
# deletes the manifest first, for the same reason: a crash halfway through a
# removal must not leave a manifest that names missing parts.  It finds what
# to delete by name rather than by memory, so it also works from a restarted
# coordinator that never wrote those files itself.
#
# Memory stays bounded whatever the output size: S3 uploads hold one part
# (at most `multipart_part_bytes`, or the whole file up to
# `multipart_threshold_bytes`) per call, local copies and the reduce feed move
# 1 MiB at a time.

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Self

from ..aws import AwsSettings
from ..command import CommandOutput
from ..errors import (
    ConfigurationError,
    CoverageError,
    RetryableStorageError,
    ShardlineError,
    StorageError,
)
from ..retry import RetryPolicy
from ..s3bucket import (
    DEFAULT_MULTIPART_PART_BYTES,
    DEFAULT_MULTIPART_THRESHOLD_BYTES,
    S3Bucket,
    S3Buckets,
)
from ..sources import is_s3_url, parse_s3_prefix, wait_uncancellable

__all__ = [
    "MANIFEST_VERSION",
    "Destination",
    "LocalDirectoryDestination",
    "ManifestShard",
    "ReduceRunner",
    "S3Destination",
    "build_manifest",
    "file_checksum",
    "open_destination",
    "output_size",
]

log = logging.getLogger("shardline.coordinator.outputs")

#: Version of the `_manifest.json` layout; bump on any incompatible change.
MANIFEST_VERSION = 1

_RESULT_NAME = "result"
_MANIFEST_NAME = "_manifest.json"
#: Names a destination writes; anything else under the prefix is not ours.
_OUR_NAME = re.compile(r"part-\d{5,}|result|_manifest\.json")
#: Local temp files (`.part-00000.<random>.tmp`) left behind by a crash.
_OUR_TEMP_NAME = re.compile(r"\.(?:part-\d{5,}|result|_manifest\.json)\.\w+\.tmp")

_S3_SCHEME = "s3://"


#: Bytes moved per step by local copies, checksums and the reduce feed.
_CHUNK_BYTES = 1024 * 1024


def _part_name(index: int) -> str:
    return f"part-{index:05d}"


class Destination(abc.ABC):
    """An S3 prefix or a local directory that receives a job's outputs.

    Use as an async context manager or call `aclose()`.  Callers must let
    every `put_*` call end (or cancel it and wait) before `remove()`.
    """

    #: "s3://bucket/prefix/" or the directory's absolute path.
    url: str

    @abc.abstractmethod
    async def check(self) -> None:
        """At submit: prove the destination can be written (creating a local
        directory if missing).  ConfigurationError naming field 'output' if not."""

    @abc.abstractmethod
    async def put_part(self, index: int, path: str) -> str:
        """Copy the local file `path` to shard `index`'s part (overwriting); returns its location."""

    @abc.abstractmethod
    async def put_result(self, path: str) -> str:
        """Copy the reduce output at `path` to "result"; returns its location."""

    @abc.abstractmethod
    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        """Write `manifest` as "_manifest.json" (call it last); returns its location."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Delete every part, result and manifest under the destination (cancel, failure)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_destination(url: str, aws: AwsSettings) -> Destination:
    """An S3Destination for "s3://bucket/prefix/" (a missing trailing slash is
    added; the prefix may be empty), else a LocalDirectoryDestination."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("field 'output': must be s3://bucket/prefix/ or a local directory")
    if is_s3_url(url):
        bucket, prefix = parse_s3_prefix(url, what="field 'output'")
        return S3Destination(bucket, prefix, aws=aws)
    if "://" in url:
        raise ConfigurationError(
            f"field 'output': unsupported URL {url!r} (expected s3://bucket/prefix/ or a local path)"
        )
    return LocalDirectoryDestination(url)


# --- S3 -----------------------------------------------------------------------


class S3Destination(Destination):
    """Objects under one S3 prefix, written through `S3Bucket` (the shared
    retry loop; multipart uploads above `multipart_threshold_bytes`)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        aws: AwsSettings,
        retry_policy: RetryPolicy = RetryPolicy(),
        multipart_threshold_bytes: int = DEFAULT_MULTIPART_THRESHOLD_BYTES,
        multipart_part_bytes: int = DEFAULT_MULTIPART_PART_BYTES,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"S3 prefix must be empty or end with '/', got {prefix!r}")
        self._bucket = S3Bucket(
            bucket,
            aws=aws,
            retry_policy=retry_policy,
            multipart_threshold_bytes=multipart_threshold_bytes,
            multipart_part_bytes=multipart_part_bytes,
        )
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"{_S3_SCHEME}{bucket}/{prefix}"

    async def check(self) -> None:
        # Writing (and deleting) a probe is the only way to learn that we may
        # write: HeadBucket succeeds with read-only access.
        probe = f"{self.prefix}.shardline-write-check-{uuid.uuid4().hex}"
        what = f"cannot write to {self.url}"
        try:
            await self._bucket.request("put_object", what=what, Key=probe, Body=b"")
            await self._bucket.request("delete_object", what=what, Key=probe)
        except RetryableStorageError:
            raise  # S3 is having trouble, the destination may well be fine
        except ShardlineError as exc:
            raise ConfigurationError(f"field 'output': {exc}") from exc

    async def put_part(self, index: int, path: str) -> str:
        return await self._upload_file(_part_name(index), path)

    async def put_result(self, path: str) -> str:
        return await self._upload_file(_RESULT_NAME, path)

    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        key = self.prefix + _MANIFEST_NAME
        body = _manifest_bytes(manifest)
        await self._bucket.request("put_object", Key=key, Body=body, ContentType="application/json")
        return self._bucket.location(key)

    async def remove(self) -> None:
        await self._bucket.request("delete_object", Key=self.prefix + _MANIFEST_NAME)
        for key, upload_id in await self._bucket.list_uploads(self.prefix):
            if self._is_ours(key):  # a multipart upload left open by a crash still costs storage
                await self._bucket.request("abort_multipart_upload", Key=key, UploadId=upload_id)
        keys = [key for key in await self._bucket.list_keys(self.prefix, delimiter="/") if self._is_ours(key)]
        await self._bucket.delete_keys(keys)
        log.info("removed %d objects from %s", len(keys), self.url)

    async def aclose(self) -> None:
        await self._bucket.aclose()

    async def _upload_file(self, name: str, path: str) -> str:
        key = self.prefix + name
        await self._bucket.upload_file(key, path)
        return self._bucket.location(key)

    def _is_ours(self, key: str) -> bool:
        return key.startswith(self.prefix) and _OUR_NAME.fullmatch(key[len(self.prefix) :]) is not None


# --- local directory ----------------------------------------------------------


class _Stopped(Exception):
    """A local write was abandoned because its caller was cancelled."""


class LocalDirectoryDestination(Destination):
    """Files in one local directory, created if missing.

    Each file is written to a temp name in the same directory, fsynced, and
    renamed over its final name, so it appears whole or not at all.  The
    copying runs in a worker thread; cancelling a `put_*` stops it within one
    chunk and waits for its temp file to be deleted.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.url = os.path.abspath(os.fspath(path))
        #: True if `check()` created the directory, so `remove()` may delete it.
        self._created_directory = False

    async def check(self) -> None:
        await asyncio.to_thread(self._check)

    def _check(self) -> None:
        if os.path.exists(self.url) and not os.path.isdir(self.url):
            raise ConfigurationError(f"field 'output': {self.url} exists and is not a directory")
        try:
            os.makedirs(self.url)
            self._created_directory = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigurationError(
                f"field 'output': cannot create directory {self.url}: {exc.strerror or exc}"
            ) from exc
        try:
            fd, probe = tempfile.mkstemp(dir=self.url, prefix=".shardline-write-check-")
        except OSError as exc:
            raise ConfigurationError(
                f"field 'output': cannot write to directory {self.url}: {exc.strerror or exc}"
            ) from exc
        os.close(fd)
        os.unlink(probe)

    async def put_part(self, index: int, path: str) -> str:
        return await self._install(_part_name(index), lambda file, stop: _copy_file(path, file, stop))

    async def put_result(self, path: str) -> str:
        return await self._install(_RESULT_NAME, lambda file, stop: _copy_file(path, file, stop))

    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        body = _manifest_bytes(manifest)
        return await self._install(_MANIFEST_NAME, lambda file, stop: file.write(body))

    async def remove(self) -> None:
        await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        try:
            names = os.listdir(self.url)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot list {self.url}: {exc.strerror or exc}") from exc
        ours = [name for name in names if _OUR_NAME.fullmatch(name) or _OUR_TEMP_NAME.fullmatch(name)]
        # The manifest first: see the module comment.
        ours.sort(key=lambda name: name != _MANIFEST_NAME)
        for name in ours:
            try:
                os.unlink(os.path.join(self.url, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot delete {os.path.join(self.url, name)}: {exc.strerror or exc}") from exc
        if self._created_directory:
            try:
                os.rmdir(self.url)
            except OSError as exc:  # someone else's files are in it: keep it
                log.debug("keeping %s: %s", self.url, exc)
        log.info("removed %d files from %s", len(ours), self.url)

    async def aclose(self) -> None:
        pass  # holds nothing between calls

    async def _install(self, name: str, fill: Callable[[BinaryIO, threading.Event], object]) -> str:
        """Run `fill(temp_file, stop)` in a thread, then rename the temp file to `name`."""
        stop = threading.Event()
        future = asyncio.ensure_future(asyncio.to_thread(self._install_in_thread, name, fill, stop))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            # Wait for the thread, or it could rename its file into place after
            # the caller has moved on to `remove()`.
            with contextlib.suppress(Exception):
                await wait_uncancellable(future)
            raise

    def _install_in_thread(
        self, name: str, fill: Callable[[BinaryIO, threading.Event], object], stop: threading.Event
    ) -> str:
        final = os.path.join(self.url, name)
        try:
            os.makedirs(self.url, exist_ok=True)  # a restarted coordinator may not have run check()
            fd, temp = tempfile.mkstemp(dir=self.url, prefix=f".{name}.", suffix=".tmp")
            try:
                with open(fd, "wb") as file:
                    fill(file, stop)
                    file.flush()
                    os.fsync(file.fileno())  # the data is on disk before the name points at it
                if stop.is_set():
                    raise _Stopped
                os.replace(temp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            _fsync_directory(self.url)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc}") from exc
        return final


def _copy_file(source: str, target: BinaryIO, stop: threading.Event) -> None:
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(source, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            if stop.is_set():
                raise _Stopped
            target.write(view[:count])


def _fsync_directory(path: str) -> None:
    """Make a rename durable (best effort: not every platform or filesystem can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


# --- checksums and the manifest -----------------------------------------------


async def output_size(location: str, buckets: S3Buckets) -> int | None:
    """Size of an attempt's output, a local file or an ``s3://`` object; None if missing."""
    if is_s3_url(location):
        bucket, key = buckets.for_url(location)
        return await bucket.size_of(key)
    try:
        return os.path.getsize(location)
    except FileNotFoundError:
        return None


async def file_checksum(path: str) -> str:
    """The file's CRC32 as "crc32:%08x", the form workers report for the input they emit."""
    return await asyncio.to_thread(_crc32_file, path)


def _crc32_file(path: str) -> str:
    crc = 0
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                crc = zlib.crc32(view[:count], crc)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return f"crc32:{crc:08x}"


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
    covered = 0
    for shard in ordered:
        if not shard.bytes:
            continue  # no line starts here: it lies inside a predecessor's range
        if shard.emitted[0] != covered:
            kind = "gap" if shard.emitted[0] > covered else "overlap"
            raise CoverageError(f"shard {shard.index} emitted {list(shard.emitted)}: {kind} after byte {covered}")
        covered = shard.emitted[1]
    if covered != size:
        raise CoverageError(f"shards emitted [0, {covered}) of a {size}-byte object")
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


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


# --- reduce -------------------------------------------------------------------


class ReduceRunner:
    """``sh -c reduce`` run once on the coordinator; its stdout is written to
    `output_path`, its stdin is the shard outputs fed in order, and `args`
    (the shard output files, in order) are its ``"$@"`` so that a merge such
    as ``sort -m "$@"`` can read each shard's output separately.

    Use as an async context manager (entering starts it; leaving aborts it
    unless `finish()` was awaited), or call `start()`, `feed_file()` per
    shard output, then `finish()`.  A reduce that stops reading early
    (``head -1``) is fine: the rest of the input is skipped, not read.
    """

    def __init__(
        self,
        command: str,
        output_path: str,
        *,
        env: Mapping[str, str] | None = None,
        drop_env: Collection[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        self._output = CommandOutput(command, output_path, env=env, drop_env=drop_env, args=args)
        self._started = False

    async def __aenter__(self) -> Self:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._started = True
        await self._output.start()

    async def feed_file(self, path: str) -> None:
        """Stream the file at `path` into the command's stdin; returns once the
        pipe has taken it all (backpressure), or the command stopped reading."""
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, after any read in flight
        except OSError as exc:
            raise StorageError(f"cannot read {path} for the reduce: {exc.strerror or exc}") from exc
        with file:
            buffer = bytearray(_CHUNK_BYTES)
            # Reusing the buffer is safe: write() returns once the pipe has the bytes.
            view = memoryview(buffer)
            while not self._output.bytes_dropped:
                read = asyncio.ensure_future(asyncio.to_thread(file.readinto, buffer))
                try:
                    # Never close the file under a read still running in a thread.
                    await wait_uncancellable(read)
                except OSError as exc:
                    raise StorageError(f"cannot read {path} for the reduce: {exc.strerror or exc}") from exc
                count = read.result()
                if not count:
                    return
                await self._output.write(view[:count])

    async def finish(self) -> int:
        """Close stdin and wait for the command; returns its output's size in bytes.

        Raises CommandFailedError (with its stderr tail) on a non-zero exit.
        """
        return await self._output.finish()

    async def aclose(self) -> None:
        """Kill the command unless finished; idempotent and cancellation-safe."""
        await self._output.aclose()
