"""`shardline serve` as an operator runs it: a daemon subprocess on 127.0.0.1.

The daemon keeps its job state and markers in the session's moto server
(reached through the standard AWS environment variables) and runs shards as
local worker processes.  Jobs are submitted over plain HTTP and with
`shardline run --coordinator`; every output must equal what the sequential
command gives.  Each daemon gets its own tables, so no test resumes another
test's jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from daemons import SHARDLINE, Daemon, clean_env, request, submit
from jobs import sequential_reference
from servers import Endpoint

DATA = b"".join(b"%d,record %05d,%s\n" % (i * 7919 % 1000, i, b"x" * (i % 50)) for i in range(4000))
SED = "sed 's/^/>/'"
SUM = "awk '{s+=$1} END {print s}'"
# One collation for the shards, the merge and the reference.
SORT = "LC_ALL=C sort"
# The reduce gets the shard output files as "$@" too: what a merge needs.
MERGE = 'LC_ALL=C sort -m "$@"'


def shardline(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SHARDLINE, *args], env=env, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def env(workdir, moto: Endpoint) -> dict[str, str]:
    home = workdir / "home"
    home.mkdir()
    return clean_env(home, **moto.env())


@pytest.fixture(scope="module")
def daemon(workdir, env):
    server = Daemon(workdir, env, "--max-processes", "4")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def s3_source(moto: Endpoint) -> str:
    s3 = moto.boto3_client("s3")
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="input.csv", Body=DATA)
    return f"s3://{bucket}/input.csv"


@pytest.fixture(scope="module")
def local_source(workdir) -> str:
    path = workdir / "input.csv"
    path.write_bytes(DATA)
    return str(path)


def test_job_over_http_is_byte_identical(daemon, s3_source):
    job_id = submit(daemon, source=s3_source, shards=6, command=SED)
    status, output = request(f"{daemon.url}/jobs/{job_id}/output")
    assert status == 200
    assert output == sequential_reference(DATA, SED)
    status, body = request(f"{daemon.url}/jobs/{job_id}")
    view = json.loads(body)
    assert view["state"] == "succeeded" and view["size"] == len(DATA)
    assert view["shards"][0]["emitted"][0] == 0 and view["shards"][-1]["emitted"][1] == len(DATA)


@pytest.mark.parametrize(
    ("command", "reduce", "sequential"),
    [("wc -l", SUM, f"wc -l | {SUM}"), (SORT, MERGE, SORT)],
    ids=["count", "sort"],
)
def test_reduce_equals_the_sequential_pipeline(daemon, local_source, command, reduce, sequential):
    job_id = submit(daemon, source=local_source, shards=5, command=command, reduce=reduce)
    status, output = request(f"{daemon.url}/jobs/{job_id}/output")
    assert status == 200
    assert output == sequential_reference(DATA, sequential)


def test_run_with_coordinator_prints_the_same_bytes(daemon, env, s3_source, local_source):
    result = shardline("run", s3_source, "-n", "4", "--coordinator", daemon.url, "--", SED, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sequential_reference(DATA, SED)
    assert result.stderr == b""  # no progress line when stderr is not a terminal

    with_env_url = {**env, "SHARDLINE_COORDINATOR": daemon.url}
    reduce = shardline("run", local_source, "-n", "3", "--reduce", SUM, "--", "wc -l", env=with_env_url)
    assert reduce.returncode == 0, reduce.stderr.decode()
    assert reduce.stdout == sequential_reference(DATA, f"wc -l | {SUM}")


def test_run_with_coordinator_fails_with_the_jobs_error(daemon, env, local_source):
    result = shardline("run", local_source, "-n", "2", "--coordinator", daemon.url, "--", "exit 3", env=env)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardline: "), result.stderr.decode()
    assert "status 3" in lines[0]
    assert result.stdout == b""


def test_status_and_cancel_commands(daemon, env, local_source):
    running = submit(daemon, source=local_source, shards=2, command="sleep 600")
    listed = shardline("status", "--coordinator", daemon.url, env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    header, *rows = listed.stdout.decode().splitlines()
    assert header.split()[:3] == ["ID", "STATE", "SHARDS"]
    assert any(row.split()[0] == running for row in rows)

    cancelled = shardline("cancel", running, "--coordinator", daemon.url, env=env)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    assert cancelled.stdout.decode().strip() == f"job {running} cancelled"

    detail = shardline("status", running, "--json", env={**env, "SHARDLINE_COORDINATOR": daemon.url})
    assert detail.returncode == 0, detail.stderr.decode()
    view = json.loads(detail.stdout)
    assert view["id"] == running and view["state"] == "cancelled"
    text = shardline("status", running, "--coordinator", daemon.url, env=env)
    assert "state:    cancelled" in text.stdout.decode()

    missing = shardline("cancel", "no-such-job", "--coordinator", daemon.url, env=env)
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == f"shardline: no job 'no-such-job' on {daemon.url}"


def test_client_commands_need_a_coordinator(env):
    result = shardline("status", env=env)
    assert result.returncode == 2
    assert "--coordinator URL or set SHARDLINE_COORDINATOR" in result.stderr.decode()


def test_outputs_are_refused_unless_the_operator_allowed_them(daemon, workdir, local_source):
    # The module's daemon was given neither --output-root nor --output-bucket.
    for output, flag in ((str(workdir / "out"), "--output-root DIR"), ("s3://any-bucket/out/", "--output-bucket NAME")):
        status, body = request(f"{daemon.url}/jobs", "POST", {"source": local_source, "shards": 2, "output": output})
        assert status == 400 and flag in json.loads(body)["error"], body
    assert not (workdir / "out").exists()


def test_outputs_go_only_below_the_output_root_and_to_listed_buckets(workdir, env, local_source, moto: Endpoint):
    root = workdir / "outputs"
    root.mkdir()
    (workdir / "elsewhere").mkdir()
    bucket = f"serve-out-{uuid.uuid4().hex[:8]}"
    s3 = moto.boto3_client("s3")
    s3.create_bucket(Bucket=bucket)
    server = Daemon(workdir, env, "--output-root", str(root), "--output-bucket", bucket)
    try:
        refused = {
            str(workdir / "elsewhere"): "is not below this coordinator's output root",
            f"{root}/../elsewhere": "has a '..' component",
            "outputs/job": "is a relative path",
            "s3://another-bucket/out/": f"only to {bucket}",
        }
        for output, message in refused.items():
            body = {"source": local_source, "shards": 2, "output": output}
            status, answer = request(f"{server.url}/jobs", "POST", body)
            assert status == 400 and message in json.loads(answer)["error"], answer
        for output in (str(root / "job"), f"s3://{bucket}/out/"):
            job_id = submit(server, source=local_source, shards=2, output=output)
            assert request(f"{server.url}/jobs/{job_id}/output") == (200, b"")

        # `shardline run --coordinator` sends --output and --overwrite along.
        run = ("run", local_source, "-n", "3", "--coordinator", server.url, "--output", str(root / "job"))
        again = shardline(*run, env=env)
        assert again.returncode == 1 and "is not empty" in again.stderr.decode()  # a 400, as for any bad field
        replaced = shardline(*run, "--overwrite", "--", SED, env=env)
        assert replaced.returncode == 0, replaced.stderr.decode()
    finally:
        assert server.stop() == 0, server.log()
    assert os.listdir(workdir / "elsewhere") == []
    assert sorted(os.listdir(root)) == ["job"]
    parts = sorted((root / "job").glob("part-*"))
    assert [path.name for path in parts] == ["part-00000", "part-00001", "part-00002"]
    assert b"".join(path.read_bytes() for path in parts) == sequential_reference(DATA, SED)
    keys = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["out/_manifest.json", "out/part-00000", "out/part-00001"]


def test_token_and_graceful_shutdown(workdir, env, local_source):
    token = "serve-test-token"
    server = Daemon(workdir, {**env, "SHARDLINE_TOKEN": token})
    try:
        status, _ = request(f"{server.url}/healthz")
        assert status == 401
        status, body = request(f"{server.url}/healthz", token=token)
        assert (status, json.loads(body)) == (200, {"status": "ok"})

        refused = shardline("run", local_source, "-n", "2", "--coordinator", server.url, env=env)
        assert refused.returncode == 2
        assert "--token" in refused.stderr.decode()
        accepted = shardline("run", local_source, "-n", "2", "--coordinator", server.url, "--token", token, env=env)
        assert accepted.returncode == 0, accepted.stderr.decode()
        assert accepted.stdout == DATA
    finally:
        returncode = server.stop(signal.SIGTERM)
    assert returncode == 0, server.log()
    assert "draining" in server.log()
