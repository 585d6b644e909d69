# A command's process: started with posix_spawn, watched from the event loop.
#
# Why not `loop.subprocess_exec`: uvloop (libuv) forks, and fork copies the
# parent's page tables, so a spawn costs more the bigger the parent is --
# 0.6 ms of CPU from a small pool worker, 9 ms from a coordinator holding
# 300 MB, against 0.1 ms for glibc's posix_spawn (clone with
# CLONE_VM | CLONE_VFORK) from either (bench/spawn.py).  A job of 5,000
# shards spawns 5,000 commands, from the coordinator itself when its shards
# run in-process.
#
# The child gets what libuv gave it: every signal at its default
# disposition (Python ignores SIGPIPE, which `yes | head` relies on being
# fatal), an empty signal mask, a session of its own, and only the three
# descriptors it is handed: everything Python opens is close-on-exec, and
# what this process inherited without that flag (a uvloop parent hands its
# child copies of its stdio sockets above fd 2) gets it before the first
# spawn, so a command left running cannot hold our parent's pipes open.
#
# `spawn_soon` starts it from a thread of its own, with the GIL released
# (glibc's posix_spawn through ctypes): os.posix_spawn holds the GIL while
# the parent waits for the child's exec, ~0.3 ms in which nothing else in
# this process runs -- a third of the event loop's time in a 5,000-shard
# in-process job (bench/README.md).  Elsewhere it falls back to `spawn`.
#
# Its exit is seen through a pidfd registered with the loop (Linux), else by
# a thread blocked in `waitpid` for that one pid; either way we reap it
# ourselves, by pid (processes.py leaves a running command's shell to us).
# Its stderr is read by a loop reader: drained for its whole life, so a
# chatty command never blocks on a full pipe; the last bytes are kept for
# the error message, and everything can be forwarded as it arrives.

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from .stderrlines import TaggedLines

__all__ = ["Child", "spawn", "spawn_soon"]

log = logging.getLogger("shardline.io.child")

#: Reset to their default in the child: all that may be (libuv's behaviour).
_DEFAULT_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))

#: Exit watched through a pidfd (Linux >= 5.3), else by a thread per child.
_PIDFD = hasattr(os, "pidfd_open")

_STDERR_READ_BYTES = 64 * 1024

_sealed_in_pid: int | None = None  # the process whose inherited descriptors are close-on-exec


