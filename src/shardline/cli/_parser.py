# The argparse parser of `shardline`: `build_parser` and one function per
# subcommand (serve's, the longest, is in `_serveparser`), and the split of
# ``... -- COMMAND ...`` into our arguments and the command line.
#
# It imports the protocol's defaults and nothing heavier: `--help` must stay
# fast, and the command modules import what they need when they run.

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import __version__
from ..protocol import (
    DEFAULT_MARKER_TABLE,
    DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_MIN_SHARD_BYTES,
    DEFAULT_PART_SIZE_BYTES,
)
from ._options import (
    Parser,
    add_common_options,
    add_coordinator_options,
    exit_codes,
    non_negative_int,
    positive_int,
    size,
)
from ._serveparser import add_serve_parser

if TYPE_CHECKING:
    from ._options import Subcommands

__all__ = ["build_parser", "split_command"]

_JOB_ID_HELP = "a job id, or any prefix of it no other job's id starts with"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line (what follows ``--`` excluded)."""
    parser = Parser(
        prog="shardline",
        description="Process a large line-oriented object (S3 or local) with N parallel workers, "
        "each getting exactly the whole lines of its slice.",
    )
    parser.add_argument("--version", action="version", version=f"shardline {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=Parser)

    _add_run(sub)
    add_serve_parser(sub)
    _add_status(sub)
    _add_cancel(sub)
    _add_output(sub)
    _add_logs(sub)
    _add_token(sub)
    _add_worker(sub)
    _add_package_worker(sub)
    return parser


def _add_run(sub: Subcommands) -> None:
    """`shardline run`: one job, embedded or on a coordinator."""
    run = sub.add_parser(
        "run",
        usage="%(prog)s SOURCE [options] [-- COMMAND ...]",
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
        "  shardline run access.log -n 8 --ok-exit 0,1 -- grep -c ' 500 '\n"
        "  shardline run s3://bucket/big.jsonl -n 16 -- 'jq -c .user | sort -u'\n"
        "  shardline run records.bin --delimiter '\\0' -n 4\n"
        "  shardline run big.log -n 8 --reduce \"awk '{s+=\\$1} END {print s}'\" -- wc -l\n"
        "  shardline run big.log -n 8 --reduce 'sort -m \"$@\"' -- sort\n"
        "  shardline run s3://bucket/big.log --coordinator http://127.0.0.1:8080 -- sort\n\n"
        "Boundary markers go to the SQLite store in the state directory (--store; DynamoDB when "
        "AWS_ENDPOINT_URL_DYNAMODB names one, or with --store dynamodb). Standard AWS configuration "
        "(credentials, AWS_REGION, AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3) is honoured for s3:// sources, "
        "S3-compatible servers without a DynamoDB API (SeaweedFS, MinIO) included. "
        "With --coordinator (or SHARDLINE_COORDINATOR) the job runs on a "
        "'shardline serve' daemon instead and its output is streamed back; a local SOURCE is then read "
        "by the daemon, so it must be a path on the daemon's machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("source", metavar="SOURCE", help="s3://bucket/key or a local file path")
    run.add_argument("-n", "--shards", type=positive_int, default=None, help="number of shards (default: CPUs)")
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
        "\"awk '{s+=\\$1} END {print s}'\", or per-shard 'sort' with --reduce 'sort -m \"$@\"'",
    )
    run.add_argument(
        "--ok-exit",
        metavar="CODES",
        type=exit_codes,
        default=(0,),
        help="COMMAND's exit statuses that count as success, comma-separated (default: 0); e.g. 0,1 for grep, "
        "whose 1 means no match",
    )
    run.add_argument(
        "--command-retries",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="retry a shard whose COMMAND exited with another status up to N times (default: 0, since the same "
        "bytes give the same status); a command killed by a signal, a crashed or lost worker and storage "
        "errors are retried regardless",
    )
    run.add_argument(
        "--header",
        metavar="N",
        nargs="?",
        type=non_negative_int,
        const=1,
        default=0,
        help="give the first N lines of SOURCE (default 1: a CSV header) to every shard's COMMAND ahead of its "
        "own lines; they are still part of shard 0's input only, so the output's check counts them once (put "
        "--header after SOURCE, or N is read from it)",
    )
    run.add_argument(
        "--min-shard-bytes",
        metavar="SIZE",
        type=size,
        default=DEFAULT_MIN_SHARD_BYTES,
        help="use fewer shards than -n if each would get less than SIZE bytes, with a notice (default: 1M)",
    )
    run.add_argument("--exact-shards", action="store_true", help="use exactly -n shards, however small each would be")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (source, size, ETag, shards and their nominal ranges, backend, store) and exit; "
        "embedded runs only",
    )
    run.add_argument(
        "--backend",
        default=None,
        help="where shards run on the coordinator, e.g. local or lambda (default: the coordinator's default)",
    )
    run.add_argument(
        "--max-line-bytes",
        type=size,
        default=None,
        help="fail (naming the offset) if a line is longer than this, e.g. 64M (default: no limit)",
    )
    run.add_argument(
        "--part-size", type=size, default=DEFAULT_PART_SIZE_BYTES, help="bytes per ranged GET (default: 8M)"
    )
    run.add_argument(
        "--parts-in-flight",
        type=positive_int,
        default=DEFAULT_MAX_IN_FLIGHT_BYTES // DEFAULT_PART_SIZE_BYTES,
        help="ranged GETs in flight per worker (default: 4)",
    )
    run.add_argument("--stats", action="store_true", help="print a JSON summary of the job to stderr at the end")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the progress line on stderr, kept off the rows output and messages are written to "
        "(default: when stderr is a terminal)",
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="with --coordinator: print the job id and return at once; the job runs on, 'shardline output ID' "
        "streams its output. Without it, the output is streamed back and stopping the client (Ctrl-C, SIGTERM, "
        "a closed stdout) cancels the job",
    )
    add_coordinator_options(run, required=False)
    local = run.add_argument_group("embedded runs (ignored with --coordinator)")
    local.add_argument(
        "--store",
        choices=("auto", "sqlite", "dynamodb"),
        default="auto",
        help="where boundary markers go: 'sqlite' (shardline.db in the state directory), 'dynamodb' (the "
        "configured DynamoDB, --markers-table), 'auto' (default): dynamodb when AWS_ENDPOINT_URL_DYNAMODB is "
        "set, else sqlite",
    )
    local.add_argument(
        "--markers-table", default=DEFAULT_MARKER_TABLE, help="DynamoDB marker table (created if missing)"
    )
    local.add_argument(
        "--state-dir",
        default=None,
        help="where the SQLite store lives (default: $SHARDLINE_STATE_DIR, else $XDG_STATE_HOME/shardline, else "
        "~/.local/state/shardline)",
    )
    local.add_argument(
        "--workers",
        choices=("process", "inprocess"),
        default=None,
        help="run shards as local worker processes or as tasks inside this process (default: inprocess for a "
        "local file, whose bytes the kernel moves; process for S3, whose bytes pass through Python)",
    )
    local.add_argument(
        "--max-processes",
        type=positive_int,
        default=None,
        help="shards running at once (default: 4 x CPUs; as worker processes, in one per CPU)",
    )
    local.add_argument(
        "--spool-dir",
        default=None,
        help="where shard outputs wait for their turn (default: /dev/shm if it has room for twice the "
        "object, else the temp dir)",
    )
    add_common_options(run)


def _add_status(sub: Subcommands) -> None:
    """`shardline status [ID]`: the jobs on a coordinator, or one of them."""
    status = sub.add_parser(
        "status",
        help="show the jobs on a coordinator, or one job in detail",
        description="Without ID, a table of the coordinator's jobs, newest first; with ID, that job and its shards.",
    )
    status.add_argument("id", metavar="ID", nargs="?", help=f"{_JOB_ID_HELP} (default: list all jobs)")
    status.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    add_coordinator_options(status, required=True)
    add_common_options(status)


def _add_cancel(sub: Subcommands) -> None:
    """`shardline cancel ID`."""
    cancel = sub.add_parser(
        "cancel",
        help="cancel a job on a coordinator",
        description="Cancel job ID: its workers are stopped and its partial outputs removed. A job that "
        "already finished is left as it is.",
    )
    cancel.add_argument("id", metavar="ID", help=_JOB_ID_HELP)
    add_coordinator_options(cancel, required=True)
    add_common_options(cancel)


def _add_output(sub: Subcommands) -> None:
    """`shardline output ID`: re-attach to a job's output."""
    output = sub.add_parser(
        "output",
        help="stream a job's output from a coordinator (re-attach)",
        description="Write job ID's output to stdout from its start, as it is produced, and exit 0 once the job "
        "succeeded (1 if it failed or was cancelled). Stopping this client (Ctrl-C) leaves the job running. "
        "For jobs started with 'run --detach', or to re-attach after a client or the daemon went away.",
    )
    output.add_argument("id", metavar="ID", help=_JOB_ID_HELP)
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the progress line on stderr (default: when stderr is a terminal)",
    )
    add_coordinator_options(output, required=True)
    add_common_options(output)


