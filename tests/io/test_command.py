"""The per-shard output stage, against real processes.

Commands are compared with the same command run by `subprocess` on the whole
input.  Backpressure and cancellation are checked through properties that
hold however loaded the machine is (an upper bound on what a stalled command
has been handed, processes gone after an abort), never through durations.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shardline.errors import CommandExitError, CommandFailedError, StorageError
from shardline.io.command import CommandOutput
from shardline.io.processes import COMMAND_ID_VARIABLE
from shardline.io.shardoutput import PassthroughOutput, ShardOutput

from leftovers import DAEMONISING, alive, kill_quietly, leave_behind, read_pids
from polling import eventually

MIB = 1024 * 1024

LINES = b"".join(b"%d the quick Brown fox\tjumps over\n" % i for i in range(100_000))
SMALL = b"alpha\nBeta\n\n gamma \x00 delta\nno final newline"

# What a command that never reads can have been handed: the stdin pipe (1 MiB
# at most, see shardline/io/command.py) and nothing buffered in the transport.
# Doubled to stay clear of kernel rounding.
STALLED_INPUT_BOUND = 2 * MIB

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


async def feed(output: ShardOutput, data: bytes, chunk_bytes: int) -> None:
    for offset in range(0, len(data), chunk_bytes):
        await output.write(data[offset : offset + chunk_bytes])


def shell_reference(command: str, data: bytes) -> bytes:
    return subprocess.run(["sh", "-c", command], input=data, stdout=subprocess.PIPE, check=True).stdout


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in group `pgid` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


async def assert_group_gone(pgid: int) -> None:
    """The leader is reaped and, within a generous bound, every member is dead."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # already reaped: no zombie of ours
    await eventually(
        lambda: not live_group_members(pgid),
        lambda: f"process group {pgid} has no live member (still: {live_group_members(pgid)})",
    )


# --- passthrough --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "chunk_bytes"),
    [
        (b"", 1),
        (b"\x00", 1),
        (b"\x00\n\x00\x00\nabc\x00", 1),
        (SMALL, 3),
        (random.Random(0).randbytes(5 * MIB + 17), MIB),
        (random.Random(1).randbytes(3 * MIB), 8 * MIB),
    ],
    ids=["empty", "nul", "nuls-bytewise", "small", "5MiB-in-1MiB", "3MiB-whole"],
)
async def test_passthrough_writes_input_exactly(tmp_path: Path, data: bytes, chunk_bytes: int) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"stale content to be truncated")
    async with PassthroughOutput(path) as output:
        await feed(output, data, chunk_bytes)
        assert await output.finish() == len(data)
        assert output.bytes_in == len(data)
    assert path.read_bytes() == data


async def test_passthrough_copies_before_returning(tmp_path: Path) -> None:
    buffer = bytearray(b"first\n")
    async with PassthroughOutput(tmp_path / "out") as output:
        await output.write(memoryview(buffer))
        buffer[:] = b"again\n"  # the caller may reuse its buffer at once
        await output.write(buffer)
        await output.finish()
    assert (tmp_path / "out").read_bytes() == b"first\nagain\n"


async def test_passthrough_unwritable_path_is_storage_error(tmp_path: Path) -> None:
    output = PassthroughOutput(tmp_path / "missing-dir" / "out")
    with pytest.raises(StorageError, match="missing-dir"):
        await output.start()
    await output.aclose()


async def test_passthrough_abort_closes_and_forbids_use(tmp_path: Path) -> None:
    output = PassthroughOutput(tmp_path / "out")
    await output.start()
    await output.write(b"partial")
    await output.aclose()
    await output.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await output.write(b"more")
    with pytest.raises(RuntimeError, match="closed"):
        await output.finish()


# --- commands: same output as the shell ---------------------------------------


