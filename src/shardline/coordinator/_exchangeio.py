# The exchange's connection plumbing: the plain and TLS byte streams a
# connection reads and writes (TLS over memory BIOs, so that the handshake runs
# inside the connection's handler, under its deadline and caps), the caps on
# connections that have not authenticated yet, and the TLS context.

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Protocol, SupportsIndex, TypeVar, cast

from ..errors import (
    ConfigurationError,
)

__all__ = [
    "DeliveringReader",
    "Stream",
    "TlsStream",
    "Unauthenticated",
    "delivering_protocol_factory",
    "server_tls_context",
]

#: Raw reads while a TLS handshake runs: one TLS record.
TLS_READ_BYTES = 16 * 1024


class _Peer(Protocol):
    host: str


C = TypeVar("C", bound=_Peer)


class DeliveringReader(asyncio.StreamReader):
    """A StreamReader that, once `deliver_to` is called, hands each chunk the
    transport receives straight to a callback (b"" for the end), inside the
    transport's own callback, instead of buffering it for a task's `read`.

    The exchange reads a connection's handshake with `read` (under its
    deadline), then has its frames handled the moment they arrive: a HEAD is
    relayed before any task runs, whatever else the coordinator is doing.
    """

    _deliver: Callable[[bytes | None], None] | None = None

    def deliver_to(self, callback: Callable[[bytes | None], None]) -> bytes:
        """From now on, pass received bytes to `callback`; returns the bytes
        already buffered, which the caller handles first."""
        # StreamReader's own buffer (not public API, the same from 3.8 to 3.13):
        # whatever arrived after the last read of the handshake.
        pending: bytearray = self._buffer  # type: ignore[attr-defined]
        buffered = bytes(pending)
        pending.clear()
        self._deliver = callback
        return buffered

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        if self._deliver is not None:
            self._deliver(cast(bytes, data))  # what transports feed
        else:
            super().feed_data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        if self._deliver is not None:
            self._deliver(None)

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        if self._deliver is not None:
            self._deliver(None)  # the connection is lost: to the session, the end


def delivering_protocol_factory(
    connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[], asyncio.Protocol]:
    """What `asyncio.start_server` builds per connection, with a DeliveringReader."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        return asyncio.StreamReaderProtocol(DeliveringReader(loop=loop), connected, loop=loop)

    return factory


class Stream:
    """The bytes of one plain TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    def deliver_to(self, callback: Callable[[bytes | None], None]) -> None:
        """Hand the connection's received bytes (still encrypted: see `decode`)
        to `callback` as they arrive, None at the end; what was received
        already goes first, now (maybe b"")."""
        assert isinstance(self._reader, DeliveringReader), "accepted through delivering_protocol_factory"
        buffered = self._reader.deliver_to(callback)
        callback(buffered)
        if self._reader.at_eof() or self._reader.exception() is not None:
            callback(None)

    def decode(self, data: bytes) -> bytes:
        """The plaintext of bytes `deliver_to` passed on (then see `peer_closed`)."""
        return data

    #: Whether the peer ended the session inside the stream (TLS close_notify),
    #: which ends it as the transport's EOF does.
    peer_closed = False

    def pause_reading(self) -> None:
        self._writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if not self._writer.transport.is_closing():
            self._writer.transport.resume_reading()  # type: ignore[attr-defined]

    def write_buffer_size(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def read(self, max_bytes: int) -> bytes:
        """Up to `max_bytes`; b"" at EOF."""
        return await self._reader.read(max_bytes)

    async def write(self, data: bytes) -> None:
        self.write_now(data)
        await self.drain()

    def write_now(self, data: bytes) -> None:
        """Hand `data` to the transport at once (it sends what the socket takes
        and buffers the rest); `drain` waits for that buffer to empty."""
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class TlsStream(Stream):
    """TLS over a plain connection, through memory BIOs.

    Terminating TLS here instead of in the event loop's transport means the
    handshake happens inside the connection's handler: under its deadline,
    counted against the caps, and evictable like any unauthenticated peer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
        super().__init__(reader, writer)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._received_any = False

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive() and not self._received_any:
                    raise ConnectionAbortedError("closed before the TLS handshake") from None
            else:
                await self._flush()
                return

    async def read(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self._tls.read(max_bytes)
            except ssl.SSLWantReadError:
                await self._flush()  # a key update may want an answer
                await self._receive()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write_now(self, data: bytes) -> None:
        self._tls.write(data)
        self._send_outgoing()

    def decode(self, data: bytes) -> bytes:
        """Decrypt what arrived (b"": whatever the SSL object holds already)."""
        if data:
            self._incoming.write(data)
        plain = bytearray()
        while True:
            try:
                chunk = self._tls.read(TLS_READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:  # its close_notify (read returns b"" then): the session's end, as EOF is
                self.peer_closed = True
                break
            plain += chunk
        self._send_outgoing()  # a key update may want an answer
        return bytes(plain)

    async def _receive(self) -> bool:
        data = await self._reader.read(TLS_READ_BYTES)
        if not data:
            self._incoming.write_eof()
            return False
        self._received_any = True
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        if self._send_outgoing():
            await self.drain()

    def _send_outgoing(self) -> bool:
        """Hand the transport what the SSL object has for the wire (already
        encrypted, so past our own `write_now`); False if it had nothing."""
        pending = self._outgoing.read()
        if pending:
            Stream.write_now(self, pending)
        return bool(pending)


class Unauthenticated(Generic[C]):
    """The connections that have not authenticated yet, oldest first: in all and per address."""

    def __init__(self, *, max_total: int, max_per_peer: int) -> None:
        if max_total < 1 or max_per_peer < 1:
            raise ConfigurationError("the exchange's unauthenticated connection caps must be >= 1")
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._all: dict[C, None] = {}  # dicts keep insertion order: oldest first
        self._by_host: dict[str, dict[C, None]] = {}

    def admit(self, connection: C) -> list[C]:
        """Add `connection`; returns the connections to evict to keep within the caps."""
        self._all[connection] = None
        same_host = self._by_host.setdefault(connection.host, {})
        same_host[connection] = None
        evict = []
        while len(same_host) > self.max_per_peer:
            evict.append(next(iter(same_host)))
            self.remove(evict[-1])
        while len(self._all) > self.max_total:
            evict.append(next(iter(self._all)))
            self.remove(evict[-1])
        return evict

    def remove(self, connection: C) -> None:
        self._all.pop(connection, None)
        same_host = self._by_host.get(connection.host)
        if same_host is not None:
            same_host.pop(connection, None)
            if not same_host:
                del self._by_host[connection.host]

    def __len__(self) -> int:
        return len(self._all)


def server_tls_context(cert_file: str, key_file: str, *, what: str = "the exchange's") -> ssl.SSLContext:
    """The exchange's TLS context: its certificate chain and key (PEM files).

    Workers verify the certificate against the CA they are given, for the
    host name they dial (the coordinator's advertised host).  The HTTP API
    uses the same kind of context (`what` names it in errors).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load {what} TLS certificate {cert_file!r} and key {key_file!r}: {exc}"
        ) from exc
    return context