class Child:
    """A running child process: its exit and its stderr, as futures.

    `exited` resolves once it has been reaped (`returncode` then holds its
    status, negative for a signal as in `subprocess`); `stderr_closed` once
    every holder of its stderr has let go (background processes it started
    may hold it longer than it lives).  `close()` stops watching stderr.
    """

    def __init__(
        self, pid: int, stderr_fd: int, *, stderr_tail_bytes: int, forward_stderr: IO[bytes] | TaggedLines | None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.pid = pid
        self.returncode: int | None = None
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self.stderr_closed: asyncio.Future[None] = self._loop.create_future()
        self.stderr_tail = bytearray()
        self._stderr_tail_bytes = stderr_tail_bytes
        self._forward_stderr = forward_stderr
        self._stderr_fd: int | None = stderr_fd
        os.set_blocking(stderr_fd, False)
        self._loop.add_reader(stderr_fd, self._read_stderr)
        self._watch_exit()

    # -- exit ----------------------------------------------------------------

    def _watch_exit(self) -> None:
        if _PIDFD:
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError as exc:  # a kernel without pidfds (ENOSYS), a seccomp filter
                log.debug("no pidfd for pid %d (%s); waiting in a thread", self.pid, exc)
            else:
                self._loop.add_reader(pidfd, self._reap_by_pidfd, pidfd)
                return
        threading.Thread(target=self._wait_in_thread, name=f"wait-{self.pid}", daemon=True).start()

    def _reap_by_pidfd(self, pidfd: int) -> None:
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        self._exited(_wait(self.pid))  # readable: it has exited, so this does not block

    def _wait_in_thread(self) -> None:
        status = _wait(self.pid)
        try:
            self._loop.call_soon_threadsafe(self._exited, status)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _exited(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self.exited.done():
            self.exited.set_result(None)

    # -- stderr --------------------------------------------------------------

    def _read_stderr(self) -> None:
        assert self._stderr_fd is not None
        try:
            data = os.read(self._stderr_fd, _STDERR_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("cannot read stderr of pid %d: %s", self.pid, exc)
            data = b""
        if data:
            self._take_stderr(data)
        else:
            self._stderr_ended()

    def _take_stderr(self, data: bytes) -> None:
        if self._forward_stderr is not None:
            try:
                self._forward_stderr.write(data)
                self._forward_stderr.flush()
            except (OSError, ValueError) as exc:
                # Keep draining regardless: a reader that stops makes the
                # command block on a full stderr pipe.
                log.warning("cannot forward command stderr any more: %s", exc)
                self._forward_stderr = None
        self.stderr_tail += data
        excess = len(self.stderr_tail) - self._stderr_tail_bytes
        if excess > 0:
            del self.stderr_tail[:excess]

    def _stderr_ended(self) -> None:
        self.close()
        if isinstance(self._forward_stderr, TaggedLines):
            try:
                self._forward_stderr.end()  # its last line, even without a newline
            except (OSError, ValueError) as exc:
                log.warning("cannot forward command stderr any more: %s", exc)
        if not self.stderr_closed.done():
            self.stderr_closed.set_result(None)

    def close(self) -> None:
        """Stop reading stderr (whatever still holds it then sees EPIPE)."""
        if self._stderr_fd is not None:
            fd, self._stderr_fd = self._stderr_fd, None
            self._loop.remove_reader(fd)
            os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin_fd: int,
    stdout_fd: int,
    stderr_tail_bytes: int,
    forward_stderr: IO[bytes] | TaggedLines | None,
    executable: str | None = None,
) -> Child:
    """Start `argv` (its first element looked up in `env`'s PATH, unless the
    caller found it already: `executable`) as the leader of a new session,
    with `stdin_fd` and `stdout_fd` as its stdin and stdout and a pipe of
    ours as its stderr.  Raises OSError if it cannot be executed.  Call it
    from the event loop's thread; it waits there for the child's exec
    (`spawn_soon` does not)."""
    executable, stderr_read, stderr_write = _prepare(argv, env, executable)
    try:
        pid = _posix_spawn(executable, argv, env, (stdin_fd, stdout_fd, stderr_write), _python_spawn)
    except BaseException:
        os.close(stderr_read)
        raise
    finally:
        os.close(stderr_write)  # the child has its copy
    return Child(pid, stderr_read, stderr_tail_bytes=stderr_tail_bytes, forward_stderr=forward_stderr)


async def spawn_soon(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin_fd: int,
    stdout_fd: int,
    stderr_tail_bytes: int,
    forward_stderr: IO[bytes] | TaggedLines | None,
    off_loop: bool = True,
    executable: str | None = None,
) -> Child:
    """`spawn`, with the exec waited for in a thread while the loop goes on
    (Linux with glibc; elsewhere, or with `off_loop` false, the same as
    `spawn`).  Cancelled, it still ends the spawn before it returns (the
    caller's descriptors are in use until then), and kills what it started.

    Off the loop pays a thread hop (~2 context switches) to save the loop
    ~0.3 ms of waiting with the GIL held: a gain where one loop runs many
    shards (in-process), a loss in CPU where it runs a few (a pool process)."""
    if not off_loop or _libc_spawn() is None:
        return spawn(
            argv,
            env=env,
            stdin_fd=stdin_fd,
            stdout_fd=stdout_fd,
            stderr_tail_bytes=stderr_tail_bytes,
            forward_stderr=forward_stderr,
            executable=executable,
        )
    executable, stderr_read, stderr_write = _prepare(argv, env, executable)
    try:
        stdio = (stdin_fd, stdout_fd, stderr_write)
        started = _spawner().submit(_posix_spawn, executable, argv, env, stdio, _ctypes_spawn)
        try:
            pid = await asyncio.wrap_future(started)
        except asyncio.CancelledError:
            if not started.cancel():  # running: the thread may be starting it right now
                with contextlib.suppress(Exception):
                    _kill_and_reap_soon(started.result())  # within one exec's time
            raise
    except BaseException:
        os.close(stderr_read)
        raise
    finally:
        os.close(stderr_write)  # the child has its copy
    return Child(pid, stderr_read, stderr_tail_bytes=stderr_tail_bytes, forward_stderr=forward_stderr)


def _kill_and_reap_soon(pid: int) -> None:
    """End a child nobody watches (a cancelled `spawn_soon`'s): its session's group, then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # a session leader: its group id is its pid
    threading.Thread(target=_wait, args=(pid,), name=f"reap-{pid}", daemon=True).start()


def _prepare(argv: Sequence[str], env: Mapping[str, str], executable: str | None) -> tuple[str, int, int]:
    """The executable's path (`executable`, else looked up) and the child's stderr pipe (read end, write end)."""
    _seal_inherited_descriptors()
    if executable is None:
        executable = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if executable is None:
        raise FileNotFoundError(2, "not found on PATH", argv[0])
    stderr_read, stderr_write = os.pipe()
    return executable, stderr_read, stderr_write


def _posix_spawn(
    executable: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: Sequence[int],
    start: Callable[[str, Sequence[str], Mapping[str, str], Sequence[int]], int],
) -> int:
    """Start the child with `stdio` as its descriptors 0-2; its pid."""
    moved = [_above_stdio(fd) for fd in stdio]
    try:
        return start(executable, argv, env, moved)
    finally:
        for original, fd in zip(stdio, moved, strict=True):
            if fd != original:
                os.close(fd)


def _python_spawn(executable: str, argv: Sequence[str], env: Mapping[str, str], stdio: Sequence[int]) -> int:
    return os.posix_spawn(
        executable,
        list(argv),
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)],
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
        setsigmask=(),
    )


# -- glibc's posix_spawn with the GIL released ---------------------------------------

# glibc's <spawn.h> flags.
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80
#: Room for glibc's opaque types (80, 336 and 128 bytes on x86-64 and arm64).
_FILE_ACTIONS_BYTES = 512
_ATTRIBUTES_BYTES = 1024
_SIGSET_BYTES = 256

_libc_checked = False
_libc: ctypes.CDLL | None = None
_spawn_executor: ThreadPoolExecutor | None = None


def _libc_spawn() -> ctypes.CDLL | None:
    """glibc, if this is Linux with a glibc whose posix_spawn knows
    POSIX_SPAWN_SETSID (2.26+); else None."""
    global _libc_checked, _libc
    if not _libc_checked:
        _libc_checked = True
        if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                attributes = ctypes.create_string_buffer(_ATTRIBUTES_BYTES)
                libc.posix_spawnattr_init(attributes)
                flags = _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK
                known = libc.posix_spawnattr_setflags(attributes, ctypes.c_short(flags)) == 0
                libc.posix_spawnattr_destroy(attributes)
                _libc = libc if known else None
            except (OSError, AttributeError, ValueError) as exc:
                log.debug("spawning with os.posix_spawn: %s", exc)
    return _libc


def _spawner() -> ThreadPoolExecutor:
    global _spawn_executor
    if _spawn_executor is None:
        _spawn_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardline-spawn")
    return _spawn_executor


def _ctypes_spawn(executable: str, argv: Sequence[str], env: Mapping[str, str], stdio: Sequence[int]) -> int:
    """What `_python_spawn` does, through glibc directly: ctypes releases the GIL for the call."""
    libc = _libc_spawn()
    assert libc is not None
    args = [os.fsencode(arg) for arg in argv]
    environment = [os.fsencode(name) + b"=" + os.fsencode(value) for name, value in env.items()]
    # C strings end at NUL: refuse what os.posix_spawn refuses rather than cut it short.
    if any(b"\0" in item for item in (*args, *environment)):
        raise ValueError("embedded null byte in a command's arguments or environment")
    if any(not name or "=" in name for name in env):
        raise ValueError("illegal environment variable name")
    c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    c_env = (ctypes.c_char_p * (len(environment) + 1))(*environment, None)
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_BYTES)
    attributes = ctypes.create_string_buffer(_ATTRIBUTES_BYTES)
    defaults = ctypes.create_string_buffer(_SIGSET_BYTES)
    mask = ctypes.create_string_buffer(_SIGSET_BYTES)
    _check(libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        _check(libc.posix_spawnattr_init(attributes), "posix_spawnattr_init")
        try:
            for target, fd in enumerate(stdio):
                _check(libc.posix_spawn_file_actions_adddup2(actions, fd, target), "posix_spawn_file_actions_adddup2")
            libc.sigemptyset(defaults)
            for number in _DEFAULT_SIGNALS:
                libc.sigaddset(defaults, int(number))
            libc.sigemptyset(mask)
            _check(libc.posix_spawnattr_setsigdefault(attributes, defaults), "posix_spawnattr_setsigdefault")
            _check(libc.posix_spawnattr_setsigmask(attributes, mask), "posix_spawnattr_setsigmask")
            flags = ctypes.c_short(_POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK)
            _check(libc.posix_spawnattr_setflags(attributes, flags), "posix_spawnattr_setflags")
            pid = ctypes.c_int()
            error = libc.posix_spawn(ctypes.byref(pid), os.fsencode(executable), actions, attributes, c_argv, c_env)
            if error:
                raise OSError(error, os.strerror(error), executable)
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attributes)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


def _check(error: int, call: str) -> None:
    if error:
        raise OSError(error, f"{call}: {os.strerror(error)}")


def _seal_inherited_descriptors() -> None:
    """Once per process: every descriptor above 2 close-on-exec."""
    global _sealed_in_pid
    if _sealed_in_pid == os.getpid():
        return
    _sealed_in_pid = os.getpid()
    for name in os.listdir("/dev/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


def _wait(pid: int) -> int:
    """Reap `pid`; its wait status.  If it is already reaped (only a sweep of
    processes.py, after an abort, can have done it) it counts as killed."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        log.debug("pid %d was reaped by someone else; counting it as killed", pid)
        return signal.SIGKILL  # the wait status of a SIGKILL


def _above_stdio(fd: int) -> int:
    """`fd`, or a close-on-exec copy of it numbered 3 or more: a dup2 onto
    itself would leave a descriptor 0-2 close-on-exec (a daemon started with
    its stdio closed hands out such numbers)."""
    return fd if fd > 2 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
