# Backends start shard attempts somewhere and tell the coordinator when the
# attempt's runtime is gone.  Results never come from here: they arrive over
# the exchange (DONE / FAILED), the same way from every backend, so a backend
# only needs to start, watch and stop.
#
# The local backend keeps a pool of long-lived ``python -m shardline.worker
# --pool`` processes (see worker/_main.py for the other end of the pipes):
# one task JSON line in on stdin, one answer line out on stdout, stderr kept
# as a tail for error messages.  A process is reused only after it answered;
# one whose attempt was cancelled, or that died, is stopped and forgotten.
# Stopping is SIGTERM (the worker cancels its task, which ends its command and
# every process the command started), a grace period, then SIGKILL for the
# worker's process group and for its children and their process groups: its
# commands, and the orphans of its commands that it adopted.

from __future__ import annotations

import abc
import asyncio
import contextlib
import glob
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, cast

from ..io.aio import completes_within
from ..io.stderrlines import tagged_lines_only
from ..protocol import ShardTask

__all__ = ["Backend", "LocalProcessBackend", "WorkerExit"]

log = logging.getLogger("shardline.coordinator.backends")

_STDERR_TAIL_BYTES = 8192
#: How long a stopped worker gets to cancel its task and exit before SIGKILL.
DEFAULT_STOP_GRACE_S = 2.0
#: How long a dead worker's last stderr bytes may take to arrive after its exit.
_STDERR_WAIT_S = 1.0
#: How long to wait for a SIGKILLed process to be reaped before giving up
#: with a warning (a process in uninterruptible sleep cannot die at once).
_KILL_WAIT_S = 10.0
#: Command stderr kept per attempt for `GET /jobs/{id}/logs` (its last bytes).
COMMAND_LOG_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExit:
    """How an attempt's runtime ended; `detail` is for error messages."""

    ok: bool
    detail: str


