"""Randomized chaos: seeded random faults on random inputs, exact output or a clean failure.

Each job draws, from its own seeded RNG: an input shape (empty, tiny, lines
longer than a shard, no trailing newline, random lines, a larger object,
NUL-delimited records), a shard count, part sizes, a command (identity,
sed, tr, awk, a slow paced reader), sometimes an output directory, and one
to three faults from DESIGN §5:

  S3 (through `FaultProxy`)    reset mid-body, 503 SlowDown, 500 InternalError,
                               a body stalled past the read timeout, first-byte
                               latency, one shard's ranges refused for good
  DynamoDB (same proxy)        throttled or slow marker writes and reads
  exchange (`ExchangeRelay`)   a session cut before or after a given frame,
                               either way; rogue clients on the exchange port
  workers                      SIGKILLed, frozen (SIGSTOP), never starting
  commands                     failing on one shard once, or on every attempt
  the object                   overwritten mid-job
  the coordinator              stopped mid-job and resumed by a new one

and asserts, for every job: either the job succeeded and its output is
byte-identical to the sequential reference (`cat object | command`), or it
failed with an error naming a shard and the cause, showing only a verified
prefix of the answer and no manifest.  Faults that a correct system must
survive (all but a command that always fails, a shard that can never be
read, and an overwritten object) must not fail the job: their counts stay
below every retry budget.

Run length and seed come from the environment; every run prints its seed:

  SHARDLINE_CHAOS_SEED=1234   reproduce a run (default: a fresh random seed)
  SHARDLINE_CHAOS_JOBS=500    more jobs (default 50, the CI run)
  SHARDLINE_CHAOS_ONLY=7,31   only these job numbers of the run
  SHARDLINE_CHAOS_LANES=2     jobs run this many at a time

A job's plan depends only on the seed and its number, so a failing job is
reproduced alone with SHARDLINE_CHAOS_SEED and SHARDLINE_CHAOS_ONLY.  See
docs/faults.md for the longer local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import random
import re
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shardline.coordinator import (
    Backend,
    Coordinator,
    CoordinatorSettings,
    ExchangeServer,
    LocalProcessBackend,
    OutputPolicy,
    WorkerExit,
)
from shardline.embedded import InProcessBackend
from shardline.errors import JobFailedError
from shardline.io.aws import AwsSettings, client
from shardline.io.retry import RetryPolicy
from shardline.io.store import DynamoJobStore, JobStore, MemoryJobStore, ensure_jobs_table, ensure_marker_table
from shardline.protocol import DEFAULT_MARKER_TABLE, ExchangeSession, JobSpec, ShardRange, ShardTask, ShardTimeouts
from shardline.worker import WorkerSettings

from faultproxy import (
    DOWN,
    UP,
    CutBody,
    CutSession,
    Delay,
    ExchangeRelay,
    Fault,
    FaultProxy,
    Rule,
    Stall,
    dynamodb_rule,
    dynamodb_throttle,
    in_shard,
    s3_internal_error,
    s3_slow_down,
)
from jobs import PACED_READER, only_in_attempt, sequential_reference
from servers import Endpoint

CI_JOBS = 50
JOBS = int(os.environ.get("SHARDLINE_CHAOS_JOBS", CI_JOBS))
SEED = int(os.environ.get("SHARDLINE_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
ONLY = {int(n) for n in os.environ.get("SHARDLINE_CHAOS_ONLY", "").split(",") if n.strip()}
LANES = int(os.environ.get("SHARDLINE_CHAOS_LANES", 2))

#: Short, so that stalls and latency above it cost little time.
READ_TIMEOUT_S = 1.0
STALL_S = 2.5
#: A hang guard per job, far above what any plan needs.
JOB_PATIENCE_S = 180.0
#: In-process workers: the default retry budget (attempts) with short sleeps.
WORKER = WorkerSettings(
    retry=RetryPolicy(attempts=6, base_delay_s=0.005, max_delay_s=0.05),
    want_answer_timeout_s=1.0,
    reconnect_interval_s=1.0,
    report_timeout_s=10.0,
)
#: Planned failures of one kind of request per job stay below every retry
#: budget (6 attempts in-process, 8 in worker processes): survivable faults
#: must never fail a job.
S3_BUDGET = 5
DYNAMODB_BUDGET = 4
SETTINGS = CoordinatorSettings(
    retry_backoff_s=0.05,
    retry_backoff_max_s=0.2,
    supervise_interval_s=0.05,
    output_policy=OutputPolicy(anywhere=True),  # outputs go to the test's tmp_path
)


# --- plans ---------------------------------------------------------------------------

SHAPES = ("empty", "tiny", "long-lines", "no-trailing", "random", "big", "nul")
SHAPE_WEIGHTS = (1, 2, 2, 2, 4, 1, 1)
#: Faults a correct job survives, and those that may (or must) fail it.
SURVIVABLE = (
    "s3_reset",
    "s3_slowdown",
    "s3_internal",
    "s3_stall",
    "s3_latency",
    "ddb_throttle",
    "ddb_latency",
    "exchange_cut",
    "rogue",
    "worker_kill",
    "worker_freeze",
    "worker_never_starts",
    "command_fail_once",
    "coordinator_restart",
)
FATAL = ("command_fail_always", "s3_persistent", "overwrite")
KIND_WEIGHTS = {
    "s3_reset": 4,
    "s3_slowdown": 3,
    "s3_internal": 2,
    "s3_stall": 1,
    "s3_latency": 1,
    "ddb_throttle": 3,
    "ddb_latency": 1,
    "exchange_cut": 4,
    "rogue": 1,
    "worker_kill": 1,
    "worker_freeze": 1,
    "worker_never_starts": 1,
    "command_fail_once": 2,
    "coordinator_restart": 1,
    "command_fail_always": 1,
    "s3_persistent": 1,
    "overwrite": 1,
}
NEEDS_PROCESSES = {"worker_kill", "worker_freeze"}
NEEDS_IN_PROCESS = {"worker_never_starts", "s3_persistent"}
#: (direction, when, frames) of exchange cuts.
CUTS = (
    (DOWN, "before", ("WELCOME",)),
    (DOWN, "before", ("PENDING", "FRAGMENT")),
    (DOWN, "after", ("FRAGMENT",)),
    (DOWN, "before", ("ACK",)),
    (UP, "before", ("WANT",)),
    (UP, "before", ("HEAD",)),
    (UP, "after", ("HEAD",)),
    (UP, "before", ("PROGRESS",)),
    (UP, "before", ("DONE", "FAILED")),
)


def _lines(rng: random.Random, size: int, longest: int, alphabet: bytes = b"abcdefghij ,") -> bytes:
    out = bytearray()
    while len(out) < size:
        out += bytes(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) + b"\n"
    return bytes(out)


def make_input(rng: random.Random, shape: str) -> tuple[bytes, bytes]:
    """(data, delimiter) of one shape."""
    if shape == "empty":
        return b"", b"\n"
    if shape == "tiny":
        return bytes(rng.choice(b"ab\n") for _ in range(rng.randint(1, 12))), b"\n"
    if shape == "long-lines":  # some lines far longer than a shard
        lengths = [rng.choice([rng.randint(0, 30), rng.randint(3_000, 20_000)]) for _ in range(rng.randint(2, 8))]
        data = b"".join(bytes(rng.choice(b"xyz") for _ in range(n)) + b"\n" for n in lengths)
        return (data[:-1] if rng.random() < 0.5 else data), b"\n"
    if shape == "no-trailing":
        return _lines(rng, rng.randint(10, 20_000), 300) + b"last line without a newline", b"\n"
    if shape == "random":
        return _lines(rng, rng.randint(1_000, 120_000), rng.choice([5, 80, 700])), b"\n"
    if shape == "big":
        return _lines(rng, rng.randint(300_000, 900_000), 200), b"\n"
    records = [bytes(rng.choice(b"ab\nc") for _ in range(rng.randint(0, 60))) for _ in range(rng.randint(1, 400))]
    return b"\0".join(records) + (b"\0" if rng.random() < 0.5 else b""), b"\0"


@dataclass
class Plan:
    """One chaos job, drawn from its seed alone."""

    number: int
    seed: str
    shape: str
    data: bytes
    delimiter: bytes
    shards: int
    part_size: int
    in_flight: int
    base: str | None  # the command whose sequential run is the reference
    base_name: str
    command: str | None  # what the job runs: `base` plus fault snippets
    backend: str
    kinds: list[str]
    output_dir: bool
    #: S3 / DynamoDB rules, built once the object's size is known.
    rules: list[Rule] = field(default_factory=list)
    cuts: list[CutSession] = field(default_factory=list)
    hang: set[tuple[int, int]] = field(default_factory=set)
    overwrite_shard: int | None = None
    fail_always_shard: int | None = None
    persistent_shard: int | None = None
    attempt_faults: dict[int, str] = field(default_factory=dict)  # shard -> kind, on attempt 0
    timeouts: ShardTimeouts = field(default_factory=ShardTimeouts)

    def describe(self) -> str:
        command = self.base_name + ("+faults" if self.command != self.base else "")
        return (
            f"job {self.number} (seed {self.seed!r}): {self.shape} {len(self.data)} B, N={self.shards}, "
            f"part {self.part_size}x{self.in_flight}, {command}, {self.backend}, "
            f"{'output dir, ' if self.output_dir else ''}faults {self.kinds}"
        )

    def must_fail(self) -> bool:
        return self.fail_always_shard is not None or self.persistent_shard is not None

    def may_fail(self) -> bool:
        return self.must_fail() or self.overwrite_shard is not None


def make_plan(number: int, paced_reader: Path) -> Plan:
    seed = f"{SEED}:{number}"
    rng = random.Random(seed)
    shape = rng.choices(SHAPES, SHAPE_WEIGHTS)[0]
    data, delimiter = make_input(rng, shape)
    size = len(data)
    kinds: list[str] = []
    for kind in rng.choices(list(KIND_WEIGHTS), list(KIND_WEIGHTS.values()), k=rng.randint(1, 3)):
        if kind in kinds:
            continue
        if (kind in NEEDS_PROCESSES and NEEDS_IN_PROCESS & set(kinds)) or (
            kind in NEEDS_IN_PROCESS and NEEDS_PROCESSES & set(kinds)
        ):
            continue
        kinds.append(kind)
    if NEEDS_PROCESSES & set(kinds):
        backend = "local"
    elif NEEDS_IN_PROCESS & set(kinds):
        backend = "inprocess"
    else:
        backend = "local" if rng.random() < 0.25 else "inprocess"
    shards = rng.choice([1, 2, 3, 4, 5, 6] if backend == "local" else [1, 2, 3, 4, 5, 7, 8, 12, 16])
    part_size = max(rng.choice([512, 2048, 4096, 16384, 65536, 1 << 20]), size // 150, 1)
    in_flight = rng.randint(1, 4)

    newline_commands = ["identity", "cat", "sed", "tr", "awk", "slow"]
    choices = newline_commands if delimiter == b"\n" else ["identity", "cat", "tr"]
    base_name = rng.choice(choices)
    base = {
        "identity": None,
        "cat": "cat",
        "sed": "sed 's/^/>/'",
        "tr": "tr a-j A-J",
        "awk": "awk '{print length($0), $1}'",
        "slow": f"{sys.executable} {paced_reader} 0.3 2000000",
    }[base_name]
    plan = Plan(
        number=number,
        seed=seed,
        shape=shape,
        data=data,
        delimiter=delimiter,
        shards=shards,
        part_size=part_size,
        in_flight=in_flight,
        base=base,
        base_name=base_name,
        command=None,
        backend=backend,
        kinds=kinds,
        output_dir=rng.random() < 0.15,
    )
    snippets: list[str] = []
    s3_left, dynamodb_left = S3_BUDGET, DYNAMODB_BUDGET

    def s3_rule(fault: Fault, most: int) -> None:
        nonlocal s3_left
        times = min(rng.randint(1, most), s3_left)
        if times > 0:
            s3_left -= times
            plan.rules.append(Rule(fault=fault, method="GET", header="Range", times=times, skip=rng.randint(0, 3)))

    def dynamodb(operation: str, fault: Fault, most: int) -> None:
        nonlocal dynamodb_left
        times = min(rng.randint(1, most), dynamodb_left)
        if times > 0:
            dynamodb_left -= times
            plan.rules.append(dynamodb_rule(operation, fault, times=times, skip=rng.randint(0, 2)))

    def free_shard(kind: str) -> int:
        """A shard with no attempt fault yet (or any, if all have one)."""
        free = [i for i in range(shards) if i not in plan.attempt_faults] or list(range(shards))
        shard = rng.choice(free)
        plan.attempt_faults[shard] = kind
        return shard

    hang_start_s, heartbeat_s = 60.0, 30.0
    for kind in kinds:
        if kind == "s3_reset":
            cut = CutBody(after_bytes=rng.choice([0, 1, 100, 1000, 5000]), reset=rng.random() < 0.5)
            s3_rule(cut, 3)
        elif kind == "s3_slowdown":
            s3_rule(s3_slow_down(), 3)
        elif kind == "s3_internal":
            s3_rule(s3_internal_error(), 2)
        elif kind == "s3_stall":
            s3_rule(Stall(after_bytes=rng.choice([0, 10, 2000]), stall_s=STALL_S, close=rng.random() < 0.5), 1)
        elif kind == "s3_latency":
            s3_rule(Delay(delay_s=rng.choice([0.2, 1.5])), 2)
        elif kind == "ddb_throttle":
            dynamodb("UpdateItem", dynamodb_throttle(), 3)
            dynamodb("GetItem", dynamodb_throttle(), 2)
        elif kind == "ddb_latency":
            dynamodb(rng.choice(["UpdateItem", "GetItem"]), Delay(delay_s=rng.choice([0.3, 1.5])), 2)
        elif kind == "exchange_cut":
            for _ in range(rng.randint(1, 2)):
                direction, when, frames = rng.choice(CUTS)
                shard = rng.randrange(shards)
                plan.cuts.append(CutSession(frames=frames, when=when, direction=direction, shard=shard, attempt=0))
        elif kind == "worker_kill":
            shard = free_shard(kind)
            snippets.append(
                only_in_attempt(shard, 0, f"head -c {rng.choice([0, 100, 5000])} >/dev/null; kill -9 $PPID; exit 1")
                + "; "
            )
        elif kind == "worker_freeze":
            shard = free_shard(kind)
            snippets.append(only_in_attempt(shard, 0, "kill -STOP $PPID; sleep 600") + "; ")
            heartbeat_s = 3.0
        elif kind == "worker_never_starts":
            plan.hang.add((free_shard(kind), 0))
            hang_start_s = 1.5
        elif kind == "command_fail_once":
            shard = free_shard(kind)
            snippets.append(only_in_attempt(shard, 0, "echo 'chaos: transient failure' >&2; exit 7") + "; ")
        elif kind == "command_fail_always":
            shard = plan.fail_always_shard = rng.randrange(shards)
            snippets.append(f"if [ \"$SHARDLINE_SHARD\" = {shard} ]; then echo 'chaos: poison shard' >&2; exit 9; fi; ")
        elif kind == "s3_persistent":
            ranges = [ShardRange.of(size, shards, i) for i in range(shards)]
            readable = [r.index for r in ranges if r.end > r.start]
            if readable:
                shard = plan.persistent_shard = rng.choice(readable)
                refused = Rule(fault=s3_slow_down(), method="GET", header="Range", when=in_shard(size, shards, shard))
                plan.rules.insert(0, refused)
        elif kind == "overwrite":
            plan.overwrite_shard = rng.randrange(shards)
    plan.timeouts = ShardTimeouts(start_s=hang_start_s, heartbeat_s=heartbeat_s, total_s=120.0)
    if snippets:
        plan.command = "".join(snippets) + (base or "cat")
    else:
        plan.command = base
    return plan


# --- lanes: what a run of jobs shares ------------------------------------------------------


@dataclass
class Runtime:
    """What the backend needs to know about a running plan."""

    plan: Plan
    bucket: str
    key: str
    s3: Any
    overwritten: bool = False


class ChaosBackend(Backend):
    """Routes every attempt's exchange session through the relay, and plays the
    plan's backend-side faults: attempts that never start, the overwrite."""

    def __init__(self, inner: Backend, relay: ExchangeRelay, running: dict[str, Runtime]) -> None:
        self.inner = inner
        self.name = inner.name
        self.relay = relay
        self.running = running

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        runtime = self.running.get(task.source)
        if runtime is not None:
            if (task.shard, task.attempt) in runtime.plan.hang:
                on_started()
                await asyncio.Event().wait()  # reported started, never runs
            if runtime.plan.overwrite_shard == task.shard and not runtime.overwritten:
                runtime.overwritten = True
                await asyncio.to_thread(
                    runtime.s3.put_object, Bucket=runtime.bucket, Key=runtime.key, Body=runtime.plan.data + b"changed\n"
                )
        host, port = self.relay.address
        return await self.inner.run(
            dataclasses.replace(task, exchange_host=host, exchange_port=port), on_started=on_started
        )


