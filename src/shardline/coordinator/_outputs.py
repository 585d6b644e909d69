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
# half-written file and a retried attempt simply overwrites.  Removals delete
# the manifest first, for the same reason: a crash halfway through a removal
# must not leave a manifest that names missing parts.
#
# Outputs are never mixed with an earlier job's files (DESIGN §9).  At submit
# a destination must be empty -- a directory with no entry, a prefix with no
# object under it -- unless the job asked to `overwrite`; `OutputPolicy`
# decides which destinations a coordinator may write at all.  The job (see
# `_job.Job`) then removes only names it may have written when it fails, and
# an overwriting job removes the earlier output's manifest before its first
# part and the earlier output's other files only after its own manifest is
# in place.  Only the names below are ever removed, never a user's files.
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

from ..errors import (
    ConfigurationError,
    RetryableStorageError,
    ShardlineError,
    StorageError,
)
from ..io import COPY_CHUNK_BYTES
from ..io.aio import wait_uncancellable
from ..io.aws import AwsSettings
from ..io.command import CommandOutput
from ..io.retry import RetryPolicy
from ..io.s3bucket import DEFAULT_MULTIPART_PART_BYTES, DEFAULT_MULTIPART_THRESHOLD_BYTES, S3Bucket, S3Buckets
from ..io.urls import is_s3_url, parse_s3_prefix
from ..protocol import check_tiling

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "RESULT_NAME",
    "Destination",
    "LocalDirectoryDestination",
    "ManifestShard",
    "OutputPolicy",
    "ReduceRunner",
    "S3Destination",
    "build_manifest",
    "file_checksum",
    "open_destination",
    "output_size",
    "part_name",
]

log = logging.getLogger("shardline.coordinator.outputs")

#: Version of the `_manifest.json` layout; bump on any incompatible change.
MANIFEST_VERSION = 1

RESULT_NAME = "result"
MANIFEST_NAME = "_manifest.json"
#: Names a destination writes; anything else under the prefix is not ours.
_OUR_NAME = re.compile(r"part-\d{5,}|result|_manifest\.json")
#: Local temp files (`.part-00000.<random>.tmp`) left behind by a crash; group 1 is the name they were for.
_OUR_TEMP_NAME = re.compile(r"\.(part-\d{5,}|result|_manifest\.json)\.\w+\.tmp")
#: Entries of a non-empty destination named in the refusal.
_SHOWN_ENTRIES = 3

_S3_SCHEME = "s3://"


def part_name(index: int) -> str:
    """The destination name of shard `index`'s part."""
    return f"part-{index:05d}"


def _our_names(names: Collection[str]) -> frozenset[str]:
    """`names`, checked to be ones a destination writes: a bug must not reach a user's files."""
    strangers = [name for name in names if not _OUR_NAME.fullmatch(name)]
    if strangers:
        raise ValueError(f"not a name a destination writes: {strangers[0]!r}")
    return frozenset(names)


def _not_empty(url: str, entries: Sequence[str], *, more: bool) -> ConfigurationError:
    shown = ", ".join(repr(entry) for entry in entries[:_SHOWN_ENTRIES])
    if more or len(entries) > _SHOWN_ENTRIES:
        shown += ", ..."
    return ConfigurationError(
        f"field 'output': {url} is not empty (it holds {shown}); choose a new or empty destination, or set "
        "'overwrite' (shardline run --overwrite) to replace the shardline output there"
    )


