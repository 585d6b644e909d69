# The coordinator's HTTP API (aiohttp): a thin layer over `Coordinator`.
#
# Handlers translate JSON to JobSpec and JobView to JSON and nothing more;
# every decision lives in the coordinator.  Errors are `{"error": message}`
# with a status chosen by the error's class (`_STATUS_BY_ERROR`), so a
# client can show the coordinator's own message.  The routes are documented
# in openapi.json next to this file; a test checks that both list the same
# paths and methods.
#
# Before any handler runs, the guard middleware refuses what is not ours to
# serve (see `_httpguard`): a Host that names another server, a request from
# a web page, a missing or wrong token (every route but /healthz), a body
# that is not JSON.  `HttpServer` runs the app behind the connection guard
# (connection cap, head deadline) and, optionally, TLS.
#
# Job output is streamed from the coordinator's spool files in bounded
# chunks.  If the job fails after the first byte was sent, the connection is
# closed without the final empty chunk: a client can then never mistake a
# partial output for a complete one.

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_log import AccessLogger

from ..errors import (
    ConfigurationError,
    InputError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    NotAcceptingJobsError,
    RetryableStorageError,
    ShardlineError,
    StorageError,
)
from ..io import COPY_CHUNK_BYTES
from ..protocol import SHARDS_PAGE_DEFAULT, SHARDS_PAGE_MAX, JobSpec
from ._httpguard import (
    ConnectionGuard,
    HostNames,
    HttpAccess,
    HttpLimits,
    guarded_protocol,
    http_refusals,
    is_own_origin,
)
from ._refusals import Refusals

if TYPE_CHECKING:
    from ._release import OutputPiece
    from ._service import Coordinator

__all__ = ["HttpServer", "make_app", "openapi_document"]

log = logging.getLogger("shardline.coordinator.http")


#: Seconds a client is asked to wait (Retry-After) when storage is failing
#: for now: about how long the retry loop has just spent trying.
STORAGE_RETRY_AFTER_S = 5

#: First match wins: subclasses before their bases.
_STATUS_BY_ERROR: tuple[tuple[type[ShardlineError], int], ...] = (
    (JobNotFoundError, 404),
    (NotAcceptingJobsError, 503),
    (ConfigurationError, 400),
    (InputError, 400),
    (JobFailedError, 409),
    (JobCancelledError, 409),
    # Not the client's fault: S3 or DynamoDB failing, for now or for good.
    (RetryableStorageError, 503),
    (StorageError, 502),
)

_COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
_LIMITS: web.AppKey[HttpLimits] = web.AppKey("limits")
_REFUSALS: web.AppKey[Refusals] = web.AppKey("refusals")
#: Set on a request the guard refused; the access log leaves it out.
_REFUSED: web.RequestKey[bool] = web.RequestKey("refused")


