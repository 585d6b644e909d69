"""Job outputs: destinations, the manifest, reduce.

S3 destinations run against the session's moto server (through
`faultproxy.FaultProxy` where a request must fail); local ones against
tmp_path; reduce commands are real shell pipelines compared with the same
pipeline run sequentially by `subprocess`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from crc32c import crc32c

from shardline.coordinator import (
    MANIFEST_VERSION,
    LocalDirectoryDestination,
    ManifestShard,
    OutputPolicy,
    ReduceRunner,
    S3Destination,
    build_manifest,
    file_checksum,
    open_destination,
)
from shardline.errors import CommandFailedError, ConfigurationError, CoverageError, StorageError
from shardline.io.aws import AwsSettings
from shardline.io.checksum import Crc32c, format_checksum
from shardline.io.retry import RetryPolicy

from faultproxy import FaultProxy, Rule, s3_error
from polling import eventually
from reference import reference_crc32c

MIB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.01)
#: Small enough that an 11 MiB file takes three parts (S3's minimum part is 5 MiB).
SMALL_MULTIPART = {"multipart_threshold_bytes": 5 * MIB, "multipart_part_bytes": 5 * MIB}


def write_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def object_bytes(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(s3, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def open_uploads(s3, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def shard(index: int, start: int, end: int, part: str = "", *, output: bytes = b"x") -> ManifestShard:
    return ManifestShard(
        index=index,
        range=(start, end),
        emitted=(start, end),
        bytes=end - start,
        checksum="crc32c:00000000",
        attempt=1,
        part=part or f"part-{index:05d}",
        output_bytes=len(output),
        output_checksum=format_checksum(crc32c(output)),
    )


# --- URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bkt/out/", "bkt", "out/"),
        ("s3://bkt/out", "bkt", "out/"),
        ("s3://bkt/a/b/c", "bkt", "a/b/c/"),
        ("s3://bkt/", "bkt", ""),
        ("s3://bkt", "bkt", ""),
    ],
)
async def test_s3_urls_name_a_prefix_ending_in_a_slash(url: str, bucket: str, prefix: str) -> None:
    async with open_destination(url, AwsSettings(), retry_policy=RetryPolicy()) as destination:
        assert isinstance(destination, S3Destination)
        assert (destination.bucket, destination.prefix) == (bucket, prefix)
        assert destination.url == f"s3://{bucket}/{prefix}"


async def test_other_urls_are_local_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_destination("out/dir", AwsSettings(), retry_policy=RetryPolicy()) as destination:
        assert isinstance(destination, LocalDirectoryDestination)
        assert destination.url == str(tmp_path / "out" / "dir")


@pytest.mark.parametrize("url", ["", "   ", "s3://", "s3:///prefix/", "s3://no spaces/p/", "gs://bkt/p/", "http://h/p"])
def test_malformed_urls_name_the_output_field(url: str) -> None:
    with pytest.raises(ConfigurationError, match="field 'output'"):
        open_destination(url, AwsSettings(), retry_policy=RetryPolicy())


# --- S3 -----------------------------------------------------------------------


async def test_s3_parts_result_and_manifest_round_trip(
    s3, bucket: str, aws_settings: AwsSettings, tmp_path: Path
) -> None:
    outputs = [b"first shard\n", b"", b"\x00binary\xff" * 1000]
    async with open_destination(f"s3://{bucket}/job/out", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.check(require_empty=True)
        locations = [
            await destination.put_part(index, write_file(tmp_path / f"out{index}", data))
            for index, data in enumerate(outputs)
        ]
        result = await destination.put_result(write_file(tmp_path / "result", b"42\n"))
        manifest = build_manifest(
            job_id="j1",
            source="s3://src/object",
            size=30,
            etag='"abc"',
            delimiter=b"\n",
            command="wc -l",
            reduce="awk '{s+=$1} END {print s}'",
            shards=[
                shard(i, 10 * i, 10 * i + 10, location, output=data)
                for i, (location, data) in enumerate(zip(locations, outputs, strict=True))
            ],
            result=result,
            result_bytes=3,
        )
        manifest_location = await destination.put_manifest(manifest)

    assert locations == [f"s3://{bucket}/job/out/part-{i:05d}" for i in range(3)]
    assert result == f"s3://{bucket}/job/out/result"
    assert manifest_location == f"s3://{bucket}/job/out/_manifest.json"
    for index, data in enumerate(outputs):
        assert object_bytes(s3, bucket, f"job/out/part-{index:05d}") == data
    assert object_bytes(s3, bucket, "job/out/result") == b"42\n"
    assert json.loads(object_bytes(s3, bucket, "job/out/_manifest.json")) == manifest
    # The write check leaves nothing behind.
    names = ["_manifest.json", "part-00000", "part-00001", "part-00002", "result"]
    assert keys(s3, bucket) == [f"job/out/{name}" for name in names]


async def test_s3_put_part_overwrites(s3, bucket: str, aws_settings: AwsSettings, tmp_path: Path) -> None:
    async with open_destination(f"s3://{bucket}/", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.put_part(7, write_file(tmp_path / "a", b"attempt 1\n"))
        await destination.put_part(7, write_file(tmp_path / "b", b"attempt 2\n"))
    assert object_bytes(s3, bucket, "part-00007") == b"attempt 2\n"


async def test_s3_large_part_goes_by_multipart_upload(
    s3, bucket: str, aws_settings: AwsSettings, tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(11 * MIB + 123)
    async with S3Destination(
        bucket, "p/", aws=aws_settings, **SMALL_MULTIPART, retry_policy=RetryPolicy()
    ) as destination:
        await destination.put_part(0, write_file(tmp_path / "big", data))
    assert object_bytes(s3, bucket, "p/part-00000") == data
    # A multipart object's ETag ends in "-<number of parts>".
    assert s3.head_object(Bucket=bucket, Key="p/part-00000")["ETag"].endswith('-3"')
    assert open_uploads(s3, bucket) == []


async def test_s3_copy_part_copies_an_object_server_side(s3, bucket: str, aws_settings: AwsSettings) -> None:
    s3.put_object(Bucket=bucket, Key="staging/a.out", Body=b"attempt 1\n")
    async with S3Destination(bucket, "p/", aws=aws_settings, retry_policy=RetryPolicy()) as destination:
        where = await destination.copy_part(3, f"s3://{bucket}/staging/a.out", size=10)
    assert where == f"s3://{bucket}/p/part-00003"
    assert object_bytes(s3, bucket, "p/part-00003") == b"attempt 1\n"
    assert object_bytes(s3, bucket, "staging/a.out") == b"attempt 1\n"  # its removal is the caller's


async def test_s3_large_copy_goes_by_multipart_copy(s3, bucket: str, aws_settings: AwsSettings) -> None:
    """Above CopyObject's limit (5 GiB; lowered here) a copy goes part by part, still inside S3."""
    data = random.Random(4).randbytes(11 * MIB + 7)
    s3.put_object(Bucket=bucket, Key="staging/big.out", Body=data)
    small_copy = {"copy_threshold_bytes": 5 * MIB, "copy_part_bytes": 5 * MIB}
    async with S3Destination(bucket, "p/", aws=aws_settings, retry_policy=RetryPolicy(), **small_copy) as destination:
        await destination.copy_part(0, f"s3://{bucket}/staging/big.out", size=len(data))
    assert object_bytes(s3, bucket, "p/part-00000") == data
    assert s3.head_object(Bucket=bucket, Key="p/part-00000")["ETag"].endswith('-3"')
    assert open_uploads(s3, bucket) == []


