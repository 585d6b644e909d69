"""How long a daemon takes to accept, show and cancel a job of many shards.

What is measured
----------------
One `shardline serve` (a real daemon process, SQLite store in a temporary
state directory unless `--store dynamodb`, which then needs
AWS_ENDPOINT_URL_DYNAMODB) and one local file of `--size-kib` KiB.  For each
trial, one job of `--shards` shards (identity command, ordered output kept by
the daemon) is

* submitted: POST /jobs, wall clock of the request (client side);
* shown: GET /jobs/ID (counts plus the first page of shards), and one
  GET /jobs/ID/shards page;
* cancelled: DELETE /jobs/ID, wall clock of the request.

With `--store dynamodb` and no AWS_ENDPOINT_URL_DYNAMODB, DynamoDB Local
(the tests' `tests/dynamodblocal.py`, Java) is started for the run.

Beside each wall clock, the daemon's CPU seconds (user + system, from
/proc/PID/stat) over the same request: the coordinator's own cost.  The
daemon starts local worker processes meanwhile (its default backend), so the
CPU figure includes the little it spends launching the first of them.

Run:  .venv/bin/python bench/submit.py --shards 20000 --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

_READY = re.compile(r"^shardline: serving (https?://\S+) \(API description at \S+; (.+?)\); workers connect")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Daemon:
    def __init__(self, workdir: Path, store: str, max_shards: int, env: dict[str, str]) -> None:
        self.log_path = workdir / "serve.log"
        profile = os.environ.get("SUBMIT_PROFILE")  # a cProfile output file for the daemon
        argv = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "shardline"]
        argv += ["serve", "--port", "0", "--store", store]
        argv += ["--state-dir", str(workdir / "state"), "--spool-dir", str(workdir / "spool")]
        argv += ["--max-shards", str(max_shards), "--max-processes", "2"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            for line in self.log_path.read_text().splitlines():
                if match := _READY.match(line):
                    self.url, auth = match.group(1), match.group(2)
                    self.token = Path(auth.removeprefix("token in ")).read_text().strip()
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit(f"shardline serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: Any = None) -> tuple[float, float, Any]:
        """(wall seconds, daemon CPU seconds, JSON answer) of one request."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        cpu = _cpu_s(self.process.pid)
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - started, _cpu_s(self.process.pid) - cpu, answer

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--size-kib", type=int, default=1024)
    parser.add_argument("--store", choices=("sqlite", "dynamodb"), default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardline-submit-") as tmp:
        workdir = Path(tmp)
        source = workdir / "input.txt"
        line = b"x" * 99 + b"\n"
        source.write_bytes(line * (args.size_kib * 1024 // len(line)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")}
        with contextlib.ExitStack() as stack:
            if args.store == "dynamodb" and "AWS_ENDPOINT_URL_DYNAMODB" not in env:
                env.update(_dynamodb_local(stack))
            daemon = _Daemon(workdir, args.store, args.shards, env)
            rows = _trials(daemon, source, args)
    print(f"{args.shards} shards, store {args.store}, {args.trials} trials (median; wall s / daemon CPU s)")
    for what, samples in rows.items():
        walls, cpus = zip(*samples, strict=True)
        print(f"  {what:<7} {statistics.median(walls):7.3f} s wall  {statistics.median(cpus):7.3f} s CPU")


def _dynamodb_local(stack: contextlib.ExitStack) -> dict[str, str]:
    """Start DynamoDB Local (as the tests do); the environment that points a daemon at it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dynamodblocal import DynamoDBLocal, find_emulator

    emulator = find_emulator()
    if emulator is None:
        raise SystemExit("--store dynamodb: set AWS_ENDPOINT_URL_DYNAMODB, or install DynamoDB Local (.ci/run)")
    local = DynamoDBLocal(emulator)
    endpoint = local.start()
    stack.callback(local.stop)
    return {
        "AWS_ENDPOINT_URL_DYNAMODB": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _trials(daemon: _Daemon, source: Path, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    rows: dict[str, list[tuple[float, float]]] = {"submit": [], "view": [], "page": [], "cancel": []}
    try:
        for _ in range(args.trials):
            spec = {"source": str(source), "shards": args.shards}
            wall, cpu, view = daemon.request("POST", "/jobs", spec)
            rows["submit"].append((wall, cpu))
            job = view["id"]
            wall, cpu, view = daemon.request("GET", f"/jobs/{job}")
            rows["view"].append((wall, cpu))
            assert view["shards_total"] == args.shards, view["shards_total"]
            wall, cpu, _ = daemon.request("GET", f"/jobs/{job}/shards?offset={args.shards // 2}&limit=100")
            rows["page"].append((wall, cpu))
            wall, cpu, view = daemon.request("DELETE", f"/jobs/{job}")
            rows["cancel"].append((wall, cpu))
            assert view["state"] in ("cancelled", "succeeded"), view["state"]
    finally:
        daemon.stop()
    return rows


if __name__ == "__main__":
    main()
