"""Coordinator capacity: how many workers one coordinator serves, measured with synthetic workers.

What is measured
----------------
One coordinator process (the real `Coordinator` and `ExchangeServer`, the
in-memory job store, SQLite markers) runs one job of N shards whose attempts
are "run" by a synthetic backend: it reports each attempt started and leaves
the work to a synthetic worker.  `--processes` load-generator processes hold
N worker sessions between them and speak the real frame protocol (the
exchange's HELLO with each attempt's own derived secret, WELCOME, WANT,
HEAD, FRAGMENT/PENDING, DONE, ACK) -- no data: every shard's boundary is a
line start, its head fragment is empty, its output an empty file.

For each N in `--workers`:

1. every generator opens its sessions (at most `--handshakes` unauthenticated
   at a time per process, from several loopback addresses, so the
   exchange's pre-auth caps are respected rather than tripped), and each
   sends WANT for its right neighbour;
2. once all N are authenticated at once -- "sessions held" -- every worker
   sends its HEAD at a random moment within `--spread-s`, waits for its
   neighbour's FRAGMENT, sends DONE and waits for the ACK.

Reported: sessions held; shard completions per second (N over the time from
the start of phase 2 to the last ACK); the coordinator's CPU seconds per
shard over the whole job (user + system, /proc, job set-up included); relay
latency p50/p99 -- for each neighbour pair held by one generator, the time
from the neighbour's HEAD leaving to its FRAGMENT arriving (one process, one
clock); and the exchange's refusals (none expected).

Run:  .venv/bin/python bench/capacity.py --workers 1000,5000,10000 --processes 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LINE_BYTES = 16
_READ_BYTES = 64 * 1024


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raise_open_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the coordinator under test -------------------------------------------------------


async def _coordinator(workers: int, workdir: Path) -> None:
    """Serve one job of `workers` shards; print its address and secret, then, when it is done, its stats."""
    from shardline.coordinator import Backend, Coordinator, CoordinatorSettings, ExchangeServer, WorkerExit
    from shardline.io.aws import AwsSettings
    from shardline.io.store import MemoryJobStore, sqlite_location
    from shardline.protocol import JobSpec, ShardTask, ShardTimeouts

    class Synthetic(Backend):
        """Reports every attempt started; a synthetic worker in another process does the rest."""

        name = "synthetic"
        observes_exit = False  # the job stops run() once the attempt committed

        async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
            on_started()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    source = workdir / "input.txt"
    source.write_bytes((b"x" * (LINE_BYTES - 1) + b"\n") * workers)  # every shard boundary is a line start
    settings = CoordinatorSettings(
        markers=sqlite_location(str(workdir / "markers.db")),
        spool_dir=str(workdir / "spool"),
        max_live_attempts=workers,
    )
    long = ShardTimeouts(start_s=600.0, heartbeat_s=600.0, total_s=3600.0)
    async with (
        ExchangeServer(host="127.0.0.1") as exchange,
        Coordinator(
            aws=AwsSettings(),
            backends={"synthetic": Synthetic()},
            store=MemoryJobStore(),
            exchange=exchange,
            settings=settings,
        ) as coordinator,
    ):
        view = await coordinator.submit(JobSpec(source=str(source), shards=workers, timeouts=long))
        job = coordinator._job(view.id)
        host, port = exchange.address
        ready = {
            "host": host,
            "port": port,
            "job": view.id,
            "secret": job.exchange_secret.hex(),
            "size": job.size,
            "spool": job.record.spool_dir,
        }
        print(json.dumps(ready), flush=True)
        final = await coordinator.wait(view.id)
        stats = {
            "state": final.state.value,
            "error": final.error,
            "shards_done": final.shards_done,
            "refused": {cause: count for cause, count in exchange.refused.items() if count},
            "handshake_wait_count": exchange.handshake_wait_s.count,
        }
        print(json.dumps(stats), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the bench has read the CPU figure


# -- one load generator -----------------------------------------------------------------


class _Worker:
    """One synthetic worker's session: the real frame protocol, no data."""

    def __init__(self, ready: dict[str, Any], shard: int, shards: int) -> None:
        from shardline.protocol import ExchangeSession, ShardRange, attempt_output_name, attempt_secret

        self.shard = shard
        self.shards = shards
        self.range = ShardRange.of(ready["size"], shards, shard)
        secret = attempt_secret(bytes.fromhex(ready["secret"]), shard, 0)
        self.session = ExchangeSession.client(job_id=ready["job"], shard=shard, attempt=0, secret=secret)
        self.output_path = os.path.join(ready["spool"], attempt_output_name(shard, 0))
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.fragment = asyncio.Event()
        self.fragment_at = 0.0
        self.head_sent_at = 0.0
        self.ack: asyncio.Future[Any] | None = None

    def send(self, frame: Any) -> None:
        assert self.writer is not None
        self.writer.write(self.session.send(frame))

    async def connect(self, host: str, port: int, source_host: str) -> None:
        from shardline.protocol import Want, Welcome

        self.reader, self.writer = await asyncio.open_connection(host, port, local_addr=(source_host, 0))
        self.writer.write(self.session.send(self.session.hello))
        frame = await self._next_frame()
        if not isinstance(frame, Welcome):
            raise RuntimeError(f"shard {self.shard}: expected WELCOME, got {frame!r}")
        if self.shard + 1 < self.shards:
            self.send(Want(shard=self.shard + 1))

    async def _next_frame(self) -> Any:
        from shardline.protocol import CLOSED, NEED_DATA

        assert self.reader is not None
        while True:
            frame = self.session.next_frame()
            if frame is CLOSED:
                raise ConnectionError(f"shard {self.shard}: the exchange closed the session")
            if frame is not NEED_DATA:
                return frame
            self.session.receive_data(await self.reader.read(_READ_BYTES))

    async def listen(self) -> None:
        from shardline.protocol import Ack, Fragment

        while True:
            frame = await self._next_frame()
            if isinstance(frame, Fragment):
                self.fragment_at = time.monotonic()
                self.fragment.set()
            elif isinstance(frame, Ack):
                assert self.ack is not None
                self.ack.set_result(frame)
                return

    async def work(self, delay_s: float) -> bool:
        from shardline.protocol import Done, Head

        await asyncio.sleep(delay_s)
        start = self.range.start
        Path(self.output_path).touch()  # the attempt's (empty) output, where the coordinator checks it
        self.head_sent_at = time.monotonic()
        self.send(Head(shard=self.shard, start=start, head_end=start, line_start=True, has_data=True))
        if self.shard + 1 < self.shards:
            await self.fragment.wait()
        end = self.range.end
        self.ack = asyncio.get_running_loop().create_future()
        done = Done(
            emitted_start=start,
            emitted_end=end,
            line_start=True,
            bytes=end - start,
            checksum="crc32c:00000000",
            output_bytes=0,
            tail_sources=["pushed"] if self.shard + 1 < self.shards else [],
        )
        self.send(done)
        ack = await self.ack
        return bool(ack.committed)


