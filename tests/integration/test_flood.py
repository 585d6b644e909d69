"""A flood of strangers on the exchange port of a `shardline serve` process
(DESIGN §9): 1,000 trickling and 100 oversized connections while a real job
runs.  The job's output is exact, the daemon's memory grows by a few MB and
its HTTP API keeps answering; refusals are counted, and logged once per
cause.  Each defence alone: tests/coordinator/test_exchange_hardening.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import resource
import struct
import threading
from pathlib import Path

import pytest

from daemons import Daemon, clean_env, submit
from jobs import sequential_reference
from polling import PATIENCE_S, eventually_blocking
from servers import Endpoint

_HEADER = struct.Struct("!2sBBI")
FLOOD_TRICKLERS = 1000
FLOOD_OVERSIZED = 100
#: What the whole flood may cost the daemon: a few KiB for each of its 1,100
#: connections, never the 4 MB frame each of the oversized ones announces.
MAX_FLOOD_RSS_GROWTH_BYTES = 50 * 1024 * 1024
FLOOD_DATA = b"".join(b"%06d flood %s\n" % (i, b"f" * (i % 37)) for i in range(30_000))
SED = "sed 's/^/>/'"


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


class Flood:
    """1,000 trickling and 100 oversized pre-auth connections to `address`,
    each opened again a second or two after the exchange closes it, from a
    thread with its own event loop, until `stop()`."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="flood", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PATIENCE_S)
        assert not self._thread.is_alive(), "the flood did not stop"

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._connection(self._trickle)) for _ in range(FLOOD_TRICKLERS)]
        tasks += [asyncio.create_task(self._connection(self._oversized)) for _ in range(FLOOD_OVERSIZED)]
        await asyncio.to_thread(self._stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, behave) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(*self.address)
            except OSError:
                await asyncio.sleep(1.0)
                continue
            self.opened += 1
            try:
                await behave(reader, writer)
            except OSError:
                pass
            finally:
                writer.transport.abort()
            await asyncio.sleep(1.0 + random.random())

    @staticmethod
    async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The start of a plausible HELLO, one byte every 3 s, until closed.
        for byte in _HEADER.pack(b"SL", 1, 1, 200) + b"{" * 200:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    if not await reader.read(1):
                        return

    @staticmethod
    async def _oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A header for a 3.9 MB HELLO, then its bytes, as fast as they go.
        writer.write(_HEADER.pack(b"SL", 1, 1, 3_900_000))
        chunk = b"\0" * 65536
        for _ in range(3_900_000 // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        await reader.read()


def _raise_own_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the flood needs {needed} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_flood_of_strangers_costs_the_daemon_kilobytes_and_no_job(tmp_path, moto: Endpoint):
    _raise_own_open_files_limit(FLOOD_TRICKLERS + FLOOD_OVERSIZED + 512)
    home = tmp_path / "home"
    home.mkdir()
    source = tmp_path / "input"
    source.write_bytes(FLOOD_DATA)
    expected = sequential_reference(FLOOD_DATA, SED)
    daemon = Daemon(tmp_path, clean_env(home, **moto.env()), "--max-processes", "4")
    flood: Flood | None = None
    health: list[int] = []
    rss: list[int] = []
    watching = threading.Event()
    try:
        line = next(line for line in daemon.log().splitlines() if "workers connect to" in line)
        host, port = re.search(r"workers connect to (\S+):(\d+);", line).groups()  # type: ignore[union-attr]
        # A first job warms the daemon up (imports, pools): the flood's cost is what comes on top.
        warm_up = submit(daemon, source=str(source), shards=8, command=SED)
        assert daemon.request(f"/jobs/{warm_up}/output") == (200, expected)
        baseline_rss = _rss_bytes(daemon.process.pid)

        def watch() -> None:
            while not watching.wait(0.5):
                health.append(daemon.request("/healthz")[0])
                rss.append(_rss_bytes(daemon.process.pid))

        watcher = threading.Thread(target=watch, name="watch", daemon=True)
        watcher.start()
        flood = Flood((host, int(port)))
        flood.start()
        eventually_blocking(lambda: flood.opened >= FLOOD_TRICKLERS + FLOOD_OVERSIZED, "the flood got going")
        # Three waves of four worker processes, each a few seconds long: the
        # flood goes on, strangers evicted and coming back, while they all
        # connect, report and commit.
        job = submit(daemon, source=str(source), shards=12, command=f"sleep 3; {SED}")
        status, output = daemon.request(f"/jobs/{job}/output")
        _, metrics = daemon.request("/metrics")
        _, view = daemon.request(f"/jobs/{job}")
    finally:
        watching.set()
        if flood is not None:
            flood.stop()
        assert daemon.stop() == 0, daemon.log()
    assert status == 200 and output == expected, json.loads(view)
    assert json.loads(view)["state"] == "succeeded"
    assert health and set(health) == {200}, health
    growth = max(rss) - baseline_rss
    assert growth < MAX_FLOOD_RSS_GROWTH_BYTES, f"the flood grew the daemon by {growth / 2**20:.0f} MiB"
    counted = {
        match[1]: int(float(match[2]))
        for match in re.finditer(r'shardline_exchange_refused_total\{cause="(\w+)"\} (\S+)', metrics.decode())
    }
    assert counted["evicted"] > 0 and counted["preauth_oversized"] > 0, counted
    log = daemon.log()
    assert "open file limit:" in log
    for cause in counted:
        assert log.count(f"refused a connection (cause {cause})") <= 1, f"{cause} logged per connection"
