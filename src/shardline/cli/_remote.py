# The commands that talk to a `shardline serve` daemon: the client they
# share (`run --coordinator` too), with its token discovery, and `status`
# and `cancel`.  They import `shardline.client` (aiohttp), never a
# coordinator module: a client needs none of the daemon.

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from ._format import format_job, format_jobs
from ._loop import run_loop

if TYPE_CHECKING:
    from ..client import CoordinatorClient

__all__ = ["cancel_command", "coordinator_client", "status_command"]


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
                view = await coordinator.job(args.id)
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


def logs_command(args: argparse.Namespace) -> int:
    """`shardline logs ID [--shard K]`."""

    async def go() -> int:
        async with coordinator_client(args) as coordinator:
            text = await coordinator.logs(args.id, args.shard)
        sys.stdout.write(text)
        return 0

    return run_loop(go, use_uvloop=not args.no_uvloop)