async def test_s3_copy_of_a_missing_object_is_a_storage_error(bucket: str, aws_settings: AwsSettings) -> None:
    async with S3Destination(bucket, "", aws=aws_settings, retry_policy=FAST_RETRY) as destination:
        with pytest.raises(StorageError, match="part-00001"):
            await destination.copy_part(1, f"s3://{bucket}/staging/gone.out", size=5)


async def test_local_destinations_copy_nothing_server_side(tmp_path: Path) -> None:
    destination = LocalDirectoryDestination(tmp_path / "out")
    assert not destination.copies_remote_parts and S3Destination.copies_remote_parts
    with pytest.raises(NotImplementedError):
        await destination.copy_part(0, "s3://b/k", size=1)


async def test_s3_throttled_upload_part_is_retried(s3, bucket: str, aws_settings: AwsSettings, tmp_path: Path) -> None:
    data = random.Random(2).randbytes(11 * MIB)
    throttled = Rule(fault=s3_error("SlowDown", "Reduce your request rate."), path_contains="partNumber=2", times=2)
    async with FaultProxy(aws_settings.s3_endpoint_url, [throttled]) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Destination(bucket, "", aws=via_proxy, retry_policy=FAST_RETRY, **SMALL_MULTIPART) as destination:
            await destination.put_result(write_file(tmp_path / "big", data))
    assert proxy.applied == [2]
    assert object_bytes(s3, bucket, "result") == data


