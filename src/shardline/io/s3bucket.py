"""Writing, reading back and deleting whole objects in one S3 bucket.

Shared by the worker (a remote worker uploads its attempt output, since the
coordinator cannot read its disk) and the coordinator (it fetches committed
attempt outputs and writes job outputs).  Every call goes through the one
retry loop, `shardline.io.retry`.

Memory stays bounded whatever the file size: an upload holds one part (at
most `multipart_part_bytes`, or the whole file up to
`multipart_threshold_bytes`) per call, read afresh from disk for every try;
a download streams to disk 1 MiB at a time; a copy between objects
(`copy_from`) is done by S3 itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Self

from ..errors import InputError, ShardlineError, SourceNotFoundError, StorageError
from . import COPY_CHUNK_BYTES
from .aio import wait_uncancellable
from .aws import AwsSettings, ClientPool, LazyClient, translate_error
from .retry import RetryPolicy, retry
from .urls import parse_s3_url

__all__ = [
    "DEFAULT_COPY_PART_BYTES",
    "DEFAULT_MULTIPART_PART_BYTES",
    "DEFAULT_MULTIPART_THRESHOLD_BYTES",
    "S3_MAX_COPY_BYTES",
    "S3Bucket",
    "S3Buckets",
]

log = logging.getLogger("shardline.io.s3bucket")

_S3_SCHEME = "s3://"
#: Defaults as in the AWS CLI: a file above 8 MiB goes in 8 MiB parts.
DEFAULT_MULTIPART_THRESHOLD_BYTES = 8 * 1024 * 1024
DEFAULT_MULTIPART_PART_BYTES = 8 * 1024 * 1024
#: S3 refuses smaller parts (except the last one of an upload).
S3_MIN_PART_BYTES = 5 * 1024 * 1024
#: The largest object one CopyObject call may copy; bigger ones go by UploadPartCopy.
S3_MAX_COPY_BYTES = 5 * 1024**3
#: Parts of a multipart copy: few requests, each well below S3's 5 GiB part limit.
DEFAULT_COPY_PART_BYTES = 512 * 1024 * 1024
#: S3 allows at most this many parts per upload; bigger files get bigger parts.
_S3_MAX_PARTS = 10_000
#: DeleteObjects takes at most this many keys per request.
_S3_DELETE_BATCH = 1000


class S3Bucket:
    """Whole-object calls on one bucket, through the shared retry loop.

    Errors are StorageError (RetryableStorageError for transient causes):
    these objects are outputs, so "no such bucket" or "access denied" is
    about where results go, not about the job's input.  The aiobotocore
    client is created on first use and closed by `aclose()`.
    """

    def __init__(
        self,
        bucket: str,
        *,
        aws: AwsSettings,
        retry_policy: RetryPolicy,
        multipart_threshold_bytes: int = DEFAULT_MULTIPART_THRESHOLD_BYTES,
        multipart_part_bytes: int = DEFAULT_MULTIPART_PART_BYTES,
        clients: ClientPool | None = None,
        copy_threshold_bytes: int = S3_MAX_COPY_BYTES,
        copy_part_bytes: int = DEFAULT_COPY_PART_BYTES,
    ) -> None:
        for name, value in (("multipart_part_bytes", multipart_part_bytes), ("copy_part_bytes", copy_part_bytes)):
            if value < S3_MIN_PART_BYTES:
                raise ValueError(f"{name} must be >= {S3_MIN_PART_BYTES}, got {value}")
        if not 0 <= copy_threshold_bytes <= S3_MAX_COPY_BYTES:
            raise ValueError(f"copy_threshold_bytes must be in [0, {S3_MAX_COPY_BYTES}], got {copy_threshold_bytes}")
        if multipart_threshold_bytes < 0:
            raise ValueError(f"multipart_threshold_bytes must be >= 0, got {multipart_threshold_bytes}")
        self.bucket = bucket
        self._aws = aws
        self._retry_policy = retry_policy
        self._multipart_threshold_bytes = multipart_threshold_bytes
        self._multipart_part_bytes = multipart_part_bytes
        self._copy_threshold_bytes = copy_threshold_bytes
        self._copy_part_bytes = copy_part_bytes
        # The shared client of `clients` is its owner's to close, not ours.
        self._owns_client = clients is None
        self._s3 = LazyClient(aws, "s3") if clients is None else clients.lazy(aws, "s3")

    @classmethod
    def for_url(cls, url: str, *, aws: AwsSettings, **kwargs: Any) -> tuple[Self, str]:
        """The bucket of "s3://bucket/key" and the key."""
        bucket, key = parse_s3_url(url)
        return cls(bucket, aws=aws, **kwargs), key

    def location(self, key: str) -> str:
        return f"{_S3_SCHEME}{self.bucket}/{key}"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._s3.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- whole objects ---------------------------------------------------------

    async def upload_file(self, key: str, path: str) -> int:
        """Store the file at `path` as `key`, replacing it whole; returns its size."""
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if size <= self._multipart_threshold_bytes:
            await self.request("put_object", Key=key, body_from=(path, 0, size))
        else:
            await self._multipart_upload(key, path, size)
        log.debug("uploaded %s (%d bytes) to %s", path, size, self.location(key))
        return size

    async def copy_from(self, key: str, source: str, *, size: int) -> None:
        """Make `key` a copy of the object at "s3://bucket/key" `source` (`size`
        bytes), replacing it whole.  S3 copies it server-side: no byte of it
        passes through this process."""
        source_bucket, source_key = parse_s3_url(source)
        copy_source = {"Bucket": source_bucket, "Key": source_key}
        if size <= self._copy_threshold_bytes:
            await self.request("copy_object", Key=key, CopySource=copy_source)
        else:
            part_bytes = max(self._copy_part_bytes, -(-size // _S3_MAX_PARTS))

            async def copy_part(upload_id: str, number: int, offset: int) -> dict[str, Any]:
                last = min(offset + part_bytes, size) - 1
                response = await self.request(
                    "upload_part_copy",
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=copy_source,
                    CopySourceRange=f"bytes={offset}-{last}",
                )
                return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

            await self._multipart(key, size, part_bytes, copy_part, create={})
        log.debug("copied %s (%d bytes) to %s", source, size, self.location(key))

    async def download_file(self, key: str, path: str, *, expected_bytes: int) -> None:
        """Write object `key` to `path`; fails unless it has `expected_bytes`.

        A failed try starts the file over, so a retried download never
        leaves bytes of two tries behind.
        """

        async def attempt() -> None:
            s3 = await self._s3.get()
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=key)
                body = response["Body"]
                written = 0
                with open(path, "wb") as file:
                    async with body:
                        while chunk := await body.read(COPY_CHUNK_BYTES):
                            await asyncio.to_thread(file.write, chunk)
                            written += len(chunk)
            except Exception as exc:
                raise self._error(exc, self.location(key)) from exc
            if written != expected_bytes:
                raise StorageError(f"{self.location(key)} has {written} bytes, expected {expected_bytes}")

        await retry(attempt, policy=self._retry_policy, describe=f"download {self.location(key)}")

    async def size_of(self, key: str) -> int | None:
        """The object's size, or None if there is no such object."""

        async def attempt() -> int | None:
            s3 = await self._s3.get()
            try:
                response = await s3.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                error = translate_error(exc, what=self.location(key))
                if isinstance(error, SourceNotFoundError):
                    return None
                raise _as_output_error(error) from exc
            return int(response["ContentLength"])

        return await retry(attempt, policy=self._retry_policy, describe=f"head {self.location(key)}")

    async def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[start : start + _S3_DELETE_BATCH]
            response = await self.request(
                "delete_objects",
                what=self.location(batch[0]),
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"cannot delete {self.location(first.get('Key', '?'))}: "
                    f"{first.get('Code', '?')}: {first.get('Message', '')} ({len(errors)} keys not deleted)"
                )

    async def list_keys(self, prefix: str, *, delimiter: str | None = None) -> list[str]:
        keys = []
        params: dict[str, Any] = {"Prefix": prefix}
        if delimiter is not None:
            params["Delimiter"] = delimiter
        while True:
            page = await self.request("list_objects_v2", what=self.location(prefix), **params)
            keys += [item["Key"] for item in page.get("Contents", ())]
            if not page.get("IsTruncated"):
                return keys
            params["ContinuationToken"] = page["NextContinuationToken"]

    async def list_uploads(self, prefix: str) -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads still open under `prefix`."""
        uploads = []
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self.request("list_multipart_uploads", what=self.location(prefix), **params)
            uploads += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", ())]
            if not page.get("IsTruncated"):
                return uploads
            params["KeyMarker"] = page["NextKeyMarker"]
            params["UploadIdMarker"] = page["NextUploadIdMarker"]

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object and open upload under `prefix`; returns the object count."""
        for key, upload_id in await self.list_uploads(prefix):
            await self.request("abort_multipart_upload", Key=key, UploadId=upload_id)
        keys = await self.list_keys(prefix)
        await self.delete_keys(keys)
        return len(keys)

    # -- requests --------------------------------------------------------------

    async def request(
        self,
        operation: str,
        *,
        what: str | None = None,
        body_from: tuple[str, int, int] | None = None,
        **params: Any,
    ) -> Any:
        """One S3 call through the retry loop; errors name `what` (default: the
        object's location).  `body_from` = (path, offset, length): the body is
        read from that file afresh for every attempt, so it is only in memory
        while being sent."""
        what = what or self.location(params.get("Key", ""))

        async def attempt() -> Any:
            s3 = await self._s3.get()
            call = dict(params)
            if body_from is not None:
                call["Body"] = await asyncio.to_thread(_read_range, *body_from)
            try:
                return await getattr(s3, operation)(Bucket=self.bucket, **call)
            except Exception as exc:
                raise self._error(exc, what) from exc

        return await retry(attempt, policy=self._retry_policy, describe=f"{operation} {what}")

    @staticmethod
    def _error(exc: Exception, what: str) -> ShardlineError:
        return _as_output_error(translate_error(exc, what=what))

    async def _multipart_upload(self, key: str, path: str, size: int) -> None:
        part_bytes = max(self._multipart_part_bytes, -(-size // _S3_MAX_PARTS))

        async def upload_part(upload_id: str, number: int, offset: int) -> dict[str, Any]:
            response = await self.request(
                "upload_part",
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                ChecksumAlgorithm="CRC32",
                body_from=(path, offset, min(part_bytes, size - offset)),
            )
            part = {"PartNumber": number, "ETag": response["ETag"]}
            if "ChecksumCRC32" in response:
                part["ChecksumCRC32"] = response["ChecksumCRC32"]
            return part

        # CRC32 part checksums, as boto3's own transfer manager sends them.
        await self._multipart(key, size, part_bytes, upload_part, create={"ChecksumAlgorithm": "CRC32"})

    async def _multipart(
        self,
        key: str,
        size: int,
        part_bytes: int,
        send_part: Callable[[str, int, int], Awaitable[dict[str, Any]]],
        *,
        create: dict[str, Any],
    ) -> None:
        """One multipart upload of `key`: `send_part(upload_id, number, offset)`
        per `part_bytes` of `size`, then complete; aborted on any failure."""
        response = await self.request("create_multipart_upload", Key=key, **create)
        upload_id = response["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, part_bytes), start=1):
                parts.append(await send_part(upload_id, number, offset))
            await self.request(
                "complete_multipart_upload", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Shielded: a cancelled upload must still free its stored parts.
            with contextlib.suppress(Exception):
                await wait_uncancellable(asyncio.ensure_future(self._abort_upload(key, upload_id)))
            raise

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            await self.request("abort_multipart_upload", Key=key, UploadId=upload_id)
        except ShardlineError as exc:
            log.warning("could not abort multipart upload of %s: %s", self.location(key), exc)

    def __repr__(self) -> str:
        return f"S3Bucket({self.bucket!r})"


def _as_output_error(error: ShardlineError) -> ShardlineError:
    """An InputError as StorageError (see S3Bucket: these objects are outputs)."""
    return StorageError(str(error)) if isinstance(error, InputError) else error


class S3Buckets:
    """One `S3Bucket` (so one client and connection pool) per bucket name,
    for a long-lived owner that touches many objects: the coordinator checks
    and fetches every remote attempt output through it, instead of paying a
    client's setup per object.  Closed by `aclose()`."""

    def __init__(self, aws: AwsSettings, *, retry_policy: RetryPolicy) -> None:
        self._aws = aws
        self._retry_policy = retry_policy
        self._buckets: dict[str, S3Bucket] = {}

    def for_url(self, url: str) -> tuple[S3Bucket, str]:
        """The bucket of "s3://bucket/key" and the key."""
        name, key = parse_s3_url(url)
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = S3Bucket(name, aws=self._aws, retry_policy=self._retry_policy)
        return bucket, key

    async def aclose(self) -> None:
        buckets, self._buckets = list(self._buckets.values()), {}
        for bucket in buckets:
            await bucket.aclose()


def _read_range(path: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of `path` (thread pool)."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            data = file.read(length)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) != length:
        raise StorageError(f"{path} shrank while being uploaded: wanted {length} bytes at offset {offset}")
    return data