@dataclass
class Lane:
    proxy: FaultProxy
    relay: ExchangeRelay
    exchange: ExchangeServer
    aws: AwsSettings
    backends: dict[str, Backend]
    running: dict[str, Runtime]
    store: JobStore
    workdir: Path


@contextlib.asynccontextmanager
async def lane(moto: Endpoint, workdir: Path) -> AsyncIterator[Lane]:
    workdir.mkdir(parents=True)
    running: dict[str, Runtime] = {}
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(FaultProxy(moto.url, seed=SEED))
        exchange = await stack.enter_async_context(ExchangeServer())
        relay = await stack.enter_async_context(ExchangeRelay(exchange.address))
        dynamodb = await stack.enter_async_context(client(moto.aws_settings(), "dynamodb"))
        # A jobs table per lane: a coordinator resumes every unfinished job of
        # its table, and two coordinators must never run one job.
        jobs_table = f"chaos-jobs-{uuid.uuid4().hex[:8]}"
        await ensure_jobs_table(dynamodb, jobs_table)
        local = LocalProcessBackend(max_processes=3)
        stack.push_async_callback(local.aclose)
        aws = moto.aws_settings(
            s3_endpoint_url=proxy.url, dynamodb_endpoint_url=proxy.url, read_timeout_s=READ_TIMEOUT_S
        )
        yield Lane(
            proxy=proxy,
            relay=relay,
            exchange=exchange,
            aws=aws,
            backends={
                "inprocess": ChaosBackend(InProcessBackend(worker_settings=WORKER), relay, running),
                "local": ChaosBackend(local, relay, running),
            },
            running=running,
            store=DynamoJobStore(dynamodb, jobs_table, retry_policy=RetryPolicy()),
            workdir=workdir,
        )


