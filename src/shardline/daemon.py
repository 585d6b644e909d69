"""`shardline serve`: the coordinator daemon's composition root.

Wires the store (SQLite in the state directory, or DynamoDB; see
`resolve_store`), the exchange listener (TLS when given a certificate),
the backends (local worker processes, and AWS Lambda when given a
function) and the `Coordinator`, then serves the HTTP API (behind
its guard: token, Host and Origin checks, connection and time limits; TLS
when given a certificate) until SIGTERM or SIGINT.  Shutdown drains: new jobs are refused at once, running
jobs get `drain_timeout_s` to finish, and whatever is still running then is
stopped with its state left in the store, so the next `shardline serve`
resumes it.

Like `embedded`, this module may import `coordinator`, never `worker`:
workers run as separate processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .coordinator import (
    DEFAULT_LAMBDA_CONCURRENCY,
    Backend,
    Coordinator,
    CoordinatorSettings,
    ExchangeServer,
    HttpAccess,
    HttpLimits,
    HttpServer,
    LambdaBackend,
    LocalProcessBackend,
    OutputPolicy,
    server_tls_context,
)
from .errors import ConfigurationError
from .io.aws import AWS_CREDENTIAL_VARIABLES, AwsSettings, client
from .io.processes import hide_environment
from .io.retry import RetryPolicy
from .io.rlimits import raise_open_files_limit
from .io.statedir import (
    COORDINATOR_KEY_FILE,
    default_state_dir,
    ensure_private_dir,
    read_or_create_key,
    read_or_create_secret,
)
from .io.store import (
    DEFAULT_JOBS_TABLE,
    DEFAULT_LEASE_S,
    STORE_FILE,
    DynamoJobStore,
    JobStore,
    SqliteDatabase,
    SqliteJobStore,
    dynamodb_location,
    ensure_jobs_table,
    ensure_marker_table,
    sqlite_location,
)
from .io.urls import is_loopback_host, parse_s3_prefix
from .protocol import COORDINATOR_KEY_BYTES, DEFAULT_MARKER_TABLE, JobLimits

__all__ = ["ServeSettings", "serve"]

log = logging.getLogger("shardline.daemon")

#: After draining, how long in-flight HTTP requests (output streams of jobs
#: that finished during the drain, still being read) may take before their
#: connections are closed.
HTTP_SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    exchange_host: str = "127.0.0.1"
    #: 0 picks a free port; workers learn it from their task.
    exchange_port: int = 0
    #: Address workers dial to reach the exchange (default: the listener's own).
    advertise_host: str | None = None
    #: Every HTTP route but /healthz requires ``Authorization: Bearer <token>``.
    #: None only with `insecure_no_auth`; the CLI generates one for loopback.
    token: str | None = None
    #: Serve the API without a token: the operator's explicit, logged choice.
    insecure_no_auth: bool = False
    #: More names clients may use in Host ("NAME" or "NAME:PORT"), besides
    #: the address they connect to and, on loopback, localhost.
    allowed_hosts: tuple[str, ...] = ()
    #: PEM files: TLS on the HTTP port (HTTPS only).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Private files that outlive the daemon (its API token, the coordinator key).
    state_dir: str = field(default_factory=default_state_dir)
    #: The most one job may ask for (serve --max-* flags).
    job_limits: JobLimits = JobLimits()
    http_limits: HttpLimits = HttpLimits()
    #: Every storage call of the daemon (S3, its store, marker fences) retries by this.
    retry: RetryPolicy = RetryPolicy()
    #: Where job state and markers live: "sqlite" (a file, `store_path`, default
    #: shardline.db in the state directory) or "dynamodb" (the two tables).
    store: str = "sqlite"
    store_path: str | None = None
    markers_table: str = DEFAULT_MARKER_TABLE
    jobs_table: str = DEFAULT_JOBS_TABLE
    #: A job's lease lasts this long unless renewed; then a coordinator sharing the store may take it over.
    lease_s: float = DEFAULT_LEASE_S
    spool_dir: str | None = None
    max_processes: int | None = None
    drain_timeout_s: float = 30.0
    #: Backend for jobs that name none: "local" or "lambda".
    default_backend: str = "local"
    #: The Lambda worker function (name or ARN); enables the "lambda" backend.
    lambda_function: str | None = None
    lambda_region: str | None = None
    lambda_concurrency: int = DEFAULT_LAMBDA_CONCURRENCY
    #: s3://bucket/prefix/ where Lambda workers upload attempt outputs.
    staging: str | None = None
    #: PEM files: the exchange's certificate chain and key (TLS on), and the
    #: CA workers verify it with (sent to them in each task).
    exchange_tls_cert: str | None = None
    exchange_tls_key: str | None = None
    exchange_ca: str | None = None
    #: The directory below which jobs may write local outputs; None: no local outputs.
    output_root: str | None = None
    #: Buckets jobs may write S3 outputs to; none: no S3 outputs.
    output_buckets: tuple[str, ...] = ()
    #: Let commands see the daemon's AWS credential variables (off: the
    #: workers use them to read S3, commands do not get them).
    command_aws_credentials: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and self.insecure_no_auth:
            raise ConfigurationError("--insecure-no-auth and a token contradict each other: drop one")
        if self.token is None and not self.insecure_no_auth:
            where = (
                f"--host {self.host} is reachable from other machines"
                if not is_loopback_host(self.host)
                else "no API token was given"
            )
            raise ConfigurationError(
                f"{where}, and the HTTP API runs commands: give it a token with --token-file FILE (a file "
                "holding the token; 'shardline token --file FILE' makes one) or $SHARDLINE_TOKEN, or pass "
                "--insecure-no-auth to serve without authentication"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        self.http_access()  # checks --allowed-host before anything starts
        if self.default_backend not in ("local", "lambda"):
            raise ConfigurationError(f"--backend must be local or lambda, got {self.default_backend!r}")
        if self.default_backend == "lambda" and self.lambda_function is None:
            raise ConfigurationError("--backend lambda needs --function NAME_OR_ARN (the worker function)")
        if self.store not in ("sqlite", "dynamodb"):
            raise ConfigurationError(f"--store must be sqlite or dynamodb, got {self.store!r}")
        if self.lambda_function is not None and self.store != "dynamodb":
            raise ConfigurationError(
                "--function: Lambda workers cannot reach a SQLite store on this machine; use --store dynamodb"
            )
        if not self.lease_s > 0:
            raise ConfigurationError(f"--lease-timeout must be > 0 seconds, got {self.lease_s!r}")
        if self.lambda_function is not None and self.staging is None:
            raise ConfigurationError(
                "--function needs --staging s3://bucket/prefix/: Lambda workers upload their outputs there"
            )
        if (self.exchange_tls_cert is None) != (self.exchange_tls_key is None):
            raise ConfigurationError("--exchange-tls-cert and --exchange-tls-key go together")
        if self.exchange_ca is not None and self.exchange_tls_cert is None:
            raise ConfigurationError("--exchange-ca needs --exchange-tls-cert and --exchange-tls-key")

    def http_access(self) -> HttpAccess:
        """Who may use the HTTP API."""
        return HttpAccess(token=self.token, bind_host=self.host, allowed_hosts=self.allowed_hosts)


def _backends(settings: ServeSettings, aws: AwsSettings) -> dict[str, Backend]:
    """The daemon's backends, the default first."""
    backends: dict[str, Backend] = {"local": LocalProcessBackend(max_concurrent=settings.max_processes)}
    if settings.lambda_function is not None:
        assert settings.staging is not None
        backends["lambda"] = LambdaBackend(
            function=settings.lambda_function,
            staging=settings.staging,
            aws=aws,
            region=settings.lambda_region,
            max_concurrency=settings.lambda_concurrency,
            storage_retry=settings.retry,
        )
        if settings.exchange_tls_cert is None:
            log.warning("Lambda workers will reach the exchange over plain TCP: pass --exchange-tls-cert/-key")
    default = backends.pop(settings.default_backend)
    return {settings.default_backend: default, **backends}


