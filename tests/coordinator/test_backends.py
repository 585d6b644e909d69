"""The local backend's process pool: real ``python -m shardline.worker --pool``
processes run real tasks (local input files, markers in the moto server's
DynamoDB), and are found again through /proc.

Nothing here asserts on time: waits are "until it happens", bounded only so
that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from pathlib import Path

import pytest

from shardline.coordinator import LocalProcessBackend, WorkerExit

from leftovers import alive
from polling import PATIENCE_S, eventually
from reference import reference_split
from tasks import DATA, SLEEPER, kill_group_quietly, pid_from, read_pid


def pool_processes() -> set[int]:
    """Live ``shardline.worker --pool`` children of this test process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == os.getpid() and b"shardline.worker" in cmdline and b"--pool" in cmdline and alive(int(entry)):
            found.add(int(entry))
    return found


async def test_pool_reuses_a_process_across_tasks(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1)
    starts: list[int] = []
    pids = tmp_path / "pids"
    try:
        tasks = [make_task(command=f"echo $PPID >> {pids}; cat", shards=2, index=i) for i in (0, 1)]
        for index, task in enumerate(tasks):
            exit_ = await backend.run(task, on_started=functools.partial(starts.append, index))
            assert exit_.ok, exit_.detail
    finally:
        await backend.aclose()
    assert starts == [0, 1]
    first, second = pids.read_text().split()
    assert first == second  # the same worker process ran both
    expected = reference_split(DATA, 2, b"\n")
    assert [Path(task.output_path).read_bytes() for task in tasks] == expected


async def test_one_process_runs_several_tasks_at_once(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1, max_concurrent=2)
    try:
        sleeping = asyncio.ensure_future(
            backend.run(make_task(command=SLEEPER.format(dir=tmp_path)), on_started=lambda: None)
        )
        worker = await pid_from(tmp_path / "worker.pid")
        # While the first task sleeps, the same process runs a second one to its end.
        quick = await backend.run(make_task(command=f"echo $PPID > {tmp_path}/quick.pid; cat"), on_started=lambda: None)
        assert quick.ok, quick.detail
        assert read_pid(tmp_path / "quick.pid") == worker
        assert not sleeping.done()
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
    finally:
        await backend.aclose()


async def test_prestarted_processes_run_tasks_and_aclose_stops_them_all(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=3)
    try:
        await backend.prestart(5)
        prestarted = pool_processes()
        assert len(prestarted) == 3  # capped at max_processes
        exit_ = await backend.run(make_task(command=f"echo $PPID > {tmp_path}/ppid; cat"), on_started=lambda: None)
        assert exit_.ok, exit_.detail
        assert read_pid(tmp_path / "ppid") in prestarted
        # A busy process is stopped too, and its command with it.
        running = asyncio.ensure_future(
            backend.run(make_task(command=SLEEPER.format(dir=tmp_path)), on_started=lambda: None)
        )
        sleeper = await pid_from(tmp_path / "sleep.pid")
    finally:
        await backend.aclose()
    exit_ = await asyncio.wait_for(running, PATIENCE_S)
    assert not exit_.ok
    assert pool_processes() == set()
    await eventually(lambda: not alive(sleeper), "the busy worker's command is killed")
    with pytest.raises(RuntimeError, match="closed"):
        await backend.run(make_task(), on_started=lambda: None)


async def test_worker_killed_mid_task_is_reported_and_replaced(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1)
    shell = None
    try:
        command = f"echo $$ > {tmp_path}/shell.pid; {SLEEPER.format(dir=tmp_path)}"
        running = asyncio.ensure_future(backend.run(make_task(command=command), on_started=lambda: None))
        worker = await pid_from(tmp_path / "worker.pid")
        shell = await pid_from(tmp_path / "shell.pid")
        os.kill(worker, signal.SIGKILL)
        exit_ = await asyncio.wait_for(running, PATIENCE_S)
        assert not exit_.ok and exit_.detail.startswith("worker process killed by signal 9"), exit_.detail
        again = await backend.run(make_task(command=f"echo $PPID > {tmp_path}/again.pid; cat"), on_started=lambda: None)
        assert again.ok, again.detail
        assert read_pid(tmp_path / "again.pid") not in (None, worker)
    finally:
        await backend.aclose()
        # A worker killed from outside cannot stop its command: do it here.
        kill_group_quietly(shell)


