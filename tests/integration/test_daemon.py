"""The daemon under stress: SIGKILLed mid-job and restarted, and 20 jobs of
64 shards at once.

Both run `shardline serve` as a real subprocess with its job state and
markers in the session's moto server, which outlives the daemon.
"""

from __future__ import annotations

import json
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemons import Daemon, clean_env, submit
from jobs import sequential_reference
from polling import eventually_blocking
from servers import Endpoint

SED = "sed 's/^/>/'"
DATA = b"".join(b"%06d %s\n" % (i, b"y" * (i % 61)) for i in range(5000))


@pytest.fixture
def serve_env(tmp_path, moto: Endpoint) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(home, **moto.env())


def view(daemon: Daemon, job_id: str) -> dict:
    status, body = daemon.request(f"/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def wait_for(daemon: Daemon, job_id: str, condition, timeout_s: float = 180.0) -> dict:
    """The job's view, once `condition` holds for it."""

    def reached() -> dict | None:
        current = view(daemon, job_id)
        return current if condition(current) else None

    return eventually_blocking(
        reached,
        lambda: f"job {job_id} got there: {view(daemon, job_id)}\n{daemon.log()}",
        timeout_s=timeout_s,
        interval_s=0.1,
    )


def test_daemon_sigkilled_mid_job_resumes_with_exact_output(tmp_path, serve_env):
    source = tmp_path / "input"
    source.write_bytes(DATA)
    runs = tmp_path / "runs.log"
    # Every attempt logs itself; shard 3's first attempt hangs, so the daemon
    # is killed while the job is surely running.
    command = (
        f'echo "$SHARDLINE_SHARD $SHARDLINE_ATTEMPT" >> {runs}; '
        'if [ "$SHARDLINE_SHARD" = 3 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then sleep 600; fi; '
        f"{SED}"
    )
    suffix = uuid.uuid4().hex[:8]
    state = ["--jobs-table", f"jobs-{suffix}", "--markers-table", f"markers-{suffix}"]
    # The same state directory: the restarted daemon is the same coordinator
    # (its id), so it resumes at once instead of waiting out the dead one's lease.
    first = Daemon(tmp_path, serve_env, *state, state_dir=tmp_path / "state")
    job_id = submit(first, source=str(source), shards=4, command=command)
    before = wait_for(first, job_id, lambda v: v["shards_done"] == 3)
    first.stop(signal.SIGKILL)

    second = Daemon(tmp_path, serve_env, *state, state_dir=tmp_path / "state")
    try:
        assert f"resumed 1 unfinished job(s): {job_id}" in second.log()
        status, output = second.request(f"/jobs/{job_id}/output")
        after = view(second, job_id)
    finally:
        assert second.stop() == 0, second.log()
    assert status == 200
    assert output == sequential_reference(DATA, SED)
    assert after["state"] == "succeeded"
    # Committed shards were kept, not redone; the hung one ran again with a new attempt.
    assert [s["attempt"] for s in after["shards"][:3]] == [s["attempt"] for s in before["shards"][:3]] == [0, 0, 0]
    assert after["shards"][3]["attempt"] >= 1
    logged = [line.split() for line in runs.read_text().splitlines()]
    assert sorted(entry for entry in logged if entry[0] != "3") == [["0", "0"], ["1", "0"], ["2", "0"]]


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


#: Bounded memory: the daemon's peak RSS with 1,280 shards in flight (about
#: 70 MiB measured, most of it the libraries; job state is small and shard
#: outputs stay on disk).
MAX_DAEMON_RSS_BYTES = 256 * 1024 * 1024


def test_twenty_jobs_of_64_shards_at_once(tmp_path, serve_env):
    inputs = []
    for index in range(20):
        path = tmp_path / f"input-{index:02d}"
        path.write_bytes(
            b"".join(b"job %02d line %05d %s\n" % (index, i, b"z" * (i * index % 23)) for i in range(1500))
        )
        inputs.append(path)
    daemon = Daemon(tmp_path, serve_env, "--max-processes", "4")
    try:
        commands = [None if index % 2 else SED for index in range(20)]
        jobs = [
            submit(daemon, source=str(path), shards=64, **({"command": command} if command else {}))
            for path, command in zip(inputs, commands, strict=True)
        ]
        running = sum(view(daemon, job_id)["state"] in ("pending", "running") for job_id in jobs)
        with ThreadPoolExecutor(max_workers=20) as pool:
            outputs = list(pool.map(lambda job_id: daemon.request(f"/jobs/{job_id}/output"), jobs))
        views = [view(daemon, job_id) for job_id in jobs]
        peak_rss = _peak_rss_bytes(daemon.process.pid)
        status, metrics = daemon.request("/metrics")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert running >= 10  # they really overlapped
    for path, command, (status, output) in zip(inputs, commands, outputs, strict=True):
        assert status == 200
        assert output == sequential_reference(path.read_bytes(), command)
    assert all(v["state"] == "succeeded" and v["shards_done"] == 64 for v in views)
    assert peak_rss < MAX_DAEMON_RSS_BYTES, f"daemon peak RSS {peak_rss / 2**20:.0f} MiB"
    assert 'shardline_jobs{state="succeeded"} 20' in metrics.decode()