def openapi_document() -> dict[str, Any]:
    """The API description served at /openapi.json."""
    text = resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def make_app(
    coordinator: Coordinator,
    *,
    access: HttpAccess,
    limits: HttpLimits = HttpLimits(),
    refusals: Refusals | None = None,
) -> web.Application:
    """The HTTP API over `coordinator`, refusing what `access` does not allow.

    With ``access.token``, every route but /healthz requires
    ``Authorization: Bearer <token>``.  Refusals are counted in the
    coordinator's metrics (or in `refusals`, shared with the connection guard).
    """
    refusals = refusals or http_refusals(coordinator.metrics.http_refused)
    app = web.Application(
        middlewares=[_guard_middleware(access, refusals), _error_middleware], client_max_size=limits.max_body_bytes
    )
    app[_COORDINATOR] = coordinator
    app[_LIMITS] = limits
    app[_REFUSALS] = refusals
    openapi = json.dumps(openapi_document()).encode()

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    # allow_head=False: the routes are exactly the ones openapi.json documents.
    app.add_routes(
        [
            web.post("/jobs", _submit),
            web.get("/jobs", _list, allow_head=False),
            web.get("/jobs/{id}", _view, allow_head=False),
            web.get("/jobs/{id}/shards", _shards, allow_head=False),
            web.delete("/jobs/{id}", _cancel),
            web.get("/jobs/{id}/output", _output, allow_head=False),
            web.get("/jobs/{id}/logs", _logs, allow_head=False),
            web.get("/healthz", _healthz, allow_head=False),
            web.get("/metrics", _metrics, allow_head=False),
            web.get("/openapi.json", get_openapi, allow_head=False),
        ]
    )
    return app


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _guard_middleware(access: HttpAccess, refusals: Refusals) -> Middleware:
    names = HostNames(access)
    token = access.token.encode() if access.token is not None else None

    def refusal(request: web.Request) -> tuple[str, str, web.Response] | None:
        """(cause, what to log, the answer) when `request` must be refused, else None."""
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        if not isinstance(local, tuple):
            return "bad_host", "request without a local address", _error(403, "connection already closed")
        peer = request.remote or "?"
        host = request.headers.get("Host")
        default_port = 443 if request.scheme == "https" else 80
        if host is not None and not names.allows(host, local=local[:2], default_port=default_port):
            message = (
                f"Host {host!r} does not name this server; if it is one of its names, start the server with "
                "--allowed-host NAME"
            )
            return "bad_host", f"Host {host!r} from {peer}", _error(403, message)
        origin = request.headers.get("Origin")
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        if (origin is not None and not is_own_origin(origin, scheme=request.scheme, host=host)) or (
            fetch_site in ("cross-site", "same-site")
        ):
            shown = origin if origin is not None else f"Sec-Fetch-Site: {fetch_site}"
            message = "requests from web pages are refused: this API runs commands"
            return "bad_origin", f"{shown} from {peer}", _error(403, message)
        if token is not None and not (request.method == "GET" and request.path == "/healthz"):
            given = _bearer_token(request.headers.get("Authorization", ""))
            # Constant-time, so the comparison leaks nothing about the token.
            if given is None or not hmac.compare_digest(given, token):
                message = "missing bearer token" if given is None else "invalid bearer token"
                answer = _error(401, message, **{"WWW-Authenticate": 'Bearer realm="shardline"'})
                return "bad_token", f"{message} from {peer} ({request.method} {request.path})", answer
        if (request.method == "POST" or request.body_exists) and request.content_type != "application/json":
            message = f"request body must be application/json, got {request.content_type!r}"
            return "content_type", f"{request.content_type!r} from {peer}", _error(415, message)
        return None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The head has been parsed: the connection's head deadline is over.
        protocol = guarded_protocol(request.transport)
        if protocol is not None:
            protocol.request_started()
        try:
            refused = refusal(request)
            if refused is None:
                return await handler(request)
            cause, detail, answer = refused
            refusals.refuse(cause, detail)
            request[_REFUSED] = True
            return answer
        finally:
            if protocol is not None:
                protocol.request_finished()

    return guard