async def test_worker_that_dies_is_named_with_its_last_stderr_line(tmp_path, make_task):
    # A stand-in "python" that complains and exits, as a worker failing at start-up would.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'first line' >&2\necho 'ImportError: no aioboto3' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    backend = LocalProcessBackend(python=str(fake_python))
    try:
        exit_ = await backend.run(make_task(), on_started=lambda: None)
    finally:
        await backend.aclose()
    assert exit_ == WorkerExit(ok=False, detail="worker process exited with status 3: ImportError: no aioboto3")


@pytest.mark.parametrize("stuck", [False, True], ids=["responsive", "stuck"])
async def test_cancelling_run_kills_the_command_process_group(tmp_path, make_task, stuck):
    backend = LocalProcessBackend(max_processes=1, stop_grace_s=0.5)
    try:
        running = asyncio.ensure_future(
            backend.run(make_task(command=SLEEPER.format(dir=tmp_path)), on_started=lambda: None)
        )
        worker = await pid_from(tmp_path / "worker.pid")
        sleeper = await pid_from(tmp_path / "sleep.pid")
        if stuck:  # cannot handle SIGTERM: the backend's SIGKILL must reach the command too
            os.kill(worker, signal.SIGSTOP)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # run() returns once the attempt's command is gone: cancelled inside
        # a responsive worker, or with the whole worker when it is stuck.
        assert not alive(sleeper)
        if stuck:
            assert not alive(worker)
            assert pool_processes() == set()  # a worker that ignored the cancel is never reused
        else:
            assert pool_processes() == {worker}
            again = await backend.run(
                make_task(command=f"echo $PPID > {tmp_path}/again.pid; cat"), on_started=lambda: None
            )
            assert again.ok, again.detail
            assert read_pid(tmp_path / "again.pid") == worker  # reused
    finally:
        await backend.aclose()


async def test_the_job_secret_reaches_the_worker_on_stdin_only(tmp_path, make_task):
    secret = os.urandom(32)
    # What the command, and (as far as it may read them) its worker, show of themselves.
    command = "env; tr '\\0' '\\n' < /proc/$PPID/cmdline; tr '\\0' '\\n' < /proc/$PPID/environ 2>/dev/null; true"
    backend = LocalProcessBackend(max_processes=1)
    try:
        task = make_task(command=command, secret=secret)
        exit_ = await backend.run(task, on_started=lambda: None)
    finally:
        await backend.aclose()
    assert exit_.ok, exit_.detail
    shown = Path(task.output_path).read_bytes()
    assert b"shardline.worker" in shown and b"SHARDLINE_SHARD=0" in shown
    assert secret.hex().encode() not in shown.lower() and secret not in shown


async def test_a_stuck_workers_commands_and_what_they_daemonised_are_killed(tmp_path, make_task):
    backend = LocalProcessBackend(max_processes=1, stop_grace_s=0.5)
    command = (
        f"setsid sleep 300 >/dev/null 2>&1 & echo $! > {tmp_path}/setsid.pid; "
        f"(setsid sleep 300 & echo $! > {tmp_path}/orphan.pid); " + SLEEPER.format(dir=tmp_path)
    )
    try:
        running = asyncio.ensure_future(backend.run(make_task(command=command), on_started=lambda: None))
        worker = await pid_from(tmp_path / "worker.pid")
        others = [await pid_from(tmp_path / name) for name in ("setsid.pid", "orphan.pid", "sleep.pid")]
        os.kill(worker, signal.SIGSTOP)  # cannot end its command: the backend must
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        for pid in others:
            await eventually(lambda pid=pid: not alive(pid), f"process {pid} the command left is killed")
    finally:
        await backend.aclose()