async def _generate(ready: dict[str, Any], first: int, end: int, shards: int, args: argparse.Namespace) -> None:
    workers = [_Worker(ready, shard, shards) for shard in range(first, end)]
    handshakes = asyncio.Semaphore(args.handshakes)
    sources = [f"127.0.0.{2 + k}" for k in range(args.source_addresses)]

    async def connect(worker: _Worker) -> None:
        async with handshakes:
            await worker.connect(ready["host"], ready["port"], sources[worker.shard % len(sources)])

    await asyncio.gather(*(connect(worker) for worker in workers))
    print(json.dumps({"connected": len(workers)}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the go: every generator's sessions are up
    started = time.time()
    listeners = [asyncio.ensure_future(worker.listen()) for worker in workers]
    rng = random.Random(first)
    committed = await asyncio.gather(*(worker.work(rng.uniform(0, args.spread_s)) for worker in workers))
    finished = time.time()
    await asyncio.gather(*listeners)
    by_shard = {worker.shard: worker for worker in workers}
    relay_ms = [
        (worker.fragment_at - by_shard[worker.shard + 1].head_sent_at) * 1000
        for worker in workers
        if worker.shard + 1 in by_shard
    ]
    for worker in workers:
        assert worker.writer is not None
        worker.writer.close()
    result = {"started": started, "finished": finished, "committed": sum(committed), "relay_ms": relay_ms}
    print(json.dumps(result), flush=True)


# -- the bench ------------------------------------------------------------------------------


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"process {process.args} ended without an answer (exit {process.wait()})")
    answer: dict[str, Any] = json.loads(line)
    return answer


def _one(workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    coordinator = _spawn("_coordinator", str(workers), str(workdir))
    try:
        ready = _read_json(coordinator)
        blocks = [(workers * k // args.processes, workers * (k + 1) // args.processes) for k in range(args.processes)]
        generators = [
            _spawn("_generate", json.dumps(ready), str(a), str(b), str(workers), *_generator_options(args))
            for a, b in blocks
        ]
        held = sum(_read_json(generator)["connected"] for generator in generators)
        for generator in generators:  # go
            assert generator.stdin is not None
            generator.stdin.write("go\n")
            generator.stdin.flush()
        results = [_read_json(generator) for generator in generators]
        for generator in generators:
            generator.wait()
        stats = _read_json(coordinator)
        cpu_s = _cpu_s(coordinator.pid)
    finally:
        with contextlib.suppress(OSError):
            assert coordinator.stdin is not None
            coordinator.stdin.close()
        coordinator.wait(timeout=60)
    relay = sorted(ms for result in results for ms in result["relay_ms"])
    elapsed_s = max(r["finished"] for r in results) - min(r["started"] for r in results)
    return {
        "workers": workers,
        "sessions_held": held,
        "committed": sum(r["committed"] for r in results),
        "completions_per_s": round(workers / elapsed_s),
        "phase2_s": round(elapsed_s, 3),
        "coordinator_cpu_ms_per_shard": round(1000 * cpu_s / workers, 3),
        "relay_p50_ms": round(statistics.median(relay), 2) if relay else None,
        "relay_p99_ms": round(relay[int(0.99 * (len(relay) - 1))], 2) if relay else None,
        "job": stats["state"],
        "refused": stats["refused"],
    }


def _generator_options(args: argparse.Namespace) -> list[str]:
    return [
        "--spread-s",
        str(args.spread_s),
        "--handshakes",
        str(args.handshakes),
        "--source-addresses",
        str(args.source_addresses),
    ]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spread-s", type=float, default=1.0, help="HEADs are sent within this many seconds")
    parser.add_argument("--handshakes", type=int, default=64, help="handshakes in flight per generator")
    parser.add_argument("--source-addresses", type=int, default=8, help="loopback addresses each generator uses")


def main() -> None:
    _raise_open_files()
    with contextlib.suppress(ImportError):  # as `shardline serve` runs, unless --no-uvloop; generators too
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if len(sys.argv) > 1 and sys.argv[1] == "_coordinator":
        profile = os.environ.get("CAPACITY_PROFILE")  # a cProfile output file for the coordinator
        if profile:
            # bench/profile.py would shadow the stdlib's `profile`, which cProfile imports.
            here = Path(__file__).resolve().parent
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
            import cProfile

            cProfile.runctx("asyncio.run(_coordinator(int(sys.argv[2]), Path(sys.argv[3])))", globals(), {}, profile)
        else:
            asyncio.run(_coordinator(int(sys.argv[2]), Path(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        parser = argparse.ArgumentParser()
        _options(parser)
        ready, first, end, shards = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        asyncio.run(_generate(ready, first, end, shards, parser.parse_args(sys.argv[6:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1000,5000,10000", help="comma-separated numbers of concurrent workers")
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    _options(parser)
    args = parser.parse_args()
    rows = []
    for workers in (int(n) for n in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="shardline-capacity-") as tmp:
            row = _one(workers, args, Path(tmp))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'workers':>8} {'held':>6} {'done/s':>7} {'CPU ms/shard':>13} {'relay p50':>10} {'p99 ms':>7}  refused")
    for row in rows:
        print(
            f"{row['workers']:>8} {row['sessions_held']:>6} {row['completions_per_s']:>7} "
            f"{row['coordinator_cpu_ms_per_shard']:>13} {row['relay_p50_ms']!s:>10} {row['relay_p99_ms']!s:>7}  "
            f"{row['refused'] or '-'}"
        )


if __name__ == "__main__":
    main()