async def test_s3_failed_multipart_upload_is_aborted(
    s3, bucket: str, aws_settings: AwsSettings, tmp_path: Path
) -> None:
    data = random.Random(3).randbytes(11 * MIB)
    denied = Rule(
        fault=s3_error("AccessDenied", "Access Denied", status=403, reason="Forbidden"), path_contains="partNumber=3"
    )
    async with FaultProxy(aws_settings.s3_endpoint_url, [denied]) as proxy:
        via_proxy = dataclasses.replace(aws_settings, s3_endpoint_url=proxy.url)
        async with S3Destination(bucket, "", aws=via_proxy, retry_policy=FAST_RETRY, **SMALL_MULTIPART) as destination:
            with pytest.raises(StorageError, match=r"part-00004.*access denied"):
                await destination.put_part(4, write_file(tmp_path / "big", data))
    assert proxy.applied == [1]
    assert open_uploads(s3, bucket) == []
    assert keys(s3, bucket) == []


async def test_s3_missing_local_file_is_a_storage_error(bucket: str, aws_settings: AwsSettings, tmp_path: Path) -> None:
    async with open_destination(f"s3://{bucket}/", aws_settings, retry_policy=RetryPolicy()) as destination:
        with pytest.raises(StorageError, match=r"cannot read .*missing"):
            await destination.put_part(0, str(tmp_path / "missing"))


async def test_s3_check_names_the_output_field_for_a_missing_bucket(aws_settings: AwsSettings) -> None:
    async with open_destination(
        "s3://shardline-no-such-bucket/out/", aws_settings, retry_policy=RetryPolicy()
    ) as destination:
        with pytest.raises(
            ConfigurationError, match=r"field 'output'.*s3://shardline-no-such-bucket/out/.*no such bucket"
        ):
            await destination.check(require_empty=True)


def put_earlier_output(s3, bucket: str, prefix: str) -> list[str]:
    """Objects an earlier coordinator process wrote (known to this one only
    by name), a multipart upload its crash left open, and objects that are
    not ours: other names, a sub-prefix, a sibling prefix.  Returns those."""
    for name in ("part-00000", "part-00001", "result", "_manifest.json"):
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=b"ours")
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=prefix + "part-00002")["UploadId"]
    s3.upload_part(Bucket=bucket, Key=prefix + "part-00002", UploadId=upload_id, PartNumber=1, Body=b"half")
    others = [f"{prefix}notes.txt", f"{prefix}part-1", f"{prefix}sub/part-00000", "outer/part-00000", "part-00000"]
    for key in others:
        s3.put_object(Bucket=bucket, Key=key, Body=b"not ours")
    return others


