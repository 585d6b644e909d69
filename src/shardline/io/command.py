# Where a stream of bytes goes: a file, or a shell command's stdin.  The
# worker's per-shard output stage, and the coordinator's reduce step.
#
# The stage's interface and `PassthroughOutput` (bytes copied unchanged) are
# in `shardoutput`; here `CommandOutput` feeds them to `sh -c COMMAND`, whose stdout *is* the output
# file (the descriptor is handed to the child, so output never passes through
# Python).  Strategy:
#
# - Backpressure is exact: stdin is a pipe of our own whose write end is
#   non-blocking, written with `os.write` as far as the pipe takes it, and
#   `write()` returns only once the kernel pipe has taken every byte.
#   Nothing is copied or piles up in user space, and the caller may reuse
#   its buffer as soon as `write()` returns.
# - Once the pipe is full, the rest is fed from a thread of the command's
#   own, which refills the pipe only when it has drained to a quarter
#   (pipepacer.py): waiting on the loop for writability would refill it a
#   page at a time, a wake-up of both sides per page for a command that
#   reads 4 KiB at a time (awk: 0.75 CPU-s per GiB for the pair).
# - A local file's bytes need not pass through Python at all:
#   `write_file_range()` moves them from the file into the pipe with
#   `os.splice` (Linux), falling back to `os.pread` + `os.write` elsewhere.
# - A command that stops reading early (`head -1`) is not an error, exactly as
#   in `cat file | head -1`: further input is dropped and the exit status
#   alone decides.
# - stderr is drained by the protocol callback for the whole life of the
#   process, so a chatty command can never deadlock against a full stderr
#   pipe; only its last `stderr_tail_bytes` are kept, for the error message.
# - The command runs in its own session, hence its own process group, so an
#   abort kills the shell *and* everything it started.  On Linux even what it
#   daemonised ends with it (processes.py): whenever a command ends, every
#   process it left behind is killed.
# - Its environment is ours minus shardline's own variables (`SHARDLINE_*`:
#   the API token, settings) and minus `drop_env` (the daemon's AWS
#   credentials), plus what the caller adds (`command_environment`).
#
# The shell is started by `child.spawn` (posix_spawn: its cost does not grow
# with our memory, as a fork's does), which watches its exit and its stderr
# separately: a background process left holding stderr must not hang
# `finish()` although the shell has exited.  `finish()` gives such
# stragglers a short grace before killing them, so nothing writes into the
# output after it is measured.  Background processes that let go of stderr
# get no grace: they are killed as soon as the shell has exited.

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import stat
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from ..errors import CommandExitError, CommandFailedError
from .aio import completes_within
from .child import Child, spawn_soon
from .pipepacer import PipePacer
from .processes import COMMAND_ID_VARIABLE, CommandProcesses, adopt_orphans
from .shardoutput import ShardOutput, State, storage_error
from .simplecommand import direct_program, has_bash_functions, shell_status, with_shell_pwd
from .stderrlines import TaggedLines

__all__ = ["COMMAND_VARIABLES", "CommandOutput", "command_environment"]

log = logging.getLogger("shardline.io.command")

#: Largest single write or splice into the stdin pipe (its requested capacity).
_STDIN_CHUNK_BYTES = 1024 * 1024

#: Kernel-side copies from a file into the stdin pipe (Linux).
_SPLICE = hasattr(os, "splice")

#: Requested capacity of the stdin pipe (Linux only, best effort).  The 64 KiB
#: default costs the command a wake-up per 64 KiB; 1 MiB is the default limit
#: for unprivileged processes (/proc/sys/fs/pipe-max-size).
_STDIN_PIPE_CAPACITY_BYTES = 1024 * 1024

#: How long `finish()` waits, after the shell exits, for everything else that
#: holds its stderr (background processes it left behind) before killing them.
_BACKGROUND_GRACE_S = 2.0

#: How long an abort waits for the killed process to be reaped before giving up
#: with a warning (a process in uninterruptible sleep cannot die at once).
_KILL_WAIT_S = 10.0

