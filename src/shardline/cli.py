"""The ``shardline`` command line: a thin layer that builds settings and calls in.

Everything environment-dependent is decided here, once: whether to run with
an embedded DynamoDB endpoint or against a coordinator daemon, the event
loop, logging.  Exit status: 0 on success, 1 when the job or input fails, 2
for usage and configuration errors, 130 on interrupt, 141 when stdout is
closed early, 143 on SIGTERM (the job is cancelled and its workers stopped
first, on the coordinator too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import ConfigurationError, ShardlineError
from .io.aws import AwsSettings, aws_configured
from .protocol import DEFAULT_MARKER_TABLE, DEFAULT_MAX_IN_FLIGHT_BYTES, DEFAULT_PART_SIZE_BYTES, parse_delimiter

if TYPE_CHECKING:
    from .client import CoordinatorClient
    from .protocol import JobSpec

__all__ = ["main"]

log = logging.getLogger("shardline.cli")


def _size(text: str) -> int:
    """Parse a byte count with an optional K/M/G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        result = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None
    if result < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return result


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shardline",
        description="Process a large line-oriented object (S3 or local) with N parallel workers, "
        "each getting exactly the whole lines of its slice.",
    )
    parser.add_argument("--version", action="version", version=f"shardline {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a job and write its output to stdout",
        description="Run COMMAND on N shards of SOURCE in parallel and write the outputs to stdout in shard "
        "order. Without COMMAND the output equals the input byte for byte. COMMAND is everything after "
        "'--': a single argument is a shell command line (pipes allowed); several arguments are quoted "
        "and joined. It runs with 'sh -c' in your environment, your AWS credentials included (so 'aws s3 cp' "
        "works), minus every SHARDLINE_* variable, plus SHARDLINE_JOB_ID, SHARDLINE_SHARD, SHARDLINE_SHARDS, "
        "SHARDLINE_ATTEMPT and SHARDLINE_COMMAND_ID (the reduce command: SHARDLINE_JOB_ID, SHARDLINE_SHARDS "
        "and SHARDLINE_COMMAND_ID). With --coordinator it runs in the daemon's environment instead, without "
        "the daemon's AWS credentials (see 'shardline serve --help'). Every process a command starts, even "
        "one it daemonises, is killed when the command ends (Linux; elsewhere its process group only).",
        epilog="examples:\n"
        "  shardline run access.log -n 8 -- grep -c ' 500 '\n"
        "  shardline run s3://bucket/big.jsonl -n 16 -- 'jq -c .user | sort -u'\n"
        "  shardline run records.bin --delimiter '\\0' -n 4\n"
        "  shardline run big.log -n 8 --reduce \"awk '{s+=$1} END {print s}'\" -- wc -l\n"
        "  shardline run big.log -n 8 --reduce 'sort -m \"$@\"' -- sort\n"
        "  shardline run s3://bucket/big.log --coordinator http://127.0.0.1:8080 -- sort\n\n"
        "With no AWS configuration in the environment, boundary markers go to an embedded "
        "DynamoDB-compatible endpoint started for the job; standard AWS configuration "
        "(credentials, AWS_REGION, AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_DYNAMODB) "
        "is honoured otherwise. With --coordinator (or SHARDLINE_COORDINATOR) the job runs on a "
        "'shardline serve' daemon instead and its output is streamed back; a local SOURCE is then read "
        "by the daemon, so it must be a path on the daemon's machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("source", metavar="SOURCE", help="s3://bucket/key or a local file path")
    run.add_argument(
        "-n", "--shards", type=_positive_int, default=os.cpu_count() or 1, help="number of shards (default: CPUs)"
    )
    run.add_argument(
        "--delimiter", default="\\n", help="record delimiter: \\n (default), \\0, \\t, \\r, \\xHH or one character"
    )
    run.add_argument(
        "--output",
        metavar="DEST",
        default=None,
        help="write one part file per shard plus _manifest.json to DEST (s3://bucket/prefix/ or a local "
        "directory) instead of stdout; DEST must be empty or new unless --overwrite",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="let --output DEST hold files already: the shardline output there (part-NNNNN, result, "
        "_manifest.json) is replaced, its manifest removed first and its other parts once the new manifest is "
        "written; other files are left alone",
    )
    run.add_argument(
        "--reduce",
        metavar="CMD",
        default=None,
        help="shell command run once with the ordered shard outputs on its stdin (and their files as its "
        "arguments, \"$@\"); its stdout is the result. E.g. per-shard 'wc -l' with --reduce "
        "\"awk '{s+=$1} END {print s}'\", or per-shard 'sort' with --reduce 'sort -m \"$@\"'",
    )
    run.add_argument(
        "--backend",
        default=None,
        help="where shards run on the coordinator, e.g. local or lambda (default: the coordinator's default)",
    )
    run.add_argument(
        "--max-line-bytes",
        type=_size,
        default=None,
        help="fail (naming the offset) if a line is longer than this, e.g. 64M (default: no limit)",
    )
    run.add_argument(
        "--part-size", type=_size, default=DEFAULT_PART_SIZE_BYTES, help="bytes per ranged GET (default: 8M)"
    )
    run.add_argument(
        "--parts-in-flight",
        type=_positive_int,
        default=DEFAULT_MAX_IN_FLIGHT_BYTES // DEFAULT_PART_SIZE_BYTES,
        help="ranged GETs in flight per worker (default: 4)",
    )
    run.add_argument("--stats", action="store_true", help="print a JSON summary of the job to stderr at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress display, even on a terminal")
    _add_coordinator(run, required=False)
    local = run.add_argument_group("embedded runs (ignored with --coordinator)")
    local.add_argument(
        "--markers",
        choices=("auto", "embedded", "aws"),
        default="auto",
        help="where boundary markers go: 'embedded' starts a local DynamoDB-compatible endpoint, 'aws' uses "
        "the configured DynamoDB, 'auto' (default) picks embedded when no AWS configuration is present",
    )
    local.add_argument(
        "--markers-table", default=DEFAULT_MARKER_TABLE, help="DynamoDB marker table (created if missing)"
    )
    local.add_argument(
        "--workers",
        choices=("process", "inprocess"),
        default="process",
        help="run shards as local worker processes (default) or as tasks inside this process",
    )
    local.add_argument(
        "--max-processes",
        type=_positive_int,
        default=None,
        help="shards running at once (default: 2 x CPUs processes, or 64 in-process tasks)",
    )
    local.add_argument(
        "--spool-dir",
        default=None,
        help="where shard outputs wait for their turn (default: /dev/shm if it has room for twice the "
        "object, else the temp dir)",
    )
    _add_common(run)

    serve = sub.add_parser(
        "serve",
        help="run the coordinator daemon (HTTP API + worker exchange)",
        description="Serve the HTTP API (see /openapi.json) that accepts jobs, runs their shards as local "
        "worker processes, and streams their outputs; plus the TCP exchange that workers connect to. Job "
        "state lives in DynamoDB, so a restarted daemon resumes unfinished jobs. With no AWS configuration "
        "an embedded DynamoDB-compatible endpoint is used and job state does not survive a restart. "
        "SIGTERM or Ctrl-C stops accepting jobs, lets running ones finish for --drain-timeout seconds, "
        "and exits 0; jobs still running then are resumed by the next daemon. "
        "The API runs commands, so every route but /healthz needs a bearer token: on 127.0.0.1 one is "
        "generated into the state directory, where 'shardline run --coordinator', 'status' and 'cancel' "
        "find it; any other --host needs --token-file (or $SHARDLINE_TOKEN). Requests from web pages, "
        "Host names that are not the server's and bodies that are not JSON are refused. Commands run with the "
        "daemon's environment minus every SHARDLINE_* variable (the API token among them) and minus its AWS "
        "credential variables (unless --command-aws-credentials).",
        epilog="examples:\n"
        "  shardline serve                      # 127.0.0.1:8080, token in ~/.local/state/shardline/token\n"
        "  shardline token --file /etc/shardline/token\n"
        "  shardline serve --host 0.0.0.0 --token-file /etc/shardline/token --allowed-host coord.example.com \\\n"
        "      --tls-cert api.pem --tls-key api.key\n"
        "  shardline serve --output-root /srv/shardline/out --output-bucket my-results\n"
        "  shardline serve --backend lambda --function shardline-worker --staging s3://bucket/shardline/staging/ \\\n"
        "      --exchange-host 0.0.0.0 --exchange-port 9000 --advertise-host coord.example.com \\\n"
        "      --exchange-tls-cert cert.pem --exchange-tls-key key.pem --exchange-ca ca.pem\n"
        '  curl -s localhost:8080/jobs -H "Authorization: Bearer $(shardline token)" -H "Content-Type: '
        'application/json" \\\n'
        '      -d \'{"source": "s3://bucket/big.log", "shards": 8, "command": "grep -c ERROR"}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8080, help="HTTP port, 0 for any free one (default: 8080)")
    serve.add_argument(
        "--exchange-host", default="127.0.0.1", help="listen address for worker connections (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--exchange-port", type=_port, default=0, help="port for worker connections (default: any free one)"
    )
    serve.add_argument(
        "--advertise-host",
        default=None,
        help="address workers use to reach the exchange, when it differs from --exchange-host (NAT, containers)",
    )
    serve.add_argument(
        "--markers-table", default=DEFAULT_MARKER_TABLE, help="DynamoDB marker table (created if missing)"
    )
    serve.add_argument(
        "--jobs-table", default=None, help="DynamoDB job state table (created if missing; default: shardline-jobs)"
    )
    serve.add_argument(
        "--spool-dir",
        default=None,
        help="root of the per-job directories holding shard outputs until they are read; resumed jobs keep "
        "their committed shards only if it survives the restart (default: /dev/shm if it has room, else the "
        "temp dir)",
    )
    serve.add_argument(
        "--max-processes",
        type=_positive_int,
        default=None,
        help="worker processes running at once, over all jobs (default: 2 x CPUs)",
    )
    outputs = serve.add_argument_group("job outputs (the 'output' field; none allowed by default)")
    outputs.add_argument(
        "--output-root",
        default=None,
        metavar="DIR",
        help="let jobs write local outputs to absolute paths below DIR, an existing directory (default: no "
        "local outputs)",
    )
    outputs.add_argument(
        "--output-bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="let jobs write S3 outputs to bucket NAME; repeat for more buckets (default: no S3 outputs)",
    )
    lambda_ = serve.add_argument_group("AWS Lambda workers (deploy/README.md)")
    lambda_.add_argument(
        "--backend",
        choices=("local", "lambda"),
        default="local",
        help="backend for jobs that name none (default: local; lambda needs --function)",
    )
    lambda_.add_argument(
        "--function", default=None, metavar="NAME_OR_ARN", help="the worker function; enables the lambda backend"
    )
    lambda_.add_argument(
        "--lambda-region", default=None, help="the function's region (default: the standard AWS configuration)"
    )
    lambda_.add_argument(
        "--lambda-concurrency",
        type=_positive_int,
        default=None,
        help="Lambda attempts running at once, over all jobs (default: 100)",
    )
    lambda_.add_argument(
        "--staging",
        default=None,
        metavar="S3_PREFIX",
        help="s3://bucket/prefix/ where Lambda workers upload attempt outputs for the coordinator to collect",
    )
    tls = serve.add_argument_group("TLS on the exchange (required when workers reach it across networks)")
    tls.add_argument("--exchange-tls-cert", default=None, metavar="PEM", help="the exchange's certificate chain")
    tls.add_argument("--exchange-tls-key", default=None, metavar="PEM", help="its private key")
    tls.add_argument(
        "--exchange-ca",
        default=None,
        metavar="PEM",
        help="CA certificate workers verify the exchange with, sent in each task (default: their system trust "
        "store); the certificate must name --advertise-host",
    )
    access = serve.add_argument_group("who may use the HTTP API (docs/security.md)")
    access.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="file holding the bearer token every route but /healthz requires ('shardline token --file FILE' "
        "makes one); default: $SHARDLINE_TOKEN, else on a loopback --host the token generated in the state "
        "directory. Any other --host refuses to start without a token",
    )
    access.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve the API without any token: anyone who reaches the port can run commands as this user",
    )
    access.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="a name clients reach this server by (the Host header), repeatable; the address connected to, "
        "and localhost over loopback, are always accepted. Without :PORT, with any port (proxies, port mappings)",
    )
    access.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate chain")
    access.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    access.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="where the daemon keeps its generated token and keys (default: $SHARDLINE_STATE_DIR, else "
        "$XDG_STATE_HOME/shardline, else ~/.local/state/shardline)",
    )
    limits = serve.add_argument_group("limits on what one client or job may ask for")
    limits.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="HTTP connections open at once, output streams included; more are answered 503 (default: 256)",
    )
    limits.add_argument(
        "--max-shards", type=_positive_int, default=None, metavar="N", help="shards of one job (default: 100000)"
    )
    limits.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=None,
        metavar="N",
        help="attempts per shard a job may ask for (default: 10)",
    )
    limits.add_argument(
        "--max-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="each of a job's start, heartbeat and total timeouts (default: 604800, a week)",
    )
    limits.add_argument(
        "--max-part-size", type=_size, default=None, metavar="SIZE", help="a job's part_size_bytes (default: 256M)"
    )
    limits.add_argument(
        "--max-in-flight",
        type=_size,
        default=None,
        metavar="SIZE",
        help="a job's max_in_flight_bytes, the download memory of each running shard (default: 1G)",
    )
    serve.add_argument(
        "--command-aws-credentials",
        action="store_true",
        help="pass the daemon's AWS credential variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN, container and web identity credentials, ...) on to commands; by default only the "
        "workers get them, to read and write S3, and commands do not",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running jobs may take to finish before they are stopped and left to "
        "resume (default: 30)",
    )
    _add_common(serve)

    status = sub.add_parser(
        "status",
        help="show the jobs on a coordinator, or one job in detail",
        description="Without ID, a table of the coordinator's jobs, newest first; with ID, that job and its shards.",
    )
    status.add_argument("id", metavar="ID", nargs="?", help="a job id (default: list all jobs)")
    status.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    _add_coordinator(status, required=True)
    _add_common(status)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a job on a coordinator",
        description="Cancel job ID: its workers are stopped and its partial outputs removed. A job that "
        "already finished is left as it is.",
    )
    cancel.add_argument("id", metavar="ID", help="the job id")
    _add_coordinator(cancel, required=True)
    _add_common(cancel)

    token = sub.add_parser(
        "token",
        help="print the API token of a local daemon (creating it if need be)",
        description="Print the bearer token that 'shardline serve' on 127.0.0.1 uses: the one in the state "
        "directory, created (mode 0600) if there is none yet. With --file, the token in FILE, created there "
        "if missing: for 'serve --token-file FILE' on other addresses or in a container.",
        epilog="examples:\n"
        '  curl -s localhost:8080/jobs -H "Authorization: Bearer $(shardline token)"\n'
        "  shardline token --file /run/secrets/shardline-token > /dev/null",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    token.add_argument("--file", default=None, metavar="FILE", help="the token file (default: in the state directory)")
    _add_common(token)

    worker = sub.add_parser(
        "worker",
        help="run one shard task by hand (debugging, containers)",
        description="Run one shard task given as JSON (the format the coordinator sends). Prints a JSON "
        "summary on success.",
    )
    worker.add_argument("--task", default="-", help="file with the task JSON, or - for stdin (default)")
    _add_common(worker)

    package = sub.add_parser(
        "package-worker",
        help="build the AWS Lambda deployment zip of the worker",
        description="Build a Lambda deployment zip holding only what the worker needs: shardline's worker and "
        "protocol code and aioboto3 with its dependencies, fetched by pip for Lambda's platform. The handler is "
        "shardline.worker.lambda_handler.handler (runtime python3.11). deploy/README.md shows how to deploy it.",
    )
    package.add_argument(
        "-o", "--output", default="shardline-worker.zip", help="zip to write (default: shardline-worker.zip)"
    )
    package.add_argument(
        "--architecture", choices=("x86_64", "arm64"), default="x86_64", help="the function's (default: x86_64)"
    )
    package.add_argument("--python-version", default="3.11", help="the function's runtime (default: 3.11)")
    package.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for pip, repeatable (e.g. --pip-arg=--index-url=URL)",
    )
    _add_common(package)
    return parser


