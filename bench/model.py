"""A model of each strategy's wall time, from per-operation costs.

    .venv/bin/python bench/model.py                       # from bench/results/full.json
    .venv/bin/python bench/model.py --results bench/results/quick.json --markdown

It answers the seed's question -- 20 GB on 16 workers at 80 MB/s per
connection took 3-4 min with download-and-split and 5.5-6 min with a
prescan, and timed out with the chain: what should each strategy take, and
where do direct reads beat download-and-split? -- and the same for 100 GB
on 256 and 1,000 workers.

Per-operation costs (`Costs`):

- first-byte latency of a GET, bandwidth of one connection, part size and
  GETs in flight per worker: the bench's realistic-S3 settings from the
  results JSON (`config`), or S3's for the seed's case (30 ms, 80 MB/s,
  8 MiB parts, 4 in flight: what shardline's reader does);
- marker write and read (DynamoDB PutItem / consistent GetItem): the bench's
  injected DynamoDB latency plus moto's own answer time, or ~8 ms on AWS;
- relay round trip (a head fragment worker -> coordinator -> worker);
- cold start (a worker's start to its first GET): the bench's measured
  `worker_start_max_s`, or a Lambda cold start for the seed's case;
- serial CPU: in the bench every worker runs on one core with the
  coordinator, so each strategy's harness CPU (measured, fitted as
  `cpu_fixed_s + cpu_per_worker_s * N`) is a floor under its time; on
  Lambda each worker has its own CPU and only the coordinator's per-shard
  work is serial.

The model per strategy (S = object / N, read(x) = time for one worker to
read x bytes with `in_flight` ranged GETs of `part_bytes`):

    naive           cold + read(S)
    download-split  read(object) by one machine (capped by its NIC), the shards routed as it goes
    prescan         ceil((N-1)/in_flight) small GETs + read(S)   (cold start overlaps the prescan)
    chain           cold + read(S) + tail + (N-1) * (marker write + poll/2 + marker read)
    overread        cold + read(S) + one GET past the end
    shardline       cold + read(S) + relay round trip + marker write + N * coordinator CPU per shard

each with one HEAD first; the workers' read phase is bounded below by the
endpoint's aggregate bandwidth (the bench's one SeaweedFS and proxy; S3
scales with prefixes, so none in the seed's case) and, in the bench, by the
harness's CPU, while the prescan comes before it and the chain's hand-offs
after it.  The check against the bench compares every predicted total with
the measured median (the fitted CPU lines and the aggregate bandwidth come
from the same run, the network terms only from its configuration, the
DynamoDB and relay times are measured here on the bench's own moto server
and a loopback relay) and prints the error.  Where the one core is
saturated (N >= 64), the model's floors are low for the strategies whose
waits queue behind that CPU (shardline's handshake and marker fallbacks,
overread's extra GETs): up to -36 % at N=256.  That term does not exist in
the seed's case, where every worker has its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MiB = 1024 * 1024
GB = 1_000_000_000
MB = 1_000_000
STRATEGIES = ("naive", "download-split", "prescan", "chain", "overread", "shardline")
#: A boundary probe of the prescan and the overread: the first small GET.
_PROBE_BYTES = 4 * 1024
_OVERREAD_BYTES = 64 * 1024
#: Samples per measured operation (`measure_local`).
_SAMPLES = 40


@dataclass(frozen=True)
class Costs:
    """What one operation costs; every time in seconds, every rate in bytes/s."""

    first_byte_s: float
    conn_bytes_s: float
    part_bytes: int
    in_flight: int
    marker_write_s: float
    marker_read_s: float
    chain_poll_s: float
    relay_rtt_s: float
    cold_start_s: float
    #: One machine's network (the download-split downloader); None: no cap.
    machine_bytes_s: float | None
    #: Connections the download-split downloader keeps open (the bench: `in_flight`).
    downloader_connections: int
    #: The endpoint's aggregate bandwidth; None: it scales (S3).
    endpoint_bytes_s: float | None
    #: Serial CPU per strategy, (fixed, per worker): one core for everything (the bench), or None.
    shared_cpu: dict[str, tuple[float, float]] | None
    #: The coordinator's serial CPU per shard (release, coverage, records): shardline only.
    coordinator_cpu_per_shard_s: float


def read_s(costs: Costs, size: float) -> float:
    """One worker reading `size` bytes: rounds of `in_flight` GETs, each a first
    byte plus a part at one connection's bandwidth."""
    if size <= 0:
        return 0.0
    parts = math.ceil(size / costs.part_bytes)
    rounds = math.ceil(parts / costs.in_flight)
    streams = min(parts, costs.in_flight)
    return rounds * costs.first_byte_s + size / (streams * costs.conn_bytes_s)