#: What shardline itself tells a shard's command (and, without the shard
#: ones, the reduce command).  No other ``SHARDLINE_*`` variable is passed on
#: from our environment: those are shardline's own, SHARDLINE_TOKEN included.
COMMAND_VARIABLES = ("SHARDLINE_JOB_ID", "SHARDLINE_SHARD", "SHARDLINE_SHARDS", "SHARDLINE_ATTEMPT")
_OWN_PREFIX = "SHARDLINE_"

#: Shell conventions for a command that could not be executed.
_STATUS_NOT_FOUND = 127
_STATUS_NOT_EXECUTABLE = 126


def command_environment(
    inherited: Mapping[str, str], *, add: Mapping[str, str] = {}, drop: Collection[str] = ()
) -> dict[str, str]:
    """A command's environment: `inherited` without any ``SHARDLINE_*``
    variable and without the names in `drop`, plus `add`."""
    dropped = frozenset(drop)
    env = {k: v for k, v in inherited.items() if not k.startswith(_OWN_PREFIX) and k not in dropped}
    env.update(add)
    return env


_environ_cache: tuple[dict[bytes, bytes], dict[str, str]] | None = None


def _environment_now() -> dict[str, str]:
    """`os.environ` as a plain dict (do not modify it).  Reading os.environ
    decodes every name and value again, about 0.1 ms for each command
    started; the decoded copy is kept while the raw environment compares
    equal (one C-level dict comparison), so a change is still seen."""
    global _environ_cache
    raw = getattr(os.environ, "_data", None)  # CPython's bytes mapping behind os.environ
    if not isinstance(raw, dict):
        return dict(os.environ)
    if _environ_cache is None or _environ_cache[0] != raw:
        _environ_cache = dict(raw), dict(os.environ)
    return _environ_cache[1]


#: The last `_inherited_environment`: (the `_environment_now` dict it came
#: from, the names dropped, the result, whether it exports a bash function).
_inherited_cache: tuple[dict[str, str], frozenset[str], dict[str, str], bool] | None = None


def _inherited_environment(drop: frozenset[str]) -> tuple[dict[str, str], bool]:
    """`command_environment(_environment_now(), drop=drop)` (do not modify
    it), and whether it exports a bash function: worked out again only when
    the environment or `drop` changed, not for every command started (a
    pass over every variable, twice, for each of thousands of shards)."""
    global _inherited_cache
    now = _environment_now()
    cached = _inherited_cache
    if cached is None or cached[0] is not now or cached[1] != drop:
        inherited = command_environment(now, drop=drop)
        cached = _inherited_cache = now, drop, inherited, has_bash_functions(inherited)
    return cached[2], cached[3]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (PermissionError: macOS, for a group of zombies)


