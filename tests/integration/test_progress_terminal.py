"""The progress line on a real terminal: `shardline run` with its stdout and
stderr on a pseudo-terminal, the bytes it wrote played back through a
minimal terminal (carriage return, erase to end of line, newline).

What the user sees at the end must be exactly the job's output and its
messages, and no row may ever have held both the progress line and
anything else: output or a message written while the line was shown would
leave a row like ``[shardline] ... ETA 2s000123 q``.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from shardline.cli._progress import ProgressDisplay

from daemons import SHARDLINE, Daemon, clean_env, submit

DATA = b"".join(b"%06d %s\n" % (i, b"q" * (i % 61)) for i in range(4000))
PROGRESS = "[shardline] shards"
_ERASE_LINE = "\x1b[K"
#: A log record as the CLI formats it (-v).
_LOG_ROW = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ shardline[.\w]* [A-Z]+ ")


def in_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a new pseudo-terminal; its exit status and all it wrote."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    finally:
        os.close(terminal)
    written = bytearray()
    deadline = time.monotonic() + 120  # a hang guard only
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            written += data
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    return process.returncode, written.decode()


def play(written: str) -> tuple[list[str], list[str]]:
    """The rows a terminal shows after `written`, and every row that ever held
    the progress line together with something else."""
    rows: list[str] = []
    row, column = "", 0
    shared: list[str] = []

    def check(row: str) -> None:
        if PROGRESS in row and not row.startswith(PROGRESS):
            shared.append(row)
        if (row.startswith(PROGRESS) and PROGRESS in row[1:]) or re.search(r"ETA +(\d+s|\?)\S", row):
            shared.append(row)

    at = 0
    while at < len(written):
        if written.startswith(_ERASE_LINE, at):
            row = row[:column]
            at += len(_ERASE_LINE)
            continue
        char = written[at]
        at += 1
        if char == "\r":
            column = 0
        elif char == "\n":
            check(row)
            if PROGRESS in row:  # a newline after the line: whatever follows would share it
                shared.append(row)
            rows.append(row)
            row, column = "", 0
        else:
            row = row[:column] + char + row[column + 1 :]
            column += 1
            check(row)
    if row:
        rows.append(row)
    return rows, shared


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(home)  # the embedded SQLite store: no AWS needed


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "input"
    path.write_bytes(DATA)
    return str(path)


def plain_output(env: dict[str, str], *args: str) -> list[str]:
    """The rows of `shardline *args`'s output, captured without a terminal."""
    result = subprocess.run([*SHARDLINE, *args], env=env, capture_output=True, timeout=120, check=True)
    return result.stdout.decode().removesuffix("\n").split("\n")


# Shard K waits K/2 s, so its output arrives while the line is being redrawn.
STAGGERED = 'sleep "$(( SHARDLINE_SHARD / 2 )).$(( SHARDLINE_SHARD % 2 * 5 ))"; '


def test_progress_never_shares_a_row_with_output_or_messages(env, source):
    command = STAGGERED + "head -3"
    expected = plain_output(env, "run", source, "-n", "6", "--exact-shards", "--", command)
    status, written = in_pty([*SHARDLINE, "run", source, "-n", "6", "--exact-shards", "-v", "--", command], env)
    assert status == 0, written
    assert PROGRESS in written  # the line was shown ...
    rows, shared = play(written)
    assert shared == []  # ... never alongside anything else
    assert any(_LOG_ROW.match(row) for row in rows)  # messages went to the same terminal
    assert [row for row in rows if not _LOG_ROW.match(row)] == expected


def test_a_half_written_output_row_keeps_the_line_away_until_it_ends(env, source):
    # Every shard's output ends in the middle of a row, which the next shard's output completes.
    command = STAGGERED + 'head -2; printf "partial-%s:" "$SHARDLINE_SHARD"'
    expected = plain_output(env, "run", source, "-n", "5", "--exact-shards", "--", command)
    status, written = in_pty([*SHARDLINE, "run", source, "-n", "5", "--exact-shards", "--", command], env)
    assert status == 0, written
    assert PROGRESS in written
    rows, shared = play(written)
    assert shared == []
    assert rows == expected


def test_the_daemons_client_keeps_the_line_off_the_output_too(env, source, tmp_path):
    command = STAGGERED + "head -3"
    expected = plain_output(env, "run", source, "-n", "6", "--exact-shards", "--", command)
    daemon = Daemon(tmp_path, env, state_dir=Path(env["SHARDLINE_STATE_DIR"]))
    try:
        job_id = submit(daemon, source=source, shards=6, command=command)
        status, written = in_pty([*SHARDLINE, "output", job_id[:8], "--coordinator", daemon.url], env)
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert status == 0, written
    assert PROGRESS in written
    rows, shared = play(written)
    assert shared == []
    assert rows == expected


def test_no_progress_on_a_terminal_shows_none(env, source):
    status, written = in_pty(
        [*SHARDLINE, "run", source, "-n", "3", "--exact-shards", "--no-progress", "--", "head -1"], env
    )
    assert status == 0, written
    assert PROGRESS not in written and _ERASE_LINE not in written
    assert play(written)[0] == plain_output(env, "run", source, "-n", "3", "--exact-shards", "--", "head -1")


def test_the_eta_follows_the_current_rate_not_the_average():
    display = ProgressDisplay(open(os.devnull, "w"))  # noqa: SIM115 - only line() is used
    # 100 s at 1 KB/s, then 5 s at 100 KB/s; 1,000,000 bytes in all.
    for second in range(101):
        display.line(0, 4, 1000 * second, 1_000_000, now=float(second))
    for second in range(1, 6):
        text = display.line(1, 4, 100_000 + 100_000 * second, 1_000_000, now=100.0 + second)
    # 400,000 bytes left at the last seconds' ~100 KB/s: about 4 s, not the ~130 s the average says.
    eta = int(re.search(r"ETA +(\d+)s", text).group(1))
    assert 3 <= eta <= 6, text
