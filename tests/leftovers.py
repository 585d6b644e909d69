"""What jobs may leave behind, and how tests find it again: the processes a
command leaves running, and spool directories.

Each snippet starts a `sleep 97` in a different way a command might leave it
running and writes its pid to ``{dir}/{tag}.<how>.pid``; `{tag}` lets the
commands of several shards and attempts share one directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

#: How a command may leave a process running: the ways daemons detach.
DAEMONISING = {
    "setsid": "setsid sleep 97 & echo $! > {dir}/{tag}.setsid.pid",
    "setsid-quiet": "setsid sleep 97 >/dev/null 2>&1 </dev/null & echo $! > {dir}/{tag}.quiet.pid",
    "double-fork": "(sleep 97 & echo $! > {dir}/{tag}.double.pid)",
    "nohup": "nohup sleep 97 >/dev/null 2>&1 & echo $! > {dir}/{tag}.nohup.pid",
    "nested": "setsid sh -c 'sleep 97 & echo $! > {dir}/{tag}.nested.pid; wait' >/dev/null 2>&1 &",
}
#: One that clears its environment too: nothing marks it as the command's
#: (only a dedicated command runner, a pool worker, kills it).
ANONYMOUS = "setsid env -i sleep 97 >/dev/null 2>&1 </dev/null & echo $! > {dir}/{tag}.anonymous.pid"


def leave_behind(directory: Path, *, tag: str = "cmd", anonymous: bool = False) -> str:
    """Shell lines that leave every kind of DAEMONISING process running."""
    snippets = [*DAEMONISING.values(), *([ANONYMOUS] if anonymous else [])]
    return "\n".join(snippets).format(dir=directory, tag=tag) + "\n"


def read_pids(directory: Path) -> dict[str, int]:
    """Pid file name -> pid, for the files written completely so far."""
    pids = {}
    for path in directory.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids[path.name] = int(path.read_text())
    return pids


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_quietly(pids: Iterable[int]) -> None:
    """SIGKILL whatever a failing test left running."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def spools_under(root: Path) -> list[Path]:
    """The spool directories of jobs under `root`."""
    return sorted(root.glob("shardline-*")) if root.exists() else []