@pytest.mark.parametrize("command", ["sed 's/^/>/'", "wc -l", "tr a-z A-Z", "cat"])
@pytest.mark.parametrize(
    ("data", "chunk_bytes"),
    [(b"", 1), (SMALL, 1), (SMALL, 7), (LINES, 65536), (LINES + SMALL, MIB), (LINES, 8 * MIB)],
    ids=["empty", "small-bytewise", "small-7", "lines-64KiB", "lines-1MiB", "lines-whole"],
)
async def test_command_output_matches_shell(tmp_path: Path, command: str, data: bytes, chunk_bytes: int) -> None:
    path = tmp_path / "out"
    async with CommandOutput(command, path) as output:
        await feed(output, data, chunk_bytes)
        size = await output.finish()
    expected = shell_reference(command, data)
    assert path.read_bytes() == expected
    assert size == len(expected)
    assert output.bytes_in == len(data)
    assert output.bytes_dropped == 0


async def test_command_sees_reused_buffer_contents_as_written(tmp_path: Path) -> None:
    buffer = bytearray(b"x" * MIB)
    async with CommandOutput("cat", tmp_path / "out") as output:
        for fill in b"abc":
            buffer[:] = bytes([fill]) * MIB
            await output.write(buffer)
        await output.finish()
    assert (tmp_path / "out").read_bytes() == b"a" * MIB + b"b" * MIB + b"c" * MIB


async def test_head_stops_reading_without_error(tmp_path: Path) -> None:
    data = LINES * 3  # ~10 MiB, far more than any pipe holds
    async with CommandOutput("head -1", tmp_path / "out") as output:
        await feed(output, data, MIB)
        assert await output.finish() == len(b"0 the quick Brown fox\tjumps over\n")
    assert (tmp_path / "out").read_bytes() == b"0 the quick Brown fox\tjumps over\n"
    assert output.bytes_in == len(data)
    assert output.bytes_dropped > 0


@pytest.mark.parametrize("command", ["cat", "wc -l", "head -c 100000"])
async def test_file_ranges_reach_the_command_as_the_files_bytes(tmp_path: Path, command: str) -> None:
    # Ranges of a file fed by descriptor (spliced on Linux), mixed with plain writes.
    source = tmp_path / "source"
    source.write_bytes(LINES * 3)  # ~10 MiB: many pipefuls
    size = source.stat().st_size
    cuts = [0, 1, 5 * MIB + 3, size - 7, size]
    fd = os.open(source, os.O_RDONLY)
    try:
        async with CommandOutput(command, tmp_path / "out") as output:
            await output.write(b"first\n")
            for start, end in itertools.pairwise(cuts):
                await output.write_file_range(fd, start, end - start)
            await output.finish()
    finally:
        os.close(fd)
    expected = subprocess.run(["sh", "-c", command], input=b"first\n" + source.read_bytes(), capture_output=True)
    assert (tmp_path / "out").read_bytes() == expected.stdout
    assert output.bytes_in == len(b"first\n") + size


async def test_a_file_range_past_the_files_end_is_a_storage_error(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(SMALL)
    fd = os.open(source, os.O_RDONLY)
    try:
        async with CommandOutput("cat", tmp_path / "out") as output:
            with pytest.raises(StorageError, match="file ended early"):
                await output.write_file_range(fd, 0, len(SMALL) + 10)
    finally:
        os.close(fd)


# --- failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "returncode", "stderr"),
    [
        ("exit 3", 3, ""),
        ("echo oops >&2; exit 1", 1, "oops"),
        ("cat >/dev/null; echo first >&2; echo oops >&2; exit 1", 1, "oops"),
        ("kill -9 $$", -9, ""),
    ],
)
async def test_nonzero_exit_raises_with_stderr_tail(tmp_path: Path, command: str, returncode: int, stderr: str) -> None:
    output = CommandOutput(command, tmp_path / "out")
    async with output:
        await feed(output, LINES, MIB)
        with pytest.raises(CommandFailedError) as failure:
            await output.finish()
    assert failure.value.returncode == returncode
    assert failure.value.stderr_tail.strip().endswith(stderr)
    assert "\n" not in str(failure.value)
    if stderr:
        assert str(failure.value).endswith(stderr)  # the last stderr lines, on one line, the last at the end