def predict(strategy: str, costs: Costs, size: float, n: int) -> float:
    """`strategy`'s wall time for an object of `size` bytes on `n` workers:
    a serial phase before the workers' reads (the prescan), the reads (where
    the endpoint's bandwidth and a shared CPU are floors), a serial phase
    after them (the chain's hand-offs)."""
    shard = size / n
    stat = costs.first_byte_s  # every strategy starts with one HEAD
    probe = costs.first_byte_s + _PROBE_BYTES / costs.conn_bytes_s
    before = after = 0.0
    if strategy == "naive":
        reads = costs.cold_start_s + read_s(costs, shard)
    elif strategy == "download-split":
        reads = read_s(dataclasses.replace(costs, in_flight=costs.downloader_connections), size)
        if costs.machine_bytes_s is not None:
            reads = max(reads, size / costs.machine_bytes_s)
        reads = max(reads, costs.cold_start_s)  # workers start while the download runs
    elif strategy == "prescan":
        before = math.ceil((n - 1) / costs.in_flight) * probe
        reads = max(costs.cold_start_s - before, 0.0) + read_s(costs, shard)  # workers start meanwhile
    elif strategy == "chain":
        reads = costs.cold_start_s + read_s(costs, shard) + probe
        after = (n - 1) * (costs.marker_write_s + costs.chain_poll_s / 2 + costs.marker_read_s)
    elif strategy == "overread":
        reads = costs.cold_start_s + read_s(costs, shard) + probe
    elif strategy == "shardline":
        handshake = costs.relay_rtt_s + costs.marker_write_s
        serial = n * costs.coordinator_cpu_per_shard_s
        reads = costs.cold_start_s + read_s(costs, shard) + handshake + serial
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    if costs.endpoint_bytes_s is not None:
        reads = max(reads, size / costs.endpoint_bytes_s)
    if costs.shared_cpu is not None and strategy in costs.shared_cpu:
        fixed, per_worker = costs.shared_cpu[strategy]
        reads = max(reads, fixed + per_worker * n)
    return stat + before + reads + after


# -- the bench's costs, from its results JSON ------------------------------------


@dataclass(frozen=True)
class LocalCosts:
    """What the bench's own endpoints answer in on this machine, measured now."""

    moto_put_s: float  # a conditional PutItem (a marker write), before the bench's injected latency
    moto_get_s: float  # a consistent GetItem (the chain's poll that finds the offset)
    relay_rtt_s: float  # a frame worker -> coordinator -> worker over loopback TCP, one event loop


def measure_local() -> LocalCosts:
    """Time moto's PutItem / GetItem and a two-hop loopback relay (a few seconds)."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from servers import MotoServer

    moto = MotoServer()
    endpoint = moto.start()
    try:
        dynamodb = endpoint.boto3_client("dynamodb")
        key = {"job": {"S": "model"}, "shard": {"N": "0"}}
        dynamodb.create_table(
            TableName="model",
            KeySchema=[{"AttributeName": "job", "KeyType": "HASH"}, {"AttributeName": "shard", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "job", "AttributeType": "S"},
                {"AttributeName": "shard", "AttributeType": "N"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        puts, gets = [], []
        for i in range(_SAMPLES):
            item = {**key, "shard": {"N": str(i)}, "offset": {"N": str(i * 1000)}}
            started = time.perf_counter()
            dynamodb.put_item(TableName="model", Item=item, ConditionExpression="attribute_not_exists(job)")
            puts.append(time.perf_counter() - started)
            started = time.perf_counter()
            dynamodb.get_item(TableName="model", Key={**key, "shard": {"N": str(i)}}, ConsistentRead=True)
            gets.append(time.perf_counter() - started)
    finally:
        moto.stop()
    return LocalCosts(statistics.median(puts), statistics.median(gets), asyncio.run(_relay_rtt_s()))


async def _relay_rtt_s() -> float:
    """Median time for 1 KiB to go worker -> relay -> worker and back on loopback."""

    relayed_all = asyncio.Event()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        relayed_all.set()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fragment = b"x" * 1024
    samples = []
    for _ in range(_SAMPLES):
        started = time.perf_counter()
        writer.write(fragment)
        await writer.drain()
        await reader.readexactly(len(fragment))
        samples.append(time.perf_counter() - started)
    writer.close()
    await writer.wait_closed()
    await relayed_all.wait()
    server.close()
    await server.wait_closed()
    return statistics.median(samples)


def bench_costs(results: dict, local: LocalCosts) -> Costs:
    """The per-operation costs of the run `results` describes, with the
    endpoints' own answer times `local` measured on this machine."""
    config = results["config"]
    sweep = results["summary"]["sweep"]["short"]
    size = results["datasets"]["short"]["size"]
    starts = [
        t["worker_start_max_s"]
        for t in results["trials"]
        if t["phase"] == "sweep" and t["strategy"] == "naive" and t.get("worker_start_max_s") is not None
    ]
    # The endpoint's aggregate bandwidth: the object over naive's best time at
    # any N (naive does nothing but read, so its floor is the endpoint's).
    fastest_naive = min(by_strategy["naive"]["median_s"] for by_strategy in sweep.values() if "naive" in by_strategy)
    injected_s = config["dynamodb_latency_ms"] / 1000
    shared_cpu = {strategy: _cpu_line(sweep, strategy) for strategy in STRATEGIES}
    return Costs(
        first_byte_s=config["latency_ms"] / 1000,
        conn_bytes_s=config["conn_mib_s"] * MiB,
        part_bytes=config["part_kib"] * 1024,
        in_flight=config["inflight"],
        marker_write_s=injected_s + local.moto_put_s,
        marker_read_s=injected_s + local.moto_get_s,
        chain_poll_s=config["chain_poll_ms"] / 1000,
        relay_rtt_s=local.relay_rtt_s,
        cold_start_s=statistics.median(starts) if starts else 0.05,
        machine_bytes_s=None,  # the downloader shares the endpoint's cap below
        downloader_connections=config["inflight"],
        endpoint_bytes_s=size / fastest_naive,
        shared_cpu=shared_cpu,
        coordinator_cpu_per_shard_s=0.0,  # inside shared_cpu in the bench
    )


