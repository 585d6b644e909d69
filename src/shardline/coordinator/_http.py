# The coordinator's HTTP API (aiohttp): a thin layer over `Coordinator`.
#
# Handlers translate JSON to JobSpec and JobView to JSON and nothing more;
# every decision lives in the coordinator.  Errors are `{"error": message}`
# with a status chosen by the error's class (`_STATUS_BY_ERROR`), so a
# client can show the coordinator's own message.  The routes are documented
# in openapi.json next to this file; a test checks that both list the same
# paths and methods.
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
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import (
    ConfigurationError,
    InputError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    NotAcceptingJobsError,
    ShardlineError,
)
from ._spec import JobSpec

if TYPE_CHECKING:
    from ._job import OutputPiece
    from ._service import Coordinator

__all__ = ["make_app", "openapi_document"]

log = logging.getLogger("shardline.coordinator.http")

#: Bytes read from a spool file per write to the client: large enough to
#: keep a fast client busy, small enough that many streams stay cheap.
OUTPUT_CHUNK_BYTES = 1024 * 1024

#: First match wins: subclasses before their bases.
_STATUS_BY_ERROR: tuple[tuple[type[ShardlineError], int], ...] = (
    (JobNotFoundError, 404),
    (NotAcceptingJobsError, 503),
    (ConfigurationError, 400),
    (InputError, 400),
    (JobFailedError, 409),
    (JobCancelledError, 409),
)

_COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")


def openapi_document() -> dict[str, Any]:
    """The API description served at /openapi.json."""
    text = resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def make_app(coordinator: Coordinator, *, token: str | None = None) -> web.Application:
    """The HTTP API over `coordinator`; with `token`, every route requires
    ``Authorization: Bearer <token>``."""
    middlewares: list[Middleware] = [_error_middleware]
    if token:
        middlewares.insert(0, _token_middleware(token))
    app = web.Application(middlewares=middlewares)
    app[_COORDINATOR] = coordinator
    openapi = json.dumps(openapi_document()).encode()

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    # allow_head=False: the routes are exactly the ones openapi.json documents.
    app.add_routes(
        [
            web.post("/jobs", _submit),
            web.get("/jobs", _list, allow_head=False),
            web.get("/jobs/{id}", _view, allow_head=False),
            web.delete("/jobs/{id}", _cancel),
            web.get("/jobs/{id}/output", _output, allow_head=False),
            web.get("/healthz", _healthz, allow_head=False),
            web.get("/metrics", _metrics, allow_head=False),
            web.get("/openapi.json", get_openapi, allow_head=False),
        ]
    )
    return app


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _token_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        # Constant-time, so the comparison leaks nothing about the token.
        if not hmac.compare_digest(given, expected):
            message = "missing bearer token" if not given else "invalid bearer token"
            return _error(401, message, **{"WWW-Authenticate": 'Bearer realm="shardline"'})
        return await handler(request)

    return check_token


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
        if status == 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        return _error(status, str(exc))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error; the coordinator's log has the details")


def _coordinator(request: web.Request) -> Coordinator:
    return request.app[_COORDINATOR]


async def _submit(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"request body: not valid JSON ({exc})") from None
    view = await _coordinator(request).submit(JobSpec.from_dict(body))
    return web.json_response(view.to_dict(), status=201, headers={"Location": f"/jobs/{view.id}"})


async def _list(request: web.Request) -> web.Response:
    views = _coordinator(request).views()
    return web.json_response({"jobs": [view.to_dict(with_shards=False) for view in views]})


async def _view(request: web.Request) -> web.Response:
    return web.json_response(_coordinator(request).view(request.match_info["id"]).to_dict())


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
    """Send bytes [start, end) of the piece's file, OUTPUT_CHUNK_BYTES at a
    time, read in a thread so a slow disk never stalls the event loop."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        remaining = piece.end - piece.start
        while remaining > 0:
            chunk = await asyncio.to_thread(f.read, min(remaining, OUTPUT_CHUNK_BYTES))
            if not chunk:
                raise ShardlineError(f"output file {piece.path} ended {remaining} bytes early")
            remaining -= len(chunk)
            await response.write(chunk)  # waits while the client reads slower than we send