async def test_exit_statuses_in_ok_exit_succeed_and_others_say_how_to_accept_them(tmp_path: Path) -> None:
    async with CommandOutput("grep -c RARE", tmp_path / "out", ok_exit=(0, 1)) as output:
        await output.write(b"common\n")
        assert await output.finish() == 2
    assert (tmp_path / "out").read_bytes() == b"0\n"
    async with CommandOutput("grep RARE", tmp_path / "out2") as output:
        await output.write(b"common\n")
        with pytest.raises(CommandExitError, match=r"status 1: \(no stderr\); .* --ok-exit 0,1$"):
            await output.finish()


@pytest.mark.parametrize("command", ["kill -9 $$", "sh -c 'kill -9 $$'"], ids=["shell", "child"])
async def test_a_signal_is_not_an_exit_status(tmp_path: Path, command: str) -> None:
    # A child killed by a signal (an OOM kill) shows as 128 + N from the shell: retryable, not CommandExitError.
    async with CommandOutput(command, tmp_path / "out") as output:
        with pytest.raises(CommandFailedError) as failure:
            await output.finish()
    assert not isinstance(failure.value, CommandExitError)
    assert failure.value.returncode in (-9, 137)


async def test_missing_command_is_127_with_the_shells_message(tmp_path: Path) -> None:
    async with CommandOutput("no-such-command-xyz", tmp_path / "out") as output:
        await output.write(b"input\n")
        with pytest.raises(CommandFailedError) as failure:
            await output.finish()
    assert failure.value.returncode == 127
    assert "no-such-command-xyz" in failure.value.stderr_tail
    assert "not found" in str(failure.value)