def _cpu_line(sweep: dict, strategy: str) -> tuple[float, float]:
    """Least squares `fixed + per_worker * N` through the strategy's harness CPU."""
    points = [(int(n), row[strategy]["harness_cpu_median_s"]) for n, row in sweep.items() if strategy in row]
    if len(points) < 2:
        return (0.0, 0.0)
    mean_n = statistics.fmean(n for n, _ in points)
    mean_cpu = statistics.fmean(cpu for _, cpu in points)
    slope = sum((n - mean_n) * (cpu - mean_cpu) for n, cpu in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return (mean_cpu - slope * mean_n, slope)


def check(results: dict, costs: Costs) -> list[dict]:
    """Every (strategy, N) the bench measured: predicted, measured, error."""
    size = results["datasets"]["short"]["size"]
    rows = []
    for n_text, by_strategy in sorted(results["summary"]["sweep"]["short"].items(), key=lambda item: int(item[0])):
        for strategy in STRATEGIES:
            if strategy not in by_strategy:
                continue
            measured = by_strategy[strategy]["median_s"]
            predicted = predict(strategy, costs, size, int(n_text))
            rows.append(
                {
                    "n": int(n_text),
                    "strategy": strategy,
                    "predicted_s": round(predicted, 2),
                    "measured_s": measured,
                    "error": round(predicted / measured - 1, 3),
                }
            )
    return rows


# -- the seed's case ---------------------------------------------------------------


def seed_costs(bench: Costs, *, cold_start_s: float, coordinator_cpu_per_shard_s: float) -> Costs:
    """S3 and Lambda: 80 MB/s per connection, 8 MiB parts, workers on their own CPUs."""
    return dataclasses.replace(
        bench,
        first_byte_s=0.030,
        conn_bytes_s=80 * MB,
        part_bytes=8 * MiB,
        marker_write_s=0.008,
        marker_read_s=0.008,
        relay_rtt_s=0.002,  # in one region, over TCP
        cold_start_s=cold_start_s,
        machine_bytes_s=10e9 / 8,  # a 10 Gbit/s downloader
        endpoint_bytes_s=None,
        shared_cpu=None,
        coordinator_cpu_per_shard_s=coordinator_cpu_per_shard_s,
    )


CASES = ((20 * GB, 16), (100 * GB, 256), (100 * GB, 1000))


#: The coordinator's CPU per shard that issue 14 aims at (10x less than measured).
TARGET_COORDINATOR_CPU_PER_SHARD_S = 0.0025


def seed_table(costs: Costs) -> list[dict]:
    """Each strategy's predicted seconds in each of `CASES`."""
    one_stream = dataclasses.replace(costs, downloader_connections=1)
    target = dataclasses.replace(costs, coordinator_cpu_per_shard_s=TARGET_COORDINATOR_CPU_PER_SHARD_S)
    rows = []
    for size, n in CASES:
        times = {
            "download-split": predict("download-split", costs, size, n),
            "download-split, 1 stream": predict("download-split", one_stream, size, n),
            "prescan": predict("prescan", costs, size, n),
            "chain": predict("chain", costs, size, n),
            "overread": predict("overread", costs, size, n),
            "shardline": predict("shardline", costs, size, n),
            "shardline at 2.5 ms/shard": predict("shardline", target, size, n),
            "naive (cuts lines)": predict("naive", costs, size, n),
        }
        rows.append({"size_gb": size / GB, "n": n, "seconds": {k: round(v, 1) for k, v in times.items()}})
    return rows


def direct_reads_win(costs: Costs, size: float, max_n: int = 100_000) -> tuple[int, int] | None:
    """The range of N over which shardline beats download-and-split on `size`
    bytes (it loses again once N times the coordinator's serial cost per
    shard outweighs the download), or None."""
    winning = [
        n
        for n in range(2, max_n + 1)
        if predict("shardline", costs, size, n) < predict("download-split", costs, size, n)
    ]
    return (winning[0], winning[-1]) if winning else None


def per_shard_coordinator_cpu(results: dict) -> float:
    """shardline's CPU per worker above naive's in the bench (upper bound of the
    coordinator's share: in-process it includes the workers' protocol work)."""
    sweep = results["summary"]["sweep"]["short"]
    return max(_cpu_line(sweep, "shardline")[1] - _cpu_line(sweep, "naive")[1], 0.0)


def markdown(
    check_rows: list[dict], table: list[dict], costs: Costs, crossings: dict[float, tuple[int, int] | None]
) -> str:
    lines = ["| object, workers | " + " | ".join(table[0]["seconds"]) + " |"]
    lines.append("|---" * (len(table[0]["seconds"]) + 1) + "|")
    for row in table:
        cells = " | ".join(f"{seconds:.1f} s" for seconds in row["seconds"].values())
        lines.append(f"| {row['size_gb']:g} GB, N={row['n']} | {cells} |")
    lines.append("")
    for size, span in crossings.items():
        where = f"for N from {span[0]} to {span[1]:,}" if span is not None else "at no N"
        lines.append(f"- {size / GB:g} GB: direct reads (shardline) beat download-and-split {where}.")
    errors = [abs(row["error"]) for row in check_rows]
    worst = max(check_rows, key=lambda row: abs(row["error"]))
    lines.append(
        f"- Checked against the bench's {len(check_rows)} measured medians: median error "
        f"{statistics.median(errors):.0%}, worst {worst['error']:+.0%} ({worst['strategy']}, N={worst['n']})."
    )
    lines += ["", "Checked against the bench's sweep: predicted / measured median seconds (error):", ""]
    ns = sorted({row["n"] for row in check_rows})
    lines.append("| strategy | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---" * (len(ns) + 1) + "|")
    for strategy in STRATEGIES:
        cells = []
        for n in ns:
            row = next((r for r in check_rows if r["strategy"] == strategy and r["n"] == n), None)
            cells.append(f"{row['predicted_s']:.2f} / {row['measured_s']:.2f} ({row['error']:+.0%})" if row else "-")
        lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"- Costs: first byte {costs.first_byte_s * 1000:.0f} ms, {costs.conn_bytes_s / MB:.0f} MB/s per connection, "
        f"{costs.part_bytes // MiB} MiB parts x {costs.in_flight} in flight, marker write "
        f"{costs.marker_write_s * 1000:.0f} ms, relay {costs.relay_rtt_s * 1000:.0f} ms, cold start "
        f"{costs.cold_start_s:.1f} s, coordinator {costs.coordinator_cpu_per_shard_s * 1000:.1f} ms CPU per shard."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "full.json", help="a bench/run.py JSON")
    parser.add_argument("--cold-start-s", type=float, default=1.0, help="a worker's cold start in the seed's case")
    parser.add_argument(
        "--coordinator-ms-per-shard",
        type=float,
        default=None,
        help="the coordinator's serial CPU per shard (default: shardline's CPU per worker above naive's in the bench)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the README table instead of JSON")
    args = parser.parse_args(argv)

    results = json.loads(args.results.read_text())
    local = measure_local()
    bench = bench_costs(results, local)
    rows = check(results, bench)
    per_shard = (
        args.coordinator_ms_per_shard / 1000
        if args.coordinator_ms_per_shard is not None
        else per_shard_coordinator_cpu(results)
    )
    seed = seed_costs(bench, cold_start_s=args.cold_start_s, coordinator_cpu_per_shard_s=per_shard)
    table = seed_table(seed)
    crossings = {size: direct_reads_win(seed, size) for size in (20 * GB, 100 * GB)}
    if args.markdown:
        print(markdown(rows, table, seed, crossings))
        return 0
    summary = {
        "results": str(args.results),
        "measured_here": dataclasses.asdict(local),
        "bench_costs": dataclasses.asdict(bench),
        "check": rows,
        "median_abs_error": statistics.median(abs(row["error"]) for row in rows),
        "seed_costs": dataclasses.asdict(seed),
        "seed": table,
        "shardline_beats_download_split_for_n": {f"{size / GB:g} GB": span for size, span in crossings.items()},
    }
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