async def test_s3_remove_deletes_only_the_names_given(s3, bucket: str, aws_settings: AwsSettings) -> None:
    others = put_earlier_output(s3, bucket, "out/")
    async with open_destination(f"s3://{bucket}/out/", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.remove({"part-00001", "part-00002", "_manifest.json"})
        await destination.remove({"part-00001"})  # nothing left to do, not an error
    assert keys(s3, bucket) == sorted([*others, "out/part-00000", "out/result"])
    assert open_uploads(s3, bucket) == []


async def test_s3_remove_others_keeps_only_the_names_given(s3, bucket: str, aws_settings: AwsSettings) -> None:
    others = put_earlier_output(s3, bucket, "out/")
    async with open_destination(f"s3://{bucket}/out/", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.remove_others({"part-00000", "_manifest.json"})
    assert keys(s3, bucket) == sorted([*others, "out/part-00000", "out/_manifest.json"])
    assert open_uploads(s3, bucket) == []


@pytest.mark.parametrize("name", ["notes.txt", "sub/part-00000", "../part-00000", ".part-00000.x.tmp"])
async def test_removals_refuse_names_a_destination_never_writes(
    tmp_path: Path, bucket: str, aws_settings: AwsSettings, name: str
) -> None:
    for url in (f"s3://{bucket}/out/", str(tmp_path)):
        async with open_destination(url, aws_settings, retry_policy=RetryPolicy()) as destination:
            with pytest.raises(ValueError, match="not a name a destination writes"):
                await destination.remove({name})
            with pytest.raises(ValueError, match="not a name a destination writes"):
                await destination.remove_others({name})


async def test_s3_check_refuses_a_non_empty_prefix_untouched(s3, bucket: str, aws_settings: AwsSettings) -> None:
    s3.put_object(Bucket=bucket, Key="out/deep/inside/notes.txt", Body=b"someone's")
    async with open_destination(f"s3://{bucket}/out", aws_settings, retry_policy=RetryPolicy()) as destination:
        with pytest.raises(
            ConfigurationError,
            match=rf"field 'output': s3://{bucket}/out/ is not empty \(it holds 'deep/inside/notes.txt'\).*overwrite",
        ):
            await destination.check(require_empty=True)
        await destination.check(require_empty=False)  # an overwriting or resumed job may use it
    assert keys(s3, bucket) == ["out/deep/inside/notes.txt"]  # no write probe either
    async with open_destination(f"s3://{bucket}/", aws_settings, retry_policy=RetryPolicy()) as destination:
        with pytest.raises(ConfigurationError, match=rf"s3://{bucket}/ is not empty"):
            await destination.check(require_empty=True)
    async with open_destination(f"s3://{bucket}/output/", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.check(require_empty=True)  # "out/" is not below "output/"


@pytest.mark.slow
async def test_s3_remove_pages_through_many_objects(s3, bucket: str, aws_settings: AwsSettings) -> None:
    names = [f"part-{i:05d}" for i in range(1005)]  # more than one list page and one delete batch
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: s3.put_object(Bucket=bucket, Key=name, Body=b""), names))
    async with open_destination(f"s3://{bucket}", aws_settings, retry_policy=RetryPolicy()) as destination:
        await destination.remove_others(["part-00003"])
    assert keys(s3, bucket) == ["part-00003"]


# --- the output policy -----------------------------------------------------------

DAEMON_POLICY_BUCKETS = frozenset({"allowed-a", "allowed-b"})


def daemon_policy(root: Path) -> OutputPolicy:
    return OutputPolicy(local_root=str(root), s3_buckets=DAEMON_POLICY_BUCKETS)


def test_policy_allows_directories_below_its_root_and_listed_buckets(tmp_path: Path) -> None:
    (tmp_path / "root" / "existing").mkdir(parents=True)
    (tmp_path / "root" / "inside-link").symlink_to(tmp_path / "root" / "existing")
    policy = daemon_policy(tmp_path / "root")
    for output in ("existing", "new/deeper", "inside-link/x", "./existing", "existing//x"):
        policy.check(str(tmp_path / "root") + "/" + output)
    for output in ("s3://allowed-a/", "s3://allowed-a", "s3://allowed-b/a/b/", "s3://allowed-b/a..b/"):
        policy.check(output)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("relative/dir", r"'relative/dir' is a relative path; give an absolute one below .*root"),
        ("{root}/a/../b", r"has a '\.\.' component"),
        ("{root}/..", r"has a '\.\.' component"),
        ("{root}", r"is not below this coordinator's output root .*--output-root"),
        ("{root}-sibling/x", r"is not below this coordinator's output root"),
        ("/etc/shardline", r"/etc/shardline is not below this coordinator's output root"),
        ("{root}/escape/x", r"/escape/x \(it resolves to .*/elsewhere/x\) is not below"),
        (
            "s3://other-bucket/p/",
            r"may not write to bucket 'other-bucket', only to allowed-a, allowed-b .*--output-bucket",
        ),
        ("s3://allowed-a/p/../q/", r"s3://allowed-a/p/\.\./q/ has a '\.\.' component"),
    ],
)
def test_policy_refuses_what_its_operator_did_not_allow(tmp_path: Path, output: str, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match="field 'output': .*" + message):
        daemon_policy(root).check(output.format(root=root))


