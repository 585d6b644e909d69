"""The ``shardline`` command line: a thin layer that builds settings and calls in.

Everything environment-dependent is decided here, once: whether to run with
an embedded DynamoDB endpoint, the event loop, logging.  Exit status: 0 on
success, 1 when the job or input fails, 2 for usage and configuration
errors, 130 on interrupt, 141 when stdout is closed early, 143 on SIGTERM
(the job is cancelled and its workers stopped first).
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
from typing import Any, NoReturn

from . import __version__
from .aws import AwsSettings, aws_configured
from .errors import ConfigurationError, ShardlineError
from .protocol import DEFAULT_MARKER_TABLE

__all__ = ["main", "parse_delimiter"]

log = logging.getLogger("shardline.cli")

_ESCAPES = {"\\n": b"\n", "\\0": b"\0", "\\t": b"\t", "\\r": b"\r", "\\\\": b"\\"}


def parse_delimiter(text: str) -> bytes:
    r"""Turn ``\n``, ``\0``, ``\t``, ``\r``, ``\\``, ``\xHH`` or one literal byte into the delimiter."""
    if text in _ESCAPES:
        return _ESCAPES[text]
    if len(text) == 4 and text.startswith("\\x"):
        try:
            return bytes([int(text[2:], 16)])
        except ValueError:
            pass
    encoded = text.encode("utf-8", errors="surrogateescape")
    if len(encoded) != 1:
        raise ConfigurationError(
            f"--delimiter must be one byte (\\n, \\0, \\t, \\r, \\xHH or a single ASCII character), got {text!r}"
        )
    return encoded


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
        "and joined. It runs with 'sh -c' and gets SHARDLINE_SHARD, SHARDLINE_SHARDS and SHARDLINE_JOB_ID "
        "in its environment.",
        epilog="examples:\n"
        "  shardline run access.log -n 8 -- grep -c ' 500 '\n"
        "  shardline run s3://bucket/big.jsonl -n 16 -- 'jq -c .user | sort -u'\n"
        "  shardline run records.bin --delimiter '\\0' -n 4\n\n"
        "With no AWS configuration in the environment, boundary markers go to an embedded "
        "DynamoDB-compatible endpoint started for the job; standard AWS configuration "
        "(credentials, AWS_REGION, AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_DYNAMODB) "
        "is honoured otherwise.",
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
        "--max-line-bytes",
        type=_size,
        default=None,
        help="fail (naming the offset) if a line is longer than this, e.g. 64M (default: no limit)",
    )
    run.add_argument("--part-size", type=_size, default=8 << 20, help="bytes per ranged GET (default: 8M)")
    run.add_argument(
        "--parts-in-flight", type=_positive_int, default=4, help="ranged GETs in flight per worker (default: 4)"
    )
    run.add_argument(
        "--markers",
        choices=("auto", "embedded", "aws"),
        default="auto",
        help="where boundary markers go: 'embedded' starts a local DynamoDB-compatible endpoint, 'aws' uses "
        "the configured DynamoDB, 'auto' (default) picks embedded when no AWS configuration is present",
    )
    run.add_argument("--markers-table", default=DEFAULT_MARKER_TABLE, help="DynamoDB marker table (created if missing)")
    run.add_argument(
        "--workers",
        choices=("process", "inprocess"),
        default="process",
        help="run shards as local worker processes (default) or as tasks inside this process",
    )
    run.add_argument(
        "--max-processes",
        type=_positive_int,
        default=None,
        help="shards running at once (default: 2 x CPUs processes, or 64 in-process tasks)",
    )
    run.add_argument(
        "--spool-dir",
        default=None,
        help="where shard outputs wait for their turn (default: /dev/shm if it has room for twice the "
        "object, else the temp dir)",
    )
    run.add_argument("--stats", action="store_true", help="print a JSON summary of the job to stderr at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress display, even on a terminal")
    _add_common(run)

    worker = sub.add_parser(
        "worker",
        help="run one shard task by hand (debugging, containers)",
        description="Run one shard task given as JSON (the format the coordinator sends). Prints a JSON "
        "summary on success.",
    )
    worker.add_argument("--task", default="-", help="file with the task JSON, or - for stdin (default)")
    _add_common(worker)
    return parser


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


def _cmd_run(args: argparse.Namespace, command: str | None) -> int:
    from .coordinator import Backend, CoordinatorSettings, JobSpec, LocalProcessBackend
    from .embedded import DEFAULT_INPROCESS_CONCURRENCY, InProcessBackend, run_embedded

    delimiter = parse_delimiter(args.delimiter)
    spec = JobSpec(
        source=args.source,
        shards=args.shards,
        delimiter=delimiter,
        command=command,
        max_line_bytes=args.max_line_bytes,
        part_size_bytes=args.part_size,
        max_in_flight_bytes=args.part_size * args.parts_in_flight,
    )
    configured = aws_configured()
    embedded = args.markers == "embedded" or (args.markers == "auto" and not configured)
    if embedded and spec.source.startswith("s3://") and not configured:
        raise ConfigurationError(
            f"{spec.source} needs AWS configuration (credentials and region, or AWS_ENDPOINT_URL_S3 for an "
            "S3-compatible server); none was found in the environment"
        )
    settings = CoordinatorSettings(markers_table=args.markers_table, spool_dir=args.spool_dir)
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

    try:
        return _run_loop(go, use_uvloop=not args.no_uvloop)
    except asyncio.CancelledError:
        print("shardline: terminated; job cancelled and its workers stopped", file=sys.stderr)
        return 143


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


def main(argv: Sequence[str] | None = None) -> int:
    own_args, command = _split_command(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(own_args)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    try:
        if args.subcommand == "run":
            return _cmd_run(args, command)
        if command is not None:
            parser.error(f"'{args.subcommand}' takes no command after --")
        return _cmd_worker(args)
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
