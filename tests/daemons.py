"""`shardline serve` as a subprocess, for the tests that drive a daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

SHARDLINE = [sys.executable, "-m", "shardline"]
#: Generous: a daemon that does not come up fails the test, a slow box does not.
STARTUP_DEADLINE_S = 90.0


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any AWS configuration, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHARDLINE_")) or k == "AWS_CA_BUNDLE"}
    env.update({"HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true", **extra})
    return env


class Daemon:
    """One `shardline serve --port 0` process; its stderr goes to a file."""

    def __init__(self, workdir: Path, env: dict[str, str], *args: str) -> None:
        self.log_path = workdir / f"serve-{uuid.uuid4().hex[:8]}.log"
        suffix = uuid.uuid4().hex[:8]
        argv = [*SHARDLINE, "serve", "--port", "0", "--jobs-table", f"jobs-{suffix}"]
        argv += ["--markers-table", f"markers-{suffix}", "--spool-dir", str(workdir / "spool"), *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith("shardline: serving http://"):
                    return line.split()[2]
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.process.kill()
        self.process.wait()
        raise AssertionError(f"shardline serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"shardline serve did not stop:\n{self.log()}") from None


def request(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def submit(daemon: Daemon, **spec: Any) -> str:
    status, body = request(f"{daemon.url}/jobs", "POST", spec)
    assert status == 201, body.decode()
    return str(json.loads(body)["id"])