def _add_coordinator(parser: argparse.ArgumentParser, *, required: bool) -> None:
    what = "the coordinator" if required else "run on this coordinator instead of embedded"
    parser.add_argument(
        "--coordinator",
        metavar="URL",
        default=os.environ.get("SHARDLINE_COORDINATOR") or None,
        help=f"{what}, e.g. http://127.0.0.1:8080 (default: $SHARDLINE_COORDINATOR)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="file holding the bearer token the coordinator requires (default: $SHARDLINE_TOKEN, else, for a "
        "coordinator on this machine, the token 'shardline serve' generated in the state directory)",
    )
    parser.add_argument(
        "--coordinator-ca",
        metavar="PEM",
        default=os.environ.get("SHARDLINE_COORDINATOR_CA") or None,
        help="CA certificate to verify an https:// coordinator with (default: $SHARDLINE_COORDINATOR_CA, else "
        "the system trust store)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")


def _split_command(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """Split ``... -- COMMAND ...`` into our arguments and the command line."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    words = argv[at + 1 :]
    if not words:
        return argv[:at], None
    command = words[0] if len(words) == 1 else shlex.join(words)
    return argv[:at], command


def _run_loop(coroutine_factory: Callable[[], Coroutine[Any, Any, int]], *, use_uvloop: bool) -> int:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine_factory())
    return asyncio.run(coroutine_factory())


class _ProgressDisplay:
    """One self-overwriting status line on a terminal's stderr."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._task: asyncio.Task[None] | None = None

    def attach(self, snapshot: Callable[[], Any]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(snapshot))

    async def _loop(self, snapshot: Callable[[], Any]) -> None:
        while True:
            p = snapshot()
            rate = p.bytes_emitted / p.elapsed_s if p.elapsed_s > 0 else 0.0
            remaining = max(p.size - p.bytes_emitted, 0)
            eta = f"{remaining / rate:5.0f}s" if rate > 0 else "    ?"
            self._stream.write(
                f"\r\x1b[K[shardline] shards {p.shards_done}/{p.shards}  "
                f"{_human(p.bytes_emitted)}/{_human(p.size)}  {_human(rate)}/s  ETA {eta}"
            )
            self._stream.flush()
            await asyncio.sleep(0.25)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _job_spec(args: argparse.Namespace, command: str | None) -> JobSpec:
    from .protocol import JobSpec

    source, output = args.source, args.output
    if args.coordinator:
        # The daemon resolves paths against its own working directory.
        source = source if source.startswith("s3://") else os.path.abspath(source)
    # Absolute, so that messages and the manifest name the directory plainly (".." resolved).
    output = output if output is None or output.startswith("s3://") else os.path.abspath(output)
    if args.overwrite and output is None:
        raise ConfigurationError("--overwrite needs --output DEST (output on stdout overwrites nothing)")
    return JobSpec(
        source=source,
        shards=args.shards,
        delimiter=parse_delimiter(args.delimiter, what="--delimiter"),
        command=command,
        output=output,
        overwrite=args.overwrite,
        reduce=args.reduce,
        backend=args.backend,
        max_line_bytes=args.max_line_bytes,
        part_size_bytes=args.part_size,
        max_in_flight_bytes=args.part_size * args.parts_in_flight,
    )


def _cmd_run(args: argparse.Namespace, command: str | None) -> int:
    spec = _job_spec(args, command)
    if args.coordinator:
        return _cmd_run_remote(args, spec)

    from .coordinator import Backend, CoordinatorSettings, LocalProcessBackend, OutputPolicy
    from .embedded import DEFAULT_INPROCESS_CONCURRENCY, InProcessBackend, run_embedded

    if spec.backend not in (None, "local"):
        raise ConfigurationError(
            f"--backend {spec.backend} runs on a coordinator: start 'shardline serve --function ...' and pass "
            "--coordinator URL (an embedded run uses local workers)"
        )

    configured = aws_configured()
    embedded = args.markers == "embedded" or (args.markers == "auto" and not configured)
    if embedded and spec.source.startswith("s3://") and not configured:
        raise ConfigurationError(
            f"{spec.source} needs AWS configuration (credentials and region, or AWS_ENDPOINT_URL_S3 for an "
            "S3-compatible server); none was found in the environment"
        )
    from .io.rlimits import raise_open_files_limit

    raise_open_files_limit()  # the in-process exchange's sessions and every worker's pipes are descriptors
    settings = CoordinatorSettings(
        markers_table=args.markers_table,
        spool_dir=args.spool_dir,
        # The user's own process writes wherever its user may.
        output_policy=OutputPolicy(anywhere=True),
    )
    show_progress = not args.no_progress and sys.stderr.isatty()
    out = sys.stdout.buffer

    async def go() -> int:
        _cancel_on_sigterm()
        display = _ProgressDisplay(sys.stderr) if show_progress else None
        if args.workers == "inprocess":
            backend: Backend = InProcessBackend(max_concurrent=args.max_processes or DEFAULT_INPROCESS_CONCURRENCY)
        else:
            backend = LocalProcessBackend(max_processes=args.max_processes)
            await backend.prestart(spec.shards)
        try:
            report = await run_embedded(
                spec,
                out=out,
                aws=AwsSettings(),
                embedded_dynamodb=embedded,
                backend=backend,
                settings=settings,
                on_start=display.attach if display else None,
            )
        finally:
            if display is not None:
                await display.close()
        out.flush()
        if args.stats:
            summary = {
                "job_id": report.job_id,
                "size": report.size,
                "shards": len(report.shards),
                "output_bytes": report.output_bytes,
                "elapsed_s": round(report.elapsed_s, 3),
                "tail_sources": report.tail_source_counts,
                "emitted": [list(s.emitted) for s in report.shards],
            }
            print(json.dumps(summary), file=sys.stderr)
        return 0

    return _run_job_loop(go, use_uvloop=not args.no_uvloop)


def _run_job_loop(coroutine_factory: Callable[[], Coroutine[Any, Any, int]], *, use_uvloop: bool) -> int:
    try:
        return _run_loop(coroutine_factory, use_uvloop=use_uvloop)
    except asyncio.CancelledError:
        print("shardline: terminated; job cancelled and its workers stopped", file=sys.stderr)
        return 143


@dataclass(slots=True)
class _RemoteProgress:
    """What the progress line shows, from the latest GET /jobs/{id}."""

    shards: int
    started: float
    shards_done: int = 0
    bytes_emitted: int = 0
    size: int = 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


#: How often the progress line asks the coordinator for the job's state.
_PROGRESS_POLL_S = 1.0


def _cmd_run_remote(args: argparse.Namespace, spec: JobSpec) -> int:
    show_progress = not args.no_progress and sys.stderr.isatty()
    out = sys.stdout.buffer

    async def go() -> int:
        _cancel_on_sigterm()
        async with _client(args) as coordinator:
            view = await coordinator.submit(spec)
            job_id = view["id"]
            log.info("job %s submitted to %s", job_id, coordinator.url)
            display = _ProgressDisplay(sys.stderr) if show_progress else None
            poller = None
            if display is not None:
                progress = _RemoteProgress(shards=spec.shards, started=time.monotonic())
                poller = asyncio.create_task(_poll_progress(coordinator, job_id, progress))
                display.attach(lambda: progress)
            try:
                async for chunk in coordinator.output(job_id):
                    out.write(chunk)
                out.flush()
            except (asyncio.CancelledError, BrokenPipeError):
                # Interrupted, terminated or `| head`: the job is ours, stop it.
                await asyncio.shield(_cancel_quietly(coordinator, job_id))
                raise
            finally:
                if poller is not None:
                    poller.cancel()
                if display is not None:
                    await display.close()
            if args.stats:
                view = await coordinator.job(job_id)
                summary = {
                    "job_id": job_id,
                    "size": view["size"],
                    "shards": len(view["shards"]),
                    "output": view["output"],
                    "retries": view["retries"],
                    "elapsed_s": round((view["finished_at"] or time.time()) - view["created_at"], 3),
                    "emitted": [shard["emitted"] for shard in view["shards"]],
                }
                print(json.dumps(summary), file=sys.stderr)
        return 0

    return _run_job_loop(go, use_uvloop=not args.no_uvloop)


async def _poll_progress(coordinator: CoordinatorClient, job_id: str, progress: _RemoteProgress) -> None:
    while True:
        try:
            view = await coordinator.job(job_id)
        except ShardlineError as exc:  # the output stream reports real trouble; the display just waits
            log.debug("progress poll failed: %s", exc)
        else:
            progress.shards_done = view["shards_done"]
            progress.bytes_emitted = view["bytes_emitted"]
            progress.size = view["size"] or 0
        await asyncio.sleep(_PROGRESS_POLL_S)


async def _cancel_quietly(coordinator: CoordinatorClient, job_id: str) -> None:
    try:
        await coordinator.cancel(job_id)
    except ShardlineError as exc:
        print(f"shardline: could not cancel job {job_id} on {coordinator.url}: {exc}", file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .coordinator import HttpLimits
    from .daemon import ServeSettings, serve
    from .io.statedir import default_state_dir
    from .protocol import JobLimits

    embedded = not aws_configured()
    fields: dict[str, Any] = {"jobs_table": args.jobs_table} if args.jobs_table else {}
    if args.lambda_concurrency:
        fields["lambda_concurrency"] = args.lambda_concurrency
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else default_state_dir()
    token, token_source = _serve_token(args, state_dir)
    job_limits = {
        "max_shards": args.max_shards,
        "max_attempts": args.max_attempts,
        "max_timeout_s": args.max_timeout,
        "max_part_size_bytes": args.max_part_size,
        "max_in_flight_bytes": args.max_in_flight,
    }
    http_limits = {"max_connections": args.max_connections}
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        exchange_host=args.exchange_host,
        exchange_port=args.exchange_port,
        advertise_host=args.advertise_host,
        token=token,
        insecure_no_auth=args.insecure_no_auth,
        allowed_hosts=tuple(args.allowed_host),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        state_dir=state_dir,
        job_limits=JobLimits(**{name: value for name, value in job_limits.items() if value is not None}),
        http_limits=HttpLimits(**{name: value for name, value in http_limits.items() if value is not None}),
        markers_table=args.markers_table,
        spool_dir=args.spool_dir,
        max_processes=args.max_processes,
        drain_timeout_s=args.drain_timeout,
        embedded_dynamodb=embedded,
        default_backend=args.backend,
        lambda_function=args.function,
        lambda_region=args.lambda_region,
        staging=args.staging,
        exchange_tls_cert=args.exchange_tls_cert,
        exchange_tls_key=args.exchange_tls_key,
        exchange_ca=args.exchange_ca,
        output_root=os.path.abspath(args.output_root) if args.output_root else None,
        output_buckets=tuple(args.output_bucket),
        command_aws_credentials=args.command_aws_credentials,
        **fields,
    )

    def ready(url: str, exchange: tuple[str, int]) -> None:
        auth = f"token in {token_source}" if token_source else "NO AUTHENTICATION"
        print(
            f"shardline: serving {url} (API description at {url}/openapi.json; {auth}); workers connect to "
            f"{exchange[0]}:{exchange[1]}; SIGTERM or Ctrl-C drains and stops",
            file=sys.stderr,
            flush=True,
        )

    async def go() -> int:
        await serve(settings, aws=AwsSettings(), on_ready=ready)
        return 0

    return _run_loop(go, use_uvloop=not args.no_uvloop)


def _serve_token(args: argparse.Namespace, state_dir: str) -> tuple[str | None, str | None]:
    """The token `serve` requires, and where it is kept (for the ready line).

    --token-file, else $SHARDLINE_TOKEN, else on a loopback --host the token
    in the state directory (generated on first use, reused after).  Anywhere
    else none, which ServeSettings refuses unless --insecure-no-auth.
    """
    from .io.statedir import TOKEN_FILE, check_token, read_or_create_secret, read_token_file
    from .io.urls import is_loopback_host

    if args.token_file:
        return read_token_file(args.token_file), args.token_file
    if "SHARDLINE_TOKEN" in os.environ:
        return check_token(os.environ["SHARDLINE_TOKEN"], source="SHARDLINE_TOKEN"), "$SHARDLINE_TOKEN"
    if args.insecure_no_auth or not is_loopback_host(args.host):
        return None, None
    path = os.path.join(state_dir, TOKEN_FILE)
    return read_or_create_secret(path), path


def _client(args: argparse.Namespace) -> CoordinatorClient:
    from .client import CoordinatorClient

    if not args.coordinator:
        raise ConfigurationError(
            f"'{args.subcommand}' needs a coordinator: pass --coordinator URL or set SHARDLINE_COORDINATOR"
        )
    return CoordinatorClient(args.coordinator, token=_client_token(args), ca_file=args.coordinator_ca)


def _client_token(args: argparse.Namespace) -> str | None:
    """--token-file, else $SHARDLINE_TOKEN, else a local daemon's generated token, else none."""
    from urllib.parse import urlsplit

    from .io.statedir import TOKEN_FILE, check_token, default_state_dir, read_secret, read_token_file
    from .io.urls import is_loopback_host

    if args.token_file:
        return read_token_file(args.token_file)
    if "SHARDLINE_TOKEN" in os.environ:
        return check_token(os.environ["SHARDLINE_TOKEN"], source="SHARDLINE_TOKEN")
    # Like Jupyter: a daemon on this machine left its token in our state
    # directory.  Never sent anywhere else: it would give the token away.
    if is_loopback_host(urlsplit(args.coordinator).hostname or ""):
        return read_secret(os.path.join(default_state_dir(), TOKEN_FILE))
    return None


def _cmd_token(args: argparse.Namespace) -> int:
    from .io.statedir import TOKEN_FILE, default_state_dir, read_or_create_secret, read_token_file

    if args.file is not None and os.path.exists(args.file):
        print(read_token_file(args.file))
    else:
        print(read_or_create_secret(args.file or os.path.join(default_state_dir(), TOKEN_FILE)))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with _client(args) as coordinator:
            if args.id:
                view = await coordinator.job(args.id)
                print(json.dumps(view, indent=2) if args.json else _format_job(view))
            else:
                jobs = await coordinator.jobs()
                print(json.dumps({"jobs": jobs}, indent=2) if args.json else _format_jobs(jobs))
        return 0

    return _run_loop(go, use_uvloop=not args.no_uvloop)


def _cmd_cancel(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with _client(args) as coordinator:
            view = await coordinator.cancel(args.id)
        if view["state"] == "cancelled":
            print(f"job {view['id']} cancelled")
        else:
            print(f"job {view['id']} had already {view['state']}; nothing to cancel")
        return 0

    return _run_loop(go, use_uvloop=not args.no_uvloop)


def _when(unix_s: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s)) if unix_s is not None else "-"


def _format_jobs(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    rows = [("ID", "STATE", "SHARDS", "INPUT", "CREATED", "SOURCE")]
    for job in jobs:
        size = _human(job["size"]) if job["size"] is not None else "?"
        rows.append(
            (
                job["id"],
                job["state"],
                f"{job['shards_done']}/{job['shards_total']}",
                f"{_human(job['bytes_emitted'])}/{size}",
                _when(job["created_at"]),
                job["source"],
            )
        )
    return _table(rows)


def _format_job(job: dict[str, Any]) -> str:
    size = f"{job['size']} bytes" if job["size"] is not None else "size not known yet"
    lines = [
        f"job:      {job['id']}",
        f"state:    {job['state']}",
        f"source:   {job['source']} ({size})",
        f"command:  {job['command'] or '(none: lines pass through)'}",
    ]
    if job["reduce"]:
        lines.append(f"reduce:   {job['reduce']}")
    if job["output"]:
        lines.append(f"output:   {job['output']}")
    lines += [
        f"shards:   {job['shards_done']}/{job['shards_total']} done, {_human(job['bytes_emitted'])} emitted, "
        f"{job['retries']} retries",
        f"created:  {_when(job['created_at'])}",
        f"finished: {_when(job['finished_at'])}",
    ]
    if job["error"]:
        lines.append(f"error:    {job['error']}")
    rows = [("SHARD", "STATE", "ATTEMPT", "BYTES", "EMITTED", "ERROR")]
    for shard in job["shards"]:
        emitted = "[{}, {})".format(*shard["emitted"]) if shard["emitted"] is not None else "-"
        rows.append(
            (
                str(shard["index"]),
                shard["state"],
                str(shard["attempt"]),
                str(shard["bytes"]),
                emitted,
                shard["error"] or "",
            )
        )
    return "\n".join(lines) + "\n\n" + _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cancel_on_sigterm() -> None:
    """Turn SIGTERM into cancellation of the running job, so every worker
    process is stopped on the way out instead of being orphaned."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)


def _cmd_worker(args: argparse.Namespace) -> int:
    from .worker._main import run_task_file

    if args.task == "-":
        return run_task_file(sys.stdin.buffer, use_uvloop=not args.no_uvloop)
    try:
        with open(args.task, "rb") as f:
            return run_task_file(f, use_uvloop=not args.no_uvloop)
    except OSError as exc:
        raise ConfigurationError(f"cannot read task file {args.task}: {exc.strerror}") from None


def _cmd_package_worker(args: argparse.Namespace) -> int:
    from .packaging import HANDLER, build_worker_zip

    package = build_worker_zip(
        args.output, architecture=args.architecture, python_version=args.python_version, pip_args=args.pip_arg
    )
    print(
        f"wrote {package.path} ({package.files} files, {package.zipped_bytes / 2**20:.1f} MiB zipped, "
        f"{package.unzipped_bytes / 2**20:.1f} MiB unzipped); handler {HANDLER}, runtime python{args.python_version}, "
        f"{args.architecture}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    own_args, command = _split_command(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(own_args)
    # A daemon's operators want to see jobs come and go; a command's users only its errors.
    base_level = logging.INFO if args.subcommand == "serve" else logging.WARNING
    level = base_level - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    try:
        if args.subcommand == "run":
            return _cmd_run(args, command)
        if command is not None:
            parser.error(f"'{args.subcommand}' takes no command after --")
        commands = {
            "serve": _cmd_serve,
            "status": _cmd_status,
            "cancel": _cmd_cancel,
            "token": _cmd_token,
            "worker": _cmd_worker,
            "package-worker": _cmd_package_worker,
        }
        return commands[args.subcommand](args)
    except ConfigurationError as exc:
        print(f"shardline: {exc}", file=sys.stderr)
        return 2
    except ShardlineError as exc:
        print(f"shardline: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): stop quietly.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 141
    finally:
        log.debug("finished in %.2fs", time.monotonic() - started)
