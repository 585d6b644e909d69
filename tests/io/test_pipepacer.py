"""When a full pipe is refilled (io/pipepacer.py), against real pipes and
reader threads.  Asserted through what the pipe holds when the wait returns,
never through durations; timeouts are hang guards only."""

from __future__ import annotations

import array
import fcntl
import os
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from shardline.io.pipepacer import PipePacer

CAPACITY = 1024 * 1024
pytestmark = pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux pipe sizes")


def queued(fd: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


@pytest.fixture
def full_pipe() -> Iterator[tuple[int, int]]:
    """A 1 MiB pipe (read end, non-blocking write end), filled to the brim."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CAPACITY)
    os.set_blocking(write_end, False)
    block = bytes(64 * 1024)
    try:
        while True:
            os.write(write_end, block)
    except BlockingIOError:
        pass
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def reading_once_soon(read_end: int, chunk_bytes: int) -> threading.Thread:
    """A reader thread that takes `chunk_bytes` once, shortly, and stops."""

    def read() -> None:
        time.sleep(0.2)
        os.read(read_end, chunk_bytes)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def wait(pacer: PipePacer, write_end: int, stop: threading.Event) -> None:
    waiting = threading.Thread(target=pacer.wait_for_room, args=(write_end, stop), daemon=True)
    waiting.start()
    waiting.join(30)
    assert not waiting.is_alive(), "wait_for_room returned"


def test_a_reader_taking_4_kib_at_a_time_drains_the_pipe_to_a_quarter_first(full_pipe):
    read_end, write_end = full_pipe
    os.read(read_end, 4096)  # it has begun to read

    def sleep(_: float) -> None:  # while the pacer sleeps, the reader takes 4 KiB
        os.read(read_end, 4096)

    wait(PipePacer(CAPACITY, sleep=sleep), write_end, threading.Event())
    assert CAPACITY // 4 - 4096 < queued(write_end) <= CAPACITY // 4


def test_a_reader_that_pauses_is_refilled_at_once_and_waited_for_in_poll(full_pipe):
    read_end, write_end = full_pipe
    os.read(read_end, 4096)
    sleeps: list[float] = []
    wait(PipePacer(CAPACITY, sleep=sleeps.append), write_end, threading.Event())
    assert queued(write_end) == CAPACITY - 4096
    assert len(sleeps) < 100  # not sleeping in turns until it reads again


def test_a_reader_taking_much_at_once_is_refilled_at_once(full_pipe):
    read_end, write_end = full_pipe
    reader = reading_once_soon(read_end, 256 * 1024)
    wait(PipePacer(CAPACITY), write_end, threading.Event())
    reader.join(30)
    assert queued(write_end) == CAPACITY - 256 * 1024  # did not wait for a drain that never comes


def test_a_stop_ends_the_wait_of_a_reader_that_never_reads(full_pipe):
    _, write_end = full_pipe
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    wait(PipePacer(CAPACITY), write_end, stop)
    assert queued(write_end) == CAPACITY


def test_a_closed_read_end_ends_the_wait(full_pipe):
    read_end, write_end = full_pipe
    os.close(read_end)
    wait(PipePacer(CAPACITY), write_end, threading.Event())
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"x")