# --- which destinations a coordinator may write ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputPolicy:
    """Which destinations (`JobSpec.output`) a coordinator may write.

    Built at the edge: `shardline serve` from --output-root and
    --output-bucket, `shardline run` with `anywhere` (the user's own process
    may write wherever its user may).  The default allows nothing, so a
    coordinator nobody configured writes no output files at all.
    """

    #: Local output directories must lie below this absolute directory, also
    #: once symlinks are resolved; None: no local outputs.
    local_root: str | None = None
    #: Buckets that S3 outputs may go to.
    s3_buckets: frozenset[str] = frozenset()
    #: Any local path (relative ones against the working directory, ".."
    #: allowed) and any bucket.
    anywhere: bool = False

    def __post_init__(self) -> None:
        if self.local_root is not None and not os.path.isabs(self.local_root):
            raise ConfigurationError(f"the output root must be an absolute path, got {self.local_root!r}")

    def check(self, output: str) -> None:
        """Refuse (ConfigurationError naming field 'output') a destination
        this policy does not allow.  Resolves symlinks: call it off the event loop."""
        if self.anywhere:
            return
        if is_s3_url(output):
            bucket, prefix = parse_s3_prefix(output, what="field 'output'")
            self._check_bucket(bucket, prefix)
        else:
            self._check_directory(output)

    def _check_bucket(self, bucket: str, prefix: str) -> None:
        if ".." in prefix.split("/"):
            raise ConfigurationError(
                f"field 'output': s3://{bucket}/{prefix} has a '..' component; name the prefix without one"
            )
        if bucket in self.s3_buckets:
            return
        if self.s3_buckets:
            allowed = ", ".join(sorted(self.s3_buckets))
            raise ConfigurationError(
                f"field 'output': this coordinator may not write to bucket {bucket!r}, only to {allowed} (its "
                "operator allows more with 'shardline serve --output-bucket NAME')"
            )
        raise ConfigurationError(
            "field 'output': this coordinator writes to no S3 bucket (its operator can allow one with "
            "'shardline serve --output-bucket NAME')"
        )

    def _check_directory(self, path: str) -> None:
        if self.local_root is None:
            raise ConfigurationError(
                "field 'output': this coordinator writes no local directories (its operator can allow some with "
                "'shardline serve --output-root DIR'); leave 'output' unset to read the output from "
                "GET /jobs/{id}/output"
            )
        if not os.path.isabs(path):
            raise ConfigurationError(
                f"field 'output': {path!r} is a relative path; give an absolute one below {self.local_root}"
            )
        if ".." in path.split(os.sep):
            raise ConfigurationError(f"field 'output': {path!r} has a '..' component; name the directory without one")
        root = os.path.realpath(self.local_root)
        real = os.path.realpath(path)
        if real == root or os.path.commonpath([root, real]) != root:
            resolved = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
            raise ConfigurationError(
                f"field 'output': {path}{resolved} is not below this coordinator's output root {self.local_root} "
                "(shardline serve --output-root)"
            )