def _output_policy(settings: ServeSettings) -> OutputPolicy:
    """Where jobs may write outputs: only where the operator said (DESIGN §9)."""
    root = settings.output_root
    if root is not None:
        if not os.path.isabs(root):
            raise ConfigurationError(f"--output-root must be an absolute path, got {root!r}")
        if not os.path.isdir(root):
            raise ConfigurationError(f"--output-root {root}: not an existing directory")
    for name in settings.output_buckets:
        if "/" in name:
            raise ConfigurationError(f"--output-bucket takes a bucket name (NAME, not s3://NAME/...), got {name!r}")
        parse_s3_prefix(f"s3://{name}", what="--output-bucket")
    return OutputPolicy(local_root=root, s3_buckets=frozenset(settings.output_buckets))


def _read_ca(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the exchange CA {path!r}: {exc}") from exc


def _http_tls(settings: ServeSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return server_tls_context(settings.tls_cert, settings.tls_key, what="the HTTP API's")


def resolve_store(requested: str, *, lambda_function: str | None, environ: Mapping[str, str]) -> str:
    """`--store auto`: DynamoDB when Lambda workers need it (they cannot reach a
    file on this machine) or the environment names a DynamoDB endpoint
    (AWS_ENDPOINT_URL_DYNAMODB); SQLite otherwise, an S3-compatible server
    without a DynamoDB API (SeaweedFS, MinIO) included."""
    if requested != "auto":
        return requested
    if lambda_function is not None or environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        return "dynamodb"
    return "sqlite"


async def _open_store(
    settings: ServeSettings, aws: AwsSettings, stack: contextlib.AsyncExitStack
) -> tuple[JobStore, str]:
    """The job store and where markers go, opened on `stack`."""
    store: JobStore
    if settings.store == "sqlite":
        path = settings.store_path or os.path.join(settings.state_dir, STORE_FILE)
        store = SqliteJobStore(SqliteDatabase(path), retry_policy=settings.retry)
        stack.push_async_callback(store.aclose)
        log.info("job state and markers in %s", path)
        return store, sqlite_location(path)
    dynamodb = await stack.enter_async_context(client(aws, "dynamodb"))
    await ensure_marker_table(dynamodb, settings.markers_table)
    await ensure_jobs_table(dynamodb, settings.jobs_table)
    store = DynamoJobStore(dynamodb, settings.jobs_table, retry_policy=settings.retry)
    log.info("job state in DynamoDB table %s, markers in %s", settings.jobs_table, settings.markers_table)
    return store, dynamodb_location(settings.markers_table)


#: Held (flock) by the daemon that uses a state directory, so that two do not share one.
_STATE_LOCK_FILE = "serve.lock"
#: This daemon's name as a job owner: kept, so a restarted daemon takes its own jobs back at once.
_OWNER_FILE = "coordinator.id"
_state_locks: list[int] = []  # descriptors held for the life of the process


def _claim_state_dir(state_dir: str) -> str:
    """Lock the state directory for this daemon; returns its owner id."""
    ensure_private_dir(state_dir)
    fd = os.open(os.path.join(state_dir, _STATE_LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigurationError(
            f"another 'shardline serve' uses the state directory {state_dir}; give this one its own --state-dir "
            "(daemons may share a store: --store-path, or --store dynamodb)"
        ) from None
    _state_locks.append(fd)
    identity = read_or_create_secret(
        os.path.join(state_dir, _OWNER_FILE), generate=lambda: f"{socket.gethostname()}-{secrets.token_hex(6)}"
    )
    return identity


async def serve(
    settings: ServeSettings, *, aws: AwsSettings, on_ready: Callable[[str, tuple[str, int]], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return.

    `on_ready(http_url, exchange_address)` is called once the HTTP API
    accepts requests (with the real ports when 0 was asked for)."""
    output_policy = _output_policy(settings)
    # Commands run as our (grand)children: keep the token and the
    # credentials in our environment out of their reach.
    hide_environment()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        http_tls = _http_tls(settings)  # a bad certificate fails before anything starts
        raise_open_files_limit()  # every session, pipe and spool file is a descriptor
        coordinator_key = read_or_create_key(
            os.path.join(settings.state_dir, COORDINATOR_KEY_FILE), size_bytes=COORDINATOR_KEY_BYTES
        )
        async with contextlib.AsyncExitStack() as stack:
            owner = await asyncio.to_thread(_claim_state_dir, settings.state_dir)
            store, markers = await _open_store(settings, aws, stack)

            tls = None
            if settings.exchange_tls_cert is not None and settings.exchange_tls_key is not None:
                tls = server_tls_context(settings.exchange_tls_cert, settings.exchange_tls_key)
            exchange = ExchangeServer(host=settings.exchange_host, port=settings.exchange_port, tls=tls)
            await exchange.start()
            stack.push_async_callback(exchange.aclose)
            backends = _backends(settings, aws)
            for backend in backends.values():
                stack.push_async_callback(backend.aclose)
            coordinator = Coordinator(
                aws=aws,
                backends=backends,
                store=store,
                exchange=exchange,
                settings=CoordinatorSettings(
                    markers=markers,
                    jobs_table=settings.jobs_table,
                    lease_s=settings.lease_s,
                    spool_dir=settings.spool_dir,
                    advertise_host=settings.advertise_host,
                    retry=settings.retry,
                    exchange_ca=_read_ca(settings.exchange_ca),
                    output_policy=output_policy,
                    command_env_drop=() if settings.command_aws_credentials else AWS_CREDENTIAL_VARIABLES,
                    job_limits=settings.job_limits,
                ),
                coordinator_key=coordinator_key,
                owner=owner,
            )
            await stack.enter_async_context(coordinator)
            await coordinator.resume()
            await coordinator.sweep_spools()  # after resume(): what no coordinator will resume

            http = HttpServer(
                coordinator,
                host=settings.host,
                port=settings.port,
                access=settings.http_access(),
                limits=settings.http_limits,
                tls=http_tls,
                shutdown_timeout_s=HTTP_SHUTDOWN_GRACE_S,
            )
            await stack.enter_async_context(http)
            if settings.insecure_no_auth:
                log.warning(
                    "THE HTTP API AT %s HAS NO AUTHENTICATION (--insecure-no-auth): anyone who can reach it can "
                    "run commands as this user",
                    http.url,
                )
            if on_ready is not None:
                on_ready(http.url, exchange.address)

            await stop.wait()
            log.warning("stopping: draining running jobs (up to %.0fs)", settings.drain_timeout_s)
            await coordinator.drain(settings.drain_timeout_s)
            # Leaving the stack closes, in order: HTTP, coordinator, workers,
            # exchange, the store.
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
