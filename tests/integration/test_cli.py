"""`shardline run` as a user runs it: a subprocess with real worker processes.

The embedded default (no AWS configuration at all) starts its own
DynamoDB-compatible endpoint; s3:// sources use the moto server through the
standard AWS environment variables, and one test uses SeaweedFS as a second,
independent S3 implementation.  Bad input must give a one-line error naming
the cause and a non-zero exit, never partial output presented as success.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.io.aws import client
from shardline.io.sources import LocalFileSource
from shardline.io.store import ensure_marker_table
from shardline.protocol import ShardTask

from corpus import CORPUS
from jobs import sequential_reference
from reference import reference_split
from servers import Endpoint, SeaweedServer, free_ports

SHARDLINE = [sys.executable, "-m", "shardline"]
SED = "s/^/>/"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a machine with no AWS configuration whatsoever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    env.update({"HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true", **extra})
    return env


def shardline(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SHARDLINE, *args], env=env, capture_output=True, timeout=timeout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    "name", ["empty", "tiny-no-trailing", "long-line-spanning-shards", "crlf", "utf8", "aligned-4", "random-mix"]
)
def test_embedded_identity_and_sed(tmp_path, home, name):
    data, _ = CORPUS[name]
    path = tmp_path / "input"
    path.write_bytes(data)
    env = clean_env(home)
    identity = shardline("run", str(path), "-n", "4", "--exact-shards", env=env)
    assert identity.returncode == 0, identity.stderr.decode()
    assert identity.stdout == data
    sed = shardline("run", str(path), "-n", "4", "--exact-shards", "--", "sed", SED, env=env)
    assert sed.returncode == 0, sed.stderr.decode()
    assert sed.stdout == sequential_reference(data, f"sed '{SED}'")
    assert sed.stderr == b""  # quiet when stderr is not a terminal


def test_n_far_above_size_and_nul_delimiter(tmp_path, home):
    data = b"a\0bb\0c"
    path = tmp_path / "input"
    path.write_bytes(data)
    result = shardline(
        "run", str(path), "-n", "16", "--exact-shards", "--delimiter", "\\0", "--stats", env=clean_env(home)
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data
    stats = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert stats["shards"] == 16 and stats["output_bytes"] == len(data)


def test_hundreds_of_in_process_shards(tmp_path, home):
    data, _ = CORPUS["nul-no-trailing"]
    path = tmp_path / "input"
    path.write_bytes(data)
    args = ("run", str(path), "-n", "300", "--exact-shards", "--workers", "inprocess", "--delimiter", "\\0")
    result = shardline(*args, env=clean_env(home))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data


def test_single_command_argument_is_a_shell_line(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"b\na\nc\na\n" * 50)
    result = shardline(
        "run", str(path), "-n", "3", "--exact-shards", "--", "sort | uniq -c | wc -l", env=clean_env(home)
    )
    assert result.returncode == 0, result.stderr.decode()
    # Each shard reports its own count of distinct lines.
    assert [int(x) for x in result.stdout.split()] == [3, 3, 3]


def test_s3_source_on_moto(tmp_path, home, moto: Endpoint, s3, bucket):
    data, _ = CORPUS["random-mix"]
    s3.put_object(Bucket=bucket, Key="dir/object.txt", Body=data)
    env = clean_env(home, **moto.env())
    result = shardline("run", f"s3://{bucket}/dir/object.txt", "-n", "5", "--exact-shards", "--", "sed", SED, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sequential_reference(data, f"sed '{SED}'")


def test_s3_source_on_seaweedfs(tmp_path, home):

    server = SeaweedServer()
    endpoint = server.start()
    try:
        s3 = endpoint.boto3_client("s3")
        s3.create_bucket(Bucket="shardline-test")
        data, _ = CORPUS["random-mix"]
        s3.put_object(Bucket="shardline-test", Key="object.txt", Body=data)
        env = clean_env(
            home,
            AWS_ENDPOINT_URL_S3=endpoint.url,
            AWS_ACCESS_KEY_ID=endpoint.access_key_id,
            AWS_SECRET_ACCESS_KEY=endpoint.secret_access_key,
            AWS_DEFAULT_REGION=endpoint.region,
            SHARDLINE_STATE_DIR=str(home / "state"),
        )
        # SeaweedFS speaks no DynamoDB: with no flag, markers go to the SQLite store.
        result = shardline("run", "s3://shardline-test/object.txt", "-n", "6", "--exact-shards", env=env)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == data
        assert (home / "state" / "shardline.db").is_file()
    finally:
        server.stop()


def _one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert lines[0].startswith("shardline") and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["run", "{missing}"], 1, "no such file"),
        (["run", "{dir}"], 1, "is a directory"),
        (["run", "{file}", "-n", "0"], 2, "must be >= 1"),
        (["run", "{file}", "--delimiter", "ab"], 2, "one byte"),
        (["run", "{file}", "--delimiter", "é"], 2, "one byte"),
        (["run", "{file}", "--", "no-such-command-xyz"], 1, "not found"),
        (["run", "{file}", "--", "exit 3"], 1, "status 3"),
        (["run", "{file}", "--max-line-bytes", "3"], 1, "longer than max_line_bytes=3"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, home, args, status, message):
    file = tmp_path / "input"
    file.write_bytes(b"hello\nworld\n")
    paths = {"missing": tmp_path / "nope", "dir": tmp_path, "file": file}
    result = shardline(*[a.format(**paths) for a in args], env=clean_env(home))
    assert result.returncode == status
    assert message in _one_line_error(result)
    assert result.stdout == b""


def test_output_directory_must_be_empty_unless_overwrite(tmp_path, home):
    data, _ = CORPUS["random-mix"]
    path = tmp_path / "input"
    path.write_bytes(data)
    out = tmp_path / "out"
    env = clean_env(home)
    earlier = shardline(
        "run", str(path), "-n", "8", "--exact-shards", "--output", str(out), "--reduce", "wc -l", env=env
    )
    assert earlier.returncode == 0, earlier.stderr.decode()
    (out / "notes.txt").write_bytes(b"mine\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}

    refused = shardline("run", str(path), "-n", "4", "--exact-shards", "--output", str(out), env=env)
    assert refused.returncode == 2
    assert f"{out} is not empty" in _one_line_error(refused) and "--overwrite" in _one_line_error(refused)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before

    # A relative path with '..' is the user's to give: it is made absolute.
    relative = os.path.relpath(out, home)
    assert relative.startswith("..")
    argv = [
        *SHARDLINE,
        "run",
        str(path),
        "-n",
        "4",
        "--exact-shards",
        "--output",
        relative,
        "--overwrite",
        "--",
        "sed",
        SED,
    ]
    replaced = subprocess.run(argv, env=env, cwd=home, capture_output=True, timeout=120)
    assert replaced.returncode == 0, replaced.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == [
        "_manifest.json",
        "notes.txt",
        *(f"part-{i:05d}" for i in range(4)),
    ]
    assert b"".join(p.read_bytes() for p in sorted(out.glob("part-*"))) == sequential_reference(data, f"sed '{SED}'")
    assert json.loads((out / "_manifest.json").read_text())["shards"][3]["part"] == str(out / "part-00003")

    alone = shardline("run", str(path), "--overwrite", env=env)
    assert alone.returncode == 2 and "--overwrite needs --output DEST" in _one_line_error(alone)


def test_unreadable_file(tmp_path, home):
    path = tmp_path / "secret.txt"
    path.write_bytes(b"hidden\n")
    path.chmod(0)
    command = [*SHARDLINE, "run", str(path), "-n", "2", "--exact-shards"]
    if os.geteuid() == 0:
        # Root reads any file: drop the capabilities that let it.
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", *command]
    result = subprocess.run(command, env=clean_env(home), capture_output=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot read {path}: permission denied" in _one_line_error(result)


def test_failed_shard_is_named(tmp_path, home):
    file = tmp_path / "input"
    file.write_bytes(b"".join(b"%d\n" % i for i in range(100)))
    # Only the shard that sees line 50 fails, with its stderr in the message.
    command = "grep -q '^50$' && { echo 'bad record 50' >&2; exit 4; } || cat"
    result = shardline("run", str(file), "-n", "4", "--exact-shards", "--", command, env=clean_env(home))
    assert result.returncode == 1
    line = _one_line_error(result)
    assert "shard 1 failed" in line and "status 4" in line and "bad record 50" in line


@pytest.mark.parametrize(("location", "message"), [("nokey", "no such key 'nokey'"), (None, "no such bucket")])
def test_missing_s3_bucket_or_key(home, moto: Endpoint, bucket, location, message):
    url = f"s3://{bucket}/{location}" if location else "s3://no-such-bucket-xyz/key"
    result = shardline("run", url, env=clean_env(home, **moto.env()))
    assert result.returncode == 1
    assert message in _one_line_error(result)


def test_s3_without_any_configuration_says_so(home):
    result = shardline("run", "s3://bucket/key", env=clean_env(home))
    assert result.returncode == 2
    assert "needs AWS configuration" in _one_line_error(result)


# Shard 0's command changes the object before it reads a byte.  Its stdin
# pipe holds at most 1 MiB, and with one 64 KiB GET in flight the worker can
# run only that far ahead, so with 3 MiB shards its next GETs certainly come
# after the change and must see it.
MID_JOB_DATA = b"".join(b"record %08d\n" % i for i in range(400_000))  # 6.4 MB
MID_JOB_ARGS = ("-n", "2", "--exact-shards", "--part-size", "64K", "--parts-in-flight", "1")


def test_s3_object_overwritten_mid_job_fails_with_etag_error(tmp_path, home, moto: Endpoint, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=MID_JOB_DATA)
    overwrite = (
        f"{sys.executable} -c \"import boto3; boto3.client('s3').put_object(Bucket='{bucket}', Key='k', Body=b'new')\""
    )
    command = f'if [ "$SHARDLINE_SHARD" = 0 ]; then {overwrite}; fi; cat'
    result = shardline("run", f"s3://{bucket}/k", *MID_JOB_ARGS, "--", command, env=clean_env(home, **moto.env()))
    assert result.returncode == 1
    assert "changed" in _one_line_error(result)
    assert len(result.stdout) < len(MID_JOB_DATA)  # never the whole answer


def test_local_file_modified_mid_job_fails(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(MID_JOB_DATA)
    command = f'if [ "$SHARDLINE_SHARD" = 0 ]; then echo more >> {path}; fi; cat'
    result = shardline("run", str(path), *MID_JOB_ARGS, "--", command, env=clean_env(home))
    assert result.returncode == 1
    assert "changed" in _one_line_error(result)
    assert len(result.stdout) < len(MID_JOB_DATA)


def test_worker_command_runs_one_shard_by_hand(tmp_path, home, moto: Endpoint, aws_settings):
    data, _ = CORPUS["random-mix"]
    path = tmp_path / "input"
    path.write_bytes(data)

    async def prepare() -> str:
        async with client(aws_settings, "dynamodb") as dynamodb:
            await ensure_marker_table(dynamodb, "shardline-markers")
        async with LocalFileSource(path) as source:
            return (await source.stat()).etag

    task = ShardTask(
        job_id="by-hand",
        shard=1,
        shards=3,
        attempt=0,
        source=str(path),
        size=len(data),
        etag=asyncio.run(prepare()),
        output_path=str(tmp_path / "out"),
        markers="dynamodb:shardline-markers",
    )
    (tmp_path / "task.json").write_text(task.to_json())
    env = clean_env(home, **moto.env())
    result = shardline("worker", "--task", str(tmp_path / "task.json"), env=env)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["tail_sources"] == ["scan"] and summary["committed"] is None
    assert (tmp_path / "out").read_bytes() == reference_split(data, 3, b"\n")[1]
    bad = shardline("worker", "--task", str(path), env=env)
    assert bad.returncode == 2 and "invalid shard task" in _one_line_error(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{file}", "--coordinator", "ftp://host/"], "must start with http:// or https://"),
        (["run", "{file}", "--coordinator", "http://127.0.0.1:{port}"], "cannot reach the coordinator"),
        (["status", "--coordinator", "http://127.0.0.1:{port}"], "cannot reach the coordinator"),
        (["cancel", "some-id"], "needs a coordinator"),
        (["serve", "--port", "70000"], "must be 0..65535"),
        (["serve", "--drain-timeout", "0"], "must be > 0"),
        (["serve", "--output-root", "{file}"], "not an existing directory"),
        (["serve", "--output-bucket", "s3://bucket/prefix/"], "takes a bucket name"),
    ],
)
def test_client_and_serve_usage_errors(tmp_path, home, args, message):
    file = tmp_path / "input"
    file.write_bytes(b"hello\n")
    (port,) = free_ports(1)  # nothing listens there
    result = shardline(*[a.format(file=file, port=port) for a in args], env=clean_env(home))
    assert result.returncode == 2
    assert message in _one_line_error(result)
    assert result.stdout == b""
