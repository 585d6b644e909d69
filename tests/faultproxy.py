"""A fault-injecting HTTP/1.1 proxy for tests, on 127.0.0.1 over real sockets.

`FaultProxy` sits in front of one upstream (the moto server) and relays
requests unchanged (the Host header too, so signatures still verify), except
for requests matched by a `Rule`, which get the rule's fault instead:

- `CutBody(after_bytes=n)`: forward the response head and the first n body
  bytes, then close (or reset) the client connection, like S3 dropping a
  stream mid-body.
- `CannedResponse(...)`: answer without contacting the upstream, e.g.
  `s3_error("SlowDown", ...)` for throttling.

Rules are tried in order and the first eligible one applies.  A rule applies
to at most `times` requests, each with probability `probability` drawn from
the proxy's RNG (seeded, so a run is reproducible).  Every request is
recorded in `records` (method, target, headers, fault, bytes of response
body sent), so tests can assert what the client really asked for, e.g. the
Range of a resumed GET.

Scope: one upstream connection per request (sent with ``Connection:
close``); request bodies must have a Content-Length; responses are relayed
with their own framing, and a response without Content-Length ends the
client connection.  Enough for S3-style clients (botocore/aiohttp).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "CannedResponse",
    "CutBody",
    "FaultProxy",
    "ProxyRecord",
    "Rule",
    "s3_error",
]

_HEAD_LIMIT_BYTES = 64 * 1024
_RELAY_CHUNK_BYTES = 64 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "expect"})


@dataclass(frozen=True, slots=True, kw_only=True)
class CutBody:
    """Relay the response head and `after_bytes` body bytes, then drop the client."""

    after_bytes: int
    #: Pause before closing so the client has read what was sent: aiohttp
    #: discards buffered body bytes once the connection error is set.
    linger_s: float = 0.05
    #: Abort with a TCP reset instead of a clean FIN.
    reset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CannedResponse:
    """Answer with this response; the upstream never sees the request."""

    status: int
    reason: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


Fault = CutBody | CannedResponse


def s3_error(code: str, message: str, *, status: int = 503, reason: str = "Slow Down") -> CannedResponse:
    """An S3-style XML error response, e.g. ``s3_error("SlowDown", "Reduce your request rate.")``."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    return CannedResponse(status=status, reason=reason, body=body, headers=(("Content-Type", "application/xml"),))


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Which requests get `fault`; every given condition must hold."""

    fault: Fault
    method: str | None = None
    path_contains: str | None = None
    #: The request must carry this header (any value), e.g. "Range".
    header: str | None = None
    #: Apply to at most this many requests; None for no limit.
    times: int | None = None
    probability: float = 1.0

    def matches(self, method: str, target: str, headers: dict[str, str]) -> bool:
        return (
            (self.method is None or self.method.upper() == method)
            and (self.path_contains is None or self.path_contains in target)
            and (self.header is None or self.header.lower() in headers)
        )


@dataclass(slots=True, kw_only=True)
class ProxyRecord:
    """One request the proxy received, and what it did with it."""

    method: str
    target: str
    #: Request headers with lower-case names.
    headers: dict[str, str]
    #: Index into the proxy's rules of the fault applied, or None if relayed.
    rule_index: int | None = None
    fault: Fault | None = None
    status: int | None = None
    #: Response body bytes sent to the client.
    body_bytes: int = 0


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    index: dict[str, str] = field(default_factory=dict)


class FaultProxy:
    """See the module docstring.  Use as ``async with FaultProxy(url, rules) as proxy``."""

    def __init__(self, upstream_url: str, rules: Sequence[Rule] = (), *, seed: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy relays plain http:// upstreams only, got {upstream_url!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.records: list[ProxyRecord] = []
        self.set_rules(rules)
        self.url = ""

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Replace the rules and reset their `applied` counters."""
        self.rules = tuple(rules)
        #: How many times each rule has been applied.
        self.applied = [0] * len(self.rules)

    @property
    def body_bytes_sent(self) -> int:
        return sum(record.body_bytes for record in self.records)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle_client, "127.0.0.1", 0, limit=_HEAD_LIMIT_BYTES)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- per connection -------------------------------------------------------

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            keep_alive = True
            while keep_alive:
                request = await _read_request(reader, writer)
                if request is None:
                    break
                keep_alive = await self._serve(request, writer)
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            writer.transport.abort()  # the client went away or sent garbage
        finally:
            self._handlers.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()  # cancelled by aclose

    def _choose_rule(self, request: _Request) -> int | None:
        for index, rule in enumerate(self.rules):
            if rule.times is not None and self.applied[index] >= rule.times:
                continue
            if not rule.matches(request.method, request.target, request.index):
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            self.applied[index] += 1
            return index
        return None

    async def _serve(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the client connection may be reused."""
        record = ProxyRecord(method=request.method, target=request.target, headers=dict(request.index))
        self.records.append(record)
        rule_index = self._choose_rule(request)
        fault = None if rule_index is None else self.rules[rule_index].fault
        record.rule_index, record.fault = rule_index, fault
        client_keep_alive = request.index.get("connection", "").lower() != "close"

        if isinstance(fault, CannedResponse):
            headers = [*fault.headers, ("Content-Length", str(len(fault.body)))]
            headers.append(("Connection", "keep-alive" if client_keep_alive else "close"))
            writer.write(_head(f"HTTP/1.1 {fault.status} {fault.reason}", headers) + fault.body)
            await writer.drain()
            record.status, record.body_bytes = fault.status, len(fault.body)
            return client_keep_alive

        up_reader, up_writer = await asyncio.open_connection(*self._upstream, limit=_HEAD_LIMIT_BYTES)
        try:
            forwarded = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
            forwarded.append(("Connection", "close"))
            up_writer.write(_head(f"{request.method} {request.target} {request.version}", forwarded) + request.body)
            await up_writer.drain()
            status_line, headers = await _read_head(up_reader)
            status = int(status_line.split(" ", 2)[1])
            record.status = status
            index = {k.lower(): v for k, v in headers}
            no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
            length = 0 if no_body else _content_length(index)
            keep_alive = client_keep_alive and length is not None and not isinstance(fault, CutBody)
            relayed = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
            relayed.append(("Connection", "keep-alive" if keep_alive else "close"))
            writer.write(_head(status_line, relayed))

            limit = length
            if isinstance(fault, CutBody):
                limit = fault.after_bytes if length is None else min(length, fault.after_bytes)
            record.body_bytes = await _relay(up_reader, writer, limit)
            await writer.drain()
            # An upstream body shorter than its Content-Length reaches the
            # client as it is; the connection cannot be reused after it.
            keep_alive = keep_alive and record.body_bytes == length
        finally:
            up_writer.transport.abort()

        if isinstance(fault, CutBody):
            await asyncio.sleep(fault.linger_s)
            if fault.reset:
                writer.transport.abort()
            else:
                writer.close()
            return False
        return keep_alive


# --- HTTP/1.1 framing ----------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    first, *lines = raw[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return first, headers


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    """The next request on a client connection, or None at a clean EOF."""
    try:
        first, headers = await _read_head(reader)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    method, target, version = first.split(" ", 2)
    request = _Request(method=method.upper(), target=target, version=version, headers=headers)
    request.index = {k.lower(): v for k, v in headers}
    if "chunked" in request.index.get("transfer-encoding", "").lower():
        raise ValueError("faultproxy does not relay chunked request bodies")
    if request.index.get("expect", "").lower() == "100-continue":
        # Expect is stripped before forwarding, so the proxy answers it itself.
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    length = _content_length(request.index) or 0
    request.body = await reader.readexactly(length)
    return request


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    return None if value is None else int(value)


def _head(first_line: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [first_line, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> int:
    """Copy until `limit` bytes (None: no limit) or EOF; return the count."""
    sent = 0
    while limit is None or sent < limit:
        want = _RELAY_CHUNK_BYTES if limit is None else min(_RELAY_CHUNK_BYTES, limit - sent)
        data = await reader.read(want)
        if not data:
            break
        writer.write(data)
        await writer.drain()
        sent += len(data)
    return sent
