"""Fault-injecting relays for tests, on 127.0.0.1 over real sockets.

`FaultProxy` is an HTTP/1.1 proxy in front of one upstream (the moto server,
which speaks both S3 and DynamoDB).  It relays requests unchanged (the Host
header too, so signatures still verify), except for requests matched by a
`Rule`, which get the rule's fault instead:

- `CutBody(after_bytes=n)`: forward the response head and the first n body
  bytes, then close (or reset) the client connection, like S3 dropping a
  stream mid-body.
- `Stall(after_bytes=n, stall_s=t)`: forward the head and n body bytes, then
  send nothing for t seconds (longer than the client's read timeout, to
  make it give up); then go on relaying, or close.
- `Delay(delay_s=t)`: hold the request t seconds before answering it:
  latency to the first byte.  `then=` applies another fault afterwards.
- `Drop()`: close (or reset) the connection without answering at all.
- `CannedResponse(...)`: answer without contacting the upstream, e.g.
  `s3_error("SlowDown", ...)`, `s3_internal_error()` or
  `dynamodb_throttle()` (ProvisionedThroughputExceededException).

Rules are tried in order and the first eligible one applies.  A rule matches
on method, path, a header (and a substring of its value, e.g. the
``X-Amz-Target`` of a DynamoDB operation: see `dynamodb_rule`), a substring
of the body, or any predicate over the request (`when`, e.g. the byte range
of a GET).  It lets its first `skip` matching requests through, then applies
to at most `times` requests, each with probability `probability`.

Determinism: the probability draw for a request depends only on the seed,
the rule, the request's method, path, Range and X-Amz-Target, and how many
such requests came before it, never on how requests from concurrent clients
interleave.  (`skip` and `times` count requests in arrival order.)

The proxy can also behave like S3 towards a client that stops reading: with
`client_send_timeout_s`, a response whose bytes the client does not take for
that long is aborted (`ProxyRecord.client_stalled`), which is how a stalled
consumer turns into an IncompleteRead.

Every request is recorded in `records` (method, target, headers, fault,
status, bytes of response body sent), so tests can assert what the client
really asked for, e.g. the Range of a resumed GET, and that each fault
really happened.

Scope: one upstream connection per request (sent with ``Connection:
close``); request bodies must have a Content-Length; responses are relayed
with their own framing, and a response without Content-Length ends the
client connection.  Enough for S3- and DynamoDB-style clients
(botocore/aiohttp).

`ExchangeRelay` is a TCP relay in front of the coordinator's exchange port
that understands shardline's frame boundaries: it identifies each session by
its HELLO (job, shard, attempt) and can cut it just before or just after a
given frame type in either direction (`CutSession`), e.g. "drop shard 0's
session right before the coordinator pushes it a FRAGMENT".
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shardline.protocol import FrameType, ShardRange

__all__ = [
    "DOWN",
    "DYNAMODB_TARGET_PREFIX",
    "UP",
    "CannedResponse",
    "CutBody",
    "CutSession",
    "Delay",
    "Drop",
    "ExchangeRelay",
    "Fault",
    "FaultProxy",
    "ProxyRecord",
    "ProxyRequest",
    "Rule",
    "SessionRecord",
    "Stall",
    "byte_range",
    "dynamodb_error",
    "dynamodb_rule",
    "dynamodb_throttle",
    "in_shard",
    "s3_error",
    "s3_internal_error",
    "s3_slow_down",
]

_HEAD_LIMIT_BYTES = 64 * 1024
_RELAY_CHUNK_BYTES = 64 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "expect"})

#: Every DynamoDB request names its operation in X-Amz-Target with this prefix.
DYNAMODB_TARGET_PREFIX = "DynamoDB_20120810."
_DYNAMODB_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"


# --- faults -------------------------------------------------------------------


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
class Stall:
    """Relay the head and `after_bytes` body bytes, then nothing for `stall_s`;
    then relay the rest (the client has usually given up by then) or close."""

    after_bytes: int
    stall_s: float
    close: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CannedResponse:
    """Answer with this response; the upstream never sees the request."""

    status: int
    reason: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Drop:
    """Close the client connection without any answer (a reset by default)."""

    reset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Delay:
    """Wait `delay_s` before answering (first-byte latency), then apply `then`
    (None: relay normally)."""

    delay_s: float
    then: CutBody | Stall | CannedResponse | Drop | None = None


Fault = CutBody | Stall | CannedResponse | Drop | Delay


def s3_error(code: str, message: str, *, status: int = 503, reason: str = "Slow Down") -> CannedResponse:
    """An S3-style XML error response, e.g. ``s3_error("SlowDown", "Reduce your request rate.")``."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    return CannedResponse(status=status, reason=reason, body=body, headers=(("Content-Type", "application/xml"),))


