# The commands that talk to a `shardline serve` daemon: the client they
# share (`run --coordinator` too), with its token discovery, `status`,
# `cancel` and `output`, and `stream_output`, which both `run --coordinator`
# and `output` use.  They import `shardline.client` (aiohttp), never a
# coordinator module: a client needs none of the daemon.
#
# Interrupts (Ctrl-C, SIGTERM, a closed stdout): `run --coordinator` started
# the job for this terminal, so stopping it cancels the job; `output` only
# watches a job that runs anyway (a `run --detach`, an earlier client), so
# stopping it leaves the job running and says how to re-attach.  If the
# daemon goes away mid-stream, the client exits 1 naming the job and the
# `shardline output` command that shows its output from the start.

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ConfigurationError, ShardlineError
from ._format import format_job, format_jobs
from ._loop import cancel_on_sigterm, run_loop
from ._progress import ProgressDisplay, RemoteProgress, poll_progress, progress_wanted

if TYPE_CHECKING:
    from ..client import CoordinatorClient

__all__ = ["cancel_command", "coordinator_client", "output_command", "status_command", "stream_output"]

log = logging.getLogger("shardline.cli")


def coordinator_client(args: argparse.Namespace) -> CoordinatorClient:
    """The client of --coordinator (or $SHARDLINE_COORDINATOR), with its token and CA."""
    from ..client import CoordinatorClient

    if not args.coordinator:
        raise ConfigurationError(
            f"'{args.subcommand}' needs a coordinator: pass --coordinator URL or set SHARDLINE_COORDINATOR"
        )
    return CoordinatorClient(args.coordinator, token=_client_token(args), ca_file=args.coordinator_ca)


def _client_token(args: argparse.Namespace) -> str | None:
    """--token-file, else $SHARDLINE_TOKEN, else a local daemon's generated token, else none."""
    from urllib.parse import urlsplit

    from ..io.statedir import TOKEN_FILE, check_token, default_state_dir, read_secret, read_token_file
    from ..io.urls import is_loopback_host

    if args.token_file:
        return read_token_file(args.token_file)
    if "SHARDLINE_TOKEN" in os.environ:
        return check_token(os.environ["SHARDLINE_TOKEN"], source="SHARDLINE_TOKEN")
    # Like Jupyter: a daemon on this machine left its token in our state
    # directory.  Never sent anywhere else: it would give the token away.
    if is_loopback_host(urlsplit(args.coordinator).hostname or ""):
        return read_secret(os.path.join(default_state_dir(), TOKEN_FILE))
    return None


def status_command(args: argparse.Namespace) -> int:
    """`shardline status [ID]`."""

    async def go() -> int:
        async with coordinator_client(args) as coordinator:
            if args.id:
                view = await coordinator.job_with_shards(args.id)
                print(json.dumps(view, indent=2) if args.json else format_job(view))
            else:
                jobs = await coordinator.jobs()
                print(json.dumps({"jobs": jobs}, indent=2) if args.json else format_jobs(jobs))
        return 0

    return run_loop(go, use_uvloop=not args.no_uvloop)


def cancel_command(args: argparse.Namespace) -> int:
    """`shardline cancel ID`."""

    async def go() -> int:
        async with coordinator_client(args) as coordinator:
            view = await coordinator.cancel(args.id)
        if view["state"] == "cancelled":
            print(f"job {view['id']} cancelled")
        else:
            print(f"job {view['id']} had already {view['state']}; nothing to cancel")
        return 0

    return run_loop(go, use_uvloop=not args.no_uvloop)


def output_command(args: argparse.Namespace) -> int:
    """`shardline output ID`: stream a job's output from its start (re-attach)."""
    show_progress = progress_wanted(args)

    async def go() -> int:
        cancel_on_sigterm()
        async with coordinator_client(args) as coordinator:
            view = await coordinator.job(args.id)  # resolves a prefix to the job's id
            await stream_output(
                coordinator, view, sys.stdout.buffer, show_progress=show_progress, cancel_on_interrupt=False
            )
        return 0

    try:
        return run_loop(go, use_uvloop=not args.no_uvloop)
    except asyncio.CancelledError:  # SIGTERM: stream_output said that the job goes on
        return 143


def reattach_command(coordinator: CoordinatorClient, job_id: str) -> str:
    """The command line that streams job `job_id`'s output again."""
    return f"shardline output {job_id} --coordinator {coordinator.url}"


async def stream_output(
    coordinator: CoordinatorClient,
    view: dict[str, object],
    out: BinaryIO,
    *,
    show_progress: bool,
    cancel_on_interrupt: bool,
) -> None:
    """Write the output of the job `view` describes to `out`, with the progress
    line if `show_progress`.  Interrupted, it cancels the job if
    `cancel_on_interrupt`, else leaves it running; a daemon that goes away
    is a ShardlineError naming the job and how to re-attach."""
    from ..client import CoordinatorUnreachableError, OutputStreamBrokenError

    job_id = str(view["id"])
    display = ProgressDisplay(sys.stderr) if show_progress else None
    poller = None
    sink = out
    if display is not None:
        sink = display.install(out)
        # The view lists one page of shards; the total is its own field.
        total = view["shards_total"]
        progress = RemoteProgress(shards=total if isinstance(total, int) else 0, started=time.monotonic())
        poller = asyncio.create_task(poll_progress(coordinator, job_id, progress))
        display.attach(lambda: progress)
    log.info("streaming the output of job %s from %s", job_id, coordinator.url)
    try:
        async for chunk in coordinator.output(job_id):
            sink.write(chunk)
        sink.flush()
    except (asyncio.CancelledError, BrokenPipeError):
        if cancel_on_interrupt:
            # Interrupted, terminated or `| head`: the job is ours, stop it.
            await asyncio.shield(_cancel_quietly(coordinator, job_id))
        else:
            print(
                f"shardline: job {job_id} goes on without this client; "
                f"re-attach with: {reattach_command(coordinator, job_id)}",
                file=sys.stderr,
            )
        raise
    except (CoordinatorUnreachableError, OutputStreamBrokenError) as exc:
        raise ShardlineError(
            f"lost the coordinator while streaming job {job_id} (the output written so far is incomplete): {exc}; "
            f"once it is back, re-attach with: {reattach_command(coordinator, job_id)}"
        ) from None
    finally:
        if poller is not None:
            poller.cancel()
        if display is not None:
            await display.close()


async def _cancel_quietly(coordinator: CoordinatorClient, job_id: str) -> None:
    try:
        await coordinator.cancel(job_id)
    except ShardlineError as exc:
        print(f"shardline: could not cancel job {job_id} on {coordinator.url}: {exc}", file=sys.stderr)
    else:
        print(f"shardline: job {job_id} cancelled", file=sys.stderr)


def logs_command(args: argparse.Namespace) -> int:
    """`shardline logs ID [--shard K]`."""

    async def go() -> int:
        async with coordinator_client(args) as coordinator:
            text = await coordinator.logs(args.id, args.shard)
        sys.stdout.write(text)
        return 0

    return run_loop(go, use_uvloop=not args.no_uvloop)
