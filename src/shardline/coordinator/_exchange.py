# The coordinator's TCP exchange (DESIGN §3): workers dial in, authenticate
# per job, publish their head fragments, and are pushed their neighbours'
# fragments the moment both sides are present.  The coordinator outlives every
# worker of a job, so a fast neighbour that already exited never strands a
# slow one.
#
# The relay keeps one HEAD per (job, shard) and a set of sessions waiting for
# it.  Everything a job needs to decide (accept a session, commit a result) is
# asked of the job's `ExchangeHooks`; this module only moves frames.  A
# misbehaving connection (garbage, wrong secret, replayed or oversized frames,
# frames illegal in its state) is logged and closed; it cannot touch any
# job's state.

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ConfigurationError, ProtocolError, RemoteProtocolError
from ..protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    NEED_DATA,
    Ack,
    Done,
    Error,
    ExchangeSession,
    Failed,
    Fragment,
    Frame,
    Head,
    Hello,
    Pending,
    Progress,
    Want,
)
from ._metrics import HANDSHAKE_WAIT_BUCKETS_S, Histogram

__all__ = ["ExchangeHooks", "ExchangeServer", "server_tls_context"]

log = logging.getLogger("shardline.coordinator.exchange")

_READ_BYTES = 256 * 1024
LISTEN_BACKLOG = 4096
#: A connection must authenticate this quickly or be dropped.
HELLO_TIMEOUT_S = 10.0


class ExchangeHooks(Protocol):
    """What the exchange asks of a job.  All calls are synchronous decisions."""

    def on_connect(self, hello: Hello) -> Error | None:
        """Accept a session (None) or refuse it with the ERROR to send (e.g. a stale attempt)."""

    def on_head(self, hello: Hello, head: Head) -> Error | None:
        """A shard's boundary arrived; an ERROR refuses it (and closes the session)."""

    def on_progress(self, hello: Hello, progress: Progress) -> None: ...

    async def on_done(self, hello: Hello, done: Done) -> bool:
        """Return True if this attempt's result is committed."""

    def on_failed(self, hello: Hello, failed: Failed) -> None: ...

    def on_disconnect(self, hello: Hello) -> None: ...


@dataclass(eq=False)
class _Connection:
    session: ExchangeSession
    writer: asyncio.StreamWriter
    peer: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, frame: Frame) -> None:
        async with self.lock:
            self.writer.write(self.session.send(frame))
            await self.writer.drain()


@dataclass(eq=False)
class _JobRelay:
    secret: bytes
    hooks: ExchangeHooks
    heads: dict[int, Head] = field(default_factory=dict)
    #: Sessions waiting for a shard's HEAD, with the time each WANT arrived.
    waiting: dict[int, dict[_Connection, float]] = field(default_factory=dict)
    #: Every HELLO nonce seen: a captured HELLO replayed verbatim authenticates,
    #: and would otherwise pass for the attempt's liveness.
    hello_nonces: set[str] = field(default_factory=set)


