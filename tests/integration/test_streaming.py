"""The head of the order streams (issue 15 item 3): `shardline run` as a
user runs it, its stdout a pipe the test reads while the job runs.

The head shard's command writes a first line and then waits for a flag file
that the test creates only once it has read that line from the pipe: if
output were released only when the shard finished, the test would never see
the line and would stop at its hang guard.  Nothing here asserts on time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from polling import PATIENCE_S

SHARDLINE = [sys.executable, "-m", "shardline"]
DATA = b"".join(b"line %03d\n" % i for i in range(40))


def start(tmp_path: Path, command: str, *, shards: int = 2) -> subprocess.Popen[bytes]:
    source = tmp_path / "input"
    source.write_bytes(DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true", "FLAG": str(tmp_path / "flag")})
    return subprocess.Popen(
        [*SHARDLINE, "run", str(source), "-n", str(shards), "--exact-shards", "--command-retries", "2", "--", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


#: Shard 0 echoes its first line, waits for $FLAG, then passes the rest;
#: `head_end` is what it does after the rest (an exit status, a marker).
HEAD_WAITS = (
    'if [ "$SHARDLINE_SHARD" = 0 ]; then IFS= read -r first; printf "%s\\n" "$first"{first_suffix}; '
    'while [ ! -e "$FLAG" ]; do sleep 0.05; done; cat{rest}; else cat; fi'
)


def read_first_line_then_release(process: subprocess.Popen[bytes], flag: Path) -> bytes:
    assert process.stdout is not None
    first = process.stdout.readline()  # blocks until the head shard's line arrives
    flag.touch()
    return first


def test_a_slow_head_shards_lines_reach_stdout_while_it_runs(tmp_path):
    process = start(tmp_path, HEAD_WAITS.format(first_suffix="", rest=""))
    try:
        first = read_first_line_then_release(process, tmp_path / "flag")
        rest, stderr = process.communicate(timeout=PATIENCE_S)
    finally:
        process.kill()
        process.wait()
    assert first == b"line 000\n"
    assert process.returncode == 0, stderr
    assert first + rest == DATA


def test_head_attempt_failing_midway_is_retried_when_its_retry_repeats_what_was_shown(tmp_path):
    # Attempt 0 shows its first line, then fails; attempt 1 (same command,
    # no wait: the flag exists) writes the same bytes and commits.
    command = HEAD_WAITS.format(first_suffix="", rest='; [ "$SHARDLINE_ATTEMPT" != 0 ]')
    process = start(tmp_path, command)
    try:
        first = read_first_line_then_release(process, tmp_path / "flag")
        rest, stderr = process.communicate(timeout=PATIENCE_S)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert first + rest == DATA  # the shown line is not repeated


def test_head_attempt_failing_midway_with_a_different_retry_fails_the_run_as_incomplete(tmp_path):
    # Attempt 0 shows "line 000 (attempt 0)" and fails; attempt 1 writes
    # "line 000 (attempt 1)": what was shown cannot be taken back, so the run
    # fails, its stdout is exactly what attempt 0 wrote, and it says why.
    command = HEAD_WAITS.format(first_suffix=' | sed "s/$/ (attempt $SHARDLINE_ATTEMPT)/"', rest="")
    command = command.replace("cat; else", 'cat; [ "$SHARDLINE_ATTEMPT" != 0 ]; else')
    process = start(tmp_path, command)
    try:
        first = read_first_line_then_release(process, tmp_path / "flag")
        rest, stderr = process.communicate(timeout=PATIENCE_S)
    finally:
        process.kill()
        process.wait()
    head_shard = DATA[: len(DATA) // 2]  # 20 whole lines: shard 0 of 2
    # Everything attempt 0 wrote before it failed, and nothing after it.
    assert first + rest == b"line 000 (attempt 0)\n" + head_shard[len(b"line 000\n") :]
    assert process.returncode != 0
    assert b"the output is incomplete" in stderr, stderr
