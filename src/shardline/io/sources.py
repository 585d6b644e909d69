# Where bytes come from: an S3 object or a local file.
#
# An ObjectSource answers two questions and nothing more: how big is the
# object and which version is it (`stat`), and "fill this buffer with bytes
# [start, start + len(buffer)) of that version" (`read_into`, one request).
# Retries, resumption and concurrency live one layer up in `_reader`; a
# source only has to make every failure a shardline error and report how far
# it got before failing.
#
# Partial progress: `read_into` takes an optional `on_bytes(count)` callback,
# called on the event loop thread each time `count` more bytes have been
# copied into the buffer, in order.  When `read_into` raises, the sum of the
# counts reported so far is the number of valid bytes at the front of the
# buffer, so the caller resumes at `start + sum` without refetching them.

from __future__ import annotations

import abc
import asyncio
import errno
import os
import stat as stat_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from ..errors import (
    ObjectChangedError,
    SourceAccessError,
    SourceNotFoundError,
    StorageError,
    StorageNetworkError,
)
from . import COPY_CHUNK_BYTES
from .aio import wait_uncancellable
from .aws import AwsSettings, ClientPool, LazyClient, translate_error
from .checksum import Crc32c
from .urls import is_s3_url, parse_s3_url

__all__ = [
    "LocalFileSource",
    "ObjectInfo",
    "ObjectSource",
    "OnBytes",
    "S3Source",
    "open_source",
]

#: Called with the number of bytes just copied into the caller's buffer.
OnBytes = Callable[[int], None]


_NOT_FOUND_STATUS = 404

#: Local reads up to this size run on the event loop, not in the thread pool
#: (`LocalFileSource._in_thread_unless_small`).
_INLINE_READ_BYTES = 64 * 1024

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectInfo:
    """Size and version of an object; `etag` pins every later read to it."""

    size: int
    etag: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"object size must be >= 0, got {self.size}")