class ExchangeServer:
    """The exchange listener; register jobs before their workers start."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._max_frame_bytes = max_frame_bytes
        self._jobs: dict[str, _JobRelay] = {}
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.rejected_connections = 0
        #: How long each WANT waited for its neighbour's HEAD (0 when it was already here).
        self.handshake_wait_s = Histogram(HANDSHAKE_WAIT_BUCKETS_S)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        # Every worker of a job dials in at once: a deep accept queue.
        self._server = await asyncio.start_server(
            self._accept,
            self._host,
            self._port,
            backlog=LISTEN_BACKLOG,
            ssl=self._tls,
            ssl_handshake_timeout=HELLO_TIMEOUT_S if self._tls else None,
        )
        log.info("exchange listening on %s:%d%s", *self.address, " (TLS)" if self._tls else "")

    @property
    def tls(self) -> bool:
        return self._tls is not None

    async def __aenter__(self) -> ExchangeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def register(self, job_id: str, secret: bytes, hooks: ExchangeHooks) -> None:
        self._jobs[job_id] = _JobRelay(secret=secret, hooks=hooks)

    def unregister(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def _lookup_secret(self, job_id: str) -> bytes | None:
        relay = self._jobs.get(job_id)
        return relay.secret if relay else None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        connection = _Connection(
            session=ExchangeSession.server(self._lookup_secret, max_frame_bytes=self._max_frame_bytes),
            writer=writer,
            peer=peer,
        )
        hello: Hello | None = None
        relay: _JobRelay | None = None
        try:
            while True:
                timeout = HELLO_TIMEOUT_S if hello is None else None
                data = await asyncio.wait_for(reader.read(_READ_BYTES), timeout)
                connection.session.receive_data(data)
                while True:
                    frame = connection.session.next_frame()
                    if frame is NEED_DATA:
                        break
                    if frame is CLOSED:
                        return
                    if isinstance(frame, Hello):
                        relay = self._jobs[frame.job_id]  # the secret lookup proved it exists
                        if frame.nonce in relay.hello_nonces:
                            raise RemoteProtocolError("replayed HELLO (its nonce was used before)")
                        relay.hello_nonces.add(frame.nonce)
                        hello = frame
                        refusal = relay.hooks.on_connect(hello)
                        await connection.send(connection.session.welcome())
                        if refusal is not None:
                            await connection.send(refusal)
                            return
                        continue
                    assert hello is not None and relay is not None
                    refusal = await self._dispatch(connection, hello, relay, frame)  # type: ignore[arg-type]
                    if refusal is not None:
                        await connection.send(refusal)
                        return
        except RemoteProtocolError as exc:
            self.rejected_connections += 1
            who = f"job {hello.job_id} shard {hello.shard} attempt {hello.attempt}" if hello else "unauthenticated peer"
            log.warning("exchange: dropped connection from %s (%s): %s", peer, who, exc)
        except TimeoutError:
            self.rejected_connections += 1
            log.warning("exchange: dropped connection from %s: no HELLO within %.0fs", peer, HELLO_TIMEOUT_S)
        except (OSError, ProtocolError) as exc:
            log.info("exchange: connection from %s ended: %s", peer, exc)
        except asyncio.CancelledError:
            # Only aclose() cancels handlers.  asyncio's server callback would
            # log a cancelled handler task as an error, so end it normally.
            pass
        finally:
            if relay is not None:
                for waiters in relay.waiting.values():
                    waiters.pop(connection, None)
                if hello is not None and self._jobs.get(hello.job_id) is relay:
                    relay.hooks.on_disconnect(hello)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _dispatch(self, connection: _Connection, hello: Hello, relay: _JobRelay, frame: Frame) -> Error | None:
        if isinstance(frame, Head):
            if frame.shard != hello.shard:
                raise RemoteProtocolError(f"shard {hello.shard} sent a HEAD for shard {frame.shard}")
            refusal = relay.hooks.on_head(hello, frame)
            if refusal is not None:
                return refusal
            relay.heads.setdefault(frame.shard, frame)
            now = time.monotonic()
            for waiter, since in list(relay.waiting.pop(frame.shard, {}).items()):
                self.handshake_wait_s.observe(now - since)
                await self._push(waiter, relay.heads[frame.shard])
        elif isinstance(frame, Want):
            head = relay.heads.get(frame.shard)
            if head is not None:
                self.handshake_wait_s.observe(0.0)
                await self._push(connection, head)
            else:
                relay.waiting.setdefault(frame.shard, {})[connection] = time.monotonic()
                await connection.send(Pending(shard=frame.shard))
        elif isinstance(frame, Progress):
            relay.hooks.on_progress(hello, frame)
        elif isinstance(frame, Done):
            committed = await relay.hooks.on_done(hello, frame)
            await connection.send(Ack(committed=committed))
        elif isinstance(frame, Failed):
            relay.hooks.on_failed(hello, frame)
            await connection.send(Ack(committed=False))
        elif isinstance(frame, Error):
            log.warning("exchange: worker shard %d attempt %d reported: %s", hello.shard, hello.attempt, frame.message)
        return None

    async def _push(self, connection: _Connection, head: Head) -> None:
        try:
            await connection.send(Fragment.relaying(head))
        except OSError as exc:  # the waiter left; it will use the marker or scan
            log.info("exchange: could not push shard %d's head to %s: %s", head.shard, connection.peer, exc)


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