async def test_shell_that_cannot_be_spawned_is_a_command_error(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty-bin"
    empty_dir.mkdir()
    output = CommandOutput("cat", tmp_path / "out", env={"PATH": str(empty_dir)})
    with pytest.raises(CommandFailedError, match="cannot run sh") as failure:
        await output.start()
    assert failure.value.returncode == 127
    await output.aclose()


async def test_unusable_output_path_is_storage_error(tmp_path: Path) -> None:
    output = CommandOutput("cat", tmp_path / "missing-dir" / "out")
    with pytest.raises(StorageError, match="missing-dir"):
        await output.start()
    assert output.pid is None  # nothing was spawned
    await output.aclose()


async def test_stderr_is_drained_bounded_and_forwarded(tmp_path: Path) -> None:
    # 300 KB of stderr before reading stdin: deadlocks unless stderr is drained.
    command = "head -c 300000 /dev/zero | tr '\\0' e >&2; echo >&2; cat; echo last words >&2; exit 2"
    forwarded = io.BytesIO()
    output = CommandOutput(command, tmp_path / "out", stderr_tail_bytes=100, forward_stderr=forwarded)
    async with output:
        await feed(output, LINES, MIB)
        with pytest.raises(CommandFailedError, match=r"status 2: e+; last words$") as failure:
            await output.finish()
    assert len(failure.value.stderr_tail.encode()) <= 100
    assert forwarded.getvalue() == b"e" * 300_000 + b"\nlast words\n"
    assert (tmp_path / "out").read_bytes() == LINES


# --- backpressure -------------------------------------------------------------


async def test_stalled_command_holds_back_writes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    command = f"while [ ! -e '{gate}' ]; do sleep 0.02; done; cat"
    data = random.Random(2).randbytes(8 * MIB)
    async with CommandOutput(command, tmp_path / "out") as output:
        writer = asyncio.create_task(feed(output, data, 64 * 1024))
        await asyncio.sleep(0.5)  # time for an unbounded writer to run far ahead
        assert not writer.done()
        assert output.bytes_in <= STALLED_INPUT_BOUND
        gate.touch()
        await asyncio.wait_for(writer, 30)
        assert await output.finish() == len(data)
    assert (tmp_path / "out").read_bytes() == data


async def test_slow_reader_gets_everything(tmp_path: Path) -> None:
    slow_cat = (
        "import sys, time\n"
        "while chunk := sys.stdin.buffer.read(65536):\n"
        "    time.sleep(0.002)\n"
        "    sys.stdout.buffer.write(chunk)\n"
    )
    data = random.Random(3).randbytes(4 * MIB)
    command = f"sleep 0.2; '{sys.executable}' -c '{slow_cat}'"
    async with CommandOutput(command, tmp_path / "out") as output:
        await feed(output, data, 3 * MIB)
        assert await output.finish() == len(data)
    assert (tmp_path / "out").read_bytes() == data


# A reader that takes 4 KiB at a time, pausing now and then: the pipe is
# refilled from a quarter full (io/pipepacer.py), across its pauses.
SMALL_READER = (
    "import os, sys, time\n"
    "n = 0\n"
    "while chunk := os.read(0, 4096):\n"
    "    n += 1\n"
    "    if n % 500 == 0: time.sleep(0.05)\n"
    "    os.write(1, chunk)\n"
)


async def test_a_reader_taking_little_at_a_time_gets_every_byte_in_order(tmp_path: Path) -> None:
    source = tmp_path / "source"
    data = random.Random(4).randbytes(6 * MIB + 5)
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        async with CommandOutput(f"'{sys.executable}' -c '{SMALL_READER}'", tmp_path / "out") as output:
            await output.write_file_range(fd, 0, 3 * MIB)
            await feed(output, data[3 * MIB :], 2 * MIB + 1)
            assert await output.finish() == len(data)
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data


def feeder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shardline-stdin")]


async def test_the_feeding_thread_ends_with_the_command(tmp_path: Path) -> None:
    before = feeder_threads()
    async with CommandOutput("cat", tmp_path / "out") as output:
        await feed(output, LINES * 3, 4 * MIB)  # far more than a pipeful: fed from the thread
        await output.finish()
    stalled = CommandOutput("sleep 30", tmp_path / "stalled")
    await stalled.start()
    writer = asyncio.create_task(stalled.write(bytes(8 * MIB)))
    await asyncio.sleep(0.2)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    await asyncio.wait_for(stalled.aclose(), 10)
    await eventually(lambda: feeder_threads() == before, lambda: f"feeder threads end (left: {feeder_threads()})")


# --- aborts and cancellation --------------------------------------------------


@needs_proc
async def test_cancelled_write_then_aclose_kills_the_process_group(tmp_path: Path) -> None:
    # `; true` keeps sh alive as the parent of sleep: a group of two to kill.
    output = CommandOutput("sleep 30; true", tmp_path / "out")
    await output.start()
    assert output.pid is not None
    writer = asyncio.create_task(output.write(bytes(8 * MIB)))
    await asyncio.sleep(0.2)
    assert not writer.done()  # nobody reads: blocked on the full pipe
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert len(live_group_members(output.pid)) == 2
    await asyncio.wait_for(output.aclose(), 10)
    await output.aclose()  # idempotent
    await assert_group_gone(output.pid)


@needs_proc
async def test_cancelling_the_owning_task_cleans_up(tmp_path: Path) -> None:
    started = asyncio.Event()
    output = CommandOutput("sleep 30; true", tmp_path / "out")

    async def shard() -> None:
        async with output:
            started.set()
            await output.write(bytes(8 * MIB))

    task = asyncio.create_task(shard())
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()  # __aexit__ runs aclose() inside the cancelled task
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert output.pid is not None
    await assert_group_gone(output.pid)


@needs_proc
async def test_cancelling_a_finish_ends_the_command_and_what_it_started_before_aclose_returns(
    tmp_path: Path,
) -> None:
    # The shell waits on a background child; finish() is cancelled while it waits.
    pid_file = tmp_path / "sleep.pid"
    output = CommandOutput(f"sleep 300 & echo $! > {pid_file}; wait", tmp_path / "out")
    await output.start()
    try:
        sleeper = await eventually(lambda: read_pids(tmp_path).get(pid_file.name), "the background child's pid written")
        waiting = asyncio.Event()

        async def finish() -> None:
            waiting.set()
            await output.finish()  # runs up to its wait for the shell in this same step

        finishing = asyncio.create_task(finish())
        await waiting.wait()
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(finishing, 30)
        # Not eventually: once the cancelled finish (and its abort) returned, both are gone.
        assert output.pid is not None
        with pytest.raises(ChildProcessError):
            os.waitpid(output.pid, os.WNOHANG)  # the shell is reaped
        assert not alive(sleeper)
    finally:
        await output.aclose()


@needs_proc
async def test_background_process_left_by_the_command_is_killed(tmp_path: Path) -> None:
    # The background sleep inherits stderr; finish() must not wait 30 s for it.
    output = CommandOutput("sleep 30 & echo done", tmp_path / "out")
    async with output:
        await output.write(b"ignored\n")
        assert await asyncio.wait_for(output.finish(), 20) == len(b"done\n")
    assert output.pid is not None
    await assert_group_gone(output.pid)
    assert (tmp_path / "out").read_bytes() == b"done\n"


async def test_lifecycle_misuse_is_a_runtime_error(tmp_path: Path) -> None:
    output = CommandOutput("cat", tmp_path / "out")
    with pytest.raises(RuntimeError, match="new"):
        await output.write(b"too early")
    await output.start()
    with pytest.raises(RuntimeError, match="running"):
        await output.start()
    await output.write(b"x\n")
    assert await output.finish() == 2
    with pytest.raises(RuntimeError, match="finished"):
        await output.write(b"too late")
    await output.aclose()
    await output.aclose()


async def test_aclose_from_another_task_interrupts_a_blocked_write(tmp_path: Path) -> None:
    output = CommandOutput("sleep 30", tmp_path / "out")
    await output.start()
    writer = asyncio.create_task(output.write(bytes(8 * MIB)))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(output.aclose(), 10)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(writer, 10)


# --- environment --------------------------------------------------------------


async def test_env_is_added_to_the_inherited_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INHERITED", "inherited")
    command = 'printf "%s %s %s" "$SHARDLINE_SHARD" "$SHARDLINE_ATTEMPT" "$TEST_INHERITED"'
    env = {"SHARDLINE_SHARD": "7", "SHARDLINE_ATTEMPT": "2"}
    async with CommandOutput(command, tmp_path / "out", env=env) as output:
        await output.finish()
    assert (tmp_path / "out").read_bytes() == b"7 2 inherited"


async def test_shardlines_own_variables_and_dropped_names_are_not_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDLINE_TOKEN", "api-token")
    monkeypatch.setenv("SHARDLINE_SHARD", "stale, from an outer shardline")
    monkeypatch.setenv("SHARDLINE_ANYTHING", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = {"SHARDLINE_JOB_ID": "job"}
    async with CommandOutput("env", tmp_path / "out", env=env, drop_env=["AWS_SECRET_ACCESS_KEY"]) as output:
        await output.finish()
    seen = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines() if "=" in line)
    shardline_names = {name for name in seen if name.startswith("SHARDLINE_")}
    assert shardline_names == {"SHARDLINE_JOB_ID", COMMAND_ID_VARIABLE}
    assert seen["SHARDLINE_JOB_ID"] == "job"
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert seen["AWS_REGION"] == "eu-west-1"
    assert seen["PATH"] == os.environ["PATH"]


async def test_each_command_sees_the_environment_and_drops_of_its_own_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The filtered environment is reused between commands: a change, or another drop list, must still show.
    def seen(name: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (tmp_path / name).read_text().splitlines() if "=" in line)

    monkeypatch.setenv("TEST_CHANGING", "first")
    for name, drop in (("one", ()), ("two", ()), ("three", ("TEST_CHANGING",))):
        async with CommandOutput("env", tmp_path / name, drop_env=drop) as output:
            await output.finish()
        monkeypatch.setenv("TEST_CHANGING", "second")
    assert seen("one")["TEST_CHANGING"] == "first"
    assert seen("two")["TEST_CHANGING"] == "second"
    assert "TEST_CHANGING" not in seen("three")


async def test_an_added_bash_function_sends_the_command_to_the_shell(tmp_path: Path) -> None:
    # bash as sh would run the exported function, not the program: only the shell can decide.
    async with CommandOutput("env", tmp_path / "out", env={"BASH_FUNC_env%%": "() { :; }"}) as output:
        await output.finish()
    assert not output._direct


# --- every process a command starts ends with it ---------------------------------


async def pids_written(directory: Path, count: int) -> list[int]:
    """The pids in the pid files of `directory`, once `count` are there."""

    def all_written() -> dict[str, int] | None:
        pids = read_pids(directory)
        return pids if len(pids) == count else None

    pids = await eventually(all_written, lambda: f"{count} pid files written (only: {sorted(read_pids(directory))})")
    return list(pids.values())


async def assert_all_gone(pids: list[int]) -> None:
    await eventually(
        lambda: not any(alive(pid) for pid in pids),
        lambda: f"every process is gone (still running: {[pid for pid in pids if alive(pid)]})",
    )


@pytest.fixture
def pid_dir(tmp_path: Path):
    directory = tmp_path / "pids"
    directory.mkdir()
    yield directory
    kill_quietly(read_pids(directory).values())  # whatever a failing test left running


@needs_proc
@pytest.mark.parametrize("outcome", ["success", "failure"])
async def test_processes_a_command_daemonised_end_with_it(tmp_path: Path, pid_dir: Path, outcome: str) -> None:
    status = 0 if outcome == "success" else 3
    command = leave_behind(pid_dir) + f"cat; exit {status}"
    output = CommandOutput(command, tmp_path / "out")
    async with output:
        await output.write(b"line\n")
        pids = await pids_written(pid_dir, len(DAEMONISING))
        assert all(alive(pid) for pid in pids)
        if status:
            with pytest.raises(CommandFailedError):
                await asyncio.wait_for(output.finish(), 60)
        else:
            assert await asyncio.wait_for(output.finish(), 60) == len(b"line\n")
    await assert_all_gone(pids)


@needs_proc
async def test_processes_a_command_daemonised_end_when_it_is_aborted(tmp_path: Path, pid_dir: Path) -> None:
    output = CommandOutput(leave_behind(pid_dir) + "sleep 300", tmp_path / "out")
    await output.start()
    pids = await pids_written(pid_dir, len(DAEMONISING))
    await asyncio.wait_for(output.aclose(), 60)
    assert output.pid is not None
    await assert_all_gone([*pids, output.pid])


@needs_proc
async def test_ending_one_command_spares_a_running_ones_processes(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first = CommandOutput(leave_behind(first_dir) + "cat", tmp_path / "first.out")
    second = CommandOutput(leave_behind(second_dir) + "cat", tmp_path / "second.out")
    first_pids: list[int] = []
    try:
        async with first, second:
            first_pids = await pids_written(first_dir, len(DAEMONISING))
            second_pids = await pids_written(second_dir, len(DAEMONISING))
            await asyncio.wait_for(second.finish(), 60)
            await assert_all_gone(second_pids)
            # The first command still runs: everything it started still does.
            assert all(alive(pid) for pid in first_pids)
            await asyncio.wait_for(first.finish(), 60)
        await assert_all_gone(first_pids)
    finally:
        kill_quietly(first_pids)
