"""Daemons on the SQLite store: job state survives SIGKILL, and several daemons
share one store under leases (an owner that dies is taken over, one that
stalls past its lease is fenced when it wakes up).

Every daemon is a real `shardline serve` process with no AWS configuration
at all: job state and markers live in SQLite files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from daemons import Daemon, clean_env, submit
from jobs import sequential_reference

SED = "sed 's/^/>/'"
DATA = b"".join(b"%06d %s\n" % (i, b"z" * (i % 53)) for i in range(4000))
#: Short leases, so that a takeover happens within seconds.
LEASE = ("--lease-timeout", "2")
#: Shard 3's first attempt hangs, so its owner is stopped while the job surely runs.
HANG_SHARD_3 = 'if [ "$SHARDLINE_SHARD" = 3 ] && [ "$SHARDLINE_ATTEMPT" = 0 ]; then sleep 600; fi; '


def view(daemon: Daemon, job_id: str) -> dict:
    status, body = daemon.request(f"/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def eventually(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def source(tmp_path: Path) -> str:
    path = tmp_path / "input"
    path.write_bytes(DATA)
    return str(path)


def daemon_env(tmp_path: Path, name: str) -> dict[str, str]:
    home = tmp_path / name
    home.mkdir()
    return clean_env(home)  # no AWS at all: the embedded SQLite store


def test_a_daemon_on_sqlite_sigkilled_mid_job_resumes_it_exactly(tmp_path):
    env = daemon_env(tmp_path, "home")
    state_dir = Path(env["SHARDLINE_STATE_DIR"])
    first = Daemon(tmp_path, env, state_dir=state_dir)
    job_id = submit(first, source=source(tmp_path), shards=4, command=HANG_SHARD_3 + SED)
    eventually(lambda: view(first, job_id)["shards_done"] == 3, "three shards are committed")
    first.stop(signal.SIGKILL)
    assert (state_dir / "shardline.db").is_file()

    second = Daemon(tmp_path, env, state_dir=state_dir)
    try:
        assert f"resumed 1 unfinished job(s): {job_id}" in second.log()
        status, output = second.request(f"/jobs/{job_id}/output")
        after = view(second, job_id)
    finally:
        assert second.stop() == 0, second.log()
    assert status == 200 and output == sequential_reference(DATA, SED)
    assert after["state"] == "succeeded"
    assert [s["attempt"] for s in after["shards"][:3]] == [0, 0, 0]  # kept, not redone
    assert after["shards"][3]["attempt"] >= 1


def two_daemons(tmp_path: Path) -> tuple[Daemon, Daemon]:
    """Two daemons, each with its own state directory, sharing one SQLite store."""
    shared = ("--store-path", str(tmp_path / "shared.db"), *LEASE)
    owner = Daemon(tmp_path, daemon_env(tmp_path, "owner"), *shared)
    other = Daemon(tmp_path, daemon_env(tmp_path, "other"), *shared)
    return owner, other


def test_when_the_owner_dies_another_daemon_finishes_its_job_exactly(tmp_path):
    owner, other = two_daemons(tmp_path)
    try:
        job_id = submit(owner, source=source(tmp_path), shards=4, command=HANG_SHARD_3 + SED)
        eventually(lambda: view(owner, job_id)["shards_done"] == 3, "three shards are committed")
        owner.stop(signal.SIGKILL)
        eventually(lambda: f"resumed 1 unfinished job(s): {job_id}" in other.log(), "the other daemon takes it over")
        status, output = other.request(f"/jobs/{job_id}/output")
        after = view(other, job_id)
    finally:
        assert other.stop() == 0, other.log()
        owner.stop(signal.SIGKILL)
    assert status == 200 and output == sequential_reference(DATA, SED)
    assert after["state"] == "succeeded"
    assert after["shards"][3]["attempt"] >= 1  # the dead owner's attempt numbers are fenced


def test_an_owner_stalled_past_its_lease_is_fenced_when_it_wakes_up(tmp_path):
    owner, other = two_daemons(tmp_path)
    try:
        job_id = submit(owner, source=source(tmp_path), shards=4, command=HANG_SHARD_3 + SED)
        eventually(lambda: view(owner, job_id)["shards_done"] == 3, "three shards are committed")
        os.kill(owner.process.pid, signal.SIGSTOP)
        try:
            eventually(lambda: f"resumed 1 unfinished job(s): {job_id}" in other.log(), "the other daemon takes it")
            status, output = other.request(f"/jobs/{job_id}/output")
            finished = view(other, job_id)
        finally:
            os.kill(owner.process.pid, signal.SIGCONT)
        # Awake again, the stalled owner finds its lease gone: it stops the job and writes nothing.
        eventually(lambda: f"job {job_id}: lost to another coordinator" in owner.log(), "the owner is fenced")
        assert owner.request(f"/jobs/{job_id}")[0] == 404
        time.sleep(1)  # anything the fenced owner might still write would land by now
        again = view(other, job_id)
    finally:
        assert other.stop() == 0, other.log()
        assert owner.stop() == 0, owner.log()
    assert status == 200 and output == sequential_reference(DATA, SED)
    assert finished["state"] == again["state"] == "succeeded"
    assert again["shards"] == finished["shards"]
