"""DynamoDB Local for tests, reachable on 127.0.0.1 only.

The jar ships in the npm package `amplify-dynamodb-simulator` (`.ci/run`
installs it; `SHARDLINE_DYNAMODB_LOCAL` names its `emulator` directory)
and runs on a Java runtime from Debian.  It has no option to choose its
listen address and binds every interface, so it runs in a network namespace
of its own (`unshare --net`, holding only a loopback device) and a relay
thread listening on 127.0.0.1 carries each connection into that namespace:
a socket belongs to the namespace of the thread that creates it, and the
relay's connecting threads `setns()` into DynamoDB Local's.  Nothing is
reachable from outside this machine, nor from any other interface of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["DynamoDBLocal", "find_emulator"]

_CLONE_NEWNET = 0x40000000
_INNER_PORT = 8000
_READY_TIMEOUT_S = 60.0


def find_emulator() -> Path | None:
    """The directory holding DynamoDBLocal.jar, or None."""
    candidates = [os.environ.get("SHARDLINE_DYNAMODB_LOCAL", "")]
    candidates += glob.glob(os.path.expanduser("~/.cache/shardline/dynamodb-local/node_modules/*/emulator"))
    for candidate in candidates:
        if candidate and (Path(candidate) / "DynamoDBLocal.jar").is_file():
            return Path(candidate)
    return None


def _setns(pid: int) -> None:
    """Move the calling thread into process `pid`'s network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into DynamoDB Local's network namespace failed")
    finally:
        os.close(fd)


class DynamoDBLocal:
    """One in-memory DynamoDB Local server; `start()` returns its http://127.0.0.1:PORT endpoint."""

    def __init__(self, emulator: Path) -> None:
        self._emulator = emulator
        self._process: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self.url = ""

    def start(self) -> str:
        java = (
            f"exec java -Djava.library.path={self._emulator / 'DynamoDBLocal_lib'} "
            f"-jar {self._emulator / 'DynamoDBLocal.jar'} -inMemory -port {_INNER_PORT} -disableTelemetry"
        )
        # unshare execs sh, and sh execs java: one pid, whose namespace the relay joins.
        self._process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", f"ip link set lo up && {java}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._emulator,
        )
        self._wait_ready()
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, name="dynamodb-local-relay", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        return self.url

    def _connect_inside(self) -> socket.socket:
        """A connection to DynamoDB Local, made from a thread inside its namespace."""
        assert self._process is not None
        result: list[socket.socket | BaseException] = []

        def connect() -> None:
            try:
                _setns(self._process.pid)  # type: ignore[union-attr]
                result.append(socket.create_connection(("127.0.0.1", _INNER_PORT), timeout=5))
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=connect, name="dynamodb-local-connect")
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"DynamoDB Local exited with status {self._process.returncode}")
            try:
                self._connect_inside().close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("DynamoDB Local did not start listening") from None
                time.sleep(0.2)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                outside, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(outside,), daemon=True).start()

    def _relay(self, outside: socket.socket) -> None:
        try:
            inside = self._connect_inside()
        except OSError:
            outside.close()
            return
        inside.settimeout(None)
        selector = selectors.DefaultSelector()
        selector.register(outside, selectors.EVENT_READ, inside)
        selector.register(inside, selectors.EVENT_READ, outside)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=1.0):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            selector.close()
            inside.close()
            outside.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()  # by PID: the one we started
            self._process.wait(timeout=30)