@contextlib.asynccontextmanager
async def coordinator(lane: Lane, store: JobStore) -> AsyncIterator[Coordinator]:
    settings = dataclasses.replace(SETTINGS, spool_dir=str(lane.workdir / "spool"))
    async with Coordinator(
        aws=lane.aws, backends=lane.backends, store=store, exchange=lane.exchange, settings=settings
    ) as service:
        yield service


# --- one job -------------------------------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    succeeded: bool
    error: str | None
    fired: Counter[str]
    elapsed_s: float
    problems: list[str]


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def read_output(service: Coordinator, job_id: str) -> tuple[bytes, JobFailedError | None]:
    out = bytearray()
    try:
        async for piece in service.output(job_id):
            with open(piece.path, "rb") as f:
                f.seek(piece.start)
                out += f.read(piece.end - piece.start)
    except JobFailedError as exc:
        return bytes(out), exc
    return bytes(out), None


async def rogue_clients(address: tuple[str, int], job_id: str) -> list[str]:
    """Garbage, an oversized frame, a wrong secret, an unknown job, a cut-short HELLO."""
    problems = []
    wrong = ExchangeSession.client(job_id=job_id, shard=0, attempt=0, secret=os.urandom(32))
    unknown = ExchangeSession.client(job_id="no-such-job", shard=0, attempt=0, secret=os.urandom(32))
    hello = wrong.send(wrong.hello)
    for payload in (
        b"\x16\x03\x01 not a frame",
        b"SL\x01\x03" + (1 << 31).to_bytes(4, "big"),
        hello,
        unknown.send(unknown.hello),
        hello[:20],
    ):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(payload)
        writer.write_eof()
        with contextlib.suppress(OSError):
            async with asyncio.timeout(30):
                answer = await reader.read()
            if answer:
                problems.append(f"the exchange answered a rogue client with {answer!r}")
        writer.close()
    return problems


