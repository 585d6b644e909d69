"""`shardline.io.rlimits`: a daemon raises its own open-file limit to the
hard limit, so that a flood of connections meets the exchange's caps first."""

from __future__ import annotations

import resource
import subprocess
import sys

from polling import PATIENCE_S


def test_open_file_limit_is_raised_to_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 64 if hard == resource.RLIM_INFINITY else min(64, hard)
    script = (
        "import resource; from shardline.io.rlimits import raise_open_files_limit; "
        "limit = raise_open_files_limit(); print(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
        capture_output=True,
        text=True,
        check=True,
        timeout=PATIENCE_S,
    )
    expected = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert result.stdout.split() == [str(expected)] * 2