class Backend(abc.ABC):
    """Runs shard attempts."""

    name: str
    #: run() returns when the worker's runtime ends.  A backend that cannot
    #: see that (an asynchronous Lambda invoke) sets False, and the job
    #: cancels run() once it is done with the attempt, committed or not.
    observes_exit: bool = True

    @abc.abstractmethod
    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        """Start `task`; call on_started() once when the worker really starts (a process slot was
        taken / an invoke accepted) -- the coordinator's start deadline counts from there.  Return
        when the attempt's runtime has ended.  Cancellation stops the attempt (and its command)."""

    async def prestart(self, count: int) -> None:  # noqa: B027 - optional hook
        """Warm up for about `count` attempts about to be run (optional)."""

    def output_location(self, job_id: str, shard: int, attempt: int) -> str | None:
        """Where an attempt writes its output when its worker cannot write to
        the coordinator's spool (an ``s3://`` URL), or None: the spool."""
        return None

    def command_stderr(self, job_id: str, shard: int | None = None) -> str:
        """The stderr of `job_id`'s commands per attempt (`CommandLogs.text`), as far as
        this backend sees and keeps it; "" where it sees none (Lambda: CloudWatch has it)."""
        return ""

    async def discard_outputs(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """Delete whatever attempt outputs of `job_id` are left at `output_location`."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""


class LocalProcessBackend(Backend):
    """A pool of up to `max_processes` local worker processes, each running tasks one after another.

    No worker ever waits on another (a shard whose neighbour has not started
    yet finds its tail by itself), so attempts beyond `max_processes` simply
    wait for a process to be free.  `prestart()` starts processes ahead of
    time: they import their libraries while the coordinator is still statting
    the object and planning.
    """

    name = "local"

    def __init__(
        self,
        *,
        max_processes: int | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        forward_stderr: IO[bytes] | None = None,
    ) -> None:
        #: Where the processes' commands' stderr lines (tagged by shard) are passed
        #: on as well: the user's terminal in an embedded run.
        self._forward_stderr = forward_stderr
        self._command_logs = CommandLogs()
        self.max_processes = max_processes or max(2, 2 * (os.cpu_count() or 1))
        self._slots = asyncio.Semaphore(self.max_processes)
        self._python = python
        self._env = dict(os.environ if env is None else env)
        self._stop_grace_s = stop_grace_s
        self._idle: list[_WorkerProcess] = []
        self._processes: set[_WorkerProcess] = set()  # idle, busy and stopping
        self._stopping: set[asyncio.Future[None]] = set()
        self._closed = False

    async def _spawn(self) -> _WorkerProcess:
        if self._closed:
            raise RuntimeError("LocalProcessBackend is closed")
        worker = await _WorkerProcess.spawn(self._python, self._env, self._forward_stderr)
        self._processes.add(worker)
        return worker

    async def prestart(self, count: int) -> None:
        """Start idle processes until the pool holds min(count, max_processes)."""
        for _ in range(min(count, self.max_processes) - len(self._processes)):
            self._idle.append(await self._spawn())

    def _take_idle(self) -> _WorkerProcess | None:
        while self._idle:
            worker = self._idle.pop()  # the most recently used: the warmest
            if worker.alive:
                return worker
            self._stop_soon(worker)  # died while idle
        return None

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        async with self._slots:
            on_started()
            worker = self._take_idle() or await self._spawn()
            try:
                exit_, reusable = await worker.run(task)
            except BaseException:
                # Ended early (a shard's failure fails the job): keep what it said so far.
                self._command_logs.add(task.job_id, task.shard, task.attempt, worker.take_command_log())
                # Cancelled (deadline, job cancelled, speculation lost): the
                # process is in the middle of a task and is never reused.
                await asyncio.shield(self._stop_soon(worker))
                raise
            self._command_logs.add(task.job_id, task.shard, task.attempt, worker.take_command_log())
            if reusable and not self._closed:
                self._idle.append(worker)
            else:
                await asyncio.shield(self._stop_soon(worker))
            return exit_

    def _stop_soon(self, worker: _WorkerProcess) -> asyncio.Future[None]:
        """Stop `worker` in a task of its own, which `aclose()` waits for."""
        self._processes.discard(worker)
        stopping = worker.stop_soon(self._stop_grace_s)
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        return stopping

    def command_stderr(self, job_id: str, shard: int | None = None) -> str:
        return self._command_logs.text(job_id, shard)

    async def aclose(self) -> None:
        """Stop every process, busy ones included; `run()` cannot start new ones afterwards."""
        self._closed = True
        self._idle.clear()
        for worker in list(self._processes):
            self._stop_soon(worker)
        await asyncio.shield(asyncio.gather(*self._stopping))


class _WorkerProtocol(asyncio.SubprocessProtocol):
    """Watches one pool process: its exit, its answer lines, its stderr tail.

    The exit is seen directly (not through pipes closing), so a process
    that dies is noticed even if something it started still holds a pipe.
    """

    def __init__(self, forward_stderr: IO[bytes] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.stderr_closed: asyncio.Future[None] = loop.create_future()
        self.stderr_tail = bytearray()
        self._stdout = bytearray()
        self._forward_stderr = forward_stderr
        self._stderr_partial = bytearray()  # taken in whole lines: other processes share the sink
        #: The current task's command stderr lines, the last COMMAND_LOG_BYTES.
        self.command_log = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._stdout += data
            while (end := self._stdout.find(b"\n")) >= 0:
                self.answers.put_nowait(bytes(self._stdout[:end]))
                del self._stdout[: end + 1]
        elif fd == 2:
            self.stderr_tail += data
            del self.stderr_tail[:-_STDERR_TAIL_BYTES]
            self._take_command_lines(data)

    def _take_command_lines(self, data: bytes) -> None:
        """Keep (and pass on, if asked) the commands' lines; the worker's own log lines stay in the tail."""
        self._stderr_partial += data
        end = self._stderr_partial.rfind(b"\n") + 1
        lines = tagged_lines_only(bytes(self._stderr_partial[:end])) if end else b""
        del self._stderr_partial[:end]
        del self._stderr_partial[:-_STDERR_TAIL_BYTES]  # bounded, even without a newline
        if not lines:
            return
        self.command_log += lines
        del self.command_log[:-COMMAND_LOG_BYTES]
        if self._forward_stderr is not None:
            try:
                self._forward_stderr.write(lines)
                self._forward_stderr.flush()
            except (OSError, ValueError) as exc:
                log.warning("cannot pass on worker stderr any more: %s", exc)
                self._forward_stderr = None

    def take_command_log(self) -> bytes:
        """The command stderr lines kept since the last call (one task's)."""
        lines = bytes(self.command_log)
        self.command_log.clear()
        return lines

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 2 and not self.stderr_closed.done():
            self.stderr_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class CommandLogs:
    """Command stderr per job and shard attempt, in memory (gone with the
    process): the last `COMMAND_LOG_BYTES` of each attempt, `max_bytes` in all
    (the oldest attempts' go first)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._logs: dict[tuple[str, int, int], bytes] = {}
        self._bytes = 0
        self._max_bytes = max_bytes

    def add(self, job_id: str, shard: int, attempt: int, lines: bytes) -> None:
        if not lines:
            return
        self._bytes += len(lines) - len(self._logs.pop((job_id, shard, attempt), b""))
        self._logs[(job_id, shard, attempt)] = lines
        while self._bytes > self._max_bytes:
            self._bytes -= len(self._logs.pop(next(iter(self._logs))))

    def text(self, job_id: str, shard: int | None = None) -> str:
        """Each kept attempt's lines under a heading, in shard and attempt order."""
        kept = sorted((s, a, lines) for (j, s, a), lines in self._logs.items() if j == job_id)
        return "".join(
            f"--- shard {s} attempt {a} ---\n" + lines.decode("utf-8", errors="replace")
            for s, a, lines in kept
            if shard is None or s == shard
        )


class _WorkerProcess:
    """One ``python -m shardline.worker --pool`` child, in a process group of its own."""

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: _WorkerProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._stopping: asyncio.Future[None] | None = None
        self.pid = transport.get_pid()

    @classmethod
    async def spawn(cls, python: str, env: Mapping[str, str], forward_stderr: IO[bytes] | None) -> _WorkerProcess:
        transport, protocol = await asyncio.get_running_loop().subprocess_exec(
            lambda: _WorkerProtocol(forward_stderr),
            python,
            "-m",
            "shardline.worker",
            "--pool",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
        return cls(transport, protocol)

    @property
    def alive(self) -> bool:
        return not self._protocol.exited.done()

    def take_command_log(self) -> bytes:
        """Its current task's command stderr lines (tagged), the last COMMAND_LOG_BYTES."""
        return self._protocol.take_command_log()

    def _stdin(self) -> asyncio.WriteTransport:
        # uvloop's pipe transports do not derive from asyncio.WriteTransport.
        return cast(asyncio.WriteTransport, self._transport.get_pipe_transport(0))

    async def run(self, task: ShardTask) -> tuple[WorkerExit, bool]:
        """Hand over `task` and wait for the answer or the process's end; also says if reusable."""
        self._protocol.take_command_log()  # a previous task's late lines are not this one's
        self._stdin().write(task.to_json().encode() + b"\n")
        answer = asyncio.ensure_future(self._protocol.answers.get())
        either: set[asyncio.Future[Any]] = {answer, self._protocol.exited}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            answer.cancel()
            raise
        if answer.done():
            # Its last stderr lines were flushed before the answer: let their read land first.
            await asyncio.sleep(0)
            return self._parse_answer(answer.result())
        answer.cancel()
        # Its last words (a traceback) may still be on the way.
        await completes_within(self._protocol.stderr_closed, _STDERR_WAIT_S)
        return WorkerExit(ok=False, detail=self._exit_detail()), False

    def _parse_answer(self, line: bytes) -> tuple[WorkerExit, bool]:
        # Messages already reported belong to this task; the next one starts afresh.
        self._protocol.stderr_tail.clear()
        try:
            answer = json.loads(line)
            ok, detail = answer["ok"], answer["detail"]
        except (ValueError, TypeError, KeyError):
            ok = detail = None
        if not isinstance(ok, bool) or not isinstance(detail, str):
            return WorkerExit(ok=False, detail=f"worker process {self.pid} answered {line[:200]!r}"), False
        return WorkerExit(ok=ok, detail=detail), self.alive

    def _exit_detail(self) -> str:
        returncode = self._transport.get_returncode()
        assert returncode is not None
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
        lines = self._protocol.stderr_tail.decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return f"worker process {how}" + (f": {last}" if last else "")

    def stop_soon(self, grace_s: float) -> asyncio.Future[None]:
        """Start stopping (once; later calls get the same future)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        return self._stopping

    async def _stop(self, grace_s: float) -> None:
        """SIGTERM and stdin EOF, `grace_s` to exit, then SIGKILL to its and its commands' groups."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._transport.send_signal(signal.SIGTERM)
        self._stdin().close()
        if not await completes_within(self._protocol.exited, grace_s):
            log.info("worker process %d still running %.1fs after SIGTERM; killing it", self.pid, grace_s)
            # Unreaped, so neither its pid nor its children's can have been reused.
            # Below it: its commands and whatever they started, daemonised or
            # not (it adopts their orphans): each group, and each process.
            descendants = _descendant_pids(self.pid)
            for group in (*_child_pids(self.pid), self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            for pid in descendants:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not await completes_within(self._protocol.exited, _KILL_WAIT_S):
                log.warning("worker process %d not reaped %.0fs after SIGKILL", self.pid, _KILL_WAIT_S)
        self._transport.close()


def _child_pids(pid: int) -> list[int]:
    """Children of `pid` (Linux; elsewhere none).  A worker starts each command
    as a session leader, so a child's pid is also its process group id."""
    children: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as f:
            children.extend(int(child) for child in f.read().split())
    return children


def _descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (Linux; elsewhere none)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        children = _child_pids(pending.pop())
        found.extend(children)
        pending.extend(children)
    return found
