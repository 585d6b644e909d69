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
import re
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
    plan = shardline("run", f"s3://{bucket}/dir/object.txt", "--dry-run", env=env)
    assert "backend: local (process workers)" in plan.stdout.decode().splitlines()  # S3 parts need the cores


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
    # Lines tagged "shard N: " are the commands' own stderr, passed on.
    lines = [line for line in result.stderr.decode().strip().splitlines() if not re.match(r"shard \d+: ", line)]
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


# --- behaving as grep, parallel and Hadoop Streaming users expect (issue 16) -----------------

RARE_DATA = b"".join(b"line %06d common\n" % i for i in range(20_000)) + b"line RARE here\n"


def _attempts_logged(command: str, log: Path) -> str:
    """`command`, preceded by a line "SHARD ATTEMPT" appended to `log` per attempt."""
    return f'echo "$SHARDLINE_SHARD $SHARDLINE_ATTEMPT" >> {log}; {command}'


def test_ok_exit_accepts_grep_no_match_and_without_it_one_attempt_fails_with_the_hint(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(RARE_DATA)
    env = clean_env(home)
    accepted = shardline("run", str(path), "-n", "4", "--exact-shards", "--ok-exit", "0,1", "--", "grep RARE", env=env)
    assert accepted.returncode == 0, accepted.stderr.decode()
    assert accepted.stdout == sequential_reference(RARE_DATA, "grep RARE") == b"line RARE here\n"

    log = tmp_path / "attempts"
    refused = shardline(
        "run", str(path), "-n", "4", "--exact-shards", "--", _attempts_logged("grep RARE", log), env=env
    )
    assert refused.returncode == 1
    message = _one_line_error(refused)
    assert "command exited with status 1: (no stderr)" in message and "--ok-exit 0,1" in message
    # One attempt per shard: an exit status is the same on the same bytes.
    assert all(line.split()[1] == "0" for line in log.read_text().splitlines())


def test_a_missing_command_is_tried_once_and_command_retries_opt_in(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(RARE_DATA)
    env = clean_env(home)
    log = tmp_path / "attempts"
    missing = shardline(
        "run", str(path), "-n", "2", "--exact-shards", "--", _attempts_logged("no-such-xyz", log), env=env
    )
    assert missing.returncode == 1 and "status 127" in _one_line_error(missing)
    attempts = log.read_text().splitlines()
    assert attempts and all(a.endswith(" 0") for a in attempts) and len(set(attempts)) == len(attempts)  # once
    flaky = 'if [ "$SHARDLINE_ATTEMPT" = 0 ]; then exit 3; fi; cat'
    retried = shardline("run", str(path), "-n", "2", "--exact-shards", "--command-retries", "1", "--", flaky, env=env)
    assert retried.returncode == 0, retried.stderr.decode()
    assert retried.stdout == RARE_DATA


def test_command_stderr_reaches_the_user_tagged_with_its_shard(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(RARE_DATA)
    for workers in ("process", "inprocess"):
        result = shardline(
            "run",
            str(path),
            "-n",
            "4",
            "--exact-shards",
            "--workers",
            workers,
            "--",
            "echo warn >&2; cat",
            env=clean_env(home),
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == RARE_DATA
        assert sorted(result.stderr.decode().splitlines()) == [f"shard {i}: warn" for i in range(4)]


def test_a_failed_commands_error_shows_its_last_stderr_lines(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"a\n")
    command = "echo context >&2; echo 'the real cause' >&2; echo 'exiting' >&2; exit 2"
    result = shardline("run", str(path), "--", command, env=clean_env(home))
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1].endswith("status 2: context; the real cause; exiting")


@pytest.mark.parametrize(
    ("magic", "name"),
    [(b"\x1f\x8b\x08\x00", "gzip"), (b"BZh91AY", "bzip2"), (b"\xfd7zXZ\x00\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")],
)
def test_compressed_input_is_refused_for_more_than_one_shard(tmp_path, home, magic, name):
    path = tmp_path / "input"
    path.write_bytes(magic + b"\n" * 100)
    refused = shardline("run", str(path), "-n", "2", "--exact-shards", env=clean_env(home))
    assert refused.returncode == 1
    message = _one_line_error(refused)
    assert f"is {name}-compressed" in message and "byte ranges" in message and "-n 1" in message
    assert refused.stdout == b""
    one = shardline("run", str(path), "-n", "1", env=clean_env(home))
    assert one.returncode == 0 and one.stdout == path.read_bytes()


def test_a_real_gzip_file_works_as_one_shard(tmp_path, home):
    import gzip

    data = b"".join(b"%d\n" % i for i in range(20_000))
    path = tmp_path / "input.gz"
    path.write_bytes(gzip.compress(data))
    assert shardline("run", str(path), "-n", "2", "--exact-shards", "--", "zcat", env=clean_env(home)).returncode == 1
    result = shardline("run", str(path), "-n", "1", "--", "zcat", env=clean_env(home))
    assert result.returncode == 0 and result.stdout == data


@pytest.mark.parametrize("url", ["s3:/x", "S3://x", "s3//x", "s3:x"])
def test_s3_lookalikes_are_refused_naming_the_intent_and_create_nothing(tmp_path, home, url):
    path = tmp_path / "input"
    path.write_bytes(b"a\n")
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(home)
    as_output = subprocess.run(
        [*SHARDLINE, "run", str(path), "--output", url], env=env, cwd=work, capture_output=True, timeout=60
    )
    assert as_output.returncode == 2
    assert "--output" in _one_line_error(as_output) and "did you mean 's3://x'" in _one_line_error(as_output)
    as_source = subprocess.run([*SHARDLINE, "run", url], env=env, cwd=work, capture_output=True, timeout=60)
    assert as_source.returncode == 2 and "did you mean 's3://x'" in _one_line_error(as_source)
    assert list(work.iterdir()) == []


def test_stdin_is_refused_with_the_reason(home):
    result = shardline("run", "-", env=clean_env(home))
    assert result.returncode == 2 and "'-' (stdin) is not supported" in _one_line_error(result)


def test_header_reaches_every_shards_command_and_is_counted_once(tmp_path, home):
    data = b"id,name\n" + b"".join(b"%d,x\n" % i for i in range(1000))
    path = tmp_path / "input.csv"
    path.write_bytes(data)
    env = clean_env(home)
    heads = shardline("run", str(path), "-n", "4", "--exact-shards", "--header", "--", "head -1", env=env)
    assert heads.returncode == 0, heads.stderr.decode()
    assert heads.stdout == b"id,name\n" * 4
    # Every line but the header, once each; each shard's command saw the header first.
    rest = shardline("run", str(path), "-n", "4", "--exact-shards", "--header", "--stats", "--", "tail -n +2", env=env)
    assert rest.returncode == 0, rest.stderr.decode()
    assert sorted(rest.stdout.splitlines()) == sorted(data.splitlines()[1:])
    stats = json.loads(rest.stderr.decode().strip().splitlines()[-1])
    assert stats["emitted"][0][0] == 0 and stats["emitted"][-1][1] == len(data)  # the input, counted once
    two = shardline("run", str(path), "-n", "3", "--exact-shards", "--header", "2", "--", "head -2", env=env)
    assert two.stdout == b"id,name\n0,x\n" * 3
    without_command = shardline("run", str(path), "--header", env=env)
    assert without_command.returncode == 2 and "--header" in _one_line_error(without_command)


def test_n_far_beyond_the_size_is_lowered_with_a_notice_unless_exact(tmp_path, home):
    data = b"".join(b"%05d\n" % i for i in range(17_000))  # about 100 KB
    path = tmp_path / "input"
    path.write_bytes(data)
    env = clean_env(home)
    lowered = shardline("run", str(path), "-n", "100000", "--stats", env=env)
    assert lowered.returncode == 0, lowered.stderr.decode()
    assert lowered.stdout == data
    notice, summary = lowered.stderr.decode().strip().splitlines()
    assert notice.startswith("shardline: using 1 shard, not 100000") and "--exact-shards" in notice
    assert json.loads(summary)["shards"] == 1
    small = shardline("run", str(path), "-n", "4", "--min-shard-bytes", "40K", "--stats", env=env)
    assert json.loads(small.stderr.decode().strip().splitlines()[-1])["shards"] == 2
    exact = shardline("run", str(path), "-n", "5", "--exact-shards", "--stats", env=env)
    assert exact.stderr.decode().count("\n") == 1 and json.loads(exact.stderr)["shards"] == 5


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"x" * 99 + b"\n")
    log = tmp_path / "ran"
    result = shardline(
        "run", str(path), "-n", "3", "--exact-shards", "--dry-run", "--", f"touch {log}", env=clean_env(home)
    )
    assert result.returncode == 0, result.stderr.decode()
    plan = result.stdout.decode().splitlines()
    assert f"source: {path}" in plan and "size: 100 bytes" in plan and "shards: 3" in plan
    assert plan[4:7] == ["  shard 0: [0, 33)", "  shard 1: [33, 66)", "  shard 2: [66, 100)"]
    assert any(line.startswith("etag: ") for line in plan) and any(line.startswith("store: sqlite:") for line in plan)
    assert "backend: local (inprocess workers)" in plan  # a local file's default: the kernel moves its bytes
    assert not log.exists() and not (home / ".local").exists()  # nothing run, no state created


def test_usage_and_help_point_at_the_command_after_double_dash(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"a\n")
    stray = shardline("run", str(path), "-n", "2", "wc", "-l", env=clean_env(home))
    assert stray.returncode == 2
    assert f"a command goes after '--', e.g. shardline run {path} ... -- wc -l" in _one_line_error(stray)
    usage = shardline("run", "--help", env=clean_env(home)).stdout.decode()
    assert usage.startswith("usage: shardline run SOURCE [options] [-- COMMAND ...]")
    assert "SHARDLINE_ATTEMPT" in usage and "--ok-exit" in usage
    # The examples survive being pasted into a shell: sh itself parses each one.
    examples = [line.strip() for line in usage.splitlines() if line.strip().startswith("shardline run ")]
    words = {}
    for example in examples:
        parsed = subprocess.run(
            ["sh", "-c", f"set -- {example}; printf '%s\\n' \"$@\""], capture_output=True, check=True, env={}
        )
        words[example] = parsed.stdout.decode().splitlines()
    assert any("awk '{s+=$1} END {print s}'" in w for w in words.values())  # $1 not eaten by the shell
    assert any('sort -m "$@"' in w for w in words.values())
    assert any(w[-3:] == ["grep", "-c", " 500 "] and "--ok-exit" in w for w in words.values())


def test_cli_errors_name_flags_not_api_fields(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"a\n")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    result = shardline("run", str(path), "--output", str(not_a_dir), env=clean_env(home))
    assert result.returncode == 2
    message = _one_line_error(result)
    assert message.startswith("shardline: --output: ") and "field" not in message


def test_max_line_bytes_names_the_lines_own_offset_from_any_shard(tmp_path, home):
    data = b"a\n" * 5000 + b"b" * 3000 + b"\n" + b"c\n" * 5000
    path = tmp_path / "input"
    path.write_bytes(data)
    for shards in ("1", "3", "7"):
        result = shardline(
            "run", str(path), "-n", shards, "--exact-shards", "--max-line-bytes", "2000", env=clean_env(home)
        )
        assert result.returncode == 1
        assert "line at offset 10000 is longer than max_line_bytes=2000" in _one_line_error(result)


def test_part_files_honour_the_umask(tmp_path, home):
    path = tmp_path / "input"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(1000)))
    out = tmp_path / "out"
    result = subprocess.run(
        [
            "sh",
            "-c",
            'umask 022; exec "$@"',
            "sh",
            *SHARDLINE,
            "run",
            str(path),
            "-n",
            "2",
            "--exact-shards",
            "--output",
            str(out),
        ],
        env=clean_env(home),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_GETPIPE_SZ is Linux's")
def test_a_pipe_on_stdout_is_widened_to_hold_1_mib(tmp_path, home):
    import fcntl

    data = b"".join(b"line %05d\n" % i for i in range(20000))
    path = tmp_path / "input"
    path.write_bytes(data)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader:
        with subprocess.Popen(
            [*SHARDLINE, "run", str(path), "-n", "3", "--no-progress"],
            env=clean_env(home, SHARDLINE_STATE_DIR=str(home / "state")),
            stdout=write_end,
        ) as process:
            os.close(write_end)
            assert reader.read() == data
            assert process.wait(timeout=120) == 0
        # The same pipe, seen from its read end.
        assert fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ) == 1024 * 1024