def _add_logs(sub: Subcommands) -> None:
    """`shardline logs ID [--shard K]`."""
    logs = sub.add_parser(
        "logs",
        help="print the stderr of a job's commands on a coordinator",
        description="Print what job ID's commands wrote to stderr, per shard attempt, each line tagged with its "
        "shard: the last 64 KiB of each attempt, kept by the daemon in memory while it runs, once the attempt "
        "has ended (local workers only; Lambda's are in CloudWatch). A failed job's error holds the last lines too.",
    )
    logs.add_argument("id", metavar="ID", help="the job id")
    logs.add_argument("--shard", metavar="K", type=non_negative_int, default=None, help="only shard K's attempts")
    add_coordinator_options(logs, required=True)
    add_common_options(logs)


def _add_token(sub: Subcommands) -> None:
    """`shardline token`: a local daemon's API token."""
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
    add_common_options(token)


def _add_worker(sub: Subcommands) -> None:
    """`shardline worker`: one shard task by hand."""
    worker = sub.add_parser(
        "worker",
        help="run one shard task by hand (debugging, containers)",
        description="Run one shard task given as JSON (the format the coordinator sends). Prints a JSON "
        "summary on success.",
    )
    worker.add_argument("--task", default="-", help="file with the task JSON, or - for stdin (default)")
    add_common_options(worker)


def _add_package_worker(sub: Subcommands) -> None:
    """`shardline package-worker`: the Lambda deployment zip."""
    package = sub.add_parser(
        "package-worker",
        help="build the AWS Lambda deployment zip of the worker",
        description="Build a Lambda deployment zip holding only what the worker needs: shardline's worker and "
        "protocol code and aiobotocore with its dependencies, fetched by pip for Lambda's platform. The handler is "
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
    add_common_options(package)


def split_command(argv: Sequence[str]) -> tuple[list[str], str | None]:
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