class CommandOutput(ShardOutput):
    """Pipes the input through ``sh -c command``; its stdout becomes `output_path`.

    The command inherits this process's environment except every
    ``SHARDLINE_*`` variable and the names in `drop_env`; `env` adds to that
    (`command_environment`).  `args` become the shell's positional parameters
    (``"$@"``).  When the command ends (finished, failed or aborted), every
    process it started ends too (processes.py; its process group only where
    there is no subreaper).  Only the last
    `stderr_tail_bytes` of stderr are kept, for `CommandFailedError`; pass
    `forward_stderr` to also copy all of it there as it arrives (written from
    the event loop, so give it something that does not block for long, such
    as ``sys.stderr.buffer``).  Exit statuses in `ok_exit` count as success;
    any other raises `CommandExitError` (a signal, `CommandFailedError`).
    `spawn_off_loop`: wait for the command's exec in a thread (`child.spawn_soon`).
    """

    def __init__(
        self,
        command: str,
        output_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        drop_env: Collection[str] = (),
        args: Sequence[str] = (),
        stderr_tail_bytes: int = 8192,
        forward_stderr: IO[bytes] | TaggedLines | None = None,
        ok_exit: Collection[int] = (0,),
        spawn_off_loop: bool = True,
    ) -> None:
        super().__init__()
        self._spawn_off_loop = spawn_off_loop
        self._ok_exit = frozenset(ok_exit)
        self._args = tuple(args)
        if stderr_tail_bytes < 0:
            raise ValueError(f"stderr_tail_bytes must be >= 0, not {stderr_tail_bytes}")
        self._command = command
        self._path = os.fspath(output_path)
        self._extra_env = dict(env or {})
        self._drop_env = frozenset(drop_env)
        self._stderr_tail_bytes = stderr_tail_bytes
        self._forward_stderr = forward_stderr
        #: Input bytes accepted but discarded, never offered to the command,
        #: because it had stopped taking input (also counted in `bytes_in`).
        self.bytes_dropped = 0
        self._output_fd: int | None = None
        self._pid: int | None = None
        self._child: Child | None = None
        #: The write end of the command's stdin pipe (non-blocking), until EOF.
        self._stdin_fd: int | None = None
        #: The command closed its stdin (a write met EPIPE).
        self._stdin_closed = False
        self._processes: CommandProcesses | None = None
        #: The thread that feeds a full pipe, started the first time it fills;
        #: its pacer; and the stop signal of the feed it is running, if any.
        self._feeder: ThreadPoolExecutor | None = None
        self._pacer: PipePacer | None = None
        self._feed_stop: threading.Event | None = None
        #: The command runs without a shell (`direct_program`).
        self._direct = False

    @property
    def pid(self) -> int | None:
        """The shell's pid, which is also its process group id; None before start."""
        return self._pid

    @property
    def stderr_tail(self) -> str:
        """The last `stderr_tail_bytes` of the command's stderr so far, decoded."""
        if self._child is None:
            return ""
        return self._child.stderr_tail.decode("utf-8", errors="replace")

    async def start(self) -> None:
        self._advance(State.NEW, State.RUNNING, "start")
        try:
            self._output_fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            self._state = State.CLOSED
            raise storage_error("open", self._path, exc) from exc
        adopt_orphans()
        # Both ends close-on-exec: no other command this process runs holds
        # this one's stdin open (which would keep it from ever seeing EOF).
        stdin_read, self._stdin_fd = os.pipe()
        os.set_blocking(self._stdin_fd, False)
        _enlarge_pipe(self._stdin_fd)
        processes = self._processes = CommandProcesses()
        inherited, bash_functions = _inherited_environment(self._drop_env)
        # = command_environment(os.environ, add={**extra, ID: marker}, drop=...)
        env = {**inherited, **self._extra_env, COMMAND_ID_VARIABLE: processes.marker}
        # A plain `prog args` runs without the shell in between (simplecommand.py).
        direct = direct_program(
            self._command, env, bash_functions=bash_functions or has_bash_functions(self._extra_env)
        )
        self._direct = direct is not None
        argv, executable = direct if direct is not None else (None, None)
        if direct is not None:
            env = with_shell_pwd(env)
        try:
            # Off the loop, the exec is waited for in a thread while other shards go on (child.py).
            self._child = await spawn_soon(
                argv or ("sh", "-c", self._command, "sh", *self._args),  # "sh" is $0
                env=env,
                stdin_fd=stdin_read,
                stdout_fd=self._output_fd,
                stderr_tail_bytes=self._stderr_tail_bytes,
                forward_stderr=self._forward_stderr,
                off_loop=self._spawn_off_loop,
                executable=executable,
            )
        except OSError as exc:
            processes.spawned(None)
            self._close_output_fd()
            self._close_stdin()
            self._state = State.CLOSED
            status = _STATUS_NOT_FOUND if exc.errno == errno.ENOENT else _STATUS_NOT_EXECUTABLE
            raise CommandFailedError(returncode=status, stderr_tail=f"cannot run sh: {exc.strerror or exc}") from exc
        except BaseException:  # cancelled: spawn_soon has ended whatever it started
            processes.spawned(None)
            self._close_output_fd()
            self._close_stdin()
            self._state = State.CLOSED
            raise
        finally:
            os.close(stdin_read)  # the child has its copy
        self._pid = self._child.pid
        processes.spawned(self._pid)
        log.debug("started %r as pid %d, output %s", self._command, self._pid, self._path)

    @property
    def _input_refused(self) -> bool:
        """True once nothing more can reach the command: it closed its stdin
        or exited.  Exit counts because a background process it left behind
        may still hold the pipe open, and waiting on that would block for its
        lifetime."""
        assert self._child is not None
        return self._stdin_closed or self._child.exited.done()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._require_running("write to")
        assert self._stdin_fd is not None
        view = memoryview(data).cast("B")
        await self._feed(len(view), lambda fd, offset, size: os.write(fd, view[offset : offset + size]))

    async def write_file_range(self, source_fd: int, offset: int, size: int) -> None:
        """Feed bytes [offset, offset + size) of the regular file `source_fd`:
        moved by the kernel (`os.splice`) where the platform has it.  The
        caller checks the file is still the version it means."""
        self._require_running("write to")

        def splice(fd: int, done: int, count: int) -> int:
            moved = os.splice(source_fd, fd, count, offset_src=offset + done, flags=os.SPLICE_F_NONBLOCK)
            if moved == 0:
                raise storage_error("read", f"descriptor {source_fd}", OSError(errno.EIO, "file ended early"))
            return moved

        def copy(fd: int, done: int, count: int) -> int:
            data = os.pread(source_fd, count, offset + done)
            if not data:
                raise storage_error("read", f"descriptor {source_fd}", OSError(errno.EIO, "file ended early"))
            # A short write leaves the rest for the next call: re-read, not lost.
            return os.write(fd, data)

        await self._feed(size, splice if _SPLICE else copy)

    async def _feed(self, size: int, move: Callable[[int, int, int], int]) -> None:
        """Call ``move(stdin_fd, done, count)`` until `size` bytes went into the
        pipe; drops the rest once input is refused.  What fits goes in from
        here; once the pipe is full the rest is fed by this command's feeder
        thread, which waits for the pipe to drain (`PipePacer`)."""
        done = 0
        while done < size:
            if self._input_refused or self._stdin_fd is None:
                self._drop(size - done, offered=self.bytes_in + done)
                break
            try:
                done += move(self._stdin_fd, done, min(_STDIN_CHUNK_BYTES, size - done))
            except BlockingIOError:
                done = await self._feed_in_thread(size, done, move)
                self._require_running("write to")  # not aborted by another task meanwhile
            except BrokenPipeError:
                self._stdin_closed = True
        self.bytes_in += size

    async def _feed_in_thread(self, size: int, done: int, move: Callable[[int, int, int], int]) -> int:
        """Go on feeding from the feeder thread until `size` bytes are in, the
        command refuses input, or this is cancelled; returns how far it got.

        The thread writes to a duplicate of the pipe's write end, so an abort
        may close ours meanwhile.  It is stopped when the command exits or is
        aborted, or this is cancelled, and waited for even then: `move` may
        use the caller's descriptors, which must outlive it."""
        assert self._stdin_fd is not None and self._child is not None
        if self._feeder is None:
            self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardline-stdin")
            self._pacer = PipePacer(_pipe_capacity(self._stdin_fd))
        stop = self._feed_stop = threading.Event()

        def stop_feeding(_: object) -> None:
            stop.set()

        exited = self._child.exited
        exited.add_done_callback(stop_feeding)
        fd = os.dup(self._stdin_fd)
        feeding = asyncio.get_running_loop().run_in_executor(
            self._feeder, self._feed_blocking, fd, size, done, move, stop
        )
        try:
            return await asyncio.shield(feeding)
        except asyncio.CancelledError:
            stop.set()
            while not feeding.done():
                try:
                    await asyncio.wait({feeding})
                except asyncio.CancelledError:
                    continue  # cancelled once already: re-raised below, once the thread is done
            raise
        finally:
            self._feed_stop = None
            exited.remove_done_callback(stop_feeding)

    def _feed_blocking(
        self, fd: int, size: int, done: int, move: Callable[[int, int, int], int], stop: threading.Event
    ) -> int:
        """The feeder thread's loop, writing to its own descriptor `fd` (closed here)."""
        assert self._pacer is not None
        try:
            while done < size and not stop.is_set():
                try:
                    done += move(fd, done, min(_STDIN_CHUNK_BYTES, size - done))
                except BlockingIOError:
                    self._pacer.wait_for_room(fd, stop)
                except BrokenPipeError:
                    self._stdin_closed = True
                    break
            return done
        finally:
            os.close(fd)

    def _close_stdin(self) -> None:
        if self._feed_stop is not None:
            self._feed_stop.set()
        if self._feeder is not None:
            self._feeder.shutdown(wait=False)  # its thread ends with the feed it may still run
        if self._stdin_fd is not None:
            fd, self._stdin_fd = self._stdin_fd, None
            os.close(fd)

    def _drop(self, size: int, *, offered: int) -> None:
        if not self.bytes_dropped:
            log.debug("pid %s took no more input after %d bytes; dropping the rest", self._pid, offered)
        self.bytes_dropped += size

    async def finish(self) -> int:
        self._advance(State.RUNNING, State.FINISHING, "finish")
        assert self._child is not None
        try:
            # Nothing is buffered (write() waits for the pipe): EOF at once.
            self._close_stdin()
            # Shielded: a cancelled `await` would cancel the future itself, and
            # the abort that follows would then take the shell for reaped and
            # sweep while it (and what it started) still runs.
            await asyncio.shield(self._child.exited)
            await self._wait_for_background_processes()
            await self._end_processes()
            self._advance(State.FINISHING, State.FINISHING, "finish")  # not aborted meanwhile
        except BaseException:
            await self.aclose()
            raise
        returncode = self._child.returncode
        assert returncode is not None
        if self._direct:
            returncode = shell_status(returncode)  # what `sh -c` would have said
        output_bytes = self._output_size()
        self._child.close()
        self._close_output_fd()
        self._state = State.FINISHED
        if returncode not in self._ok_exit:
            log.debug("pid %d exited with status %d", self._pid, returncode)
            # A shell reports a child killed by signal N (an OOM kill) as 128 + N.
            error = CommandExitError if 0 < returncode < 128 else CommandFailedError
            raise error(returncode=returncode, stderr_tail=self.stderr_tail)
        return output_bytes

    async def _wait_for_background_processes(self) -> None:
        """After the shell exited: wait for stderr EOF, killing stragglers if it is late."""
        assert self._child is not None and self._pid is not None
        if await completes_within(self._child.stderr_closed, _BACKGROUND_GRACE_S):
            return
        log.warning(
            "command %r exited but left a background process holding its stderr; killing process group %d",
            self._command,
            self._pid,
        )
        if not await self._end_processes():
            # No subreaper: something still holds stderr, so the group is
            # most likely not empty and its id not reused.  The best we can do.
            _kill_group(self._pid)
        if not await completes_within(self._child.stderr_closed, _KILL_WAIT_S):
            log.warning("stderr of process group %d still open; closing it anyway", self._pid)

    async def _end_processes(self) -> bool:
        """End whatever the command left running (see processes.py), once;
        False where that cannot be done (no subreaper)."""
        processes, self._processes = self._processes, None
        return processes is not None and await processes.end()

    def _output_size(self) -> int:
        assert self._output_fd is not None
        st = os.fstat(self._output_fd)
        # The child shares our open file, so this counts all it wrote.  A
        # non-regular output (/dev/null, a FIFO) has no size to report.
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def _close_output_fd(self) -> None:
        if self._output_fd is not None:
            fd, self._output_fd = self._output_fd, None
            os.close(fd)

    async def _abort(self) -> None:
        child = self._child
        if child is not None:
            if not (child.exited.done() and child.stderr_closed.done()):
                # Signal the group only while someone in it is known to live
                # (the unreaped shell, or whoever still holds stderr), so that
                # its id cannot have been reused by an unrelated group.
                _kill_group(child.pid)
                log.info("aborted command %r: killed process group %d", self._command, child.pid)
            if not await completes_within(child.exited, _KILL_WAIT_S):
                log.warning("process %d still not reaped %.0fs after SIGKILL", child.pid, _KILL_WAIT_S)
            child.close()
        self._close_stdin()  # discards input the command will never read
        await self._end_processes()
        self._close_output_fd()


def _pipe_capacity(fd: int) -> int:
    """The pipe's capacity in bytes (Linux), else the common 64 KiB."""
    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if get_size is not None:
        try:
            return int(fcntl.fcntl(fd, get_size))
        except OSError:
            pass
    return 64 * 1024


def _enlarge_pipe(fd: int) -> None:
    """Best effort, Linux only: a command woken per 1 MiB instead of per 64 KiB."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        fcntl.fcntl(fd, set_size, _STDIN_PIPE_CAPACITY_BYTES)
    except OSError as exc:
        log.debug("keeping the default stdin pipe size: %s", exc)