def test_default_policy_allows_no_output_at_all(tmp_path: Path) -> None:
    policy = OutputPolicy()
    with pytest.raises(ConfigurationError, match=r"writes no local directories .*--output-root DIR"):
        policy.check(str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"writes to no S3 bucket .*--output-bucket NAME"):
        policy.check("s3://any-bucket/p/")


def test_policy_anywhere_allows_any_path_and_bucket() -> None:
    policy = OutputPolicy(anywhere=True)
    for output in ("relative", "../up", "/", "s3://any-bucket/p/../q/"):
        policy.check(output)


def test_policy_root_must_be_absolute() -> None:
    with pytest.raises(ConfigurationError, match="absolute"):
        OutputPolicy(local_root="relative")


# --- local directory ----------------------------------------------------------


def our_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_local_round_trip_creates_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    async with open_destination(str(directory), AwsSettings(), retry_policy=RetryPolicy()) as destination:
        await destination.check(require_empty=True)
        assert directory.is_dir()
        part = await destination.put_part(0, write_file(tmp_path / "out0", b"zero\n"))
        empty = await destination.put_part(1, write_file(tmp_path / "out1", b""))
        result = await destination.put_result(write_file(tmp_path / "result", b"2\n"))
        manifest = build_manifest(
            job_id="j",
            source="/data/in",
            size=8,
            etag="local-1",
            delimiter=b"\x00",
            command=None,
            reduce="wc -l",
            shards=[shard(1, 4, 8, empty, output=b""), shard(0, 0, 4, part, output=b"zero\n")],
            result=result,
            result_bytes=2,
        )
        location = await destination.put_manifest(manifest)

    assert (part, empty, result, location) == tuple(
        str(directory / name) for name in ("part-00000", "part-00001", "result", "_manifest.json")
    )
    assert our_files(directory) == ["_manifest.json", "part-00000", "part-00001", "result"]  # no temp files left
    assert (directory / "part-00000").read_bytes() == b"zero\n"
    assert (directory / "part-00001").read_bytes() == b""
    assert (directory / "result").read_bytes() == b"2\n"
    assert json.loads((directory / "_manifest.json").read_text()) == manifest


async def test_local_put_part_overwrites(tmp_path: Path) -> None:
    destination = LocalDirectoryDestination(tmp_path / "out")
    await destination.check(require_empty=True)
    await destination.put_part(2, write_file(tmp_path / "a", b"attempt 1, longer\n"))
    await destination.put_part(2, write_file(tmp_path / "b", b"attempt 2\n"))
    assert (tmp_path / "out" / "part-00002").read_bytes() == b"attempt 2\n"


