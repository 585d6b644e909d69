"""The daemon's client as a person uses it: `run --detach`, `shardline output
PREFIX` to re-attach, and a client whose daemon is SIGKILLed mid-stream.

Real `shardline serve` processes on the SQLite store (no AWS at all) and
real client processes; the daemon is restarted on the same state directory
and every output must equal the sequential command's.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from daemons import SHARDLINE, Daemon, clean_env, submit
from jobs import sequential_reference
from polling import eventually_blocking

SED = "sed 's/^/>/'"
DATA = b"".join(b"%06d %s\n" % (i, b"q" * (i % 61)) for i in range(4000))
#: Shard 3's first attempt hangs, so the daemon is killed while the job surely runs.
HANG_SHARD_3 = 'if [ "$SHARDLINE_SHARD" = 3 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then sleep 600; fi; '


def shardline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SHARDLINE, *args], env=env, capture_output=True, timeout=120)


def shards_done(daemon: Daemon, job_id: str) -> int:
    status, body = daemon.request(f"/jobs/{job_id}")
    assert status == 200, body
    return int(json.loads(body)["shards_done"])


def job_ids(daemon: Daemon) -> set[str]:
    status, body = daemon.request("/jobs")
    assert status == 200, body
    return {job["id"] for job in json.loads(body)["jobs"]}


def test_detached_job_survives_a_sigkilled_daemon_and_output_prefix_gives_it_exactly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    state_dir = Path(env["SHARDLINE_STATE_DIR"])
    source = tmp_path / "input"
    source.write_bytes(DATA)
    expected = sequential_reference(DATA, SED)
    run = ("run", str(source), "-n", "4", "--exact-shards")

    first = Daemon(tmp_path, env, state_dir=state_dir)
    try:
        detached = shardline(*run, "--detach", "--coordinator", first.url, "--", HANG_SHARD_3 + SED, env=env)
        assert detached.returncode == 0, detached.stderr.decode()
        job_id = detached.stdout.decode().strip()
        assert len(job_id) == 16 and shards_done(first, job_id) >= 0  # the bare id, and the job exists
        # An attached client of a second job, streaming when the daemon dies.
        attached = subprocess.Popen(
            [*SHARDLINE, *run, "--coordinator", first.url, "--", HANG_SHARD_3 + SED],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        eventually_blocking(lambda: len(job_ids(first)) == 2, "the attached client submitted its job")
        (other_id,) = job_ids(first) - {job_id}
        for each in (job_id, other_id):
            eventually_blocking(lambda each=each: shards_done(first, each) == 3, "three shards are committed")
    finally:
        first.stop(signal.SIGKILL)

    # The attached client: exit 1 (not 2, "usage"), naming the job and how to re-attach.
    _, stderr = attached.communicate(timeout=120)
    message = stderr.decode()
    assert attached.returncode == 1, message
    assert other_id in message and f"re-attach with: shardline output {other_id} --coordinator {first.url}" in message

    second = Daemon(tmp_path, env, state_dir=state_dir)
    try:
        ids = [job_id, other_id]
        for each in ids:
            prefix = next(each[:k] for k in range(1, 16) if not any(i.startswith(each[:k]) for i in ids if i != each))
            output = shardline("output", prefix, "--coordinator", second.url, env=env)
            assert output.returncode == 0, output.stderr.decode()
            assert output.stdout == expected
            assert output.stderr == b""
    finally:
        assert second.stop() == 0, second.log()


def test_output_of_a_failed_job_exits_1_and_an_unknown_one_says_so(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    source = tmp_path / "input"
    source.write_bytes(DATA)
    daemon = Daemon(tmp_path, env, state_dir=Path(env["SHARDLINE_STATE_DIR"]))
    try:
        failing = submit(daemon, source=str(source), shards=2, command="exit 3", max_attempts=1)
        failed = shardline("output", failing[:8], "--coordinator", daemon.url, env=env)
        missing = shardline("output", "zz", "--coordinator", daemon.url, env=env)
        embedded = shardline("run", str(source), "--detach", env=env)
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert failed.returncode == 1 and "status 3" in failed.stderr.decode(), failed.stderr.decode()
    assert failed.stdout == b""
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == f"shardline: no job 'zz' on {daemon.url}"
    assert embedded.returncode == 2 and "--detach needs --coordinator" in embedded.stderr.decode()


def test_ctrl_c_cancels_the_job_run_started_but_never_one_output_watches(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    source = tmp_path / "input"
    source.write_bytes(DATA)
    daemon = Daemon(tmp_path, env, state_dir=Path(env["SHARDLINE_STATE_DIR"]))

    def interrupted(*args: str) -> tuple[int, str]:
        """Exit status and stderr of a client given SIGINT once it streams (what -v says)."""
        log = tmp_path / f"client-{len(list(tmp_path.glob('client-*')))}.log"
        with open(log, "wb") as stderr:
            client = subprocess.Popen(
                [*SHARDLINE, args[0], "-v", *args[1:]], env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        eventually_blocking(lambda: "streaming the output of job" in log.read_text(), "the client streams")
        client.send_signal(signal.SIGINT)
        client.wait(timeout=120)
        return client.returncode, log.read_text()

    try:
        watched = submit(daemon, source=str(source), shards=2, command="sleep 600")
        code, watcher = interrupted("output", watched[:6], "--coordinator", daemon.url)
        still = json.loads(daemon.request(f"/jobs/{watched}")[1])["state"]
        code_run, runner = interrupted(
            "run", str(source), "-n", "2", "--exact-shards", "--coordinator", daemon.url, "--", "sleep 600"
        )
        (started,) = job_ids(daemon) - {watched}
        cancelled = json.loads(daemon.request(f"/jobs/{started}")[1])["state"]
        daemon.request(f"/jobs/{watched}", "DELETE")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert code == 130 and still == "running", watcher
    assert f"job {watched} goes on without this client; re-attach with: shardline output {watched}" in watcher
    assert code_run == 130 and cancelled == "cancelled", runner
    assert f"job {started} cancelled" in runner
