# Every process a command starts ends with it (Linux; DESIGN §9).
#
# A command runs in a session of its own (see command.py), so its ordinary
# descendants share its session id, and every descendant, daemonised or not,
# inherits the command's marker variable (`COMMAND_ID_VARIABLE`).  The process
# that runs commands makes itself a child subreaper (`adopt_orphans`), so an
# orphan of a command (``setsid sleep &``, ``(sleep &)``, nohup) is re-parented
# to it instead of to init.
#
# When a command ends, `CommandProcesses.end()` kills, round after round, each
# direct child of ours that belongs to it (by marker, or by session when the
# marker cannot be read), and any child whose command no longer runs here.  A
# killed parent orphans its children, which the next round finds; the rounds
# stop when a scan finds nothing left.  Children of commands that still run
# are left alone: a process may run several commands at once.  A child that
# cannot be attributed (its environment was replaced, as by ``env -i``) is
# killed too, but only in a *dedicated* process -- a pool worker, a Lambda
# handler -- where every child in a session of its own is a command's; a
# coordinator also has worker processes and its caller's children there.
#
# Only direct children are signalled and reaped: a child's pid cannot be
# reused until we reap it, so no signal can reach an unrelated process.
# Reaping is by pid, never ``waitpid(-1)``: a command's own watcher (child.py)
# owns the children we spawned ourselves.
#
# Elsewhere (macOS: no subreaper, no /proc) nothing here is active, and a
# command's processes end with its process group only.

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import threading

__all__ = ["COMMAND_ID_VARIABLE", "CommandProcesses", "adopt_orphans", "hide_environment"]

log = logging.getLogger("shardline.io.processes")

#: Set in every command's environment: which run of a command a process
#: belongs to.  The value starts with the pid of the process that ran it.
COMMAND_ID_VARIABLE = "SHARDLINE_COMMAND_ID"

#: How long `end()` keeps killing and reaping before it gives up with a
#: warning (a process in uninterruptible sleep cannot die at once).
_END_WAIT_S = 10.0
#: Pause between two rounds, while killed processes die and their children
#: are re-parented to us.
_ROUND_PAUSE_S = 0.01

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36

# Per process (a fork starts afresh: the subreaper flag is not inherited).
_state_lock = threading.Lock()
_adopting_pid: int | None = None  # the pid that made itself a subreaper
_dedicated = False
_live: dict[str, CommandProcesses] = {}  # marker -> running command
_live_sessions: dict[int, CommandProcesses] = {}  # session id -> running command
_spawning = 0  # commands between registration and a known pid
_killed: set[int] = set()  # children signalled by some end(), not reaped yet


def _prctl(option: int, value: int) -> bool:
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def adopt_orphans(*, dedicated: bool = False) -> bool:
    """Make this process the reaper of its commands' orphans; True if active (Linux only).

    Idempotent; `CommandOutput` calls it before each command.  Pass
    `dedicated` from a process whose only children in sessions of their own
    are commands (a pool worker, a Lambda handler): an orphan that cannot be
    attributed to a command is then killed too.  Once dedicated, always.
    """
    global _adopting_pid, _dedicated
    with _state_lock:
        if dedicated:
            _dedicated = True
        if _adopting_pid != os.getpid():
            if not os.path.isdir("/proc/self/task") or not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
                return False
            _adopting_pid = os.getpid()
        return True


def hide_environment() -> bool:
    """Make this process's /proc files (environ, memory) unreadable to other
    processes of the same user, its commands included; True if done (Linux).

    A command could otherwise read the secrets its parent holds, AWS
    credentials among them, from ``/proc/$PPID/environ``.  Costs core dumps
    and same-user debuggers (root is unaffected).  Not inherited across exec.
    """
    return _prctl(_PR_SET_DUMPABLE, 0)