def s3_slow_down() -> CannedResponse:
    """503 SlowDown, S3's throttling answer."""
    return s3_error("SlowDown", "Please reduce your request rate.")


def s3_internal_error() -> CannedResponse:
    """500 InternalError, S3's "try again" answer."""
    message = "We encountered an internal error. Please try again."
    return s3_error("InternalError", message, status=500, reason="Internal Server Error")


def dynamodb_error(type_name: str, message: str, *, status: int = 400, reason: str = "Bad Request") -> CannedResponse:
    """A DynamoDB-style JSON error, e.g. ``dynamodb_error("ThrottlingException", "Rate exceeded")``."""
    body = json.dumps({"__type": _DYNAMODB_ERROR_PREFIX + type_name, "message": message}).encode()
    return CannedResponse(
        status=status, reason=reason, body=body, headers=(("Content-Type", "application/x-amz-json-1.0"),)
    )


def dynamodb_throttle() -> CannedResponse:
    """DynamoDB's answer to a table over its provisioned throughput."""
    return dynamodb_error(
        "ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded.",
    )


# --- rules --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyRequest:
    """A request as rules see it."""

    method: str
    target: str
    #: Lower-case names.
    headers: dict[str, str]
    body: bytes = b""

    @property
    def byte_range(self) -> tuple[int, int] | None:
        return byte_range(self.headers)


def byte_range(headers: dict[str, str]) -> tuple[int, int] | None:
    """The half-open [start, end) of a "Range: bytes=a-b" header, or None."""
    value = headers.get("range")
    if value is None or not value.startswith("bytes="):
        return None
    first, _, last = value.removeprefix("bytes=").partition("-")
    if not first or not last:
        return None
    return int(first), int(last) + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Which requests get `fault`; every given condition must hold."""

    fault: Fault
    method: str | None = None
    path_contains: str | None = None
    #: The request must carry this header, e.g. "Range" ...
    header: str | None = None
    #: ... with a value containing this, e.g. "DynamoDB_20120810.UpdateItem".
    header_contains: str | None = None
    body_contains: bytes | None = None
    when: Callable[[ProxyRequest], bool] | None = None
    #: Let this many matching requests through before applying the fault.
    skip: int = 0
    #: Apply to at most this many requests; None for no limit.
    times: int | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        if self.header_contains is not None and self.header is None:
            raise ValueError("header_contains needs header")

    def matches(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        if self.header is not None:
            value = headers.get(self.header.lower())
            if value is None or (self.header_contains is not None and self.header_contains not in value):
                return False
        if self.body_contains is not None and self.body_contains not in body:
            return False
        return self.when is None or self.when(ProxyRequest(method=method, target=target, headers=headers, body=body))


def dynamodb_rule(operation: str, fault: Fault, **conditions: object) -> Rule:
    """A rule for one DynamoDB operation ("UpdateItem", "GetItem", ...)."""
    return Rule(
        fault=fault,
        method="POST",
        header="X-Amz-Target",
        header_contains=DYNAMODB_TARGET_PREFIX + operation,
        **conditions,  # type: ignore[arg-type]
    )


@dataclass(slots=True, kw_only=True, eq=False)
class ProxyRecord:
    """One request the proxy received, and what it did with it (compared by identity)."""

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
    #: The response had this many body bytes (None: unknown or not sent).
    content_length: int | None = None
    #: Aborted because the client stopped reading (`client_send_timeout_s`).
    client_stalled: bool = False

    @property
    def byte_range(self) -> tuple[int, int] | None:
        return byte_range(self.headers)

    @property
    def operation(self) -> str | None:
        """The DynamoDB operation ("UpdateItem", ...), or None."""
        target = self.headers.get("x-amz-target", "")
        return target.removeprefix(DYNAMODB_TARGET_PREFIX) if target.startswith(DYNAMODB_TARGET_PREFIX) else None

    @property
    def complete(self) -> bool:
        """The whole response body was delivered."""
        return self.content_length is not None and self.body_bytes == self.content_length


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    index: dict[str, str] = field(default_factory=dict)


class _ClientStalled(OSError):
    """The client did not take the response's bytes within the send timeout."""