async def test_local_check_refuses_a_regular_file(tmp_path: Path) -> None:
    write_file(tmp_path / "file", b"")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ConfigurationError, match=f"field 'output': .*{re.escape(str(path))}"):
            await LocalDirectoryDestination(path).check(require_empty=True)


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A directory we cannot create files in; root ignores modes, so it gets sysfs."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir(mode=0o555)
        yield directory
        directory.chmod(0o755)
        return
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "shardline-probe").touch()
    except OSError:
        yield sysfs
    else:
        (sysfs / "shardline-probe").unlink()
        pytest.skip("no directory is unwritable for root here")


async def test_local_check_refuses_an_unwritable_directory(unwritable_dir: Path) -> None:
    where = re.escape(str(unwritable_dir))
    with pytest.raises(ConfigurationError, match=f"field 'output': cannot write to directory {where}:"):
        await LocalDirectoryDestination(unwritable_dir).check(require_empty=False)
    with pytest.raises(ConfigurationError, match=f"field 'output': cannot create directory {where}/sub:"):
        await LocalDirectoryDestination(unwritable_dir / "sub").check(require_empty=True)


def make_earlier_output(directory: Path) -> list[str]:
    """Files an earlier coordinator process left (a crash mid-write
    included), and files that are not ours; returns the latter."""
    directory.mkdir()
    for name in ("part-00000", "part-00001", "result", "_manifest.json", ".part-00002.k2j_x9.tmp"):
        write_file(directory / name, b"ours")
    others = ["notes.txt", "part-1", ".hidden", ".part-1.x.tmp"]
    for name in others:
        write_file(directory / name, b"not ours")
    return others


