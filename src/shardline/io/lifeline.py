# What ends a run's commands when the process running them dies first (Linux).
#
# A pool process's lifeline is its parent's pipe: when the coordinator dies,
# even by SIGKILL, the pool sees EOF and ends its commands (processes.py).
# A process that runs commands itself -- `shardline run` with a local
# file's shards in process -- has nobody left to do that when it is killed:
# its commands, in sessions of their own, would run on.  So it starts this
# small process first (`start_lifeline`), which reads its stdin until EOF --
# which comes when that process exits, however it exits -- and then ends
# every process still carrying one of its command markers
# (``SHARDLINE_COMMAND_ID=PID.…``, inherited by everything a command
# starts).  After a normal exit the scan finds none.
#
# Each process is signalled through a pidfd opened *before* its marker is
# read, so a pid reused meanwhile by an unrelated process is never signalled.
# Only what a command hid from the marker (``env -i``) escapes, as it does
# a pool process that is itself killed.
#
# Run as ``python -m shardline.io.lifeline PREFIX``; it imports nothing
# beyond the standard library's os, signal and sys.

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

__all__ = ["end_marked_processes", "start_lifeline"]

#: How long the rounds of killing may last: a process in uninterruptible
#: sleep cannot die at once, and is left after this.
_END_WAIT_S = 10.0


def start_lifeline() -> subprocess.Popen[bytes] | None:
    """Start the lifeline of this process's commands; None where there is no
    pidfd (not Linux).  Keep the returned process's stdin open until this
    process exits: its EOF is the signal (the descriptor is close-on-exec, so
    no command holds it)."""
    import subprocess

    from .processes import COMMAND_ID_VARIABLE

    if not hasattr(os, "pidfd_open") or not os.path.isdir("/proc/self"):
        return None
    prefix = f"{COMMAND_ID_VARIABLE}={os.getpid()}."
    return subprocess.Popen(
        [sys.executable, "-m", __name__, prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def end_marked_processes(prefix: bytes, *, wait_s: float = _END_WAIT_S) -> int:
    """SIGKILL every process whose environment has an entry starting with
    `prefix`, round after round until a round finds none (a dying shell may
    still fork); returns how many were signalled."""
    me = os.getpid()
    signalled = 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        found = 0
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != me:
                found += _kill_if_marked(int(name), prefix)
        if not found:
            break
        signalled += found
        time.sleep(0.01)  # while the killed die (a zombie's environ reads empty)
    return signalled


def _kill_if_marked(pid: int, prefix: bytes) -> int:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0  # gone, or not ours to see
    try:
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            return 0
        if not any(entry.startswith(prefix) for entry in environ.split(b"\0")):
            return 0
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            return 0  # ended meanwhile
        return 1
    finally:
        os.close(pidfd)


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m shardline.io.lifeline PREFIX", file=sys.stderr)
        return 2
    # Whatever reaches the run's process group (Ctrl-C, a closed terminal, a
    # group-wide SIGTERM) must not end the lifeline before the run: it ends
    # at EOF, once the run has.
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    while os.read(0, 4096):
        pass
    end_marked_processes(argv[0].encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
