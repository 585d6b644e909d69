# Backends start shard attempts somewhere and tell the coordinator when the
# attempt's runtime is gone.  Results never come from here: they arrive over
# the exchange (DONE / FAILED), the same way from every backend, so a backend
# only needs to start, watch and stop.
#
# The local backend keeps a pool of long-lived ``python -m shardline.worker
# --pool`` processes, about one per core, each running several tasks at once
# (see worker/_main.py for the other end of the pipes): ``run ID TASK`` and
# ``cancel ID`` lines in on stdin, one ``{"id", "ok", "detail"}`` answer line
# per task out on stdout, stderr kept as a tail for error messages.  A
# cancelled attempt is cancelled inside its process, which answers once the
# attempt's command and everything it started have ended; a process that
# does not answer in time, that died, or that garbled an answer is stopped
# and forgotten (and its other tasks fail with it, to be retried).
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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from ..io.aio import completes_within
from ..io.stderrlines import ByteSink, attempt_route, routed_lines
from ..protocol import DEFAULT_TASKS_PER_PROCESS, ShardTask

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

    async def prestart(self, count: int, *, aws_services: Collection[str] = ()) -> None:  # noqa: B027
        """Warm up for about `count` attempts about to be run (optional hook);
        `aws_services`: they will use those ("s3", "dynamodb") with the
        AWS settings of this process's environment."""

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
    """A pool of up to `max_processes` local worker processes (default: one per
    core), together running up to `max_concurrent` tasks at once (default:
    `DEFAULT_TASKS_PER_PROCESS` per process).

    No worker ever waits on another (a shard whose neighbour has not started
    yet finds its tail by itself), so attempts beyond `max_concurrent` simply
    wait for a slot.  `prestart()` starts processes ahead of time: they import
    their libraries while the coordinator is still statting the object and
    planning.  A task is given to the least busy process, and a new process
    is started only while every existing one is busy.
    """

    name = "local"

    def __init__(
        self,
        *,
        max_processes: int | None = None,
        max_concurrent: int | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        forward_stderr: ByteSink | None = None,
    ) -> None:
        #: Where the processes' commands' stderr lines (tagged by shard) are passed
        #: on as well: the user's terminal in an embedded run.
        self._forward_stderr = forward_stderr
        self._command_logs = CommandLogs()
        cores = os.cpu_count() or 1
        self.max_processes = max_processes or (min(cores, max_concurrent) if max_concurrent else cores)
        self.max_concurrent = max_concurrent or self.max_processes * DEFAULT_TASKS_PER_PROCESS
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self._spawning = asyncio.Lock()
        self._python = python
        self._env = dict(os.environ if env is None else env)
        self._stop_grace_s = stop_grace_s
        self._usable: list[_WorkerProcess] = []  # alive and not being stopped
        self._processes: set[_WorkerProcess] = set()  # usable and stopping
        self._stopping: set[asyncio.Future[None]] = set()
        self._closed = False
        #: Clients new processes make as they start (prestart's aws_services).
        self._warm_services: tuple[str, ...] = ()

    async def _spawn(self) -> _WorkerProcess:
        if self._closed:
            raise RuntimeError("LocalProcessBackend is closed")
        worker = await _WorkerProcess.spawn(self._python, self._env, self._forward_stderr, self._warm_services)
        self._processes.add(worker)
        self._usable.append(worker)
        return worker

    async def prestart(self, count: int, *, aws_services: Collection[str] = ()) -> None:
        """Start idle processes until the pool holds min(count, max_processes);
        with `aws_services` they import the AWS client stack and make those
        clients at once, in parallel with the coordinator's own work (the
        object's stat), instead of at their first task."""
        # In the order given: a process makes them one after another, and a
        # task's first GET waits for the S3 client, not for DynamoDB's.
        self._warm_services = tuple(dict.fromkeys([*self._warm_services, *aws_services]))
        async with self._spawning:
            for _ in range(min(count, self.max_processes) - len(self._processes)):
                await self._spawn()

    async def _choose(self) -> _WorkerProcess:
        """The least busy usable process, or a new one while every one is busy."""
        for worker in [worker for worker in self._usable if not worker.alive]:
            self._stop_soon(worker)  # died while idle or between tasks
        async with self._spawning:
            least = min(self._usable, key=lambda worker: worker.load, default=None)
            if least is None or (least.load > 0 and len(self._usable) < self.max_processes):
                return await self._spawn()
            return least

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        async with self._slots:
            on_started()
            worker = await self._choose()
            try:
                return await worker.run(task, self._stop_grace_s)
            finally:
                # Kept however the attempt ended: a failure's last lines matter most.
                route = attempt_route(task.job_id, task.shard, task.attempt)
                self._command_logs.add(task.job_id, task.shard, task.attempt, worker.take_command_log(route))
                if not worker.usable:
                    # Died, garbled its answers, or ignored a cancel: never reused.
                    await asyncio.shield(self._stop_soon(worker))

    def _stop_soon(self, worker: _WorkerProcess) -> asyncio.Future[None]:
        """Stop `worker` in a task of its own, which `aclose()` waits for."""
        self._processes.discard(worker)
        with contextlib.suppress(ValueError):
            self._usable.remove(worker)
        stopping = worker.stop_soon(self._stop_grace_s)
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        return stopping

    def command_stderr(self, job_id: str, shard: int | None = None) -> str:
        return self._command_logs.text(job_id, shard)

    async def aclose(self) -> None:
        """Stop every process, busy ones included; `run()` cannot start new ones afterwards."""
        self._closed = True
        for worker in list(self._processes):
            self._stop_soon(worker)
        await asyncio.shield(asyncio.gather(*self._stopping))