class ObjectSource(abc.ABC):
    """One object, read by ranges.  Use as an async context manager."""

    #: "s3://bucket/key" or the local path; used in every message.
    description: str

    @abc.abstractmethod
    async def stat(self) -> ObjectInfo:
        """Size and ETag of the object as it is now (one request, no retry).

        Raises SourceNotFoundError, SourceAccessError, or StorageError
        (RetryableStorageError for transient causes).
        """

    @abc.abstractmethod
    async def read_into(
        self,
        start: int,
        view: memoryview,
        *,
        etag: str,
        on_bytes: OnBytes | None = None,
    ) -> None:
        """Fill `view` with bytes [start, start + len(view)) of version `etag`.

        One request; an empty `view` makes none.  Progress is reported through
        `on_bytes` (see the module comment).  Raises RetryableStorageError for
        transient failures, including a body that ends early;
        ObjectChangedError if the object is no longer version `etag`.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections or file descriptors; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def open_source(location: str, aws: AwsSettings, *, clients: ClientPool | None = None) -> ObjectSource:
    """An S3Source for "s3://bucket/key", else a LocalFileSource for the path.

    With `clients`, an S3 source uses the pool's shared client.
    """
    if is_s3_url(location):
        bucket, key = parse_s3_url(location)
        return S3Source(bucket, key, aws=aws, clients=clients)
    return LocalFileSource(location)


def _check_range(start: int, view: memoryview) -> None:
    if start < 0:
        raise ValueError(f"read start must be >= 0, got {start}")
    if view.readonly:
        raise ValueError("read_into needs a writable buffer")


# --- local files --------------------------------------------------------------


def _local_etag(st: os.stat_result) -> str:
    """A version tag for a local file: changes whenever it is replaced or written."""
    return f"local-{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` at `offset` without an intermediate copy where possible."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


class LocalFileSource(ObjectSource):
    """A local file, read with `os.pread` in the default thread pool.

    The ETag is derived from (st_dev, st_ino, st_size, st_mtime_ns), and every
    read re-checks it with `fstat` after reading, so a file written to or
    truncated mid-job raises ObjectChangedError rather than mixing versions.
    The descriptor is opened on first use and kept until `aclose`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.description = self.path
        self._fd: int | None = None
        self._closed = False
        # Thread-pool reads still running, so aclose never closes their fd.
        self._in_flight: set[asyncio.Future[Any]] = set()

    async def stat(self) -> ObjectInfo:
        st = await self._in_thread(os.fstat, self._open())
        return ObjectInfo(size=st.st_size, etag=_local_etag(st))

    async def read_into(
        self,
        start: int,
        view: memoryview,
        *,
        etag: str,
        on_bytes: OnBytes | None = None,
    ) -> None:
        _check_range(start, view)
        if not view:
            return
        fd = self._open()
        filled = 0
        while filled < len(view):
            chunk = view[filled : filled + COPY_CHUNK_BYTES]
            count = await self._in_thread_unless_small(len(chunk), self._read_chunk, fd, chunk, start + filled, etag)
            filled += count
            if on_bytes is not None:
                on_bytes(count)

    def _read_chunk(self, fd: int, chunk: memoryview, offset: int, etag: str) -> int:
        """One pread, then prove the file is still version `etag` (thread pool)."""
        try:
            count = _pread_into(fd, chunk, offset)
            st = os.fstat(fd)
        except OSError as exc:
            raise translate_error(exc, what=f"reading {self.path}") from exc
        if _local_etag(st) != etag:
            raise ObjectChangedError(
                f"{self.path}: the file changed during the job (expected version {etag}, found {_local_etag(st)})"
            )
        if count == 0:
            raise StorageError(
                f"{self.path}: asked for bytes from offset {offset} but the file has only {st.st_size} bytes"
            )
        return count

    async def read_checksummed(self, start: int, view: memoryview, *, etag: str, crc: Crc32c) -> None:
        """Fill `view` like `read_into` and add its bytes to `crc`, both in one
        hop to the thread pool: CRC32C releases the GIL, so the checksum runs
        beside the event loop (and beside other shards'), on bytes the read
        has just brought into the CPU's cache.  No progress callback: the
        view is filled, or this raises."""
        _check_range(start, view)
        if view:
            await self._in_thread_unless_small(len(view), self._read_all, self._open(), view, start, etag, crc)

    def _read_all(self, fd: int, view: memoryview, start: int, etag: str, crc: Crc32c) -> None:
        filled = 0
        while filled < len(view):
            filled += self._read_chunk(fd, view[filled:], start + filled, etag)
        crc.update(view)

    def descriptor(self) -> int:
        """The open file's descriptor (opened on first use), for kernel-side
        copies; it stays owned by the source, closed by `aclose`."""
        return self._open()

    def check_version(self, etag: str) -> None:
        """Raise ObjectChangedError unless the file is still version `etag` (one fstat)."""
        try:
            st = os.fstat(self._open())
        except OSError as exc:
            raise translate_error(exc, what=f"reading {self.path}") from exc
        if _local_etag(st) != etag:
            raise ObjectChangedError(
                f"{self.path}: the file changed during the job (expected version {etag}, found {_local_etag(st)})"
            )

    def _open(self) -> int:
        """The file's descriptor, opened on first use.

        Synchronous on purpose: with no await between the check and the
        assignment, concurrent first reads cannot open the file twice.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._fd is not None:
            return self._fd
        # O_NONBLOCK keeps open() of a FIFO from hanging; regular files ignore it.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise self._open_error(exc) from exc
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            os.close(fd)
            raise self._open_error(exc) from exc
        if not stat_module.S_ISREG(mode):
            os.close(fd)
            kind = "is a directory" if stat_module.S_ISDIR(mode) else "not a regular file"
            raise SourceAccessError(f"cannot read {self.path}: {kind}")
        self._fd = fd
        return fd

    def _open_error(self, exc: OSError) -> Exception:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return SourceNotFoundError(f"no such file: {self.path}")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return SourceAccessError(f"cannot read {self.path}: permission denied")
        if exc.errno == errno.EISDIR:
            return SourceAccessError(f"cannot read {self.path}: is a directory")
        return SourceAccessError(f"cannot read {self.path}: {exc.strerror or exc}")

    async def _in_thread_unless_small(self, size: int, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the thread pool, or here if it reads at most
        _INLINE_READ_BYTES: a small pread of a page-cached file takes
        microseconds, a hop to the pool and back tens of them and a GIL
        hand-off (a head scan's window, a tail: a small shard makes several)."""
        if size <= _INLINE_READ_BYTES:
            return function(*args)
        return await self._in_thread(function, *args)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        # Shielded: a cancelled caller must not leave a pread running on a
        # descriptor that aclose is about to close (or the OS to reuse).
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._in_flight.add(future)
        future.add_done_callback(self._forget)
        return await asyncio.shield(future)

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: a cancelled caller never will

    async def aclose(self) -> None:
        self._closed = True
        while self._in_flight:
            await wait_uncancellable(asyncio.gather(*self._in_flight, return_exceptions=True))
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


