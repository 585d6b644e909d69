"""A client for a running `shardline serve`: submit, watch, stream, cancel.

Answers are the API's JSON objects (see coordinator/openapi.json) as dicts.
Every failure is a `ShardlineError` carrying the coordinator's own message:
400 -> InputError, 401 and 403 -> ConfigurationError, 404 ->
JobNotFoundError, 409 -> JobFailedError or JobCancelledError, 502 ->
StorageError, 503 -> RetryableStorageError when it says when to retry
(storage failing for now, too many connections), else NotAcceptingJobsError
(draining); an unreachable coordinator is a `CoordinatorUnreachableError` (a
ConfigurationError) naming the URL.
An https:// URL is verified against the system's trust store, or against
`ca_file` when given.

`output()` yields bytes only from a response that ends properly: a stream
the coordinator aborts (the job failed mid-way) or that breaks (the daemon
died) raises, so partial output is never presented as complete: the job's
error if it failed or was cancelled, else `OutputStreamBrokenError`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

import aiohttp

from .errors import (
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
from .protocol import SHARDS_PAGE_MAX, JobSpec

__all__ = ["CoordinatorClient", "CoordinatorUnreachableError", "OutputStreamBrokenError"]

log = logging.getLogger("shardline.client")

#: Longest error body quoted when the answer is not our JSON (a proxy's page).
_MAX_QUOTED_BODY_CHARS = 200


class CoordinatorUnreachableError(ConfigurationError):
    """The coordinator did not answer at all (not running, wrong URL, gone)."""


class OutputStreamBrokenError(ShardlineError):
    """A job's output stream ended early while the job itself had not failed:
    the coordinator went away or the connection broke."""


class CoordinatorClient:
    """HTTP client for one coordinator; use as ``async with``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 60.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"coordinator URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tls = _tls_context(ca_file) if ca_file is not None else None
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=connect_timeout_s)
        # The output stream lasts as long as the job: no total or read limit.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout, connector=connector)
        return self._session

    async def submit(self, spec: JobSpec) -> dict[str, Any]:
        """Submit a job; returns its view (``id``, ``state``, ``shards`` ...)."""
        return await self._json("POST", "/jobs", body=spec.to_dict())

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", _job_path(job_id))

    async def shards(self, job_id: str, *, offset: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's shards from index `offset` on, in order, fetched a page
        (GET /jobs/{id}/shards) at a time."""
        next_offset: int | None = offset
        while next_offset is not None:
            page = await self._json("GET", f"{_job_path(job_id)}/shards?offset={next_offset}&limit={SHARDS_PAGE_MAX}")
            for shard in page["shards"]:
                yield shard
            next_offset = page["next_offset"]

    async def job_with_shards(self, job_id: str) -> dict[str, Any]:
        """The job's view with every shard in ``shards`` (not just the first page)."""
        view = await self.job(job_id)
        if view.get("shards_next") is not None:
            view["shards"] += [shard async for shard in self.shards(job_id, offset=view["shards_next"])]
            view["shards_next"] = None
        return view

    async def jobs(self) -> list[dict[str, Any]]:
        """Known jobs, newest first, without per-shard detail."""
        answer = await self._json("GET", "/jobs")
        jobs: list[dict[str, Any]] = answer["jobs"]
        return jobs

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; a job that already finished is returned unchanged."""
        return await self._json("DELETE", _job_path(job_id))

    async def output(self, job_id: str) -> AsyncIterator[bytes]:
        """The job's ordered output (or reduce result) as it is produced.

        Ends normally only when the coordinator ended the stream properly,
        which it does only for a job that succeeded."""
        url = self.url + _job_path(job_id) + "/output"
        started = False
        try:
            async with self._http().get(url, timeout=self._stream_timeout) as response:
                if response.status != 200:
                    raise await self._error(response, job_id)
                started = True
                async for chunk in response.content.iter_any():
                    yield chunk
        except aiohttp.ClientError as exc:
            if not started:
                raise self._unreachable(exc) from None
            raise await self._broken_stream(job_id, exc) from None

    async def logs(self, job_id: str, shard: int | None = None) -> str:
        """The stderr of the job's commands, per shard attempt (all shards, or `shard`'s)."""
        path = _job_path(job_id) + "/logs" + (f"?shard={shard}" if shard is not None else "")
        try:
            async with self._http().get(self.url + path) as response:
                if response.status >= 300:
                    raise await self._error(response, job_id)
                return await response.text()
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None

    async def _json(self, method: str, path: str, *, body: Any = None) -> dict[str, Any]:
        try:
            async with self._http().request(method, self.url + path, json=body) as response:
                if response.status >= 300:
                    raise await self._error(response, _job_id_of(path))
                answer: dict[str, Any] = await response.json()
                return answer
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        except TimeoutError:
            raise ShardlineError(f"the coordinator at {self.url} did not answer {method} {path} in time") from None

    def _unreachable(self, exc: BaseException) -> ShardlineError:
        return CoordinatorUnreachableError(f"cannot reach the coordinator at {self.url}: {exc}")

    async def _error(self, response: aiohttp.ClientResponse, job_id: str | None) -> ShardlineError:
        """The error for a non-2xx answer, with the coordinator's message."""
        text = await response.text(errors="replace")
        try:
            message = str((await response.json(content_type=None))["error"])
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status} {response.reason}: {text[:_MAX_QUOTED_BODY_CHARS]}"
        status = response.status
        if status == 400:
            return InputError(message)
        if status == 401:
            hint = "pass --token-file FILE or set SHARDLINE_TOKEN"
            return ConfigurationError(f"the coordinator at {self.url} refused the request ({message}); {hint}")
        if status == 403:
            return ConfigurationError(f"the coordinator at {self.url} refused the request: {message}")
        if status == 404:
            return JobNotFoundError(message if job_id is None else f"no job {job_id!r} on {self.url}")
        if status == 409 and job_id is not None:
            # Failed or cancelled before any output: the view says which.
            cancelled = await self._state(job_id) == "cancelled"
            return JobCancelledError(message) if cancelled else JobFailedError(message)
        if status == 502:
            return StorageError(message)
        if status == 503 and "Retry-After" in response.headers:
            wait = response.headers["Retry-After"]
            return RetryableStorageError(
                f"the coordinator at {self.url} cannot do it for now (try again in {wait}s): {message}"
            )
        if status == 503:
            return NotAcceptingJobsError(f"the coordinator at {self.url} takes no new jobs: {message}")
        return ShardlineError(f"the coordinator at {self.url} answered {status}: {message}")

    async def _state(self, job_id: str) -> str | None:
        try:
            return str((await self.job(job_id))["state"])
        except ShardlineError:
            return None

    async def _broken_stream(self, job_id: str, exc: BaseException) -> ShardlineError:
        """Why an output stream ended without its final chunk."""
        log.debug("output stream of job %s broke: %r", job_id, exc)
        try:
            view = await self.job(job_id)
        except ShardlineError as why:
            return OutputStreamBrokenError(f"the output stream of job {job_id} broke before its end ({why})")
        if view["state"] == "failed":
            return JobFailedError(view.get("error") or f"job {job_id} failed")
        if view["state"] == "cancelled":
            return JobCancelledError(f"job {job_id} was cancelled")
        return OutputStreamBrokenError(
            f"the output stream of job {job_id} broke before its end; the job is {view['state']}"
        )


def _tls_context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the coordinator's CA certificate {ca_file!r}: {exc}") from exc


def _job_path(job_id: str) -> str:
    if not job_id:
        raise ConfigurationError("a job id is required")
    return "/jobs/" + quote(job_id, safe="")


def _job_id_of(path: str) -> str | None:
    """The job id in a /jobs/{id} path (for error messages), else None."""
    parts = path.split("/")
    return unquote(parts[2]) if len(parts) >= 3 and parts[1] == "jobs" else None
