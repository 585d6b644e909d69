# The options of `shardline serve`, the coordinator daemon, by group:
# where it listens, where jobs may write, Lambda workers, TLS on the
# exchange, who may use the API, and what one client or job may cost.

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..protocol import DEFAULT_MARKER_TABLE
from ._options import add_common_options, port, positive_float, positive_int, size

if TYPE_CHECKING:
    from ._options import Subcommands

__all__ = ["add_serve_parser"]


def add_serve_parser(sub: Subcommands) -> None:
    """`shardline serve`: the coordinator daemon."""
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
        '      -d \'{"source": "s3://bucket/big.log", "shards": 8, "command": "grep -c ERROR", "ok_exit": [0, 1]}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default: 127.0.0.1)")
    serve.add_argument("--port", type=port, default=8080, help="HTTP port, 0 for any free one (default: 8080)")
    serve.add_argument(
        "--exchange-host", default="127.0.0.1", help="listen address for worker connections (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--exchange-port", type=port, default=0, help="port for worker connections (default: any free one)"
    )
    serve.add_argument(
        "--advertise-host",
        default=None,
        help="address workers use to reach the exchange, when it differs from --exchange-host (NAT, containers)",
    )
    serve.add_argument(
        "--store",
        choices=("auto", "sqlite", "dynamodb"),
        default="auto",
        help="where job state and boundary markers live: 'sqlite' (a file, --store-path; default "
        "shardline.db in the state directory), 'dynamodb' (--jobs-table and --markers-table), 'auto' "
        "(default): dynamodb when Lambda workers are enabled (--function: they cannot reach a file here) or "
        "AWS_ENDPOINT_URL_DYNAMODB is set, else sqlite. Daemons sharing one store (the same --store-path, or "
        "the same tables) share its jobs: each owns its jobs under a lease and takes over the jobs of one that "
        "died once their lease has run out",
    )
    serve.add_argument(
        "--store-path", default=None, metavar="FILE", help="the SQLite store's file (default: in the state directory)"
    )
    serve.add_argument(
        "--lease-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="a job's lease lasts this long unless its daemon renews it (every third of it); another daemon "
        "sharing the store takes over a job whose lease ran out (default: 30)",
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
        type=positive_int,
        default=None,
        help="shard attempts running at once over all jobs, in one worker process per CPU (default: 4 x CPUs)",
    )
    _add_outputs(serve)
    _add_lambda(serve)
    _add_exchange_tls(serve)
    _add_access(serve)
    _add_limits(serve)
    serve.add_argument(
        "--command-aws-credentials",
        action="store_true",
        help="pass the daemon's AWS credential variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN, container and web identity credentials, ...) on to commands; by default only the "
        "workers get them, to read and write S3, and commands do not",
    )
    serve.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running jobs may take to finish before they are stopped and left to "
        "resume (default: 30)",
    )
    add_common_options(serve)


def _add_outputs(serve: argparse.ArgumentParser) -> None:
    """Where jobs may write their outputs."""
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


def _add_lambda(serve: argparse.ArgumentParser) -> None:
    """The lambda backend."""
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
        type=positive_int,
        default=None,
        help="Lambda attempts running at once, over all jobs (default: 100)",
    )
    lambda_.add_argument(
        "--staging",
        default=None,
        metavar="S3_PREFIX",
        help="s3://bucket/prefix/ where Lambda workers upload attempt outputs for the coordinator to collect",
    )


def _add_exchange_tls(serve: argparse.ArgumentParser) -> None:
    """TLS on the exchange port."""
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


def _add_access(serve: argparse.ArgumentParser) -> None:
    """Who may use the HTTP API, and the state directory holding its generated token."""
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


def _add_limits(serve: argparse.ArgumentParser) -> None:
    """What one HTTP client or job may cost the daemon."""
    limits = serve.add_argument_group("limits on what one client or job may ask for")
    limits.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        metavar="N",
        help="HTTP connections open at once, output streams included; more are answered 503 (default: 256)",
    )
    limits.add_argument(
        "--max-shards", type=positive_int, default=None, metavar="N", help="shards of one job (default: 100000)"
    )
    limits.add_argument(
        "--max-attempts",
        type=positive_int,
        default=None,
        metavar="N",
        help="attempts per shard a job may ask for (default: 10)",
    )
    limits.add_argument(
        "--max-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="each of a job's start, heartbeat and total timeouts (default: 604800, a week)",
    )
    limits.add_argument(
        "--max-part-size", type=size, default=None, metavar="SIZE", help="a job's part_size_bytes (default: 256M)"
    )
    limits.add_argument(
        "--max-in-flight",
        type=size,
        default=None,
        metavar="SIZE",
        help="a job's max_in_flight_bytes, the download memory of each running shard (default: 1G)",
    )