# --- S3 -----------------------------------------------------------------------


class S3Source(ObjectSource):
    """An S3 object, read with ranged GETs pinned by If-Match to one ETag.

    The aiobotocore client is created on first use (so constructing a source
    costs nothing) and closed by `aclose` -- unless it is the shared one of
    `clients`, which the pool's owner closes.
    """

    def __init__(self, bucket: str, key: str, *, aws: AwsSettings, clients: ClientPool | None = None) -> None:
        self.bucket = bucket
        self.key = key
        self.description = f"s3://{bucket}/{key}"
        self._owns_client = clients is None
        self._s3 = LazyClient(aws, "s3") if clients is None else clients.lazy(aws, "s3")

    async def stat(self) -> ObjectInfo:
        s3 = await self._s3.get()
        try:
            response = await s3.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _http_status(exc) == _NOT_FOUND_STATUS:
                # HEAD responses carry no error body, so a 404 cannot say
                # whether the bucket or the key is missing; ask the bucket.
                raise await self._not_found_error() from exc
            raise translate_error(exc, what=self.description) from exc
        return ObjectInfo(size=int(response["ContentLength"]), etag=str(response["ETag"]))

    async def _not_found_error(self) -> Exception:
        s3 = await self._s3.get()
        try:
            await s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _http_status(exc) == _NOT_FOUND_STATUS:
                return SourceNotFoundError(f"no such bucket {self.bucket!r}")
            return translate_error(exc, what=self.description)
        return SourceNotFoundError(f"no such key {self.key!r} in bucket {self.bucket!r}")

    async def read_into(
        self,
        start: int,
        view: memoryview,
        *,
        etag: str,
        on_bytes: OnBytes | None = None,
    ) -> None:
        _check_range(start, view)
        if not view:
            return
        wanted = len(view)
        # Half-open everywhere else; the Range header's end is inclusive.
        byte_range = f"bytes={start}-{start + wanted - 1}"
        what = f"{self.description} {byte_range}"
        s3 = await self._s3.get()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=self.key, Range=byte_range, IfMatch=etag)
        except Exception as exc:
            raise translate_error(exc, what=what) from exc
        body = response["Body"]
        try:
            length = int(response.get("ContentLength", -1))
            if length != wanted:
                # Not a transient failure: the server answered a different range
                # (past the end of the object, or Range ignored).
                raise StorageError(
                    f"{what}: server sent {length} bytes (Content-Range "
                    f"{response.get('ContentRange')!r}) for a {wanted}-byte range"
                )
            read_chunk = _chunk_reader(body)
            filled = 0
            while filled < wanted:
                try:
                    data = await read_chunk(min(COPY_CHUNK_BYTES, wanted - filled))
                except Exception as exc:
                    raise translate_error(exc, what=f"{what} after {filled} bytes") from exc
                if not data:
                    raise StorageNetworkError(f"{what}: body ended after {filled} of {wanted} bytes")
                if filled + len(data) > wanted:
                    raise StorageError(f"{what}: server sent more than the {wanted} bytes of the range")
                view[filled : filled + len(data)] = data
                filled += len(data)
                if on_bytes is not None:
                    on_bytes(len(data))
        finally:
            # Closing an unfinished body drops its connection rather than
            # returning a half-read stream to the pool.
            body.close()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._s3.aclose()


def _chunk_reader(body: Any) -> Callable[[int], Any]:
    """The cheapest way to pull the next bytes off a GET body.

    aiobotocore's StreamingBody.read(n) joins aiohttp's buffered network
    chunks into one new bytes object (a full extra copy of every part);
    aiohttp's readany() hands over the next chunk as it arrived.  Falls back
    to read(n) for a body that is not aiohttp-backed.
    """
    content = getattr(getattr(body, "__wrapped__", None), "content", None)
    if content is not None and hasattr(content, "readany"):

        async def readany(_limit: int) -> bytes:
            return await content.readany()

        return readany
    return body.read


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
