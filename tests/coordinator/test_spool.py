"""Spool directories (DESIGN §9: nothing is left on disk): what a sweep may
remove, reservations of memory spool space shared with other processes, and
that only the coordinator holding a job's spool resumes the job.  Other
processes holding spools are real processes; coordinators run in-process.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from shardline.coordinator import CoordinatorSettings, choose_spool_dir, sweep_spools
from shardline.embedded import InProcessBackend
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import (
    DynamoJobStore,
    ensure_jobs_table,
)
from shardline.protocol import JobSpec

from jobs import running_coordinator
from leftovers import spools_under

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only (/proc)")

DATA = b"".join(b"line %05d %s\n" % (i, b"y" * (i % 29)) for i in range(2000))


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


async def test_concurrent_jobs_reserve_memory_spool_space_together(tmp_path, aws_settings: AwsSettings):
    source = tmp_path / "input"
    source.write_bytes(DATA)
    memory = tmp_path / "shm"
    memory.mkdir()
    gate = tmp_path / "gate"
    # Room for one job's reservation (twice its input), not for two.
    settings = CoordinatorSettings(memory_spool_dir=str(memory), memory_spool_limit_bytes=3 * len(DATA))
    command = f"while [ ! -e {gate} ]; do sleep 0.05; done; cat"
    async with running_coordinator(aws_settings, InProcessBackend(), settings=settings) as service:
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
        async with running_coordinator(aws_settings, InProcessBackend(), settings=settings, store=store) as first:
            view = await first.submit(JobSpec(source=str(source), shards=2, command=command))
            async with running_coordinator(aws_settings, InProcessBackend(), settings=settings, store=store) as second:
                assert await second.resume() == []  # the first one holds it
                assert second.views() == []
                assert await second.sweep_spools() == []
            assert len(spools_under(spool)) == 1
        # The first coordinator is gone, its job unfinished: the spool is kept for the next one,
        # and a sweep by a coordinator of another store (shardline run) leaves it alone.
        assert sweep_spools([str(spool)]) == []
        async with running_coordinator(aws_settings, InProcessBackend(), settings=settings, store=store) as third:
            assert await third.resume() == [view.id]
            assert await third.sweep_spools() == []
            gate.touch()
            assert (await third.wait(view.id)).state.value == "succeeded"
            third.forget(view.id)
    assert spools_under(spool) == []
