"""Safe by default (DESIGN §9): what a command sees, what it leaves running,
and what a job leaves on disk.

Everything runs as it does for users: `shardline serve` and `shardline run`
subprocesses with their real worker processes, and commands that really
daemonise.  Processes are found again by the pids the commands write to
files; waits are bounded only so that a regression fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shardline.coordinator import (
    Coordinator,
    CoordinatorSettings,
    DynamoJobStore,
    ExchangeServer,
    JobStore,
    MemoryJobStore,
    choose_spool_dir,
    sweep_spools,
)
from shardline.embedded import InProcessBackend
from shardline.io.aws import AwsSettings, client
from shardline.io.processes import COMMAND_ID_VARIABLE
from shardline.io.retry import RetryPolicy
from shardline.io.tables import ensure_jobs_table, ensure_marker_table
from shardline.protocol import JobSpec

from daemons import SHARDLINE, Daemon, clean_env, request, submit
from jobs import only_in_attempt
from leftovers import DAEMONISING, alive, kill_quietly, leave_behind, read_pids
from servers import Endpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only (/proc, subreaper)")

DATA = b"".join(b"line %05d %s\n" % (i, b"y" * (i % 29)) for i in range(2000))
TOKEN = "api-token-of-the-daemon"
SESSION_TOKEN = "aws-session-token-of-the-daemon"
#: Bound on every wait for something to happen (a hang guard, not a timing check).
PATIENCE_S = 60.0


def leaving_behind(directory: Path, then: str, *, anonymous: bool = False) -> str:
    """A command that leaves every kind of daemonised process behind (per
    shard and attempt), then runs `then`."""
    return leave_behind(directory, tag="$SHARDLINE_SHARD-$SHARDLINE_ATTEMPT", anonymous=anonymous) + then


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def all_gone(pids: dict[str, int]) -> None:
    eventually(lambda: not any(alive(pid) for pid in pids.values()), "every process left behind is gone")


def spools_under(root: Path) -> list[Path]:
    return sorted(root.glob("shardline-*")) if root.exists() else []


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
        [*SHARDLINE, "run", source, "-n", "2", "--markers", "aws", "--", "env"],
        env=daemon_env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = env_lines(result.stdout)
    assert seen["AWS_SESSION_TOKEN"] == SESSION_TOKEN and seen["AWS_ACCESS_KEY_ID"]
    assert "SHARDLINE_TOKEN" not in seen and TOKEN not in result.stdout.decode()


def test_a_hidden_environment_is_unreadable_to_other_processes_of_its_user(tmp_path):
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every environ; needs setpriv to test as an ordinary user")
        as_user = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    else:
        as_user = []
    code = (
        "import sys, time\n"
        "from shardline.io.processes import hide_environment\n"
        "print(hide_environment(), flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "PROBE_SECRET": "s3cret"}
    hider = subprocess.Popen([*as_user, sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    plain = subprocess.Popen([*as_user, sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:

        def readable(pid: int) -> bool:
            probe = subprocess.run([*as_user, "cat", f"/proc/{pid}/environ"], capture_output=True)
            return b"PROBE_SECRET=s3cret" in probe.stdout

        assert hider.stdout is not None
        assert hider.stdout.readline() == "True\n"
        eventually(lambda: readable(plain.pid), "the plain process's environ can be read")
        assert not readable(hider.pid)
    finally:
        for process in (hider, plain):
            process.kill()
            process.wait()


# --- every process an attempt starts ends with it ------------------------------------------


def test_processes_left_by_commands_end_with_a_successful_run(tmp_path, pid_dir, source, daemon_env):
    command = leaving_behind(pid_dir, "cat", anonymous=True)
    result = subprocess.run(
        [*SHARDLINE, "run", source, "-n", "3", "--markers", "aws", "--", command],
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
    assert job_output(daemon, source=source, shards=2, command=command) == DATA
    pids = read_pids(pid_dir)
    assert {name.split(".")[0] for name in pids} == {"0-0", "1-0", "1-1"}  # shard 1 failed once
    all_gone(pids)


def test_processes_left_by_a_cancelled_job_end_with_it(daemon, pid_dir, source):
    job_id = submit_with_token(daemon, source=source, shards=2, command=leaving_behind(pid_dir, "sleep 300"))
    eventually(lambda: len(read_pids(pid_dir)) == 2 * len(DAEMONISING), "every shard left its processes")
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
    argv = [*SHARDLINE, "run", source, "-n", "2", "--spool-dir", str(spool)]
    killed = subprocess.Popen([*argv, "--", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        eventually(lambda: len(read_pids(pid_dir)) == 2, "both shards running")
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


def test_a_daemon_on_the_embedded_store_leaves_no_spool_after_sigterm(tmp_path, pid_dir, source):
    home = tmp_path / "home"
    home.mkdir()
    daemon = Daemon(tmp_path, clean_env(home), "--drain-timeout", "1")
    try:
        finished = submit(daemon, source=source, shards=2, command="cat")
        status, output = daemon.request(f"/jobs/{finished}/output")
        assert (status, output) == (200, DATA)  # its output is kept for an hour
        submit(daemon, source=source, shards=2, command=f"sleep 300 & echo $! > {pid_dir}/$SHARDLINE_SHARD.pid; wait")
        eventually(lambda: len(read_pids(pid_dir)) == 2, "the second job runs")
        assert len(spools_under(tmp_path / "spool")) == 2
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    # Nothing can ever resume that state: nothing of it is kept.
    assert spools_under(tmp_path / "spool") == []
    all_gone(read_pids(pid_dir))


def hold_spool(root: Path, *, reserved_bytes: int, resumable: bool = False, store: str = "") -> subprocess.Popen[str]:
    """Another process that holds a spool directory under `root` until killed."""
    code = (
        "import sys\n"
        "from shardline.coordinator import SpoolDir\n"
        f"spool = SpoolDir.create({str(root)!r}, job_id='other', reserved_bytes={reserved_bytes}, "
        f"resumable={resumable}, store={store!r})\n"
        "print(spool.path, flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.readline()
    return process


def test_sweeping_removes_only_what_no_live_process_holds(tmp_path):
    root = tmp_path / "root"
    live = hold_spool(root, reserved_bytes=1)
    dead = hold_spool(root, reserved_bytes=1)
    resumable = hold_spool(root, reserved_bytes=1, resumable=True, store="dynamodb somewhere jobs")
    for process in (dead, resumable):
        process.kill()
        process.wait()
    older = root / "shardline-from-an-older-version"
    older.mkdir()
    try:
        assert len(spools_under(root)) == 4
        removed = sweep_spools([str(root)])
        assert len(removed) == 1 and not Path(removed[0]).exists()  # the dead process's
        assert sweep_spools([str(root)], store="dynamodb elsewhere jobs") == []
        # Resumable: only a coordinator of its store may remove it, after resuming its own jobs.
        assert len(sweep_spools([str(root)], store="dynamodb somewhere jobs")) == 1
        assert len(spools_under(root)) == 2  # the live one, and the one without a lock file
        assert older.exists()
    finally:
        live.kill()
        live.wait()


def test_spool_reservations_of_other_processes_count(tmp_path):
    memory = tmp_path / "shm"
    memory.mkdir()
    size = 1_000_000
    assert choose_spool_dir(size, memory_dir=str(memory), memory_limit_bytes=3 * size) == str(memory)
    other = hold_spool(memory, reserved_bytes=2 * size)
    try:
        # 2 x size promised to the other job: twice this one's size no longer fits in 3 x size.
        assert choose_spool_dir(size, memory_dir=str(memory), memory_limit_bytes=3 * size) == tempfile.gettempdir()
    finally:
        other.kill()
        other.wait()
    assert choose_spool_dir(size, memory_dir=str(memory), memory_limit_bytes=3 * size) == str(memory)


@contextlib.asynccontextmanager
async def in_process_coordinator(
    aws: AwsSettings, settings: CoordinatorSettings, store: JobStore | None = None
) -> AsyncIterator[Coordinator]:
    async with client(aws, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, settings.markers_table)
    backend = InProcessBackend()
    async with (
        ExchangeServer() as exchange,
        Coordinator(
            aws=aws,
            backends={backend.name: backend},
            store=store or MemoryJobStore(),
            exchange=exchange,
            settings=settings,
        ) as service,
    ):
        yield service


async def test_concurrent_jobs_reserve_memory_spool_space_together(tmp_path, aws_settings: AwsSettings):
    source = tmp_path / "input"
    source.write_bytes(DATA)
    memory = tmp_path / "shm"
    memory.mkdir()
    gate = tmp_path / "gate"
    # Room for one job's reservation (twice its input), not for two.
    settings = CoordinatorSettings(memory_spool_dir=str(memory), memory_spool_limit_bytes=3 * len(DATA))
    command = f"while [ ! -e {gate} ]; do sleep 0.05; done; cat"
    async with in_process_coordinator(aws_settings, settings) as service:
        first = await service.submit(JobSpec(source=str(source), shards=2, command=command))
        second = await service.submit(JobSpec(source=str(source), shards=2, command=command))
        assert [path.name.split("-")[1] for path in spools_under(memory)] == [first.id]
        assert len(list(Path(tempfile.gettempdir()).glob(f"shardline-{second.id}-*"))) == 1
        gate.touch()
        for job in (first, second):
            assert (await service.wait(job.id)).state.value == "succeeded"
            service.forget(job.id)
        # Released: the memory spool has room again.
        third = await service.submit(JobSpec(source=str(source), shards=1))
        assert [path.name.split("-")[1] for path in spools_under(memory)] == [third.id]
        await service.wait(third.id)
    assert spools_under(memory) == []


async def test_only_the_coordinator_holding_a_jobs_spool_resumes_it(tmp_path, aws_settings: AwsSettings):
    source = tmp_path / "input"
    source.write_bytes(DATA)
    spool = tmp_path / "spool"
    gate = tmp_path / "gate"
    settings = CoordinatorSettings(spool_dir=str(spool), retry_backoff_s=0.05, supervise_interval_s=0.05)
    command = f"while [ ! -e {gate} ]; do sleep 0.05; done; cat"
    table = f"leaks-jobs-{uuid.uuid4().hex[:8]}"
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_jobs_table(dynamodb, table)
        store = DynamoJobStore(dynamodb, table, retry_policy=RetryPolicy())
        async with in_process_coordinator(aws_settings, settings, store) as first:
            view = await first.submit(JobSpec(source=str(source), shards=2, command=command))
            async with in_process_coordinator(aws_settings, settings, store) as second:
                assert await second.resume() == []  # the first one holds it
                assert second.views() == []
                assert await second.sweep_spools() == []
            assert len(spools_under(spool)) == 1
        # The first coordinator is gone, its job unfinished: the spool is kept for the next one,
        # and a sweep by a coordinator of another store (shardline run) leaves it alone.
        assert sweep_spools([str(spool)]) == []
        async with in_process_coordinator(aws_settings, settings, store) as third:
            assert await third.resume() == [view.id]
            assert await third.sweep_spools() == []
            gate.touch()
            assert (await third.wait(view.id)).state.value == "succeeded"
            third.forget(view.id)
    assert spools_under(spool) == []