class FaultProxy:
    """See the module docstring.  Use as ``async with FaultProxy(url, rules) as proxy``."""

    def __init__(
        self,
        upstream_url: str,
        rules: Sequence[Rule] = (),
        *,
        seed: int = 0,
        client_send_timeout_s: float | None = None,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy relays plain http:// upstreams only, got {upstream_url!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self.seed = seed
        self.client_send_timeout_s = client_send_timeout_s
        self._draws: Counter[str] = Counter()
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
        #: How many requests each rule matched (skipped, drawn out or applied).
        self.matched = [0] * len(self.rules)

    @property
    def body_bytes_sent(self) -> int:
        return sum(record.body_bytes for record in self.records)

    def faulted(self, rule_index: int | None = None) -> list[ProxyRecord]:
        """Records of requests that got a fault (from one rule, or any)."""
        return [r for r in self.records if r.rule_index is not None and rule_index in (None, r.rule_index)]

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
        except asyncio.CancelledError:
            pass  # only aclose() cancels; asyncio would log a cancelled handler as an error
        finally:
            self._handlers.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()  # cancelled by aclose

    def _draw(self, rule_index: int, request: _Request) -> float:
        """A uniform draw that depends on the seed and the request, not on timing."""
        key = "|".join(
            (
                str(self.seed),
                str(rule_index),
                request.method,
                request.target,
                request.index.get("range", ""),
                request.index.get("x-amz-target", ""),
            )
        )
        self._draws[key] += 1
        return random.Random(f"{key}|{self._draws[key]}").random()

    def _choose_rule(self, request: _Request) -> int | None:
        for index, rule in enumerate(self.rules):
            if rule.times is not None and self.applied[index] >= rule.times:
                continue
            if not rule.matches(request.method, request.target, request.index, request.body):
                continue
            self.matched[index] += 1
            if self.matched[index] <= rule.skip:
                continue
            if rule.probability < 1.0 and self._draw(index, request) >= rule.probability:
                continue
            self.applied[index] += 1
            return index
        return None

    async def _drain(self, writer: asyncio.StreamWriter, record: ProxyRecord) -> None:
        if self.client_send_timeout_s is None:
            await writer.drain()
            return
        try:
            async with asyncio.timeout(self.client_send_timeout_s):
                await writer.drain()
        except TimeoutError:
            record.client_stalled = True
            raise _ClientStalled(f"client took no bytes for {self.client_send_timeout_s}s") from None

    async def _serve(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the client connection may be reused."""
        record = ProxyRecord(method=request.method, target=request.target, headers=dict(request.index))
        self.records.append(record)
        rule_index = self._choose_rule(request)
        fault = None if rule_index is None else self.rules[rule_index].fault
        record.rule_index, record.fault = rule_index, fault
        client_keep_alive = request.index.get("connection", "").lower() != "close"

        if isinstance(fault, Delay):
            await asyncio.sleep(fault.delay_s)
            fault = fault.then
        if isinstance(fault, Drop):
            if fault.reset:
                writer.transport.abort()
            else:
                writer.close()
            return False
        if isinstance(fault, CannedResponse):
            headers = [*fault.headers, ("Content-Length", str(len(fault.body)))]
            headers.append(("Connection", "keep-alive" if client_keep_alive else "close"))
            # An answer to HEAD has the headers of the body it does not carry.
            body = b"" if request.method == "HEAD" else fault.body
            writer.write(_head(f"HTTP/1.1 {fault.status} {fault.reason}", headers) + body)
            record.status, record.content_length = fault.status, len(fault.body)
            await self._drain(writer, record)
            record.body_bytes = len(body)
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
            record.content_length = length
            ends_early = isinstance(fault, CutBody) or (isinstance(fault, Stall) and fault.close)
            keep_alive = client_keep_alive and length is not None and not ends_early
            relayed = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
            relayed.append(("Connection", "keep-alive" if keep_alive else "close"))
            writer.write(_head(status_line, relayed))

            if isinstance(fault, (CutBody, Stall)):
                limit = fault.after_bytes if length is None else min(length, fault.after_bytes)
                await self._relay(up_reader, writer, limit, record)
                await self._drain(writer, record)
                if isinstance(fault, CutBody):
                    await asyncio.sleep(fault.linger_s)
                    if fault.reset:
                        writer.transport.abort()
                    else:
                        writer.close()
                    return False
                await asyncio.sleep(fault.stall_s)
                if fault.close:
                    writer.close()
                    return False
            rest = None if length is None else length - record.body_bytes
            await self._relay(up_reader, writer, rest, record)
            await self._drain(writer, record)
            # An upstream body shorter than its Content-Length reaches the
            # client as it is; the connection cannot be reused after it.
            return keep_alive and record.body_bytes == length
        finally:
            up_writer.transport.abort()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None, record: ProxyRecord
    ) -> None:
        """Copy until `limit` more bytes (None: no limit) or EOF, counting them in `record`."""
        sent = 0
        while limit is None or sent < limit:
            want = _RELAY_CHUNK_BYTES if limit is None else min(_RELAY_CHUNK_BYTES, limit - sent)
            data = await reader.read(want)
            if not data:
                break
            writer.write(data)
            sent += len(data)
            record.body_bytes += len(data)
            await self._drain(writer, record)


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


# --- the exchange: a frame-aware TCP relay --------------------------------------

# The exchange's framing (shardline.protocol._frames): magic "SL", version u8,
# type u8, payload length u32, payload (meta length u32, JSON meta, data), MAC.
_FRAME_HEADER = struct.Struct("!2sBBI")
_META_LENGTH = struct.Struct("!I")
_FRAME_MAC_BYTES = 32
_MAGIC = b"SL"
_READ_BYTES = 256 * 1024

UP = "up"  # worker -> coordinator
DOWN = "down"  # coordinator -> worker


@dataclass(frozen=True, slots=True, kw_only=True)
class CutSession:
    """Cut matching exchange sessions (both ends reset) at a frame boundary."""

    #: Frame type names, e.g. ("FRAGMENT", "PENDING").
    frames: tuple[str, ...]
    #: "before": the frame is never delivered (both ends are reset); "after":
    #: it is, then its receiver gets a FIN and the sender a reset.
    when: str = "before"
    #: DOWN: frames the coordinator sends; UP: frames the worker sends.
    direction: str = DOWN
    job_id: str | None = None
    shard: int | None = None
    attempt: int | None = None
    #: Only the n-th session (from 1) of a (job, shard, attempt); None for every one.
    session: int | None = 1
    times: int | None = None

    def __post_init__(self) -> None:
        if self.when not in ("before", "after") or self.direction not in (UP, DOWN):
            raise ValueError(f"bad CutSession: when={self.when!r} direction={self.direction!r}")
        unknown = set(self.frames) - set(FrameType.__members__)
        if unknown:
            raise ValueError(f"unknown frame types {sorted(unknown)}")

    def matches(self, job_id: str, shard: int, attempt: int, session: int) -> bool:
        return (
            (self.job_id is None or self.job_id == job_id)
            and (self.shard is None or self.shard == shard)
            and (self.attempt is None or self.attempt == attempt)
            and (self.session is None or self.session == session)
        )


@dataclass(slots=True, kw_only=True)
class SessionRecord:
    """One connection through the relay."""

    job_id: str | None = None
    shard: int | None = None
    attempt: int | None = None
    #: n-th session of this (job, shard, attempt), from 1.
    session: int = 0
    rule_index: int | None = None
    #: Frame type names seen, in order, per direction (cut frames included).
    up: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)
    #: e.g. "before down FRAGMENT", once the session was cut.
    cut: str | None = None


class _Cut(Exception):
    """Ends a relayed session; `graceful` (if any) got a FIN rather than a reset."""

    def __init__(self, what: str, graceful: asyncio.StreamWriter | None = None) -> None:
        super().__init__(what)
        self.graceful = graceful


class ExchangeRelay:
    """A TCP relay in front of the exchange; see the module docstring.

    Point workers at `address` (e.g. by rewriting their task's exchange host
    and port).  `cut_all()` drops every open session at once.
    """

    def __init__(self, upstream: tuple[str, int], rules: Sequence[CutSession] = ()) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._sessions: Counter[tuple[str, int, int]] = Counter()
        self.records: list[SessionRecord] = []
        self.set_rules(rules)
        self.address: tuple[str, int] = ("", 0)

    def set_rules(self, rules: Sequence[CutSession]) -> None:
        self.rules = tuple(rules)
        self.applied = [0] * len(self.rules)

    def cuts(self) -> list[SessionRecord]:
        return [record for record in self.records if record.cut is not None]

    async def start(self) -> ExchangeRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut_all()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> ExchangeRelay:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def cut_all(self) -> None:
        for client, upstream in list(self._open):
            client.transport.abort()
            upstream.transport.abort()
        self._open.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        record = SessionRecord()
        self.records.append(record)
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter] | None = None
        graceful: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            pair = (writer, up_writer)
            self._open.add(pair)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer, record, UP)),
                asyncio.ensure_future(self._pump(up_reader, writer, record, DOWN)),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                for pump in done:
                    pump.result()
                await asyncio.gather(*pumps)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except _Cut as cut:
            graceful = cut.graceful
        except OSError:
            pass
        except asyncio.CancelledError:
            pass  # only aclose() cancels; asyncio would log a cancelled handler as an error
        finally:
            if pair is not None:
                self._open.discard(pair)
            for side in (writer, *(pair or ())):
                if side is not graceful:
                    side.transport.abort()
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: SessionRecord, direction: str
    ) -> None:
        buffer = bytearray()
        framed = True
        while data := await reader.read(_READ_BYTES):
            if not framed:
                writer.write(data)
                await writer.drain()
                continue
            buffer += data
            while True:
                frame = _next_frame(buffer)
                if frame is None:
                    break
                if frame is False:  # not our protocol: relay the rest as it is
                    framed = False
                    writer.write(bytes(buffer))
                    buffer.clear()
                    break
                kind, raw = frame
                del buffer[: len(raw)]
                if direction == UP and kind == "HELLO" and record.job_id is None:
                    self._identify(record, raw)
                (record.up if direction == UP else record.down).append(kind)
                rule = self._rule_for(record, direction, kind)
                if rule is not None and rule.when == "before":
                    raise self._cut(record, rule, direction, kind)
                writer.write(raw)
                await writer.drain()
                if rule is not None:
                    # A FIN after the frame, so the peer surely reads it (a
                    # reset may discard unread bytes); the other side is reset.
                    writer.close()
                    raise self._cut(record, rule, direction, kind, graceful=writer)
        if writer.can_write_eof():
            writer.write_eof()

    def _identify(self, record: SessionRecord, raw: bytes) -> None:
        try:
            (meta_length,) = _META_LENGTH.unpack_from(raw, _FRAME_HEADER.size)
            start = _FRAME_HEADER.size + _META_LENGTH.size
            meta = json.loads(raw[start : start + meta_length])
            record.job_id, record.shard, record.attempt = str(meta["job_id"]), int(meta["shard"]), int(meta["attempt"])
        except (ValueError, KeyError, TypeError, struct.error):
            return  # a malformed HELLO: the exchange will refuse it
        key = (record.job_id, record.shard, record.attempt)
        self._sessions[key] += 1
        record.session = self._sessions[key]
        for index, rule in enumerate(self.rules):
            if rule.times is not None and self.applied[index] >= rule.times:
                continue
            if rule.matches(record.job_id, record.shard, record.attempt, record.session):
                record.rule_index = index
                return

    def _rule_for(self, record: SessionRecord, direction: str, kind: str) -> CutSession | None:
        if record.rule_index is None or record.cut is not None:
            return None
        rule = self.rules[record.rule_index]
        if rule.direction != direction or kind not in rule.frames:
            return None
        if rule.times is not None and self.applied[record.rule_index] >= rule.times:
            return None
        return rule

    def _cut(
        self,
        record: SessionRecord,
        rule: CutSession,
        direction: str,
        kind: str,
        *,
        graceful: asyncio.StreamWriter | None = None,
    ) -> _Cut:
        assert record.rule_index is not None
        self.applied[record.rule_index] += 1
        record.cut = f"{rule.when} {direction} {kind}"
        return _Cut(record.cut, graceful)


def _next_frame(buffer: bytearray) -> tuple[str, bytes] | bool | None:
    """The next whole frame (type name, bytes); None if incomplete; False if not a frame."""
    if len(buffer) < _FRAME_HEADER.size:
        return None if _MAGIC.startswith(bytes(buffer[:2])) else False
    magic, _version, type_code, length = _FRAME_HEADER.unpack_from(buffer)
    if magic != _MAGIC:
        return False
    total = _FRAME_HEADER.size + length + _FRAME_MAC_BYTES
    if len(buffer) < total:
        return None
    try:
        kind = FrameType(type_code).name
    except ValueError:
        kind = f"type-{type_code}"
    return kind, bytes(buffer[:total])


def in_shard(size: int, shards: int, index: int) -> Callable[[ProxyRequest], bool]:
    """Matches ranged GETs that start inside shard `index`'s download [s_i - 1, s_{i+1})."""
    shard = ShardRange.of(size, shards, index)

    def within(request: ProxyRequest) -> bool:
        span = request.byte_range
        return span is not None and shard.fetch_start <= span[0] < shard.end

    return within
