# `shardline run`: the job spec from the command line, then the job either
# embedded (an in-process coordinator with local workers) or on a daemon
# (`--coordinator`: submit, then stream the output back and cancel the job
# if we are interrupted, or with --detach print its id and return), with the
# progress line and the --stats summary.

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import stat
import sys
import time
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, InputError
from ..io.aws import AwsSettings, aws_configured
from ..io.lifeline import start_lifeline
from ..io.urls import is_s3_url
from ..protocol import (
    COMPRESSION_MAGIC_BYTES,
    DEFAULT_TASKS_PER_PROCESS,
    JobSpec,
    ShardRange,
    check_location,
    compressed_input_message,
    compression_format,
    parse_delimiter,
    usable_shards,
)
from ._loop import cancel_on_sigterm, run_job_loop
from ._progress import ProgressDisplay, progress_wanted
from ._remote import coordinator_client, stream_output

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..coordinator import JobProgress

__all__ = ["run_command"]

log = logging.getLogger("shardline.cli")

_DEFAULT_MAX_ATTEMPTS = JobSpec.__dataclass_fields__["max_attempts"].default


def run_command(args: argparse.Namespace, command: str | None) -> int:
    """`shardline run SOURCE ... [-- COMMAND]`: on --coordinator if given, else embedded."""
    try:
        spec = _job_spec(args, command)
        if args.dry_run:
            if args.coordinator:
                raise ConfigurationError("--dry-run plans embedded runs only (without --coordinator)")
            return _dry_run(args, spec)
        if args.coordinator:
            return _run_remote(args, spec)
        return _run_embedded(args, spec)
    except ConfigurationError as exc:
        raise ConfigurationError(in_cli_words(str(exc))) from None


#: The API's field names in messages, and what `shardline run` calls them.
_FLAGS = {
    "source": "SOURCE",
    "shards": "-n",
    "delimiter": "--delimiter",
    "command": "COMMAND",
    "output": "--output",
    "overwrite": "--overwrite",
    "reduce": "--reduce",
    "backend": "--backend",
    "ok_exit": "--ok-exit",
    "command_retries": "--command-retries",
    "min_shard_bytes": "--min-shard-bytes",
    "header_lines": "--header",
    "max_line_bytes": "--max-line-bytes",
    "part_size_bytes": "--part-size",
    "max_in_flight_bytes": "--parts-in-flight",
}


def in_cli_words(message: str) -> str:
    """`message` with the API's "field 'output'" said as the command line's "--output"."""
    return re.sub(r"field '(\w+)'", lambda m: _FLAGS.get(m.group(1), m.group(0)), message)


def _job_spec(args: argparse.Namespace, command: str | None) -> JobSpec:
    source, output = args.source, args.output
    # Before paths are made absolute: "s3:/x" would become "/cwd/s3:/x".
    check_location(source, what="SOURCE")
    if output is not None:
        check_location(output, what="--output")
    if args.coordinator:
        # The daemon resolves paths against its own working directory.
        source = source if is_s3_url(source) else os.path.abspath(source)
    # Absolute, so that messages and the manifest name the directory plainly (".." resolved).
    output = output if output is None or is_s3_url(output) else os.path.abspath(output)
    if args.overwrite and output is None:
        raise ConfigurationError("--overwrite needs --output DEST (output on stdout overwrites nothing)")
    return JobSpec(
        source=source,
        shards=args.shards or os.cpu_count() or 1,
        delimiter=parse_delimiter(args.delimiter, what="--delimiter"),
        command=command,
        output=output,
        overwrite=args.overwrite,
        reduce=args.reduce,
        backend=args.backend,
        ok_exit=args.ok_exit,
        command_retries=args.command_retries,
        # Room for the retries asked for, beside those of crashes and lost workers.
        max_attempts=max(_DEFAULT_MAX_ATTEMPTS, args.command_retries + 1),
        min_shard_bytes=None if args.exact_shards else args.min_shard_bytes,
        header_lines=args.header,
        max_line_bytes=args.max_line_bytes,
        part_size_bytes=args.part_size,
        max_in_flight_bytes=args.part_size * args.parts_in_flight,
    )