class Destination(abc.ABC):
    """An S3 prefix or a local directory that receives a job's outputs.

    Use as an async context manager or call `aclose()`.  Callers must let
    every `put_*` call end (or cancel it and wait) before `remove()`.
    """

    #: "s3://bucket/prefix/" or the directory's absolute path.
    url: str

    @abc.abstractmethod
    async def check(self, *, require_empty: bool) -> None:
        """At submit and resume: with `require_empty`, refuse a destination
        that holds anything, before touching it; then prove it can be written
        (creating a local directory if missing).  ConfigurationError naming
        field 'output' if not."""

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
    async def remove_manifest(self) -> None:
        """Delete "_manifest.json", durably: whatever is here stops claiming to be complete."""

    @abc.abstractmethod
    async def remove(self, names: Collection[str]) -> None:
        """Delete these names ("part-00003", "result", "_manifest.json"; the
        manifest first) and what a crash left of their writes; then a
        directory that `check()` created, if nothing else is in it."""

    @abc.abstractmethod
    async def remove_others(self, keep: Collection[str]) -> None:
        """Delete every name a destination writes except `keep` (and every
        leftover of an interrupted write); never anything else."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_destination(url: str, aws: AwsSettings, *, retry_policy: RetryPolicy) -> Destination:
    """An S3Destination for "s3://bucket/prefix/" (a missing trailing slash is
    added; the prefix may be empty), else a LocalDirectoryDestination."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("field 'output': must be s3://bucket/prefix/ or a local directory")
    if is_s3_url(url):
        bucket, prefix = parse_s3_prefix(url, what="field 'output'")
        return S3Destination(bucket, prefix, aws=aws, retry_policy=retry_policy)
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
        retry_policy: RetryPolicy,
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

    async def check(self, *, require_empty: bool) -> None:
        try:
            if require_empty:
                listing = await self._bucket.request(
                    "list_objects_v2", what=f"cannot list {self.url}", Prefix=self.prefix, MaxKeys=_SHOWN_ENTRIES
                )
                found = [item["Key"][len(self.prefix) :] for item in listing.get("Contents", ())]
                if found:
                    raise _not_empty(self.url, found, more=bool(listing.get("IsTruncated")))
            # Writing (and deleting) a probe is the only way to learn that we
            # may write: HeadBucket succeeds with read-only access.
            probe = f"{self.prefix}.shardline-write-check-{uuid.uuid4().hex}"
            what = f"cannot write to {self.url}"
            await self._bucket.request("put_object", what=what, Key=probe, Body=b"")
            await self._bucket.request("delete_object", what=what, Key=probe)
        except (RetryableStorageError, ConfigurationError):
            raise  # S3 is having trouble (the destination may well be fine), or the refusal above
        except ShardlineError as exc:
            raise ConfigurationError(f"field 'output': {exc}") from exc

    async def put_part(self, index: int, path: str) -> str:
        return await self._upload_file(part_name(index), path)

    async def put_result(self, path: str) -> str:
        return await self._upload_file(RESULT_NAME, path)

    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        key = self.prefix + MANIFEST_NAME
        body = _manifest_bytes(manifest)
        await self._bucket.request("put_object", Key=key, Body=body, ContentType="application/json")
        return self._bucket.location(key)

    async def remove_manifest(self) -> None:
        await self._bucket.request("delete_object", Key=self.prefix + MANIFEST_NAME)

    async def remove(self, names: Collection[str]) -> None:
        doomed = _our_names(names)
        if doomed:  # S3 has no directory to clean up
            await self._delete(doomed.__contains__)

    async def remove_others(self, keep: Collection[str]) -> None:
        kept = _our_names(keep)
        await self._delete(lambda name: name not in kept)

    async def _delete(self, select: Callable[[str], bool]) -> None:
        """Delete our names that `select` picks (the manifest first) and their open uploads."""
        if select(MANIFEST_NAME):
            await self.remove_manifest()
        for key, upload_id in await self._bucket.list_uploads(self.prefix):
            name = self._our_name(key)
            if name is not None and select(name):  # an upload left open by a crash still costs storage
                await self._bucket.request("abort_multipart_upload", Key=key, UploadId=upload_id)
        keys = []
        for key in await self._bucket.list_keys(self.prefix, delimiter="/"):
            name = self._our_name(key)
            if name is not None and name != MANIFEST_NAME and select(name):
                keys.append(key)
        await self._bucket.delete_keys(keys)
        log.info("removed %d objects from %s", len(keys), self.url)

    async def aclose(self) -> None:
        await self._bucket.aclose()

    async def _upload_file(self, name: str, path: str) -> str:
        key = self.prefix + name
        await self._bucket.upload_file(key, path)
        return self._bucket.location(key)

    def _our_name(self, key: str) -> str | None:
        """The name of `key` below the prefix if it is one we write, else None."""
        name = key[len(self.prefix) :]
        return name if key.startswith(self.prefix) and _OUR_NAME.fullmatch(name) else None


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

    async def check(self, *, require_empty: bool) -> None:
        await asyncio.to_thread(self._check, require_empty)

    def _check(self, require_empty: bool) -> None:
        if os.path.exists(self.url) and not os.path.isdir(self.url):
            raise ConfigurationError(f"field 'output': {self.url} exists and is not a directory")
        if require_empty:
            try:
                entries = sorted(os.listdir(self.url))
            except FileNotFoundError:
                entries = []
            except OSError as exc:
                raise ConfigurationError(
                    f"field 'output': cannot list directory {self.url}: {exc.strerror or exc}"
                ) from exc
            if entries:
                raise _not_empty(self.url, entries, more=False)
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
        return await self._install(part_name(index), lambda file, stop: _copy_file(path, file, stop))

    async def put_result(self, path: str) -> str:
        return await self._install(RESULT_NAME, lambda file, stop: _copy_file(path, file, stop))

    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        body = _manifest_bytes(manifest)
        return await self._install(MANIFEST_NAME, lambda file, stop: file.write(body))

    async def remove_manifest(self) -> None:
        await asyncio.to_thread(self._delete, lambda name, temp: name == MANIFEST_NAME and not temp)

    async def remove(self, names: Collection[str]) -> None:
        doomed = _our_names(names)
        await asyncio.to_thread(self._delete, lambda name, temp: name in doomed, remove_directory=True)

    async def remove_others(self, keep: Collection[str]) -> None:
        kept = _our_names(keep)
        await asyncio.to_thread(self._delete, lambda name, temp: temp or name not in kept)

    def _delete(self, select: Callable[[str, bool], bool], *, remove_directory: bool = False) -> None:
        """Delete the entries `select(name, is_temp_file)` picks among ours, the manifest first."""
        try:
            entries = os.listdir(self.url)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot list {self.url}: {exc.strerror or exc}") from exc
        doomed = []
        for entry in entries:
            if _OUR_NAME.fullmatch(entry):
                name, temp = entry, False
            elif match := _OUR_TEMP_NAME.fullmatch(entry):
                name, temp = match[1], True
            else:
                continue  # not ours
            if select(name, temp):
                doomed.append(entry)
        # The manifest first: see the module comment.
        doomed.sort(key=lambda entry: entry != MANIFEST_NAME)
        for entry in doomed:
            try:
                os.unlink(os.path.join(self.url, entry))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot delete {os.path.join(self.url, entry)}: {exc.strerror or exc}") from exc
        if doomed:
            _fsync_directory(self.url)  # gone for good before anything is written next
        if remove_directory and self._created_directory:
            try:
                os.rmdir(self.url)
            except OSError as exc:  # someone else's files are in it: keep it
                log.debug("keeping %s: %s", self.url, exc)
        log.info("removed %d files from %s", len(doomed), self.url)

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
    buffer = bytearray(COPY_CHUNK_BYTES)
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
    buffer = bytearray(COPY_CHUNK_BYTES)
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
            buffer = bytearray(COPY_CHUNK_BYTES)
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
