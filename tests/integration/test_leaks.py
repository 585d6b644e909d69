"""Safe by default (DESIGN §9): what a command sees, what it leaves running,
and what a job leaves on disk.

Everything runs as it does for users: `shardline serve` and `shardline run`
subprocesses with their real worker processes, and commands that really
daemonise.  Processes are found again by the pids the commands write to
files; waits are bounded only so that a regression fails instead of hanging.
Spool sweeping and reservations, in-process: tests/coordinator/test_spool.py;
a hidden environment: tests/io/test_processes.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.io.processes import COMMAND_ID_VARIABLE

from daemons import SHARDLINE, Daemon, clean_env, request, submit
from jobs import only_in_attempt
from leftovers import DAEMONISING, alive, kill_quietly, leave_behind, read_pids, spools_under
from polling import eventually_blocking
from servers import Endpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only (/proc, subreaper)")

DATA = b"".join(b"line %05d %s\n" % (i, b"y" * (i % 29)) for i in range(2000))
TOKEN = "api-token-of-the-daemon"
SESSION_TOKEN = "aws-session-token-of-the-daemon"


def leaving_behind(directory: Path, then: str, *, anonymous: bool = False) -> str:
    """A command that leaves every kind of daemonised process behind (per
    shard and attempt), then runs `then`."""
    return leave_behind(directory, tag="$SHARDLINE_SHARD-$SHARDLINE_ATTEMPT", anonymous=anonymous) + then


def all_gone(pids: dict[str, int]) -> None:
    eventually_blocking(lambda: not any(alive(pid) for pid in pids.values()), "every process left behind is gone")


def env_lines(output: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.decode().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("leaks")


@pytest.fixture(scope="module")
def daemon_env(workdir: Path, moto: Endpoint) -> dict[str, str]:
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    return clean_env(home, **moto.env(), SHARDLINE_TOKEN=TOKEN, AWS_SESSION_TOKEN=SESSION_TOKEN)


@pytest.fixture(scope="module")
def daemon(workdir: Path, daemon_env: dict[str, str]):
    server = Daemon(workdir, daemon_env, "--max-processes", "4")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def source(workdir: Path) -> str:
    path = workdir / "input"
    path.write_bytes(DATA)
    return str(path)


@pytest.fixture
def pid_dir(tmp_path: Path):
    directory = tmp_path / "pids"
    directory.mkdir()
    yield directory
    kill_quietly(read_pids(directory).values())


def submit_with_token(daemon: Daemon, **spec: object) -> str:
    status, body = request(f"{daemon.url}/jobs", "POST", spec, token=TOKEN)
    assert status == 201, body.decode()
    return str(json.loads(body)["id"])


def job_output(daemon: Daemon, **spec: object) -> bytes:
    job_id = submit_with_token(daemon, **spec)
    status, output = request(f"{daemon.url}/jobs/{job_id}/output", token=TOKEN)
    assert status == 200, output.decode()
    return output


# --- what a command sees --------------------------------------------------------------

PARENT = (
    "echo PARENT_ARGV=$(tr '\\0' ' ' < /proc/$PPID/cmdline); "
    "if cat /proc/$PPID/environ >/dev/null 2>&1; then echo PARENT_ENVIRON=readable; fi"
)


def test_daemon_commands_see_neither_its_token_nor_its_aws_credentials(daemon, source):
    shards = job_output(daemon, source=source, shards=2, command=f"env; {PARENT}")
    reduce = job_output(daemon, source=source, shards=2, command="true", reduce="env")
    for output in (shards, reduce):
        seen = env_lines(output)
        assert TOKEN not in output.decode() and SESSION_TOKEN not in output.decode()
        assert not {"SHARDLINE_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(seen)
        assert seen["AWS_ENDPOINT_URL"]  # configuration that is not a credential stays
        assert COMMAND_ID_VARIABLE in seen
    assert shards.count(b"SHARDLINE_SHARD=") == 2
    reduce_sees = {name for name in env_lines(reduce) if name.startswith("SHARDLINE_")}
    assert reduce_sees == {"SHARDLINE_JOB_ID", "SHARDLINE_SHARDS", COMMAND_ID_VARIABLE}
    # The job's secret reaches the worker only on its stdin: its argv holds none.
    assert [line for line in shards.decode().splitlines() if line.startswith("PARENT_ARGV=")] == [
        f"PARENT_ARGV={sys.executable} -m shardline.worker --pool"
    ] * 2
    if os.geteuid() != 0:  # root reads every process's environ regardless
        assert b"PARENT_ENVIRON=readable" not in shards


def test_daemon_passes_aws_credentials_to_commands_only_when_told(tmp_path, daemon_env, source):
    opted_in = Daemon(tmp_path, daemon_env, "--command-aws-credentials")
    try:
        seen = env_lines(job_output(opted_in, source=source, shards=1, command="env"))
    finally:
        assert opted_in.stop() == 0, opted_in.log()
    assert seen["AWS_SESSION_TOKEN"] == SESSION_TOKEN and seen["AWS_ACCESS_KEY_ID"]
    assert "SHARDLINE_TOKEN" not in seen


def test_run_passes_the_users_aws_credentials_but_no_shardline_variable(daemon_env, source):
    result = subprocess.run(
        [*SHARDLINE, "run", source, "-n", "2", "--exact-shards", "--store", "dynamodb", "--", "env"],
        env=daemon_env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = env_lines(result.stdout)
    assert seen["AWS_SESSION_TOKEN"] == SESSION_TOKEN and seen["AWS_ACCESS_KEY_ID"]
    assert "SHARDLINE_TOKEN" not in seen and TOKEN not in result.stdout.decode()


# --- every process an attempt starts ends with it ------------------------------------------


def test_processes_left_by_commands_end_with_a_successful_run(tmp_path, pid_dir, source, daemon_env):
    command = leaving_behind(pid_dir, "cat", anonymous=True)
    result = subprocess.run(
        [*SHARDLINE, "run", source, "-n", "3", "--exact-shards", "--store", "dynamodb", "--", command],
        env=daemon_env,
        capture_output=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == DATA
    pids = read_pids(pid_dir)
    assert len(pids) == 3 * (len(DAEMONISING) + 1)
    all_gone(pids)


def test_processes_left_by_a_failed_attempt_end_with_it(daemon, pid_dir, source):
    command = leaving_behind(pid_dir, only_in_attempt(1, 0, "exit 3") + "; cat")
    assert job_output(daemon, source=source, shards=2, command=command, command_retries=1) == DATA
    pids = read_pids(pid_dir)
    assert {name.split(".")[0] for name in pids} == {"0-0", "1-0", "1-1"}  # shard 1 failed once
    all_gone(pids)


def test_processes_left_by_a_cancelled_job_end_with_it(daemon, pid_dir, source):
    job_id = submit_with_token(daemon, source=source, shards=2, command=leaving_behind(pid_dir, "sleep 300"))
    eventually_blocking(lambda: len(read_pids(pid_dir)) == 2 * len(DAEMONISING), "every shard left its processes")
    pids = read_pids(pid_dir)
    assert all(alive(pid) for pid in pids.values())
    status, body = request(f"{daemon.url}/jobs/{job_id}", "DELETE", token=TOKEN)
    assert status == 200, body.decode()
    assert json.loads(body)["state"] == "cancelled"
    all_gone(pids)


# --- no spool is left behind ----------------------------------------------------------------


def test_a_run_killed_with_sigkill_leaves_a_spool_the_next_run_sweeps(tmp_path, pid_dir, source):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)  # the embedded default: no AWS at all
    spool = tmp_path / "spool"
    command = f"sleep 300 & echo $! > {pid_dir}/$SHARDLINE_SHARD.pid; wait"
    argv = [*SHARDLINE, "run", source, "-n", "2", "--exact-shards", "--spool-dir", str(spool)]
    killed = subprocess.Popen([*argv, "--", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        eventually_blocking(lambda: len(read_pids(pid_dir)) == 2, "both shards running")
    finally:
        killed.kill()
        killed.wait()
    left = spools_under(spool)
    assert len(left) == 1 and (left[0] / ".lock").exists()
    all_gone(read_pids(pid_dir))  # its workers saw their stdin close and stopped their commands
    again = subprocess.run([*argv], env=env, capture_output=True, timeout=180)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == DATA
    assert spools_under(spool) == []


def test_a_stopped_daemon_keeps_a_running_jobs_spool_for_the_one_that_resumes_it(tmp_path, pid_dir, source):
    """On the SQLite store a job outlives its daemon: SIGTERM stops its
    commands but keeps its spool; the daemon restarted on the same state
    directory resumes the job, and removes the spool once the job ends."""
    home = tmp_path / "home"
    home.mkdir()
    state_dir = tmp_path / "state"
    daemon = Daemon(tmp_path, clean_env(home), "--drain-timeout", "1", state_dir=state_dir)
    sleeper = f"sleep 300 & echo $! > {pid_dir}/$SHARDLINE_SHARD.pid; wait"
    try:
        finished = submit(daemon, source=source, shards=2, command="cat")
        status, output = daemon.request(f"/jobs/{finished}/output")
        assert (status, output) == (200, DATA)  # its output is kept for an hour
        running = submit(daemon, source=source, shards=2, command=sleeper)
        eventually_blocking(lambda: len(read_pids(pid_dir)) == 2, "the second job runs")
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    all_gone(read_pids(pid_dir))
    kept = spools_under(tmp_path / "spool")
    assert any(running in path.name for path in kept), kept

    for pid_file in pid_dir.iterdir():
        pid_file.unlink()
    resumed = Daemon(tmp_path, clean_env(home), "--drain-timeout", "1", state_dir=state_dir)
    try:
        eventually_blocking(lambda: len(read_pids(pid_dir)) == 2, "the resumed job runs its commands again")
        assert resumed.request(f"/jobs/{running}", "DELETE")[0] == 200
        eventually_blocking(
            lambda: not any(running in path.name for path in spools_under(tmp_path / "spool")),
            "the cancelled job's spool is removed",
        )
    finally:
        assert resumed.stop(signal.SIGTERM) == 0, resumed.log()
    all_gone(read_pids(pid_dir))
