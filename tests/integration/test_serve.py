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
import re
import signal
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from shardline.coordinator import HttpLimits
from shardline.protocol import JobLimits

from daemons import SHARDLINE, Daemon, clean_env, request, submit
from jobs import sequential_reference
from servers import Endpoint
from tlsca import make_ca

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
    # The clients find its generated token in the environment's state directory.
    server = Daemon(workdir, env, "--max-processes", "4", state_dir=Path(env["SHARDLINE_STATE_DIR"]))
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
    status, output = daemon.request(f"/jobs/{job_id}/output")
    assert status == 200
    assert output == sequential_reference(DATA, SED)
    status, body = daemon.request(f"/jobs/{job_id}")
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
    status, output = daemon.request(f"/jobs/{job_id}/output")
    assert status == 200
    assert output == sequential_reference(DATA, sequential)


def test_run_with_coordinator_prints_the_same_bytes(daemon, env, s3_source, local_source):
    result = shardline("run", s3_source, "-n", "4", "--exact-shards", "--coordinator", daemon.url, "--", SED, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sequential_reference(DATA, SED)
    assert result.stderr == b""  # no progress line when stderr is not a terminal

    with_env_url = {**env, "SHARDLINE_COORDINATOR": daemon.url}
    reduce = shardline(
        "run", local_source, "-n", "3", "--exact-shards", "--reduce", SUM, "--", "wc -l", env=with_env_url
    )
    assert reduce.returncode == 0, reduce.stderr.decode()
    assert reduce.stdout == sequential_reference(DATA, f"wc -l | {SUM}")


def test_run_with_coordinator_fails_with_the_jobs_error(daemon, env, local_source):
    result = shardline(
        "run", local_source, "-n", "2", "--exact-shards", "--coordinator", daemon.url, "--", "exit 3", env=env
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardline: "), result.stderr.decode()
    assert "status 3" in lines[0]
    assert result.stdout == b""


def test_command_stderr_is_kept_per_attempt_and_shown_by_logs(daemon, env, local_source):
    failing = 'if [ "$SHARDLINE_SHARD" = 1 ]; then echo "bad record" >&2; exit 4; fi'
    command = f'echo "warn from $SHARDLINE_SHARD" >&2; {failing}; cat'
    result = shardline(
        "run", local_source, "-n", "3", "--exact-shards", "--coordinator", daemon.url, "--", command, env=env
    )
    assert result.returncode == 1
    error = result.stderr.decode().strip().splitlines()[-1]
    assert "status 4: warn from 1; bad record" in error  # the job's error has the last lines
    job_id = error.split("job ")[1].split()[0]
    # On a loaded machine an attempt may end before its command ran (a start
    # deadline) and be retried: the logs name the attempts that ran it.
    shards = json.loads(daemon.request(f"/jobs/{job_id}/shards")[1])["shards"]
    attempts = {shard["index"]: shard["attempt"] for shard in shards}
    one = shardline("logs", job_id, "--shard", "1", "--coordinator", daemon.url, env=env)
    assert one.returncode == 0, one.stderr.decode()
    assert one.stdout.decode() == f"--- shard 1 attempt {attempts[1]} ---\nshard 1: warn from 1\nshard 1: bad record\n"
    every = shardline("logs", job_id, "--coordinator", daemon.url, env=env)
    assert "shard 1: bad record" in every.stdout.decode()
    assert {line for line in every.stdout.decode().splitlines() if line.startswith("--- ")} <= {
        f"--- shard {i} attempt {a} ---" for i in range(3) for a in range(attempts[i] + 1)
    }
    beyond = shardline("logs", job_id, "--shard", "9", "--coordinator", daemon.url, env=env)
    assert beyond.returncode == 1 and "has shards 0 to 2" in beyond.stderr.decode()


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
        status, body = daemon.request("/jobs", "POST", {"source": local_source, "shards": 2, "output": output})
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
            status, answer = server.request("/jobs", "POST", body)
            assert status == 400 and message in json.loads(answer)["error"], answer
        for output in (str(root / "job"), f"s3://{bucket}/out/"):
            job_id = submit(server, source=local_source, shards=2, output=output)
            assert server.request(f"/jobs/{job_id}/output") == (200, b"")

        # `shardline run --coordinator` sends --output and --overwrite along.
        run = (
            "run",
            local_source,
            "-n",
            "3",
            "--exact-shards",
            "--coordinator",
            server.url,
            "--output",
            str(root / "job"),
        )
        again = shardline(*run, env=server.client_env)
        assert again.returncode == 1 and "is not empty" in again.stderr.decode()  # a 400, as for any bad field
        replaced = shardline(*run, "--overwrite", "--", SED, env=server.client_env)
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


def test_a_token_from_the_environment_and_graceful_shutdown(workdir, env, local_source):
    token = "serve-test-token"
    server = Daemon(workdir, {**env, "SHARDLINE_TOKEN": token})
    try:
        assert server.token == token
        assert request(f"{server.url}/jobs")[0] == 401
        status, body = server.request("/jobs")
        assert (status, json.loads(body)) == (200, {"jobs": []})

        # Without the token, the client tries the local daemon's generated
        # one (the module's daemon shares the state directory): refused.
        refused = shardline("run", local_source, "-n", "2", "--exact-shards", "--coordinator", server.url, env=env)
        assert refused.returncode == 2
        assert "--token-file FILE or set SHARDLINE_TOKEN" in refused.stderr.decode()
        accepted = shardline(
            "run",
            local_source,
            "-n",
            "2",
            "--exact-shards",
            "--coordinator",
            server.url,
            env={**env, "SHARDLINE_TOKEN": token},
        )
        assert accepted.returncode == 0, accepted.stderr.decode()
        assert accepted.stdout == DATA
    finally:
        returncode = server.stop(signal.SIGTERM)
    assert returncode == 0, server.log()
    assert "draining" in server.log()


# -- safe by default -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "coord.example.com", "app.localhost"])
def test_serve_off_loopback_without_a_token_refuses_to_start(env, host):
    # Refused before anything binds: the test never listens off loopback.
    result = shardline("serve", "--host", host, "--port", "0", env=env, timeout=60)
    assert result.returncode == 2
    message = result.stderr.decode().strip()
    assert message.startswith(f"shardline: --host {host} is reachable from other machines"), message
    assert "--token-file FILE" in message and "--insecure-no-auth" in message
    empty = shardline("serve", "--host", host, "--port", "0", env={**env, "SHARDLINE_TOKEN": ""}, timeout=60)
    assert empty.returncode == 2
    assert "SHARDLINE_TOKEN is empty" in empty.stderr.decode()


def test_a_local_daemon_needs_no_token_flags(daemon, env, local_source):
    """The generated token: 0600 in the state directory, found there by the clients."""
    token_file = Path(env["SHARDLINE_STATE_DIR"]) / "token"
    assert f"token in {token_file})" in daemon.log()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert daemon.token == token_file.read_text().strip()
    assert request(f"{daemon.url}/jobs")[0] == 401
    assert request(f"{daemon.url}/healthz") == (200, b'{"status": "ok"}')
    # No token flag, no variable; "localhost" names the daemon as well as 127.0.0.1.
    local_url = daemon.url.replace("127.0.0.1", "localhost")
    result = shardline("run", local_source, "-n", "3", "--exact-shards", "--coordinator", local_url, "--", SED, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sequential_reference(DATA, SED)
    printed = shardline("token", env=env)
    assert printed.returncode == 0 and printed.stdout.decode().strip() == daemon.token


def test_the_generated_token_survives_a_restart(workdir, moto):
    home = workdir / "restart-home"
    home.mkdir()
    env = clean_env(home, **moto.env())
    first = Daemon(workdir, env, state_dir=home / "state")
    assert first.stop() == 0, first.log()
    second = Daemon(workdir, env, state_dir=home / "state")
    try:
        assert second.token == first.token and second.token
    finally:
        assert second.stop() == 0, second.log()


def test_token_file_and_an_explicit_insecure_mode(workdir, env, local_source):
    token_file = workdir / "api-token"
    made = shardline("token", "--file", str(token_file), env=env)
    assert made.returncode == 0, made.stderr.decode()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    server = Daemon(workdir, env, "--token-file", str(token_file))
    try:
        assert server.token == made.stdout.decode().strip()
        status = shardline("status", "--coordinator", server.url, "--token-file", str(token_file), env=env)
        assert status.returncode == 0, status.stderr.decode()
    finally:
        assert server.stop() == 0, server.log()

    insecure = Daemon(workdir, env, "--insecure-no-auth")
    try:
        assert insecure.token is None
        assert "HAS NO AUTHENTICATION (--insecure-no-auth)" in insecure.log()
        assert request(f"{insecure.url}/jobs") == (200, b'{"jobs": []}')
        # Still not for web pages, nor for bodies that are not JSON.
        assert request(f"{insecure.url}/jobs", headers={"Origin": "http://evil.example"})[0] == 403
        form = request(f"{insecure.url}/jobs", "POST", {"source": local_source, "shards": 1}, headers=PLAIN_TEXT)
        assert form[0] == 415
    finally:
        assert insecure.stop() == 0, insecure.log()


PLAIN_TEXT = {"Content-Type": "text/plain"}


def test_job_limits_are_serve_flags_and_run_has_the_same_defaults(workdir, env, local_source):
    server = Daemon(workdir, env, "--max-shards", "3", "--max-attempts", "2")
    try:
        status, body = server.request("/jobs", "POST", {"source": local_source, "shards": 4})
        assert status == 400 and "limit of 3 " in json.loads(body)["error"]
        status, body = server.request("/jobs", "POST", {"source": local_source, "shards": 1, "max_attempts": 3})
        assert status == 400 and "'max_attempts'" in json.loads(body)["error"]
        result = shardline(
            "run", local_source, "-n", "4", "--exact-shards", "--coordinator", server.url, env=server.client_env
        )
        assert result.returncode == 1 and "--max-shards" in result.stderr.decode()
    finally:
        assert server.stop() == 0, server.log()
    embedded = shardline("run", local_source, "-n", "100001", env=env)
    assert embedded.returncode == 2
    assert "-n: 100001 is above this coordinator's limit of 100000" in embedded.stderr.decode()


def test_https_daemon_with_the_clients_ca(workdir, env):
    ca = make_ca(workdir / "api-ca")
    server = Daemon(workdir, env, "--tls-cert", str(ca.server_cert), "--tls-key", str(ca.server_key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        listed = shardline(
            "status", "--coordinator", server.url, "--coordinator-ca", str(ca.ca_cert), env=server.client_env
        )
        assert listed.returncode == 0, listed.stderr.decode()
        assert listed.stdout.decode().strip() == "no jobs"
        unverified = shardline("status", "--coordinator", server.url, env=server.client_env)
        assert unverified.returncode == 2 and "certificate" in unverified.stderr.decode()
    finally:
        assert server.stop() == 0, server.log()


def test_serve_help_states_the_real_limits(env):
    text = " ".join(shardline("serve", "--help", env=env).stdout.decode().split())
    text = text[text.index("options:") :]  # the descriptions, not the usage line
    jobs, http = JobLimits(), HttpLimits()
    defaults = {
        "--max-shards": str(jobs.max_shards),
        "--max-attempts": str(jobs.max_attempts),
        "--max-timeout": str(int(jobs.max_timeout_s)),
        "--max-part-size": f"{jobs.max_part_size_bytes >> 20}M",
        "--max-in-flight": f"{jobs.max_in_flight_bytes >> 30}G",
        "--max-connections": str(http.max_connections),
    }
    for flag, default in defaults.items():
        described = re.search(rf"{flag} \S+ (.*?)(?= --|$)", text)
        assert described and f"(default: {default}" in described.group(1), (flag, described)
