# `shardline run`: the job spec from the command line, then the job either
# embedded (an in-process coordinator with local workers) or on a daemon
# (`--coordinator`: submit, then stream the output back and cancel the job
# if we are interrupted, or with --detach print its id and return), with the
# progress line and the --stats summary.

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ..errors import ConfigurationError
from ..io.aws import AwsSettings, aws_configured
from ..protocol import JobSpec, parse_delimiter
from ._loop import cancel_on_sigterm, run_job_loop
from ._progress import ProgressDisplay, progress_wanted
from ._remote import coordinator_client, stream_output

__all__ = ["run_command"]

log = logging.getLogger("shardline.cli")


def run_command(args: argparse.Namespace, command: str | None) -> int:
    """`shardline run SOURCE ... [-- COMMAND]`: on --coordinator if given, else embedded."""
    spec = _job_spec(args, command)
    if args.coordinator:
        return _run_remote(args, spec)
    return _run_embedded(args, spec)


def _job_spec(args: argparse.Namespace, command: str | None) -> JobSpec:
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


def _run_embedded(args: argparse.Namespace, spec: JobSpec) -> int:
    """The job in this process: an in-process coordinator, local workers, markers in
    the SQLite store (or DynamoDB, by --store)."""
    from ..coordinator import Backend, CoordinatorSettings, LocalProcessBackend, OutputPolicy
    from ..embedded import DEFAULT_INPROCESS_CONCURRENCY, InProcessBackend, run_embedded

    if spec.backend not in (None, "local"):
        raise ConfigurationError(
            f"--backend {spec.backend} runs on a coordinator: start 'shardline serve --function ...' and pass "
            "--coordinator URL (an embedded run uses local workers)"
        )

    if spec.source.startswith("s3://") and not aws_configured():
        raise ConfigurationError(
            f"{spec.source} needs AWS configuration (credentials and region, or AWS_ENDPOINT_URL_S3 for an "
            "S3-compatible server); none was found in the environment"
        )
    from ..io.rlimits import raise_open_files_limit

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
        display = ProgressDisplay(sys.stderr) if show_progress else None
        # On a terminal the output goes through the display, which keeps it off the progress line.
        out = display.install(sys.stdout.buffer) if display is not None else sys.stdout.buffer
        if args.workers == "inprocess":
            backend: Backend = InProcessBackend(max_concurrent=args.max_processes or DEFAULT_INPROCESS_CONCURRENCY)
        else:
            backend = LocalProcessBackend(max_concurrent=args.max_processes)
            await backend.prestart(spec.shards)
        try:
            report = await run_embedded(
                spec,
                out=out,
                aws=AwsSettings(),
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

    return run_job_loop(go, use_uvloop=not args.no_uvloop)


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
            if args.detach:
                print(job_id)
                return 0
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


def _markers_location(args: argparse.Namespace) -> str:
    """Where an embedded run's markers go (see `run --help`, --store)."""
    from ..io.statedir import default_state_dir, ensure_private_dir
    from ..io.store import STORE_FILE, dynamodb_location, sqlite_location

    store = args.store
    if store == "auto":
        store = "dynamodb" if os.environ.get("AWS_ENDPOINT_URL_DYNAMODB") else "sqlite"
    if store == "dynamodb":
        return dynamodb_location(args.markers_table)
    state_dir = ensure_private_dir(os.path.abspath(args.state_dir) if args.state_dir else default_state_dir())
    return sqlite_location(os.path.join(state_dir, STORE_FILE))
