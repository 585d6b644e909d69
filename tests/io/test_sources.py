"""The objects a job reads (`shardline.io.sources`, `shardline.io.urls`):
S3 URLs, the source a URL opens, and the errors naming a source that is
missing or unreadable, on local files and the session's moto server.

Reading them by ranges is the worker's reader's part: tests/worker/test_reader.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shardline.errors import (
    ConfigurationError,
    ObjectChangedError,
    RetryableStorageError,
    SourceAccessError,
    SourceNotFoundError,
)
from shardline.io.aws import AwsSettings
from shardline.io.checksum import Crc32c
from shardline.io.sources import LocalFileSource, S3Source, open_source
from shardline.io.urls import parse_s3_url

from faultproxy import CannedResponse, FaultProxy, Rule


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/key") == ("bucket", "key")
    assert parse_s3_url("s3://bucket/dir/sub/key.txt") == ("bucket", "dir/sub/key.txt")


@pytest.mark.parametrize("url", ["s3://", "s3://b", "s3://b/", "s3:///key", "http://b/k"])
def test_parse_s3_url_rejects(url: str) -> None:
    with pytest.raises(ConfigurationError, match="s3://bucket/key"):
        parse_s3_url(url)


def test_open_source_dispatches_on_scheme(aws_settings: AwsSettings, tmp_path: Path) -> None:
    s3_source = open_source("s3://b/some/key", aws_settings)
    assert isinstance(s3_source, S3Source)
    assert (s3_source.bucket, s3_source.key, s3_source.description) == ("b", "some/key", "s3://b/some/key")
    local = open_source(str(tmp_path / "f.txt"), aws_settings)
    assert isinstance(local, LocalFileSource)
    assert local.description == str(tmp_path / "f.txt")


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    async with LocalFileSource(path) as source:
        with pytest.raises(SourceNotFoundError) as caught:
            await source.stat()
    assert str(caught.value) == f"no such file: {path}"


async def test_directory_is_not_readable(tmp_path: Path) -> None:
    async with LocalFileSource(tmp_path) as source:
        with pytest.raises(SourceAccessError) as caught:
            await source.stat()
    assert str(caught.value) == f"cannot read {tmp_path}: is a directory"


async def test_missing_bucket(aws_settings: AwsSettings) -> None:
    async with S3Source("no-such-bucket-shardline", "k", aws=aws_settings) as source:
        with pytest.raises(SourceNotFoundError) as caught:
            await source.stat()
    assert str(caught.value) == "no such bucket 'no-such-bucket-shardline'"


async def test_botocore_does_not_retry_on_its_own(s3, bucket: str, aws_settings: AwsSettings) -> None:
    """shardline.io.retry must see every failure (DESIGN §4), so botocore may not retry first."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    rule = Rule(method="HEAD", fault=CannedResponse(status=503, reason="Service Unavailable"), times=1)
    async with FaultProxy(aws_settings.s3_endpoint_url, [rule]) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Source(bucket, "k", aws=via_proxy) as source:
            with pytest.raises(RetryableStorageError):
                await source.stat()
    assert [r.method for r in proxy.records] == ["HEAD"]


async def test_read_checksummed_fills_the_view_and_the_running_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    async with LocalFileSource(path) as source:
        info = await source.stat()
        crc, whole = Crc32c(), Crc32c()
        view = memoryview(bytearray(1000))
        await source.read_checksummed(0, view, etag=info.etag, crc=crc)
        assert bytes(view) == data[:1000]
        await source.read_checksummed(1000, view[:500], etag=info.etag, crc=crc)  # continues the same checksum
        assert bytes(view[:500]) == data[1000:1500]
    whole.update(data[:1500])
    assert crc.value == whole.value


async def test_read_checksummed_refuses_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"line\n" * 100)
    async with LocalFileSource(path) as source:
        info = await source.stat()
        with path.open("ab") as file:
            file.write(b"more\n")
        with pytest.raises(ObjectChangedError, match="changed during the job"):
            await source.read_checksummed(0, memoryview(bytearray(10)), etag=info.etag, crc=Crc32c())