def _run_embedded(args: argparse.Namespace, spec: JobSpec) -> int:
    """The job in this process: an in-process coordinator, local workers, markers in
    the SQLite store (or DynamoDB, by --store)."""
    in_process = _workers(args, spec) == "inprocess"
    # Started first, so that its Python starts while ours imports; held (its
    # stdin open) until we exit: then it ends whatever our commands left.
    lifeline = start_lifeline() if in_process and not args.detach else None
    from ..coordinator import Backend, CoordinatorSettings, LocalProcessBackend, OutputPolicy
    from ..embedded import InProcessBackend, run_embedded

    if spec.backend not in (None, "local"):
        raise ConfigurationError(
            f"--backend {spec.backend} runs on a coordinator: start 'shardline serve --function ...' and pass "
            "--coordinator URL (an embedded run uses local workers)"
        )

    _check_aws(spec)
    from ..io.processes import adopt_orphans, hide_environment
    from ..io.rlimits import raise_open_files_limit
    from ..io.store import parse_location

    raise_open_files_limit()  # the in-process exchange's sessions and every worker's pipes are descriptors
    settings = CoordinatorSettings(
        markers=_markers_location(args),
        spool_dir=args.spool_dir,
        # The user's own process writes wherever its user may.
        output_policy=OutputPolicy(anywhere=True),
    )
    if args.detach:
        raise ConfigurationError("--detach needs --coordinator URL: an embedded job lives and dies with this process")
    show_progress = progress_wanted(args)

    async def go() -> int:
        cancel_on_sigterm()
        if spec.output is None:
            _widen_stdout_pipe()
        display = ProgressDisplay(sys.stderr) if show_progress else None
        # On a terminal the output goes through the display, which keeps it off the progress line.
        out = display.install(sys.stdout.buffer) if display is not None else sys.stdout.buffer

        def on_start(snapshot: Callable[[], JobProgress]) -> None:
            first = snapshot()
            _notice_fewer_shards(args, spec, first.shards, first.size)
            if display is not None:
                display.attach(snapshot)

        if in_process:
            # This process now runs the commands, as a pool process does: its
            # only children in sessions of their own are commands (the
            # lifeline shares our session), so whatever a command leaves
            # behind ends with it, even what it hid from the sweep (`env -i`);
            # and no command reads the job's secrets (or the environment it
            # was spared) from /proc/$PPID.
            adopt_orphans(dedicated=True)
            hide_environment()
            # As many commands at once as worker processes would run.
            at_once = args.max_processes or (os.cpu_count() or 1) * DEFAULT_TASKS_PER_PROCESS
            backend: Backend = InProcessBackend(max_concurrent=at_once)
        else:
            # The commands' stderr, tagged with their shards, reaches the user
            # (through the progress display, when one is shown).
            backend = LocalProcessBackend(max_concurrent=args.max_processes, forward_stderr=_CurrentStderr())
            aws_services = ["s3"] if is_s3_url(spec.source) else []
            if parse_location(settings.markers)[0] == "dynamodb":
                aws_services.append("dynamodb")
            await backend.prestart(spec.shards, aws_services=aws_services)
        try:
            report = await run_embedded(
                spec,
                out=out,
                aws=AwsSettings(),
                backend=backend,
                settings=settings,
                on_start=on_start,
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
        return run_job_loop(go, use_uvloop=not args.no_uvloop)
    finally:
        if lifeline is not None and lifeline.stdin is not None:
            lifeline.stdin.close()  # our commands have ended: the lifeline checks, and exits


def _run_remote(args: argparse.Namespace, spec: JobSpec) -> int:
    """The job on a daemon: submitted, then (unless --detach) its output
    streamed back, the job cancelled if we stop early (see `_remote`)."""
    show_progress = progress_wanted(args)

    async def go() -> int:
        cancel_on_sigterm()
        async with coordinator_client(args) as coordinator:
            view = await coordinator.submit(spec)
            job_id = view["id"]
            log.info("job %s submitted to %s", job_id, coordinator.url)
            _notice_fewer_shards(args, spec, view["shards_total"], view["size"])
            if args.detach:
                print(job_id)
                return 0
            if spec.output is None:
                _widen_stdout_pipe()
            await stream_output(
                coordinator, view, sys.stdout.buffer, show_progress=show_progress, cancel_on_interrupt=True
            )
            if args.stats:
                view = await coordinator.job_with_shards(job_id)
                summary = {
                    "job_id": job_id,
                    "size": view["size"],
                    "shards": view["shards_total"],
                    "output": view["output"],
                    "retries": view["retries"],
                    "elapsed_s": round((view["finished_at"] or time.time()) - view["created_at"], 3),
                    "emitted": [shard["emitted"] for shard in view["shards"]],
                }
                print(json.dumps(summary), file=sys.stderr)
        return 0

    return run_job_loop(go, use_uvloop=not args.no_uvloop)


#: How much a pipe on stdout may hold (Linux's default limit for any user,
#: /proc/sys/fs/pipe-max-size): the whole output passes through it.
_STDOUT_PIPE_BYTES = 1024 * 1024


def _widen_stdout_pipe() -> None:
    """Let a pipe on stdout hold 1 MiB instead of 64 KiB (Linux), if it is one.

    Every output byte goes through it: with 64 KiB its reader is woken, and
    our copy blocks, once per 64 KiB, 16 times as often.  Anything that
    fails (not a pipe, not Linux, the limit lowered) leaves it as it was."""
    try:
        descriptor = sys.stdout.fileno()
        if stat.S_ISFIFO(os.fstat(descriptor).st_mode) and (
            fcntl.fcntl(descriptor, fcntl.F_GETPIPE_SZ) < _STDOUT_PIPE_BYTES
        ):
            fcntl.fcntl(descriptor, fcntl.F_SETPIPE_SZ, _STDOUT_PIPE_BYTES)
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: no F_SETPIPE_SZ off Linux
        log.debug("stdout's pipe keeps its size: %s", exc)


def _notice_fewer_shards(args: argparse.Namespace, spec: JobSpec, shards: int, size: int) -> None:
    """One line on stderr when the coordinator lowered an -n the user gave (--min-shard-bytes)."""
    if shards < spec.shards and args.shards is not None:
        print(
            f"shardline: using {shards} shard{'s' if shards > 1 else ''}, not {spec.shards}: the source's {size} "
            f"bytes give more shards less than --min-shard-bytes ({spec.min_shard_bytes}) each; --exact-shards "
            f"keeps -n {spec.shards}",
            file=sys.stderr,
        )


def _dry_run(args: argparse.Namespace, spec: JobSpec) -> int:
    """--dry-run: what an embedded run would do, from the source's size and ETag; nothing is started."""
    from ..io.sources import open_source

    _check_aws(spec)

    async def plan() -> int:
        async with open_source(spec.source, AwsSettings()) as source:
            info = await source.stat()
            shards = usable_shards(info.size, spec.shards, spec.min_shard_bytes)
            if shards > 1:  # as shard 0's worker would
                first = bytearray(min(info.size, COMPRESSION_MAGIC_BYTES))
                await source.read_into(0, memoryview(first), etag=info.etag)
                if (name := compression_format(bytes(first))) is not None:
                    raise InputError(compressed_input_message(spec.source, name))
        lowered = f" (-n {spec.shards} lowered: --min-shard-bytes {spec.min_shard_bytes})"
        ranges = [ShardRange.of(info.size, shards, index) for index in range(shards)]
        workers = f"{_workers(args, spec)} workers" + (
            f", at most {args.max_processes} at once" if args.max_processes else ""
        )
        lines = [
            f"source: {spec.source}",
            f"size: {info.size} bytes",
            f"etag: {info.etag}",
            f"shards: {shards}{lowered if shards < spec.shards else ''}",
            *(f"  shard {r.index}: [{r.start}, {r.end})" for r in ranges),
            f"command: {spec.command or '(none: the output is the input)'}",
            f"backend: local ({workers})",
            f"store: {_markers_location(args, create=False)}",
            f"output: {spec.output or 'stdout'}",
        ]
        print("\n".join(lines))
        return 0

    return run_job_loop(plan, use_uvloop=not args.no_uvloop)


def _workers(args: argparse.Namespace, spec: JobSpec) -> str:
    """--workers, else the default for the source: "inprocess" for a local file,
    "process" for S3.

    A local file's range reaches its command by `os.splice` (the kernel moves
    the bytes; this process checksums them at hardware speed), so its shards
    need no core of their own, and a worker process per core would only add
    its Python start (about 0.15 CPU-s each, half of a run's fixed start).
    S3 parts pass through Python buffers: their shards need the cores.
    """
    if args.workers is not None:
        return str(args.workers)
    return "process" if is_s3_url(spec.source) else "inprocess"


def _check_aws(spec: JobSpec) -> None:
    if is_s3_url(spec.source) and not aws_configured():
        raise ConfigurationError(
            f"{spec.source} needs AWS configuration (credentials and region, or AWS_ENDPOINT_URL_S3 for an "
            "S3-compatible server); none was found in the environment"
        )


class _CurrentStderr:
    """Bytes to whatever `sys.stderr` is when they are written: the progress
    display replaces it while it is shown, and keeps its line apart."""

    def write(self, data: bytes) -> int:
        return sys.stderr.buffer.write(data)

    def flush(self) -> None:
        sys.stderr.flush()


def _markers_location(args: argparse.Namespace, *, create: bool = True) -> str:
    """Where an embedded run's markers go (see `run --help`, --store)."""
    from ..io.statedir import default_state_dir, ensure_private_dir
    from ..io.store import STORE_FILE, dynamodb_location, sqlite_location

    store = args.store
    if store == "auto":
        store = "dynamodb" if os.environ.get("AWS_ENDPOINT_URL_DYNAMODB") else "sqlite"
    if store == "dynamodb":
        return dynamodb_location(args.markers_table)
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else default_state_dir()
    if create:
        state_dir = ensure_private_dir(state_dir)
    return sqlite_location(os.path.join(state_dir, STORE_FILE))
