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

import asyncio
import contextlib
import errno
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any, BinaryIO

from ..errors import (
    ConfigurationError,
    RetryableStorageError,
    ShardlineError,
    StorageError,
)
from ..io import COPY_CHUNK_BYTES
from ..io.aio import wait_uncancellable
from ..io.aws import AwsSettings
from ..io.retry import RetryPolicy
from ..io.s3bucket import (
    DEFAULT_COPY_PART_BYTES,
    DEFAULT_MULTIPART_PART_BYTES,
    DEFAULT_MULTIPART_THRESHOLD_BYTES,
    S3_MAX_COPY_BYTES,
    S3Bucket,
)
from ..io.urls import is_s3_url, parse_s3_prefix, s3_url
from ._destination import (
    MANIFEST_NAME,
    OUR_NAME,
    OUR_TEMP_NAME,
    RESULT_NAME,
    SHOWN_ENTRIES,
    Destination,
    not_empty_error,
    our_names,
    part_name,
)
from ._manifest import manifest_bytes

__all__ = ["LocalDirectoryDestination", "S3Destination", "open_destination"]

log = logging.getLogger("shardline.coordinator.outputs")


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
    retry loop; multipart uploads above `multipart_threshold_bytes`).  A part
    already in S3 (a Lambda worker's output) is copied there by S3 itself."""

    copies_remote_parts = True

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        aws: AwsSettings,
        retry_policy: RetryPolicy,
        multipart_threshold_bytes: int = DEFAULT_MULTIPART_THRESHOLD_BYTES,
        multipart_part_bytes: int = DEFAULT_MULTIPART_PART_BYTES,
        copy_threshold_bytes: int = S3_MAX_COPY_BYTES,
        copy_part_bytes: int = DEFAULT_COPY_PART_BYTES,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"S3 prefix must be empty or end with '/', got {prefix!r}")
        self._bucket = S3Bucket(
            bucket,
            aws=aws,
            retry_policy=retry_policy,
            multipart_threshold_bytes=multipart_threshold_bytes,
            multipart_part_bytes=multipart_part_bytes,
            copy_threshold_bytes=copy_threshold_bytes,
            copy_part_bytes=copy_part_bytes,
        )
        self.bucket = bucket
        self.prefix = prefix
        self.url = s3_url(bucket, prefix)

    async def check(self, *, require_empty: bool) -> None:
        try:
            if require_empty:
                listing = await self._bucket.request(
                    "list_objects_v2", what=f"cannot list {self.url}", Prefix=self.prefix, MaxKeys=SHOWN_ENTRIES
                )
                found = [item["Key"][len(self.prefix) :] for item in listing.get("Contents", ())]
                if found:
                    raise not_empty_error(self.url, found, more=bool(listing.get("IsTruncated")))
            # Writing (and deleting) a probe is the only way to learn that we
            # may write: HeadBucket succeeds with read-only access.
            probe = f"{self.prefix}.shardline-write-check-{os.urandom(16).hex()}"
            what = f"cannot write to {self.url}"
            await self._bucket.request("put_object", what=what, Key=probe, Body=b"")
            await self._bucket.request("delete_object", what=what, Key=probe)
        except (RetryableStorageError, ConfigurationError):
            raise  # S3 is having trouble (the destination may well be fine), or the refusal above
        except ShardlineError as exc:
            raise ConfigurationError(f"field 'output': {exc}") from exc

    async def put_part(self, index: int, path: str) -> str:
        return await self._upload_file(part_name(index), path)

    async def copy_part(self, index: int, source: str, *, size: int) -> str:
        key = self.prefix + part_name(index)
        await self._bucket.copy_from(key, source, size=size)
        return self._bucket.location(key)

    async def put_result(self, path: str) -> str:
        return await self._upload_file(RESULT_NAME, path)

    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        key = self.prefix + MANIFEST_NAME
        body = manifest_bytes(manifest)
        await self._bucket.request("put_object", Key=key, Body=body, ContentType="application/json")
        return self._bucket.location(key)

    async def remove_manifest(self) -> None:
        await self._bucket.request("delete_object", Key=self.prefix + MANIFEST_NAME)

    async def remove(self, names: Collection[str]) -> None:
        doomed = our_names(names)
        if doomed:  # S3 has no directory to clean up
            await self._delete(doomed.__contains__)

    async def remove_others(self, keep: Collection[str]) -> None:
        kept = our_names(keep)
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
        return name if key.startswith(self.prefix) and OUR_NAME.fullmatch(name) else None


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
                raise not_empty_error(self.url, entries, more=False)
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
        body = manifest_bytes(manifest)
        return await self._install(MANIFEST_NAME, lambda file, stop: file.write(body))

    async def remove_manifest(self) -> None:
        await asyncio.to_thread(self._delete, lambda name, temp: name == MANIFEST_NAME and not temp)

    async def remove(self, names: Collection[str]) -> None:
        doomed = our_names(names)
        await asyncio.to_thread(self._delete, lambda name, temp: name in doomed, remove_directory=True)

    async def remove_others(self, keep: Collection[str]) -> None:
        kept = our_names(keep)
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
            if OUR_NAME.fullmatch(entry):
                name, temp = entry, False
            elif match := OUR_TEMP_NAME.fullmatch(entry):
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
            os.fchmod(fd, _NEW_FILE_MODE)  # mkstemp's 0600 is for the temp name; the file is the user's
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


def _umask() -> int:
    """The process's umask (read by setting it, at import, before any thread can create files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: What open(2) would give an output file: 0666 less the umask, as `cp` or a shell redirect does.
_NEW_FILE_MODE = 0o666 & ~_umask()


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