async def test_local_remove_deletes_only_the_names_given(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    others = make_earlier_output(directory)
    destination = LocalDirectoryDestination(directory)
    await destination.remove({"part-00001", "part-00002", "_manifest.json"})
    assert our_files(directory) == sorted([*others, "part-00000", "result"])


async def test_local_remove_others_keeps_only_the_names_given(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    others = make_earlier_output(directory)
    await LocalDirectoryDestination(directory).remove_others({"part-00000", "_manifest.json"})
    assert our_files(directory) == sorted([*others, "_manifest.json", "part-00000"])


async def test_local_remove_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    others = make_earlier_output(directory)
    destination = LocalDirectoryDestination(directory)
    await destination.remove_manifest()
    await destination.remove_manifest()  # already gone: not an error
    assert our_files(directory) == sorted([*others, ".part-00002.k2j_x9.tmp", "part-00000", "part-00001", "result"])


async def test_local_remove_deletes_a_directory_it_created(tmp_path: Path) -> None:
    destination = LocalDirectoryDestination(tmp_path / "new")
    await destination.check(require_empty=True)
    await destination.put_part(0, write_file(tmp_path / "p0", b"data"))
    await destination.remove({"part-00000"})
    assert not (tmp_path / "new").exists()
    await destination.remove({"part-00000"})  # already gone: not an error


async def test_local_check_refuses_a_non_empty_directory_untouched(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    write_file(directory / ".hidden", b"someone's")
    (directory / "empty-subdir").mkdir()
    before = os.stat(directory)
    destination = LocalDirectoryDestination(directory)
    with pytest.raises(
        ConfigurationError,
        match=rf"field 'output': {re.escape(str(directory))} is not empty \(it holds '.hidden', 'empty-subdir'\)",
    ):
        await destination.check(require_empty=True)
    after = os.stat(directory)
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)  # no write probe
    assert our_files(directory) == [".hidden", "empty-subdir"]
    await destination.check(require_empty=False)  # an overwriting or resumed job may use it
    assert our_files(directory) == [".hidden", "empty-subdir"]


async def test_local_cancelled_put_leaves_no_file(tmp_path: Path) -> None:
    # The source is a FIFO kept open and fed: the copy cannot end by itself,
    # only by noticing that it was cancelled.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "out"
    destination = LocalDirectoryDestination(directory)
    put = asyncio.create_task(destination.put_part(0, str(fifo)))
    writer = await asyncio.to_thread(open, fifo, "wb", buffering=0)  # returns once the copy has opened it
    try:
        writer.write(b"first bytes\n")
        put.cancel()

        def fed_until_stopped() -> bool:
            with contextlib.suppress(BrokenPipeError):  # the copy has stopped reading
                writer.write(b"more bytes\n")
            return put.done()

        await eventually(fed_until_stopped, "the cancelled copy stopped", interval_s=0.01)
    finally:
        with contextlib.suppress(BrokenPipeError):
            writer.close()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert our_files(directory) == []


# --- checksums and the manifest -----------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, 3 * MIB + 17])
async def test_file_checksum_is_crc32c_of_the_bytes(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert await file_checksum(write_file(tmp_path / "f", data)) == format_checksum(crc32c(data))


def test_crc32c_matches_the_reference_algorithm() -> None:
    # The standard check value of CRC-32C (Castagnoli), then random inputs
    # fed whole and in pieces, against a bitwise implementation.
    assert crc32c(b"123456789") == reference_crc32c(b"123456789") == 0xE3069283
    for size in (0, 1, 7, 64, 1000):
        data = random.Random(size).randbytes(size)
        running = Crc32c()
        for piece in (data[: size // 3], memoryview(bytearray(data))[size // 3 :]):
            running.update(piece)
        assert running.value == crc32c(data) == reference_crc32c(data)
        assert running.hexdigest() == f"crc32c:{reference_crc32c(data):08x}"


async def test_file_checksum_of_a_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        await file_checksum(str(tmp_path / "missing"))


def test_manifest_document() -> None:
    shards = [shard(0, 0, 5, "s3://b/p/part-00000"), shard(1, 5, 9, "s3://b/p/part-00001")]
    manifest = build_manifest(
        job_id="job-1",
        source="s3://src/k",
        size=9,
        etag='"e"',
        delimiter=b"\x00",
        command="sort",
        reduce=None,
        shards=shards,
        result=None,
        result_bytes=None,
    )
    created_at = manifest.pop("created_at")
    assert isinstance(created_at, float)
    assert manifest == {
        "version": MANIFEST_VERSION,
        "job_id": "job-1",
        "source": "s3://src/k",
        "size": 9,
        "etag": '"e"',
        "delimiter": "\x00",
        "command": "sort",
        "reduce": None,
        "shards": [
            {
                "index": 0,
                "range": [0, 5],
                "emitted": [0, 5],
                "bytes": 5,
                "checksum": "crc32c:00000000",
                "attempt": 1,
                "part": "s3://b/p/part-00000",
                "output_bytes": 1,
                "output_checksum": format_checksum(crc32c(b"x")),
            },
            {
                "index": 1,
                "range": [5, 9],
                "emitted": [5, 9],
                "bytes": 4,
                "checksum": "crc32c:00000000",
                "attempt": 1,
                "part": "s3://b/p/part-00001",
                "output_bytes": 1,
                "output_checksum": format_checksum(crc32c(b"x")),
            },
        ],
        "result": None,
    }
    assert json.loads(json.dumps(manifest)) == manifest


def test_manifest_shards_with_empty_ranges_tile_an_empty_object() -> None:
    manifest = build_manifest(
        job_id="j",
        source="empty",
        size=0,
        etag="e",
        delimiter=b"\n",
        command=None,
        reduce=None,
        shards=[shard(i, 0, 0) for i in range(3)],
        result=None,
        result_bytes=None,
    )
    assert [entry["emitted"] for entry in manifest["shards"]] == [[0, 0]] * 3


@pytest.mark.parametrize(
    ("shards", "size", "message"),
    [
        ([shard(0, 0, 4), shard(1, 5, 9)], 9, r"gap: bytes \[4, 5\) before shard 1"),
        ([shard(0, 0, 5), shard(1, 4, 9)], 9, r"overlap: bytes \[4, 5\) emitted twice \(shard 1\)"),
        ([shard(0, 0, 5), shard(1, 5, 9)], 10, r"gap: bytes \[9, 10\) at the end"),
    ],
)
def test_manifest_refuses_shards_that_do_not_tile_the_object(
    shards: list[ManifestShard], size: int, message: str
) -> None:
    with pytest.raises(CoverageError, match=message):
        build_manifest(
            job_id="j",
            source="s",
            size=size,
            etag="e",
            delimiter=b"\n",
            command=None,
            reduce=None,
            shards=shards,
            result=None,
            result_bytes=None,
        )


def test_manifest_shard_bytes_must_match_its_emitted_range() -> None:
    with pytest.raises(ValueError, match="emitted range"):
        dataclasses.replace(shard(0, 0, 5), bytes=4)


# --- reduce -------------------------------------------------------------------

LINES = [b"%d %s\n" % (i, random.Random(i).choice([b"pear", b"fig", b"apple", b"kiwi"])) for i in range(20_000)]


def shell(command: str, data: bytes) -> bytes:
    return subprocess.run(["sh", "-c", command], input=data, stdout=subprocess.PIPE, check=True).stdout


def shard_outputs(tmp_path: Path, command: str, shards: int) -> list[str]:
    """`command` run on each of `shards` slices of LINES, as workers would."""
    step = -(-len(LINES) // shards)
    return [
        write_file(tmp_path / f"shard{i}", shell(command, b"".join(LINES[i * step : (i + 1) * step])))
        for i in range(shards)
    ]


async def run_reduce(command: str, inputs: list[str], output: Path) -> int:
    async with ReduceRunner(command, str(output)) as reduce:
        for path in inputs:
            await reduce.feed_file(path)
        return await reduce.finish()


async def test_reduce_sums_per_shard_line_counts(tmp_path: Path) -> None:
    inputs = shard_outputs(tmp_path, "wc -l", 7)
    output = tmp_path / "result"
    size = await run_reduce("awk '{s+=$1} END {print s}'", inputs, output)
    expected = shell("wc -l | awk '{s+=$1} END {print s}'", b"".join(LINES))
    assert output.read_bytes() == expected == b"20000\n"
    assert size == len(expected)


async def test_reduce_sort_m_equals_the_sequential_pipeline(tmp_path: Path) -> None:
    # The reduce sees one stream, so `sort -m` has a single input to "merge":
    # the sequential pipeline (sort per shard, then sort -m) gives the same.
    inputs = shard_outputs(tmp_path, "LC_ALL=C sort", 5)
    output = tmp_path / "result"
    size = await run_reduce("LC_ALL=C sort -m", inputs, output)
    assert output.read_bytes() == shell("LC_ALL=C sort -m", b"".join(Path(path).read_bytes() for path in inputs))
    assert size == sum(map(len, LINES))


async def test_reduce_streams_large_inputs_in_order(tmp_path: Path) -> None:
    pieces = [random.Random(i).randbytes(3 * MIB + i) for i in range(3)]
    output = tmp_path / "result"
    inputs = [write_file(tmp_path / f"in{i}", piece) for i, piece in enumerate(pieces)]
    assert await run_reduce("cat", inputs, output) == sum(map(len, pieces))
    assert output.read_bytes() == b"".join(pieces)


async def test_reduce_that_stops_reading_early_is_fine(tmp_path: Path) -> None:
    inputs = [write_file(tmp_path / f"in{i}", b"".join(LINES) * 20) for i in range(3)]
    output = tmp_path / "result"
    assert await run_reduce("head -1", inputs, output) == len(LINES[0])
    assert output.read_bytes() == LINES[0]


async def test_failing_reduce_names_its_stderr(tmp_path: Path) -> None:
    inputs = shard_outputs(tmp_path, "wc -l", 2)
    with pytest.raises(CommandFailedError, match="status 3: no sum for you") as caught:
        await run_reduce("cat >/dev/null; echo 'no sum for you' >&2; exit 3", inputs, tmp_path / "result")
    assert caught.value.returncode == 3


async def test_reduce_of_a_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        await run_reduce("cat", [str(tmp_path / "missing")], tmp_path / "result")
