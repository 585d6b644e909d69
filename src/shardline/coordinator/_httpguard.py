# Who may talk to the HTTP API, and for how long (DESIGN §9).
#
# The API runs commands by design.  So beyond the bearer token, a request
# must come to this server by one of its own names (a DNS-rebinding page
# sends its own name in Host), must not come from a web page (browsers send
# Origin and Sec-Fetch-Site; no legitimate client of ours is a page), and a
# body must be JSON (a page can send text/plain to anyone without asking).
# The pure checks live here; `_http` applies them in a middleware.
#
# Below HTTP, every connection's protocol is wrapped (`GuardedProtocol`):
# past `max_connections` a connection is answered 503 and closed before
# aiohttp sees it, and a connection whose request head is not complete
# `header_timeout_s` after it opened (or after the first byte of a later
# request on it) is answered 408 and closed.  aiohttp has no such deadline
# of its own: its keep-alive timer restarts with every byte, so a client
# trickling its head holds the connection for as long as it likes.
#
# Every refusal is counted by cause (`shardline_http_refused_total`) and
# logged at most once a minute per cause, so a flood cannot flood the log.

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ..errors import ConfigurationError
from ..io.urls import ip_literal, is_loopback_host
from ._metrics import HTTP_REFUSAL_CAUSES
from ._refusals import REFUSAL_LOG_INTERVAL_S, Refusals

__all__ = [
    "ConnectionGuard",
    "GuardedProtocol",
    "HostNames",
    "HttpAccess",
    "HttpLimits",
    "guarded_protocol",
    "http_refusals",
    "is_own_origin",
]

