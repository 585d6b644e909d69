# `shardline serve` (the coordinator daemon: settings from the command line,
# the token it requires, the ready line) and `shardline token` (print or make
# a daemon's token).  The daemon's modules are imported only when it starts.

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ._loop import run_loop

__all__ = ["serve_command", "token_command"]


def serve_command(args: argparse.Namespace) -> int:
    """`shardline serve`."""
    from ..coordinator import HttpLimits
    from ..daemon import ServeSettings, resolve_store, serve
    from ..io.aws import AwsSettings
    from ..io.statedir import default_state_dir
    from ..protocol import JobLimits

    fields: dict[str, Any] = {"jobs_table": args.jobs_table} if args.jobs_table else {}
    if args.lease_timeout:
        fields["lease_s"] = args.lease_timeout
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
        store=resolve_store(args.store, lambda_function=args.function, environ=os.environ),
        store_path=os.path.abspath(args.store_path) if args.store_path else None,
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

    return run_loop(go, use_uvloop=not args.no_uvloop)


def _serve_token(args: argparse.Namespace, state_dir: str) -> tuple[str | None, str | None]:
    """The token `serve` requires, and where it is kept (for the ready line).

    --token-file, else $SHARDLINE_TOKEN, else on a loopback --host the token
    in the state directory (generated on first use, reused after).  Anywhere
    else none, which ServeSettings refuses unless --insecure-no-auth.
    """
    from ..io.statedir import TOKEN_FILE, check_token, read_or_create_secret, read_token_file
    from ..io.urls import is_loopback_host

    if args.token_file:
        return read_token_file(args.token_file), args.token_file
    if "SHARDLINE_TOKEN" in os.environ:
        return check_token(os.environ["SHARDLINE_TOKEN"], source="SHARDLINE_TOKEN"), "$SHARDLINE_TOKEN"
    if args.insecure_no_auth or not is_loopback_host(args.host):
        return None, None
    path = os.path.join(state_dir, TOKEN_FILE)
    return read_or_create_secret(path), path


def token_command(args: argparse.Namespace) -> int:
    """`shardline token [--file FILE]`."""
    from ..io.statedir import TOKEN_FILE, default_state_dir, read_or_create_secret, read_token_file

    if args.file is not None and os.path.exists(args.file):
        print(read_token_file(args.file))
    else:
        print(read_or_create_secret(args.file or os.path.join(default_state_dir(), TOKEN_FILE)))
    return 0
