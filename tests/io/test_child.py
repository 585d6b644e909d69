"""What a command's process starts with, spawned by `shardline.io.child`.

It must see what a shell user would give it: default signal dispositions
(Python itself ignores SIGPIPE), an empty signal mask, a session of its own,
and no descriptor of ours beyond its stdin, stdout and stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from shardline.io.child import Child, spawn, spawn_soon

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@pytest.fixture(params=["on the loop", "off the loop"], autouse=True)
def how(request: pytest.FixtureRequest) -> str:
    """Every property holds for `spawn` (os.posix_spawn) and `spawn_soon` (glibc's, from a thread)."""
    global _soon
    _soon = request.param == "off the loop"
    return str(request.param)


_soon = False


async def start(argv: tuple[str, ...], **spawn_args: object) -> Child:
    if _soon:
        return await spawn_soon(argv, **spawn_args)  # type: ignore[arg-type]
    return spawn(argv, **spawn_args)  # type: ignore[arg-type]


async def run(script: str, tmp_path: Path, **spawn_args: object) -> tuple[int | None, str, bytes]:
    """(returncode, stdout, stderr tail) of ``sh -c script`` with an empty stdin."""
    out_path = tmp_path / "out"
    stdin_read, stdin_write = os.pipe()
    os.close(stdin_write)
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        child = await start(
            ("sh", "-c", script),
            env=dict(os.environ),
            stdin_fd=stdin_read,
            stdout_fd=out,
            stderr_tail_bytes=4096,
            forward_stderr=None,
            **spawn_args,
        )
    finally:
        os.close(stdin_read)
        os.close(out)
    await asyncio.wait_for(asyncio.gather(child.exited, child.stderr_closed), 60)
    child.close()
    return child.returncode, out_path.read_text(), bytes(child.stderr_tail)


@needs_proc
async def test_no_signal_is_ignored_or_blocked_in_the_child(tmp_path: Path) -> None:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's own setting, not inherited
    returncode, out, _ = await run("grep -E '^Sig(Ign|Blk):' /proc/self/status", tmp_path)
    assert returncode == 0
    masks = dict(line.split(":") for line in out.splitlines())
    # Bit n - 1 is signal n; 32 and 33 are glibc's own (its threads), not Python's to set.
    glibc_own = (1 << 31) | (1 << 32)
    assert int(masks["SigBlk"], 16) == 0
    assert int(masks["SigIgn"], 16) & ~glibc_own == 0


async def test_a_writer_into_a_closed_pipe_dies_of_sigpipe_as_in_a_shell(tmp_path: Path) -> None:
    returncode, out, _ = await run("yes | head -1; echo ${PIPESTATUS:-done}", tmp_path)
    assert returncode == 0
    assert out == "y\ndone\n"


@needs_proc
async def test_the_child_holds_only_its_three_descriptors(tmp_path: Path) -> None:
    ours = os.open(os.devnull, os.O_RDONLY)  # close-on-exec, as Python opens everything
    try:
        returncode, out, _ = await run("ls /proc/$$/fd", tmp_path)
    finally:
        os.close(ours)
    assert returncode == 0
    assert sorted(map(int, out.split())) == [0, 1, 2]


async def test_the_child_leads_a_session_of_its_own(tmp_path: Path) -> None:
    returncode, out, _ = await run("ps -o sid= -o pid= -p $$", tmp_path)
    assert returncode == 0
    session, pid = out.split()
    assert session == pid
    assert int(session) != os.getsid(0)


async def test_exit_status_and_signal_are_reported_as_subprocess_does(tmp_path: Path) -> None:
    assert (await run("exit 7", tmp_path))[0] == 7
    assert (await run("kill -KILL $$", tmp_path))[0] == -signal.SIGKILL


async def test_stderr_is_kept_after_the_process_exits(tmp_path: Path) -> None:
    returncode, _, stderr = await run("echo one >&2; echo two >&2", tmp_path)
    assert returncode == 0
    assert stderr == b"one\ntwo\n"


async def test_an_executable_missing_from_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await start(
            ("no-such-program-xyz",),
            env={"PATH": str(tmp_path)},
            stdin_fd=0,
            stdout_fd=1,
            stderr_tail_bytes=0,
            forward_stderr=None,
        )


async def test_a_null_byte_is_refused_not_cut_short(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="null byte"):
        await run("echo safe\0; rm -rf /nothing-here", tmp_path)


async def test_a_cancelled_spawn_leaves_no_process_behind(tmp_path: Path) -> None:
    marker = f"shardline-cancelled-{os.getpid()}-{id(tmp_path)}"
    stdin_read, stdin_write = os.pipe()
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(20):  # cancelled at various points of the spawn
            spawning = asyncio.ensure_future(
                start(
                    ("sleep", "30"),
                    env={**os.environ, "CANCEL_MARKER": marker},
                    stdin_fd=stdin_read,
                    stdout_fd=out,
                    stderr_tail_bytes=0,
                    forward_stderr=None,
                )
            )
            await asyncio.sleep(0)
            spawning.cancel()
            try:
                child = await spawning
            except asyncio.CancelledError:
                continue
            os.killpg(child.pid, signal.SIGKILL)  # it finished before the cancel: ours to end
            await asyncio.wait_for(child.exited, 10)
            child.close()
    finally:
        for fd in (stdin_read, stdin_write, out):
            os.close(fd)
    deadline = asyncio.get_running_loop().time() + 10
    while _processes_marked(marker) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert _processes_marked(marker) == []


def _processes_marked(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found