async def run_plan(lane: Lane, plan: Plan, s3: Any, bucket: str) -> Result:
    key = f"chaos-{SEED}-{plan.number}"
    source = f"s3://{bucket}/{key}"
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=plan.data)
    first_record, first_session = len(lane.proxy.records), len(lane.relay.records)
    lane.proxy.set_rules(plan.rules)
    lane.relay.set_rules(plan.cuts)
    lane.running[source] = Runtime(plan=plan, bucket=bucket, key=key, s3=s3)
    out_dir = lane.workdir / f"out-{plan.number}"
    spec = JobSpec(
        source=source,
        shards=plan.shards,
        delimiter=plan.delimiter,
        command=plan.command,
        output=str(out_dir) if plan.output_dir else None,
        backend=plan.backend,
        timeouts=plan.timeouts,
        max_attempts=3,
        command_retries=1,  # command_fail_once exits 7 in attempt 0 only
        part_size_bytes=plan.part_size,
        max_in_flight_bytes=plan.part_size * plan.in_flight,
    )
    restart = "coordinator_restart" in plan.kinds
    store = lane.store if restart else MemoryJobStore()
    started = time.monotonic()
    problems: list[str] = []
    job_id = ""
    try:
        async with asyncio.timeout(JOB_PATIENCE_S):
            async with coordinator(lane, store) as service:
                job_id = (await service.submit(spec)).id
                if "rogue" in plan.kinds:
                    problems += await rogue_clients(lane.exchange.address, job_id)
                if restart:
                    # Stop the coordinator once some shard has committed (or the job ended),
                    # or after 10 s all the same: not `eventually`, a restart with nothing
                    # committed is a plan too.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            while service.view(job_id).shards_done == 0 and not service.view(job_id).state.is_final:
                                await asyncio.sleep(0.02)
                else:
                    output, error = await read_output(service, job_id)
                    view = service.view(job_id)
                    service.forget(job_id)
            if restart:
                async with coordinator(lane, store) as service:
                    await service.resume()
                    output, error = await read_output(service, job_id)
                    view = service.view(job_id)
                    service.forget(job_id)
                await store.delete_job(job_id)
    except TimeoutError:
        problems.append(f"HUNG: no outcome within {JOB_PATIENCE_S:.0f}s")
        return Result(plan, False, None, Counter(), time.monotonic() - started, problems)
    except Exception as exc:  # anything but the job's own failure is a finding too
        problems.append(f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return Result(plan, False, None, Counter(), time.monotonic() - started, problems)
    finally:
        lane.proxy.set_rules([])
        lane.relay.set_rules([])
        del lane.running[source]
    elapsed = time.monotonic() - started

    fired: Counter[str] = Counter()
    for record in lane.proxy.records[first_record:]:
        if record.fault is not None:
            fired[f"{record.operation or 'S3'} {type(record.fault).__name__}"] += 1
    for session in lane.relay.records[first_session:]:
        if session.cut is not None:
            fired[f"exchange cut {session.cut}"] += 1

    reference = sequential_reference(plan.data, plan.base)
    manifest = out_dir / "_manifest.json"
    if error is None:
        if plan.output_dir:
            output = b"".join(path.read_bytes() for path in sorted(out_dir.glob("part-*")))
            if not manifest.exists():
                problems.append("succeeded without a manifest")
        if output != reference:
            problems.append(
                f"SILENT MISMATCH: {len(output)} bytes out, {len(reference)} expected, "
                f"first difference at {first_difference(output, reference)}"
            )
        if plan.must_fail():
            problems.append("succeeded although a fault in its plan cannot be survived")
        if not restart:
            for shard, kind in plan.attempt_faults.items():
                if view.shards[shard].attempt < 1:
                    problems.append(f"{kind} on shard {shard} attempt 0 never happened")
    else:
        message = str(error)
        if view.state.value != "failed":
            problems.append(f"error {message!r} but the job is {view.state.value}")
        if not re.search(r"shard \d+ failed: \S", message):
            problems.append(f"the error names no shard and cause: {message!r}")
        expected = []
        if plan.fail_always_shard is not None:
            expected.append(rf"shard {plan.fail_always_shard} failed: command exited with status 9: chaos: poison")
        if plan.persistent_shard is not None:
            expected.append(r"SlowDown.*gave up after")
        if plan.overwrite_shard is not None:
            expected.append(r"the object changed during the job \(ETag no longer matches\)")
        if not plan.may_fail():
            problems.append(f"failed although every fault in its plan is survivable: {message}")
        elif not any(re.search(pattern, message) for pattern in expected):
            problems.append(f"failed for a cause not in its plan: {message}")
        if plan.output_dir:
            if manifest.exists():
                problems.append("failed, but left a manifest presenting its output as complete")
        elif not reference.startswith(output):
            # (It may be all of the answer, when only shards that emit nothing
            # remained: the stream still ends with the error, not as complete.)
            problems.append("failed, and what it showed is not a prefix of the answer")
    return Result(plan, error is None, None if error is None else str(error), fired, elapsed, problems)


# --- the run -----------------------------------------------------------------------------------


# Each job has its own hang guard (JOB_PATIENCE_S): the test's own timeout
# only catches what that guard cannot (a loop blocked for good).
@pytest.mark.timeout(300 + JOB_PATIENCE_S * math.ceil((len(ONLY) or JOBS) / LANES))
async def test_chaos(moto: Endpoint, s3, bucket, tmp_path, capsys):
    numbers = sorted(ONLY) if ONLY else list(range(JOBS))
    with capsys.disabled():  # the seed is shown even when the run passes
        print(
            f"\nchaos: seed {SEED}, {len(numbers)} jobs, {LANES} lanes; reproduce with "
            f"SHARDLINE_CHAOS_SEED={SEED} SHARDLINE_CHAOS_JOBS={JOBS}"
        )
    paced_reader = tmp_path / "paced_reader.py"
    paced_reader.write_text(PACED_READER)
    plans = [make_plan(number, paced_reader) for number in numbers]
    async with client(moto.aws_settings(), "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
    results: list[Result] = []
    queue: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)

    async def work(index: int) -> None:
        async with lane(moto, tmp_path / f"lane-{index}") as mine:
            while not queue.empty():
                plan = queue.get_nowait()
                result = await run_plan(mine, plan, s3, bucket)
                results.append(result)
                outcome = "ok" if result.succeeded else f"failed: {result.error}"
                fired = ", ".join(f"{kind} x{count}" for kind, count in sorted(result.fired.items()))
                print(f"{plan.describe()} -> {outcome} [{fired}] {result.elapsed_s:.1f}s")
                for problem in result.problems:
                    print(f"  PROBLEM: {problem}")

    started = time.monotonic()
    await asyncio.gather(*(work(index) for index in range(LANES)))
    elapsed = time.monotonic() - started
    fired = sum((result.fired for result in results), Counter())
    succeeded = sum(result.succeeded for result in results)
    mismatches = sum(any(p.startswith("SILENT") for p in result.problems) for result in results)
    with capsys.disabled():
        print(
            f"chaos: seed {SEED}: {len(results)} jobs in {elapsed:.0f}s, {succeeded} exact, "
            f"{len(results) - succeeded} failed cleanly, {mismatches} silent mismatches; "
            f"{sum(fired.values())} faults fired by the proxy and relay"
        )
    print(f"faults fired: {dict(sorted(fired.items()))}")
    assert len(results) == len(plans)
    failures = [f"{r.plan.describe()}: {'; '.join(r.problems)}" for r in results if r.problems]
    assert not failures, (
        f"chaos seed {SEED} (rerun one job with SHARDLINE_CHAOS_SEED={SEED} SHARDLINE_CHAOS_ONLY=<job>):\n"
        + "\n".join(failures)
    )
    # The faults were real: the proxies and relays did inject them.
    if not ONLY:
        assert sum(fired.values()) >= len(results) // 2, fired
