"""AWS client configuration and error translation, shared by worker and coordinator.

Settings are built once at the edge (the CLI, a Lambda event) and passed
down; nothing below reads the environment except botocore itself, which
honours the standard chain (credentials, region, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL_DYNAMODB``) for every field left
as None here (`client_environment` only fingerprints what that chain reads,
so no client is made from credentials that have since changed).  botocore's
own retries are off: `shardline.io.retry` is the one
retry loop, and it needs to see every failure to resume ranged GETs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import (
    ConfigurationError,
    ObjectChangedError,
    ShardlineError,
    SourceAccessError,
    SourceNotFoundError,
    StorageError,
    StorageNetworkError,
    StorageThrottledError,
    StorageTimeoutError,
)
from .aio import wait_uncancellable
from .collector import collection_paused

__all__ = [
    "AWS_CREDENTIAL_VARIABLES",
    "AwsSettings",
    "BlockingClient",
    "ClientPool",
    "LazyClient",
    "aws_configured",
    "client",
    "client_environment",
    "translate_error",
]

log = logging.getLogger("shardline.io.aws")

DEFAULT_REGION = "us-east-1"

_Resource = TypeVar("_Resource")

#: Environment variables that hold AWS credentials, or say where to fetch
#: them (a container credentials endpoint, a web identity token).  The daemon
#: keeps them out of commands' environments (`shardline serve
#: --command-aws-credentials` lets them through).
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
)

#: Error codes that ask us to slow down, and ones of a transient server-side failure.
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "429",
    }
)
#: What else botocore's chain reads from the environment when it makes a
#: client: where it talks to, in which region, from which profile.
_CLIENT_VARIABLES = (
    *AWS_CREDENTIAL_VARIABLES,
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_LAMBDA",
)
_TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "504"})
_TRANSIENT_CODES = frozenset(
    {
        "ServiceUnavailable",
        "InternalError",
        "InternalServerError",
        "TransactionInProgressException",
        "500",
        "502",
        "503",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_ACCESS_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidObjectState"})
_CHANGED_CODES = frozenset({"PreconditionFailed", "412"})


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsSettings:
    """How to reach S3 and DynamoDB.  None means "let botocore decide"."""

    region: str | None = None
    s3_endpoint_url: str | None = None
    dynamodb_endpoint_url: str | None = None
    lambda_endpoint_url: str | None = None
    #: Static credentials for both services (tests, explicit configuration).
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    #: Static credentials for DynamoDB only: the embedded endpoint's, so that
    #: S3 keeps using the standard credential chain.
    dynamodb_access_key_id: str | None = None
    dynamodb_secret_access_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_pool_connections: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AwsSettings:
        return cls(**data)


def aws_configured(environ: dict[str, str] | None = None, home: Path | None = None) -> bool:
    """True if the environment names any AWS credentials or endpoint.

    Looks only at variables and config files, never at instance metadata, so
    deciding to run embedded costs no network round trip.
    """
    env = os.environ if environ is None else environ
    keys = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_LAMBDA_FUNCTION_NAME",
    )
    if any(env.get(key) for key in keys):
        return True
    base = Path.home() if home is None else home
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE"), env.get("AWS_CONFIG_FILE")]
    candidates = [Path(f) for f in files if f] + [base / ".aws" / "credentials", base / ".aws" / "config"]
    return any(path.is_file() for path in candidates)


def import_libraries() -> None:
    """Import the AWS client stack now (about a quarter of a CPU-second), not
    at the first request: a worker process started ahead of an S3 job does it
    while the coordinator is still statting the object."""
    with collection_paused():
        import aiobotocore.config
        import aiobotocore.session  # noqa: F401
        import botocore.exceptions  # noqa: F401


def client_environment() -> tuple[str | None, ...]:
    """The values, now, of the environment variables botocore's chain reads
    to make a client (credentials, region, endpoints, profile).

    A client keeps what it read when it was made: when this changes (AWS
    Lambda rotates the role credentials it puts in the environment), clients
    made before must give way to new ones.
    """
    return tuple(os.environ.get(name) for name in _CLIENT_VARIABLES)


def _credentials(settings: AwsSettings, service: str) -> tuple[str | None, str | None]:
    """The static credentials `settings` give `service` (None, None: botocore's chain)."""
    if service == "dynamodb" and settings.dynamodb_access_key_id:
        return settings.dynamodb_access_key_id, settings.dynamodb_secret_access_key
    return settings.access_key_id, settings.secret_access_key


@functools.lru_cache(maxsize=16)
def _session(
    credentials: tuple[str | None, str | None],
    region: str | None,
    environment: tuple[str | None, ...],
    *,
    blocking: bool = False,
) -> Any:
    """One aiobotocore session per set of credentials, whatever the service:
    its clients share what the session loaded and resolved (the endpoint
    data, the credentials, the config files), so a second service's client
    costs ~35 ms of CPU instead of ~60 in a session of its own.  botocore's
    session, not aioboto3's: the boto3 layer (resources, transfer methods)
    is not used, and importing it costs ~10 ms per process.  `environment`
    is `client_environment()`, part of the key because a session keeps the
    credentials it resolved first, and hands them to every later client.
    `blocking`: botocore's own session, for `BlockingClient`s."""
    if blocking:
        from botocore.session import get_session
    else:
        from aiobotocore.session import get_session

    session = get_session()
    key, secret = credentials
    if key or secret:
        session.set_credentials(key, secret)
    if region is not None:
        session.set_config_variable("region", region)
    return session


def _client_args(settings: AwsSettings, service: str, session: Any, max_pool_connections: int | None) -> dict[str, Any]:
    """`create_client`'s arguments but the config class: endpoint, region and the config's fields."""
    endpoint = {
        "s3": settings.s3_endpoint_url,
        "dynamodb": settings.dynamodb_endpoint_url,
        "lambda": settings.lambda_endpoint_url,
    }[service]
    config = dict(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # total_max_attempts counts the first request too: exactly one try.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max_pool_connections or settings.max_pool_connections,
        # S3-compatible servers (moto, SeaweedFS, MinIO) want path-style URLs.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    region = settings.region or session.get_config_variable("region") or DEFAULT_REGION
    return {"endpoint_url": endpoint, "region_name": region, "config": config}


@asynccontextmanager
async def client(settings: AwsSettings, service: str, *, max_pool_connections: int | None = None) -> AsyncIterator[Any]:
    """An aiobotocore client for `service` ("s3", "dynamodb" or "lambda"), closed on exit.

    `max_pool_connections` overrides the settings' limit of connections
    the client keeps open at once (a client shared by many shards needs more).
    """
    async with AsyncExitStack() as stack:
        # Its model's objects live as long as the client (io/collector.py).
        with collection_paused():
            from aiobotocore.config import AioConfig

            session = _session(_credentials(settings, service), settings.region, client_environment())
            args = _client_args(settings, service, session, max_pool_connections)
            args["config"] = AioConfig(**args["config"])
            made = await stack.enter_async_context(session.create_client(service, **args))
        log.debug("created a %s client (endpoint %s)", service, args["endpoint_url"] or "botocore's")
        yield made


#: The threads `BlockingClient` calls run in: not the loop's default executor,
#: whose shutdown at the loop's end would wait for a call abandoned by a
#: cancelled caller (up to its timeout).
_BLOCKING_CALLS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="aws-blocking")
#: botocore's sessions are not thread-safe: its clients are made one at a time.
_BLOCKING_CREATION = threading.Lock()


class BlockingClient:
    """A botocore (blocking) client awaited like an aiobotocore one: every
    operation, ``await client.head_object(...)``, runs in a thread.

    For a process whose AWS calls are a few small requests answered by a
    dict (an embedded coordinator's stat, table check and fences): botocore
    alone imports in about half the CPU time that aiohttp and aiobotocore
    add to it (~0.09 s against ~0.17-0.2 s here), a cost on `shardline
    run`'s path to its first task.
    Operations only: no streaming bodies (`get_object`), paginators or
    waiters -- those belong to aiobotocore clients.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @classmethod
    async def create(cls, settings: AwsSettings, service: str, *, max_pool_connections: int | None = None) -> Any:
        """A client for `service`, made in a thread (loading its model is ~25-80 ms of CPU)."""

        def make() -> BlockingClient:
            with _BLOCKING_CREATION, collection_paused():  # what it loads lives as long as the client
                from botocore.config import Config

                credentials = _credentials(settings, service)
                session = _session(credentials, settings.region, client_environment(), blocking=True)
                args = _client_args(settings, service, session, max_pool_connections)
                args["config"] = Config(**args["config"])
                made = cls(session.create_client(service, **args))
            log.debug("created a blocking %s client (endpoint %s)", service, args["endpoint_url"] or "botocore's")
            return made

        return await asyncio.get_running_loop().run_in_executor(_BLOCKING_CALLS, make)

    def __getattr__(self, name: str) -> Any:
        if name in ("get_paginator", "get_waiter") or name.startswith("_"):
            raise AttributeError(f"a BlockingClient has no {name!r}: use an aiobotocore client")
        operation = getattr(self._inner, name)
        if not callable(operation):  # `meta`, `exceptions`: as they are
            return operation

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(
                _BLOCKING_CALLS, functools.partial(operation, *args, **kwargs)
            )

        return call

    def close(self) -> None:
        self._inner.close()


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def translate_error(exc: BaseException, *, what: str) -> ShardlineError:
    """Map a botocore / aiohttp / OS error about `what` to a ShardlineError.

    Transient causes become a RetryableStorageError (timeout, network or
    throttling), so `shardline.io.retry` can tell them apart from failures no
    retry will fix.
    """
    import aiohttp
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ShardlineError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigurationError(f"{what}: no usable AWS credentials ({exc})")
    if isinstance(exc, ParamValidationError):
        return ConfigurationError(f"{what}: {exc}")
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message") or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _CHANGED_CODES or status == 412:
            return ObjectChangedError(f"{what}: the object changed during the job (ETag no longer matches)")
        if code in _THROTTLE_CODES or status == 429:
            return StorageThrottledError(f"{what}: {code}: {message}")
        if code in _TIMEOUT_CODES:
            return StorageTimeoutError(f"{what}: {code}: {message}")
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageNetworkError(f"{what}: {code}: {message}")
        if code in _NOT_FOUND_CODES:
            kind = "bucket" if code == "NoSuchBucket" else "object"
            return SourceNotFoundError(f"{what}: no such {kind} ({code})")
        if code in _ACCESS_CODES:
            return SourceAccessError(f"{what}: access denied ({code}: {message})")
        return StorageError(f"{what}: {code}: {message}")
    if isinstance(exc, (TimeoutError, ReadTimeoutError, ConnectTimeoutError, aiohttp.ServerTimeoutError)):
        return StorageTimeoutError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (BotoCoreError, OSError, aiohttp.ClientError)):
        return StorageNetworkError(f"{what}: {type(exc).__name__}: {exc}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


class LazyClient:
    """One aiobotocore client for `service` (a `BlockingClient` if
    `blocking`), created on first use (so an owner that never calls costs
    nothing; concurrent first uses share one) and closed by `aclose()`,
    after which it refuses to make another."""

    def __init__(
        self, aws: AwsSettings, service: str, *, max_pool_connections: int | None = None, blocking: bool = False
    ) -> None:
        self._aws = aws
        self._service = service
        self._max_pool_connections = max_pool_connections
        self._blocking = blocking
        self._exit_stack = AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def opened(self) -> bool:
        """Whether the client has been made (and not closed yet)."""
        return self._client is not None

    async def get(self) -> Any:
        if self._closed:
            raise RuntimeError(f"the {self._service} client is closed")
        if self._client is None:
            async with self._lock:
                if self._client is None and self._blocking:
                    made = await BlockingClient.create(
                        self._aws, self._service, max_pool_connections=self._max_pool_connections
                    )
                    self._exit_stack.callback(made.close)
                    self._client = made
                elif self._client is None:
                    self._client = await self._exit_stack.enter_async_context(
                        client(self._aws, self._service, max_pool_connections=self._max_pool_connections)
                    )
        return self._client

    async def aclose(self) -> None:
        self._closed = True
        self._client = None
        await wait_uncancellable(asyncio.ensure_future(self._exit_stack.aclose()))


class ClientPool:
    """Clients shared by every shard a process runs: one per (settings, service).

    Making a client costs milliseconds of CPU (its service model, an SSL
    context with the system's trust store loaded, a connection pool); made
    per shard, that was most of a small shard's cost.  Clients are created on
    first use and kept, with their open connections, until `aclose()`.
    aiobotocore clients take concurrent requests from any number of tasks on
    the one event loop they were made on, so a pool belongs to one loop: make
    it where the loop runs and close it before the loop ends.

    Each client may hold `aws.max_pool_connections` x `shards_at_once`
    connections, what that many shards with a client each could hold.
    Other per-process resources (a SQLite store's connection and thread)
    are kept the same way with `shared`.

    `blocking`: its clients are `BlockingClient`s (operations only), for a
    process that never needs aiobotocore otherwise.
    """

    def __init__(self, *, shards_at_once: int = 1, blocking: bool = False) -> None:
        if shards_at_once < 1:
            raise ValueError(f"shards_at_once must be >= 1, got {shards_at_once}")
        self._shards_at_once = shards_at_once
        self._blocking = blocking
        self._clients: dict[tuple[AwsSettings, str], LazyClient] = {}
        self._resources: dict[Hashable, tuple[Any, Callable[[Any], Awaitable[None]]]] = {}
        self._closed = False

    def lazy(self, aws: AwsSettings, service: str) -> LazyClient:
        """The shared client for `service` with `aws`; the pool closes it, its users must not."""
        if self._closed:
            raise RuntimeError("the client pool is closed")
        key = (aws, service)
        shared = self._clients.get(key)
        if shared is None:
            limit = aws.max_pool_connections * self._shards_at_once
            shared = self._clients[key] = LazyClient(aws, service, max_pool_connections=limit, blocking=self._blocking)
        return shared

    async def get(self, aws: AwsSettings, service: str) -> Any:
        """The shared aiobotocore client itself, created on first use."""
        return await self.lazy(aws, service).get()

    @property
    def clients_open(self) -> int:
        """How many clients the pool has made and holds open."""
        return sum(shared.opened for shared in self._clients.values())

    def shared(
        self, key: Hashable, make: Callable[[], _Resource], close: Callable[[_Resource], Awaitable[None]]
    ) -> _Resource:
        """The resource kept under `key`, made by `make()` the first time;
        `close(resource)` runs when the pool closes (its users must not close it)."""
        if self._closed:
            raise RuntimeError("the client pool is closed")
        if key not in self._resources:
            self._resources[key] = (make(), close)
        resource: _Resource = self._resources[key][0]
        return resource

    async def aclose(self) -> None:
        """Close every client and resource (idempotent); the pool refuses new ones after."""
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        resources, self._resources = list(self._resources.values()), {}
        for shared in clients:
            await shared.aclose()
        for resource, close in resources:
            await wait_uncancellable(asyncio.ensure_future(close(resource)))

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