class _WorkerProtocol(asyncio.SubprocessProtocol):
    """Watches one pool process: its exit, its answer lines, its stderr tail.

    The exit is seen directly (not through pipes closing), so a process
    that dies is noticed even if something it started still holds a pipe.
    """

    def __init__(self, forward_stderr: ByteSink | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        #: Set to the offending line when an answer makes no sense: the
        #: process is broken, and every task it runs fails with that.
        self.garbled: asyncio.Future[bytes] = loop.create_future()
        self.pending: dict[str, asyncio.Future[WorkerExit]] = {}
        self.stderr_closed: asyncio.Future[None] = loop.create_future()
        self.stderr_tail = bytearray()
        self._stdout = bytearray()
        self._forward_stderr = forward_stderr
        self._stderr_partial = bytearray()  # taken in whole lines: other processes share the sink
        #: Each running attempt's command stderr lines (by route), the last COMMAND_LOG_BYTES.
        self.command_logs: dict[str, bytearray] = {}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._stdout += data
            while (end := self._stdout.find(b"\n")) >= 0:
                self._answer(bytes(self._stdout[:end]))
                del self._stdout[: end + 1]
        elif fd == 2:
            self.stderr_tail += data
            del self.stderr_tail[:-_STDERR_TAIL_BYTES]
            self._take_command_lines(data)

    def _take_command_lines(self, data: bytes) -> None:
        """Keep each attempt's command lines (and pass them on, if asked); the
        worker's own log lines stay in the tail."""
        self._stderr_partial += data
        end = self._stderr_partial.rfind(b"\n") + 1
        lines = routed_lines(bytes(self._stderr_partial[:end])) if end else []
        del self._stderr_partial[:end]
        del self._stderr_partial[:-_STDERR_TAIL_BYTES]  # bounded, even without a newline
        if not lines:
            return
        for route, line in lines:
            if route is not None:
                kept = self.command_logs.setdefault(route, bytearray())
                kept += line
                del kept[:-COMMAND_LOG_BYTES]
        if self._forward_stderr is not None:
            try:
                self._forward_stderr.write(b"".join(line for _, line in lines))
                self._forward_stderr.flush()
            except (OSError, ValueError) as exc:
                log.warning("cannot pass on worker stderr any more: %s", exc)
                self._forward_stderr = None

    def take_command_log(self, route: str) -> bytes:
        """The command stderr lines kept for the attempt behind `route`, forgotten here."""
        return bytes(self.command_logs.pop(route, b""))

    def _answer(self, line: bytes) -> None:
        try:
            answer = json.loads(line)
            key, ok, detail = answer["id"], answer["ok"], answer["detail"]
        except (ValueError, TypeError, KeyError):
            key = ok = detail = None
        waiter = self.pending.pop(key, None) if isinstance(key, str) else None
        if waiter is None or not isinstance(ok, bool) or not isinstance(detail, str):
            if not self.garbled.done():
                self.garbled.set_result(line)
            return
        if not waiter.done():
            waiter.set_result(WorkerExit(ok=ok, detail=detail))

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
        self._next_id = 0
        #: Why the process must not be given tasks any more, once it must not.
        self._unusable_because: str | None = None
        self.pid = transport.get_pid()

    @classmethod
    async def spawn(
        cls, python: str, env: Mapping[str, str], forward_stderr: ByteSink | None, warm_services: Sequence[str]
    ) -> _WorkerProcess:
        transport, protocol = await asyncio.get_running_loop().subprocess_exec(
            lambda: _WorkerProtocol(forward_stderr),
            python,
            "-m",
            "shardline.worker",
            "--pool",
            *([f"--warm-aws={','.join(warm_services)}"] if warm_services else []),
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

    @property
    def usable(self) -> bool:
        return (
            self._unusable_because is None
            and self.alive
            and not self._protocol.garbled.done()
            and self._stopping is None
        )

    @property
    def load(self) -> int:
        """Tasks running in the process now."""
        return len(self._protocol.pending)

    def take_command_log(self, route: str) -> bytes:
        """The command stderr lines (tagged) of the attempt behind `route`, the last COMMAND_LOG_BYTES."""
        return self._protocol.take_command_log(route)

    def _stdin(self) -> asyncio.WriteTransport:
        # uvloop's pipe transports do not derive from asyncio.WriteTransport.
        return cast(asyncio.WriteTransport, self._transport.get_pipe_transport(0))

    async def run(self, task: ShardTask, cancel_grace_s: float) -> WorkerExit:
        """Hand over `task` and wait for its answer or the process's end.

        Cancelled, it asks the process to cancel the task (which ends the
        task's command and everything that started) and waits up to
        `cancel_grace_s` for the answer; a process that does not answer in
        time is marked unusable, and the backend stops it."""
        self._next_id += 1
        key = str(self._next_id)
        answer: asyncio.Future[WorkerExit] = asyncio.get_running_loop().create_future()
        self._protocol.pending[key] = answer
        try:
            self._stdin().write(b"run " + key.encode() + b" " + task.to_json().encode() + b"\n")
            either: set[asyncio.Future[Any]] = {answer, self._protocol.exited, self._protocol.garbled}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await asyncio.shield(self._cancel(key, answer, cancel_grace_s))
            raise
        finally:
            self._protocol.pending.pop(key, None)
        if answer.done():
            # Its last stderr lines were written before the answer: let a read of them land first.
            await asyncio.sleep(0)
            return answer.result()
        if self._protocol.garbled.done():
            garbled = self._protocol.garbled.result()[:200]
            return WorkerExit(ok=False, detail=f"worker process {self.pid} answered {garbled!r}")
        if self._unusable_because is not None:
            return WorkerExit(ok=False, detail=f"worker process {self.pid} was stopped: {self._unusable_because}")
        # Its last words (a traceback) may still be on the way.
        await completes_within(self._protocol.stderr_closed, _STDERR_WAIT_S)
        return WorkerExit(ok=False, detail=self._exit_detail())

    async def _cancel(self, key: str, answer: asyncio.Future[WorkerExit], grace_s: float) -> None:
        if not self.usable:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._stdin().write(b"cancel " + key.encode() + b"\n")
        if not await completes_within(answer, grace_s):
            self._unusable_because = f"it did not cancel another attempt within {grace_s:.1f}s"
            log.info("worker process %d %s; stopping it", self.pid, self._unusable_because)

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
