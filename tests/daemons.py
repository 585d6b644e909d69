"""`shardline serve` as a subprocess, for the tests that drive a daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from polling import eventually_blocking

SHARDLINE = [sys.executable, "-m", "shardline"]
#: Generous: a daemon that does not come up fails the test, a slow box does not.
STARTUP_DEADLINE_S = 90.0


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any AWS or shardline configuration, plus `extra`; the
    state directory (where a daemon keeps its generated token) is under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHARDLINE_")) or k == "AWS_CA_BUNDLE"}
    env.update(
        {"HOME": str(home), "SHARDLINE_STATE_DIR": str(home / "state"), "AWS_EC2_METADATA_DISABLED": "true", **extra}
    )
    return env


_READY = re.compile(r"^shardline: serving (https?://\S+) \(API description at \S+; (.+?)\); workers connect")


class Daemon:
    """One `shardline serve --port 0` process; its stderr goes to a file.

    `token` is the one the daemon requires (read from where its ready line
    says it is), or None if it serves without one.
    """

    def __init__(self, workdir: Path, env: dict[str, str], *args: str, state_dir: Path | None = None) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.log_path = workdir / f"serve-{suffix}.log"
        # One daemon per state directory (it holds a lock there): each gets its
        # own unless the test says which, e.g. to restart on the same one.
        self.state_dir = state_dir or workdir / f"state-{suffix}"
        argv = [*SHARDLINE, "serve", "--port", "0", "--jobs-table", f"jobs-{suffix}"]
        argv += ["--markers-table", f"markers-{suffix}", "--spool-dir", str(workdir / "spool")]
        argv += ["--state-dir", str(self.state_dir), *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        #: `env` for a client that finds this daemon's generated token where
        #: local clients look for it (its state directory).
        self.client_env = {**env, "SHARDLINE_STATE_DIR": str(self.state_dir)}
        self.url, auth = self._wait_ready()
        self.token: str | None = None
        if auth == "token in $SHARDLINE_TOKEN":
            self.token = env["SHARDLINE_TOKEN"]
        elif auth.startswith("token in "):
            self.token = Path(auth.removeprefix("token in ")).read_text().strip()

    def _wait_ready(self) -> tuple[str, str]:
        def ready() -> tuple[str, str] | None:
            for line in self.log().splitlines():
                if match := _READY.match(line):
                    return match.group(1), match.group(2)
            if self.process.poll() is not None:
                raise AssertionError(f"shardline serve exited with {self.process.returncode}:\n{self.log()}")
            return None

        try:
            started: tuple[str, str] = eventually_blocking(
                ready, lambda: f"shardline serve started:\n{self.log()}", timeout_s=STARTUP_DEADLINE_S, interval_s=0.1
            )
        except BaseException:  # pytest.fail raises a BaseException
            self.process.kill()
            self.process.wait()
            raise
        return started

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

    def request(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
        """`request` of this daemon's `path`, with its token."""
        return request(self.url + path, method, body, token=self.token)


def request(
    url: str, method: str = "GET", body: Any = None, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def submit(daemon: Daemon, **spec: Any) -> str:
    status, body = daemon.request("/jobs", "POST", spec)
    assert status == 201, body.decode()
    return str(json.loads(body)["id"])