class CommandProcesses:
    """The processes of one run of a command.

    Create it before spawning the command (its `marker` goes into the
    command's environment), call `spawned()` with the command's pid (its
    session id) or None if it could not be spawned, and await `end()` once
    the command has exited or been killed: that ends every process it left.
    """

    def __init__(self) -> None:
        global _spawning
        self.marker = f"{os.getpid()}.{secrets.token_hex(8)}"
        self.session: int | None = None
        self._registered = True
        with _state_lock:
            _live[self.marker] = self
            _spawning += 1

    def spawned(self, session: int | None) -> None:
        """The command runs as the leader of session `session` (None: it
        never ran, and there is nothing to end)."""
        global _spawning
        with _state_lock:
            _spawning -= 1
            if session is not None and self._registered:
                self.session = session
                _live_sessions[session] = self
        if session is None:
            self._forget()

    async def end(self) -> bool:
        """Kill and reap every process of this command that is still around,
        then forget the command.  False, doing nothing, unless
        `adopt_orphans()` is active."""
        try:
            if _adopting_pid != os.getpid():
                return False
            await self._kill_and_reap()
            return True
        finally:
            self._forget()

    def _forget(self) -> None:
        with _state_lock:
            if self._registered:
                self._registered = False
                _live.pop(self.marker, None)
                if self.session is not None and _live_sessions.get(self.session) is self:
                    del _live_sessions[self.session]

    async def _kill_and_reap(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _END_WAIT_S
        killed: set[int] = set()  # ours of _killed
        while True:
            # One synchronous step: nothing can reap a child between our
            # look at it and our signal to it.
            with _state_lock:
                found = _sweep_once(self, killed)
                killed &= _killed
            if not found and not killed:
                return
            if loop.time() >= deadline:
                log.warning(
                    "processes left by a command still not gone %.0fs after SIGKILL: %s",
                    _END_WAIT_S,
                    ", ".join(map(str, sorted(killed))) or "more keep appearing",
                )
                return
            await asyncio.sleep(_ROUND_PAUSE_S)


# -- one round (called with _state_lock held) -------------------------------------


def _sweep_once(ending: CommandProcesses, killed: set[int]) -> bool:
    """Kill the children that belong to `ending` or to no running command
    (adding them to `killed`), reap what died; True if a live one was found
    (another round is needed)."""
    me = os.getpid()
    my_session = os.getsid(0)
    found = False
    for pid in _children(me):
        if pid in _killed:
            continue  # reaped below
        if pid != ending.session and pid in _live_sessions:
            # Another running command's shell (its pid is its session id):
            # not ours to reap, and still unreaped, so the pid is still it.
            # Skipped unread: a process running many commands has many.
            continue
        stat = _stat(pid)
        if stat is None or stat.parent != me:
            continue  # gone meanwhile
        if pid == ending.session:
            # The command itself, reaped by its watcher (child.py).  While it lives,
            # what it started is still its children, not ours: kill it and
            # look again once it died.  Only if it is still that command (its
            # marker): once reaped, its pid may be another command's.
            if not stat.zombie and _marker(pid) == ending.marker:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                found = True
            continue
        if not _ends_with(ending, pid, stat, my_session):
            continue
        if stat.zombie:
            _reap(pid)  # died on its own
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _killed.add(pid)
        killed.add(pid)
        found = True
    for pid in list(_killed):
        if _reap(pid):
            _killed.discard(pid)
    return found


def _ends_with(ending: CommandProcesses, pid: int, stat: _Stat, my_session: int) -> bool:
    """Whether child `pid` must end now that `ending` ends."""
    if stat.session == my_session:
        # Commands run in sessions of their own, and no process can join an
        # existing session: this child (a worker process, the lifeline) is not
        # a command's, and its environment need not be read.
        return False
    marker = None if stat.zombie else _marker(pid)
    if marker is not None:
        owner = _live.get(marker)
        if owner is not None:
            return owner is ending
        if marker.startswith(f"{os.getpid()}."):
            return True  # a command of ours that has ended
    else:
        owner = _live_sessions.get(stat.session)
        if owner is not None:
            return owner is ending
    # Nobody's we know of: a command's only if it is in a session of its own
    # and this process starts no other such children; and never while a
    # command is being spawned (it could be that one, not yet exec'd).
    return _dedicated and stat.session != my_session and _spawning == 0


class _Stat:
    __slots__ = ("parent", "session", "zombie")

    def __init__(self, parent: int, session: int, zombie: bool) -> None:
        self.parent = parent
        self.session = session
        self.zombie = zombie


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # state ppid pgrp session ...
    return _Stat(parent=int(fields[1]), session=int(fields[3]), zombie=fields[0] in (b"Z", b"X"))


def _marker(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    prefix = COMMAND_ID_VARIABLE.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("ascii", errors="replace")
    return None


def _children(pid: int) -> list[int]:
    """Our direct children that can belong to commands (`pid` is ours).

    The kernel lists a child under the thread that made it.  Commands are
    spawned by this thread (the event loop's), and an orphan is re-parented
    to the subreaper's first live thread, its leader while the process runs
    (kernel/exit.c, find_new_reaper): so those two threads' lists hold every
    child a sweep looks for, however many threads (executors, SQLite) the
    process has.
    """
    paths = {f"/proc/{pid}/task/{tid}/children" for tid in (pid, threading.get_native_id())}
    children: list[int] = []
    for path in paths:
        try:
            with open(path) as f:
                children.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):  # no CONFIG_PROC_CHILDREN: scan them all
                return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _parent_is(int(entry), pid)]
        except OSError:
            pass
    return children


def _parent_is(pid: int, parent: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat.parent == parent


def _reap(pid: int) -> bool:
    """Reap child `pid` if it has died; True once it is no longer ours to reap."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return reaped == pid