def _bearer_token(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case), else None."""
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials.encode("utf-8", errors="surrogateescape")


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own answers (unknown route, wrong method, body too large),
        # in the same JSON shape as ours.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return _error(exc.status, f"{exc.reason}: {request.method} {request.path}", **allow)
    except ShardlineError as exc:
        status = next((status for cls, status in _STATUS_BY_ERROR if isinstance(exc, cls)), 500)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        if isinstance(exc, RetryableStorageError):
            return _error(status, str(exc), **{"Retry-After": str(STORAGE_RETRY_AFTER_S)})
        return _error(status, str(exc))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error; the coordinator's log has the details")


def _coordinator(request: web.Request) -> Coordinator:
    return request.app[_COORDINATOR]


async def _submit(request: web.Request) -> web.Response:
    limits, refusals = request.app[_LIMITS], request.app[_REFUSALS]
    peer = request.remote or "?"
    too_large = f"request body is larger than {limits.max_body_bytes} bytes"
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        refusals.refuse("body_too_large", f"{request.content_length} bytes announced by {peer}")
        return _refused(request, _error(413, too_large))
    try:
        # One deadline for the whole body, however it trickles in.
        async with asyncio.timeout(limits.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        refusals.refuse("body_timeout", f"{peer} did not send its body in {limits.body_timeout_s:g}s")
        return _refused(request, _error(408, f"the request body did not arrive in {limits.body_timeout_s:g}s"))
    except web.HTTPRequestEntityTooLarge:
        refusals.refuse("body_too_large", f"more than {limits.max_body_bytes} bytes sent by {peer}")
        return _refused(request, _error(413, too_large))
    view = await _coordinator(request).submit(JobSpec.from_dict(_parse_json(raw)))
    return web.json_response(view.to_dict(), status=201, headers={"Location": f"/jobs/{view.id}"})


def _refused(request: web.Request, response: web.Response) -> web.Response:
    """`response`, on a connection closed once it is sent: the body was not read to its end."""
    request[_REFUSED] = True
    response.force_close()
    return response


def _parse_json(raw: bytes) -> Any:
    """The JSON value of a request body; anything else is a ConfigurationError (400) saying why."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ConfigurationError("request body: not UTF-8 text") from None
    except RecursionError:
        raise ConfigurationError("request body: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise ConfigurationError(f"request body: not valid JSON ({exc})") from None


async def _list(request: web.Request) -> web.Response:
    views = _coordinator(request).views()
    return web.json_response({"jobs": [view.to_dict(with_shards=False) for view in views]})


async def _view(request: web.Request) -> web.Response:
    return web.json_response(_coordinator(request).view(request.match_info["id"]).to_dict())


async def _shards(request: web.Request) -> web.Response:
    """One page of a job's shards: `offset` (default 0) and `limit` (default
    SHARDS_PAGE_DEFAULT, at most SHARDS_PAGE_MAX) in the query."""
    job_id = request.match_info["id"]
    offset = _query_int(request, "offset", default=0, maximum=None)
    limit = _query_int(request, "limit", default=SHARDS_PAGE_DEFAULT, maximum=SHARDS_PAGE_MAX)
    coordinator = _coordinator(request)
    shards = coordinator.shards(job_id, offset=offset, limit=limit)
    view = coordinator.view(job_id, limit=0)  # a prefix names the job: answer with its whole id
    total = view.spec.shards
    end = offset + len(shards)
    return web.json_response(
        {
            "id": view.id,
            "shards_total": total,
            "offset": offset,
            "shards": [shard.to_dict() for shard in shards],
            "next_offset": end if shards and end < total else None,
        }
    )


def _query_int(request: web.Request, name: str, *, default: int, maximum: int | None) -> int:
    """Query parameter `name` as an integer >= 0 (<= `maximum`); a ConfigurationError (400) says why not."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise ConfigurationError(f"query parameter {name!r}: expected an integer >= 0, got {raw[:40]!r}")
    value = int(raw)
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"query parameter {name!r}: at most {maximum}, got {value}")
    return value


async def _logs(request: web.Request) -> web.Response:
    shard = _query_int(request, "shard", default=-1, maximum=None) if "shard" in request.query else None
    return web.Response(text=_coordinator(request).command_logs(request.match_info["id"], shard))


async def _cancel(request: web.Request) -> web.Response:
    view = await _coordinator(request).cancel(request.match_info["id"])
    return web.json_response(view.to_dict())


async def _healthz(request: web.Request) -> web.Response:
    if _coordinator(request).accepting:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "draining"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    text = _coordinator(request).metrics_text()
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _output(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["id"]
    pieces = aiter(_coordinator(request).output(job_id))
    try:
        # Headers wait for the first piece, so a job that is unknown or fails
        # before producing anything gets a proper error status.
        first = await anext(pieces, None)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if first is not None:
                await _send_piece(response, first)
                async for piece in pieces:
                    await _send_piece(response, piece)
            await response.write_eof()
        except ConnectionError:
            log.debug("client went away while reading the output of job %s", job_id)
        except (JobFailedError, JobCancelledError) as exc:
            log.info("job %s ended mid-stream; aborting its output response: %s", job_id, exc)
            _abort(request)
        except Exception:
            log.exception("streaming the output of job %s failed; aborting the response", job_id)
            _abort(request)
        return response
    finally:
        # Also runs when the client went away: lets the coordinator's
        # iterator release whatever it holds for this reader.
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()


def _abort(request: web.Request) -> None:
    """Close the connection without ending the chunked body.

    aiohttp's own attempt to write the final chunk then fails quietly on the
    closed transport, and the client sees an incomplete payload."""
    if request.transport is not None:
        request.transport.close()


async def _send_piece(response: web.StreamResponse, piece: OutputPiece) -> None:
    """Send bytes [start, end) of the piece's file, COPY_CHUNK_BYTES at a
    time, read in a thread so a slow disk never stalls the event loop."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        remaining = piece.end - piece.start
        while remaining > 0:
            chunk = await asyncio.to_thread(f.read, min(remaining, COPY_CHUNK_BYTES))
            if not chunk:
                raise ShardlineError(f"output file {piece.path} ended {remaining} bytes early")
            remaining -= len(chunk)
            await response.write(chunk)  # waits while the client reads slower than we send


# -- the server --------------------------------------------------------------------------


class HttpServer:
    """The API of `coordinator` listening on `host`:`port`, behind the guard.

    Use as ``async with`` (or `start` and `aclose`).  With `tls`, it speaks
    HTTPS only.  `url` is the address clients use, with the real port when 0
    was asked for.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        host: str,
        port: int,
        access: HttpAccess,
        limits: HttpLimits = HttpLimits(),
        tls: ssl.SSLContext | None = None,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        self._coordinator = coordinator
        self._host = host
        self._port = port
        self._access = access
        self._limits = limits
        self._tls = tls
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        assert self._url is not None, "start() first"
        return self._url

    async def start(self) -> None:
        limits = self._limits
        refusals = http_refusals(self._coordinator.metrics.http_refused)
        app = make_app(self._coordinator, access=self._access, limits=limits, refusals=refusals)
        runner = web.AppRunner(
            app,
            shutdown_timeout=self._shutdown_timeout_s,
            access_log_class=_AccessLogger,
            keepalive_timeout=limits.keepalive_timeout_s,
            lingering_time=limits.lingering_s,
            max_headers=_MAX_HEADERS,
        )
        await runner.setup()
        self._runner = runner
        site = _GuardedSite(runner, self._host, self._port, tls=self._tls, guard=ConnectionGuard(limits, refusals))
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if self._tls is not None else "http"
        self._url = f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    async def aclose(self) -> None:
        """Stop listening, then close connections (in-flight requests get `shutdown_timeout_s`)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


#: Request headers allowed per request (aiohttp's default is 128): with lines of
#: at most 8 KiB, a request head stays within a few hundred KiB.
_MAX_HEADERS = 32


class _AccessLogger(AccessLogger):
    """aiohttp's access log without the refused requests: `Refusals` logs those, at a bounded rate."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not request.get(_REFUSED):
            super().log(request, response, time)


class _GuardedSite(web.BaseSite):
    """aiohttp's TCP site with every connection's protocol wrapped by the `ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, tls: ssl.SSLContext | None, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner, ssl_context=tls, backlog=_LISTEN_BACKLOG)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            # A TLS handshake is part of the request head's time budget.
            ssl_handshake_timeout=self._guard.limits.header_timeout_s if self._ssl_context else None,
        )


_LISTEN_BACKLOG = 128
