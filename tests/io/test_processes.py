"""`shardline.io.processes`: a process that hides its environment (as a
daemon holding credentials does) is unreadable to the other processes of
its user, as a real process probed from outside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polling import eventually_blocking

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only (/proc)")


def test_a_hidden_environment_is_unreadable_to_other_processes_of_its_user(tmp_path):
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every environ; needs setpriv to test as an ordinary user")
        as_user = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    else:
        as_user = []
    code = (
        "import sys, time\n"
        "from shardline.io.processes import hide_environment\n"
        "print(hide_environment(), flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PROBE_SECRET": "s3cret"}
    hider = subprocess.Popen([*as_user, sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    plain = subprocess.Popen([*as_user, sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:

        def readable(pid: int) -> bool:
            probe = subprocess.run([*as_user, "cat", f"/proc/{pid}/environ"], capture_output=True)
            return b"PROBE_SECRET=s3cret" in probe.stdout

        assert hider.stdout is not None
        assert hider.stdout.readline() == "True\n"
        eventually_blocking(lambda: readable(plain.pid), "the plain process's environ can be read")
        assert not readable(hider.pid)
    finally:
        for process in (hider, plain):
            process.kill()
            process.wait()