log = logging.getLogger("shardline.coordinator.http")

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """What one HTTP client may cost the coordinator: a few KiB and a few seconds."""

    #: From a connection's start (or the first byte of a later request on it)
    #: to the end of the request head; an absolute deadline, not per read.
    header_timeout_s: float = 5.0
    #: From the end of the head to the end of a POST /jobs body (absolute).
    body_timeout_s: float = 10.0
    #: Longest POST /jobs body (a job spec is a few hundred bytes).
    max_body_bytes: int = 64 * 1024
    #: Connections open at once, output streams included; more are answered 503.
    max_connections: int = 256
    #: Idle time allowed between requests on a kept-alive connection (longer
    #: than aiohttp clients keep theirs, 15 s, so the client closes first).
    keepalive_timeout_s: float = 30.0
    #: After an answer sent before its request's body was read (a refusal),
    #: how long the rest of that body is read and dropped before closing.
    lingering_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "lingering_s"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"HTTP limit {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"HTTP limit {name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpAccess:
    """Who may use the API: the bearer token and the names the server answers to."""

    #: Required on every route but /healthz.  None only when the operator
    #: chose to run without authentication (``--insecure-no-auth``).
    token: str | None
    #: The address the server listens on; a host name here is one of its names.
    bind_host: str = "127.0.0.1"
    #: More names clients may use in Host: "NAME" (with any port) or
    #: "NAME:PORT" (with that port only), e.g. behind a proxy or port mapping.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ConfigurationError("the API token is empty")
        for entry in self.allowed_hosts:
            if _split_host(entry) is None:
                raise ConfigurationError(f"--allowed-host {entry!r}: not a host name, NAME or NAME:PORT")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header value, or None if it is not one."""
    try:
        parts = urllib.parse.urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        return None
    return name, port


class HostNames:
    """The Host header values this server answers to.

    A request names this server if its Host is, with the port the connection
    arrived on: the IP address it arrived on; a loopback name or address
    when it arrived on loopback; the host name the server is bound to; or
    any `allowed_hosts` entry (with its own port rule).  IP literals are
    safe to accept: a DNS-rebinding page sends its own host name.
    """

    def __init__(self, access: HttpAccess) -> None:
        bind = access.bind_host.strip("[]").lower()
        self._bound_name = bind if bind not in _WILDCARD_HOSTS and ip_literal(bind) is None else None
        self._any_port: set[str] = set()
        self._with_port: set[tuple[str, int]] = set()
        for entry in access.allowed_hosts:
            parsed = _split_host(entry)
            assert parsed is not None  # checked by HttpAccess
            name, port = parsed
            if port is None:
                self._any_port.add(name)
            else:
                self._with_port.add((name, port))

    def allows(self, host: str, *, local: tuple[str, int], default_port: int) -> bool:
        """Whether `host` (a Host header) names this server, for a connection to `local`."""
        parsed = _split_host(host)
        if parsed is None:
            return False
        name, given_port = parsed
        port = default_port if given_port is None else given_port
        if name in self._any_port or (name, port) in self._with_port:
            return True
        local_ip, local_port = ip_literal(local[0]), local[1]
        if port != local_port or local_ip is None:
            return False
        address = ip_literal(name)
        if address is not None:
            return address == local_ip or (address.is_loopback and local_ip.is_loopback)
        return name == self._bound_name or (local_ip.is_loopback and is_loopback_host(name))


def is_own_origin(origin: str, *, scheme: str, host: str | None) -> bool:
    """Whether `origin` (an Origin header) is the server as the request addressed it
    (`scheme` and its Host, port included); "null" never is."""
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    if host is None or parts.scheme != scheme or parts.path or parts.query or parts.fragment:
        return False
    default_port = 443 if scheme == "https" else 80
    addressed, claimed = _split_host(host), _split_host(parts.netloc)
    if addressed is None or claimed is None:
        return False
    return (addressed[0], addressed[1] or default_port) == (claimed[0], claimed[1] or default_port)


def http_refusals(counts: Counter[str], *, log_interval_s: float = REFUSAL_LOG_INTERVAL_S) -> Refusals:
    """The refusals of one HTTP server, counted into `counts` (shardline_http_refused_total)."""
    return Refusals(
        "HTTP",
        causes=HTTP_REFUSAL_CAUSES,
        counts=counts,
        metric="shardline_http_refused_total",
        unit="request",
        log=log,
        log_interval_s=log_interval_s,
    )


def _canned(status: int, reason: str, message: str, *headers: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for refusals below aiohttp."""
    body = json.dumps({"error": message}).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


_TOO_MANY_CONNECTIONS = _canned(
    503, "Service Unavailable", "too many connections to this coordinator; try again shortly", "Retry-After: 1"
)
_HEAD_TIMEOUT = _canned(408, "Request Timeout", "the request head did not arrive in time")


class ConnectionGuard:
    """The connection cap and head deadline, shared by every connection of one server."""

    def __init__(self, limits: HttpLimits, refusals: Refusals) -> None:
        self.limits = limits
        self.refusals = refusals
        self.open_connections = 0

    def wrap(self, make_protocol: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` around aiohttp's own."""
        return lambda: GuardedProtocol(self, make_protocol)


class GuardedProtocol(asyncio.Protocol):
    """One connection: aiohttp's protocol, admitted under the cap, with a head deadline.

    The API's middleware reports when a request's head has been parsed
    (`request_started`) and when it has been answered (`request_finished`);
    in between no deadline runs (the handler bounds its own body read).
    """

    def __init__(self, guard: ConnectionGuard, make_protocol: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_protocol = make_protocol
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        guard = self._guard
        if guard.open_connections >= guard.limits.max_connections:
            guard.refusals.refuse(
                "connection_limit",
                f"{guard.open_connections} connections already open (limit {guard.limits.max_connections}); "
                f"answered {_peer(transport)} 503",
            )
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        guard.open_connections += 1
        self._inner = self._make_protocol()
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._in_request and self._deadline is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        inner, self._inner = self._inner, None
        if inner is not None:
            self._guard.open_connections -= 1
            inner.connection_lost(exc)

    def request_started(self) -> None:
        self._in_request = True
        self._disarm()

    def request_finished(self) -> None:
        self._in_request = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.limits.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        transport = self._transport
        if self._in_request or transport is None or transport.is_closing():
            return
        self._guard.refusals.refuse(
            "header_timeout",
            f"{_peer(transport)} sent no complete request head in {self._guard.limits.header_timeout_s:g}s; "
            "connection closed",
        )
        transport.write(_HEAD_TIMEOUT)
        transport.close()


def guarded_protocol(transport: asyncio.BaseTransport | None) -> GuardedProtocol | None:
    """The guard of the connection `transport` belongs to, if it has one."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedProtocol) else None


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"
