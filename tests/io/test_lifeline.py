"""The lifeline of commands run in process (`shardline.io.lifeline`): once
its stdin ends, every process carrying the marker prefix it was given ends,
and nothing else.  End to end (a `shardline run` killed with SIGKILL):
tests/integration/test_leaks.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from shardline.io.lifeline import end_marked_processes

from polling import PATIENCE_S, eventually_blocking

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only")


def sleeper(**env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], env={**os.environ, **env})


def ignores(pid: int, *numbers: int) -> bool:
    """Whether process `pid` ignores every signal in `numbers` (its /proc status)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return all(mask & (1 << (number - 1)) for number in numbers)


def test_marked_processes_end_and_others_do_not() -> None:
    marked = sleeper(SHARDLINE_COMMAND_ID="424242.abc")
    other_run = sleeper(SHARDLINE_COMMAND_ID="4242420.abc")  # a longer pid with the same digits
    unmarked = sleeper()
    try:
        assert end_marked_processes(b"SHARDLINE_COMMAND_ID=424242.") == 1
        assert marked.wait(timeout=PATIENCE_S) == -9
        assert other_run.poll() is None and unmarked.poll() is None
    finally:
        for process in (marked, other_run, unmarked):
            process.kill()
            process.wait()


def test_the_lifeline_acts_at_eof_and_not_on_sigint_or_sigterm() -> None:
    marked = sleeper(SHARDLINE_COMMAND_ID="515151.x")
    lifeline = subprocess.Popen(
        [sys.executable, "-m", "shardline.io.lifeline", "SHARDLINE_COMMAND_ID=515151."], stdin=subprocess.PIPE
    )
    try:
        eventually_blocking(lambda: ignores(lifeline.pid, signal.SIGINT, signal.SIGTERM), "the lifeline is ready")
        lifeline.send_signal(signal.SIGINT)
        lifeline.terminate()
        assert lifeline.stdin is not None
        lifeline.stdin.write(b"still here\n")
        lifeline.stdin.flush()  # it reads on: the signals were ignored
        assert marked.poll() is None
        lifeline.stdin.close()
        assert lifeline.wait(timeout=PATIENCE_S) == 0
        assert marked.wait(timeout=PATIENCE_S) == -9
    finally:
        for process in (marked, lifeline):
            process.kill()
            process.wait()
