# The coordinator's TCP exchange (DESIGN §3, §9): workers dial in, authenticate
# per shard attempt, publish their head fragments, and are pushed their
# neighbours' fragments the moment both sides are present.  The coordinator
# outlives every worker of a job, so a fast neighbour that already exited
# never strands a slow one.
#
# The relay keeps one HEAD per (job, shard) and a set of sessions waiting for
# it.  A WANT for a head that is not here yet is answered with the FRAGMENT
# the moment the HEAD arrives; PENDING (fall back to the marker or a scan) is
# held back for up to PENDING_HOLD_S while the neighbour is connected, since
# its HEAD is then one read away, and for PENDING_GRACE_S while it is not
# (it may be connecting right now): a worker that reaches its tail
# waits for that answer, and a push costs it nothing while a fallback costs
# S3 reads.  Every per-event cost here is O(1) in the number of shards.
#
# Once a session is open its frames are handled in the transport's read
# callback, as they arrive: a HEAD is pushed to its waiters (one write each,
# no task) before any task of the coordinator runs, whatever else it is
# doing.  Only what must await -- a DONE's output check, a slow reader's
# drain -- goes to the session's task, which handles it and then lets the
# callback go on with the frames that arrived meanwhile, in order.
#
# Everything a job needs to decide (accept a session, commit a result) is
# asked of the job's `ExchangeHooks`; this module only moves frames.  A
# misbehaving connection (garbage, wrong secret, replayed or oversized frames,
# frames illegal in its state) is closed; it cannot touch any job's state.
#
# The port faces the workers' network, so a stranger on it may cost a few
# KiB and a few seconds, never a job:
#
# - Before its HELLO has verified, a peer's frames may be at most
#   MAX_HANDSHAKE_FRAME_BYTES (4 KiB), read a few KiB at a time; the full
#   frame limit applies only to an authenticated session.
# - It has ONE deadline, HANDSHAKE_DEADLINE_S from accept, to finish the TLS
#   handshake and send a HELLO that verifies; trickling bytes do not extend
#   it.  TLS is terminated here (over memory BIOs) rather than by the event
#   loop, so that the deadline, the caps and the byte limits cover it too.
# - Unauthenticated connections are capped, in all and per peer address.  A
#   newcomer beyond a cap evicts the OLDEST unauthenticated connection rather
#   than being refused: workers dial in from the same addresses a flood may
#   come from, and a worker authenticates within milliseconds, so it is never
#   the oldest for long, while a stranger that keeps a connection open gets
#   pushed out.
# - An authenticated session that sends nothing for its job's heartbeat
#   deadline is closed.
#
# Every refusal is counted by cause (`refused`, shown by /metrics as
# shardline_exchange_refused_total{cause}) and logged the first time for its
# cause, then as a count at most once a minute: a flood must not become a
# flood of log lines.

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import (
    AuthenticationError,
    FrameTooLargeError,
    ProtocolError,
    RemoteProtocolError,
)
from ..io.rlimits import open_files_limit
from ..protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES,
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
    attempt_secret,
)
from ._exchangeio import Stream, TlsStream, Unauthenticated, delivering_protocol_factory
from ._metrics import HANDSHAKE_WAIT_BUCKETS_S, Histogram
from ._refusals import REFUSAL_LOG_INTERVAL_S, Refusals

__all__ = ["REFUSAL_CAUSES", "ExchangeHooks", "ExchangeServer"]

log = logging.getLogger("shardline.coordinator.exchange")

_READ_BYTES = 256 * 1024

#: How many ended jobs an attempt may still connect for and be told to stop.
_ENDED_JOBS_KEPT = 1024
#: Past this many bytes waiting in a session's transport, its frames wait
#: until the peer has read them (what a WANT of a known head, or a flood of
#: them, may queue up).
_WRITE_BUFFER_HIGH_BYTES = 1024 * 1024
#: A session's outcome: its peer must read before it is served more frames.
_DRAIN = object()
LISTEN_BACKLOG = 4096
#: From accept to a verified HELLO, TLS handshake included: one deadline, not per read.
HANDSHAKE_DEADLINE_S = 10.0
#: Unauthenticated connections held at once, in all and from one address
#: (further capped at a quarter, and a sixteenth, of the open-file limit).
MAX_UNAUTHENTICATED = 1024
MAX_UNAUTHENTICATED_PER_PEER = 256

#: How long PENDING waits for the HEAD of a connected neighbour (below the
#: worker's 2 s wait for an answer, `ShardSettings.want_answer_timeout_s`).
PENDING_HOLD_S = 1.0
#: ... and for a neighbour with no session yet: barely longer than it takes to connect.
PENDING_GRACE_S = 0.1

#: Why the exchange closed a connection: the `cause` label of
#: shardline_exchange_refused_total.
REFUSAL_CAUSES = (
    "preauth_oversized",  # a frame over MAX_HANDSHAKE_FRAME_BYTES before the HELLO verified
    "handshake_deadline",  # no verified HELLO (TLS included) within HANDSHAKE_DEADLINE_S of accept
    "evicted",  # the oldest unauthenticated connection, making room beyond a cap
    "tls_failed",  # the TLS handshake failed
    "bad_frame",  # malformed, truncated or out-of-place frames
    "auth_failed",  # a HELLO for an unknown job, or a MAC that does not verify
    "replayed_hello",  # a HELLO whose nonce was seen before
    "idle",  # an authenticated session silent for longer than its job's heartbeat deadline
)


class ExchangeHooks(Protocol):
    """What the exchange asks of a job.  All calls are synchronous decisions."""

    def session_idle_timeout_s(self) -> float:
        """Close an authenticated session that sends nothing for this long (the job's heartbeat deadline)."""

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
    stream: Stream
    session: ExchangeSession
    peer: str  # host:port
    host: str
    accepted_at: float  # loop time
    hello: Hello | None = None  # once authenticated
    relay: _JobRelay | None = None  # its job's, once authenticated
    #: The cause it was refused for, once it has been (each connection counts once).
    refused: str | None = None
    #: Shards whose HEAD it waits for, each with the timer that will answer PENDING.
    wants: dict[int, asyncio.TimerHandle | None] = field(default_factory=dict)
    #: When its last frame arrived (loop time), once authenticated; the timer
    #: that closes it after its job's heartbeat deadline without one; whether it did.
    last_frame_at: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None
    idled: bool = False
    #: Once open, its frames are handled as they arrive until one needs its
    #: task (`blocked`): `outcome` says what, `handoff` wakes the task.  While
    #: blocked, what arrives is buffered, reading `paused` past _READ_BYTES.
    blocked: bool = False
    outcome: object | None = None
    handoff: asyncio.Future[None] | None = None
    paused: bool = False
    ended: bool = False  # its end (EOF or loss) was received
    failure: Exception | None = None  # what its bytes raised (TLS), for its task to raise

    def send_now(self, frame: Frame) -> None:
        """Encode and hand `frame` to the transport, with no await in between:
        frames leave in the order their MACs are numbered, with no lock."""
        self.stream.write_now(self.session.send(frame))

    async def send(self, frame: Frame) -> None:
        """`send_now`, then wait while the peer is slow to read (backpressure
        on the session that caused the frame)."""
        self.send_now(frame)
        await self.stream.drain()

    @property
    def who(self) -> str:
        hello = self.hello
        if hello is None:
            return f"unauthenticated peer {self.peer}"
        return f"{self.peer} (job {hello.job_id} shard {hello.shard} attempt {hello.attempt})"


class _Refusal(Exception):
    """Close the connection for `cause` (one of REFUSAL_CAUSES)."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def _refusal_for(exc: RemoteProtocolError, *, authenticated: bool) -> _Refusal:
    if isinstance(exc, AuthenticationError):
        return _Refusal("auth_failed", str(exc))
    if isinstance(exc, FrameTooLargeError) and not authenticated:
        return _Refusal("preauth_oversized", str(exc))
    return _Refusal("bad_frame", str(exc))


@dataclass(eq=False)
class _JobRelay:
    secret: bytes = field(repr=False)  # the job's; each attempt's is derived from it
    hooks: ExchangeHooks
    heads: dict[int, Head] = field(default_factory=dict)
    #: Sessions waiting for a shard's HEAD, with the time each WANT arrived.
    waiting: dict[int, dict[_Connection, float]] = field(default_factory=dict)
    #: Authenticated sessions per shard (attempts of one shard may overlap).
    sessions: Counter[int] = field(default_factory=Counter)
    #: Every HELLO nonce seen: a captured HELLO replayed verbatim authenticates,
    #: and would otherwise pass for the attempt's liveness.
    hello_nonces: set[str] = field(default_factory=set)


class ExchangeServer:
    """The exchange listener; register jobs before their workers start.

    The caps on unauthenticated connections default to MAX_UNAUTHENTICATED
    (a quarter of the open-file limit at most) and MAX_UNAUTHENTICATED_PER_PEER
    (a quarter of that at most).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tls: ssl.SSLContext | None = None,
        handshake_deadline_s: float = HANDSHAKE_DEADLINE_S,
        max_unauthenticated: int | None = None,
        max_unauthenticated_per_peer: int | None = None,
        refusal_log_interval_s: float = REFUSAL_LOG_INTERVAL_S,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._max_frame_bytes = max_frame_bytes
        self._handshake_deadline_s = handshake_deadline_s
        total = max_unauthenticated or max(1, min(MAX_UNAUTHENTICATED, open_files_limit() // 4))
        per_peer = max_unauthenticated_per_peer or max(1, min(MAX_UNAUTHENTICATED_PER_PEER, total // 4))
        self._unauthenticated: Unauthenticated[_Connection] = Unauthenticated(max_total=total, max_per_peer=per_peer)
        self._jobs: dict[str, _JobRelay] = {}
        #: Secrets of the last _ENDED_JOBS_KEPT jobs unregistered (see unregister).
        self._ended: OrderedDict[str, bytes] = OrderedDict()
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: Connections closed by the exchange, by cause (REFUSAL_CAUSES).
        self.refused: Counter[str] = Counter(dict.fromkeys(REFUSAL_CAUSES, 0))
        self._refusals = Refusals(
            "exchange",
            causes=REFUSAL_CAUSES,
            counts=self.refused,
            metric="shardline_exchange_refused_total",
            unit="connection",
            log=log,
            log_interval_s=refusal_log_interval_s,
        )
        #: How long each WANT waited for its neighbour's HEAD (0 when it was already here).
        self.handshake_wait_s = Histogram(HANDSHAKE_WAIT_BUCKETS_S)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        # Every worker of a job dials in at once: a deep accept queue.
        self._server = await asyncio.get_running_loop().create_server(
            delivering_protocol_factory(self._accept), self._host, self._port, backlog=LISTEN_BACKLOG
        )
        log.info(
            "exchange listening on %s:%d%s; at most %d unauthenticated connections (%d per address), "
            "%.0fs to authenticate",
            *self.address,
            " (TLS)" if self._tls else "",
            self._unauthenticated.max_total,
            self._unauthenticated.max_per_peer,
            self._handshake_deadline_s,
        )

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
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            self._refusals.flush()

    def register(self, job_id: str, secret: bytes, hooks: ExchangeHooks) -> None:
        """Serve `job_id`'s attempts; `secret` is the job's (protocol.job_secret)."""
        self._jobs[job_id] = _JobRelay(secret=secret, hooks=hooks)

    def unregister(self, job_id: str) -> None:
        relay = self._jobs.pop(job_id, None)
        if relay is not None:
            # An attempt still starting when its job ended is ours, not a
            # stranger: it is told the job is over and stops.
            self._ended[job_id] = relay.secret
            while len(self._ended) > _ENDED_JOBS_KEPT:
                self._ended.popitem(last=False)

    def _lookup_secret(self, hello: Hello) -> bytes | None:
        relay = self._jobs.get(hello.job_id)
        secret = relay.secret if relay is not None else self._ended.get(hello.job_id)
        return attempt_secret(secret, hello.shard, hello.attempt) if secret is not None else None

    # -- one connection ------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        connection = _Connection(
            stream=TlsStream(reader, writer, self._tls) if self._tls else Stream(reader, writer),
            session=ExchangeSession.server(self._lookup_secret, max_frame_bytes=self._max_frame_bytes),
            peer=f"{host}:{port}",
            host=str(host),
            accepted_at=asyncio.get_running_loop().time(),
        )
        for oldest in self._unauthenticated.admit(connection):
            unauthenticated_s = connection.accepted_at - oldest.accepted_at
            self._refuse(oldest, _Refusal("evicted", f"unauthenticated for {unauthenticated_s:.1f}s, over a cap"))
            oldest.stream.abort()
        try:
            if await self._authenticate(connection):
                await self._serve_session(connection)
        except _Refusal as refusal:
            self._refuse(connection, refusal)
        except RemoteProtocolError as exc:
            self._refuse(connection, _refusal_for(exc, authenticated=connection.hello is not None))
        except ssl.SSLError as exc:
            self._refuse(connection, _Refusal("tls_failed", str(exc)))
        except (OSError, ProtocolError) as exc:
            # A peer that leaves is no refusal; a stranger's goings are not worth a line each.
            level = logging.INFO if connection.hello is not None else logging.DEBUG
            log.log(level, "exchange: connection of %s ended: %s", connection.who, exc)
        except asyncio.CancelledError:
            # Only aclose() cancels handlers.  asyncio's server callback would
            # log a cancelled handler task as an error, so end it normally.
            pass
        finally:
            self._unauthenticated.remove(connection)
            relay, hello = connection.relay, connection.hello
            if relay is not None and hello is not None:
                relay.sessions[hello.shard] -= 1
                if relay.sessions[hello.shard] <= 0:
                    del relay.sessions[hello.shard]
                for shard, timer in connection.wants.items():  # its own wants only: O(1), not O(shards)
                    if timer is not None:
                        timer.cancel()
                    waiters = relay.waiting.get(shard)
                    if waiters is not None:
                        waiters.pop(connection, None)
                        if not waiters:
                            del relay.waiting[shard]
                connection.wants.clear()
                if self._jobs.get(hello.job_id) is relay:
                    relay.hooks.on_disconnect(hello)
            await connection.stream.aclose()
            self._handlers.discard(task)

    def _refuse(self, connection: _Connection, refusal: _Refusal) -> None:
        if connection.refused is not None:
            return  # e.g. evicted: its handler then sees the connection end
        connection.refused = refusal.cause
        self._refusals.refuse(refusal.cause, f"{connection.who}: {refusal}")

    async def _authenticate(self, connection: _Connection) -> bool:
        """TLS and a verified, fresh HELLO within one deadline from accept;
        then WELCOME, or the job's refusal.  True if the session is open,
        False if the peer left first or the job refused it."""
        session = connection.session
        try:
            async with asyncio.timeout_at(connection.accepted_at + self._handshake_deadline_s):
                if isinstance(connection.stream, TlsStream):
                    await connection.stream.handshake()
                while True:
                    frame = session.next_frame()
                    if frame is CLOSED:
                        return False
                    if frame is NEED_DATA:
                        session.receive_data(await connection.stream.read(MAX_HANDSHAKE_FRAME_BYTES))
                        continue
                    assert isinstance(frame, Hello)  # the session accepts nothing else first
                    break
        except TimeoutError:
            raise _Refusal(
                "handshake_deadline", f"no verified HELLO within {self._handshake_deadline_s:g}s of connecting"
            ) from None
        relay = self._jobs.get(frame.job_id)  # the secret lookup just proved it exists, or existed
        if relay is None:
            log.debug("exchange: %s connected after its job ended; telling it to stop", connection.peer)
            connection.send_now(session.welcome())
            connection.send_now(Error(message=f"job {frame.job_id} has ended", stale=True))  # as a job's refusal
            await connection.stream.drain()
            return False
        if frame.nonce in relay.hello_nonces:
            raise _Refusal("replayed_hello", "replayed HELLO (its nonce was used before)")
        relay.hello_nonces.add(frame.nonce)
        connection.hello, connection.relay = frame, relay
        relay.sessions[frame.shard] += 1
        self._unauthenticated.remove(connection)
        refusal = relay.hooks.on_connect(frame)
        connection.send_now(session.welcome())
        if refusal is not None:
            connection.send_now(refusal)  # one write with the WELCOME
        await connection.stream.drain()
        return refusal is None

    async def _serve_session(self, connection: _Connection) -> None:
        """Serve an open session.  Its frames are handled as they arrive, in
        the transport's callback (`_received`): a HEAD is relayed before any
        task runs.  This task does only what must await -- a DONE's output
        check, a slow reader's drain -- and ends the session."""
        relay = connection.relay
        assert connection.hello is not None and relay is not None
        loop = asyncio.get_running_loop()
        idle_s = relay.hooks.session_idle_timeout_s()
        connection.last_frame_at = loop.time()
        self._watch_idle(connection, idle_s)
        try:
            # From here on its frames are handled as they arrive (those already here first).
            connection.stream.deliver_to(functools.partial(self._received, connection))
            while True:
                if connection.outcome is None:
                    connection.handoff = loop.create_future()
                    await connection.handoff
                outcome, connection.outcome = connection.outcome, None
                try:
                    if connection.idled:
                        raise _Refusal("idle", f"no frame for {idle_s:g}s (the job's heartbeat deadline)")
                    if outcome is CLOSED:
                        return
                    if isinstance(outcome, BaseException):
                        raise outcome
                    if isinstance(outcome, Error):  # a refusal: say why, and close
                        await connection.send(outcome)
                        return
                    if isinstance(outcome, Done):
                        committed = await relay.hooks.on_done(connection.hello, outcome)
                        await connection.send(Ack(committed=committed))
                    else:  # _DRAIN: the peer reads slower than it is sent frames
                        await connection.stream.drain()
                except OSError:
                    if connection.idled:
                        raise _Refusal("idle", f"no frame for {idle_s:g}s (the job's heartbeat deadline)") from None
                    raise
                if connection.failure is not None:
                    raise connection.failure
                connection.blocked = False
                if connection.paused:
                    connection.paused = False
                    connection.stream.resume_reading()
                self._take_frames(connection)
        finally:
            connection.blocked = True  # nothing more is handled for it
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()

    def _received(self, connection: _Connection, data: bytes | None) -> None:
        """Bytes of an open session arrived (None: its end); called by the transport."""
        if connection.ended:
            return
        try:
            if data is None:
                connection.ended = True
                connection.session.receive_data(b"")
            else:
                plain = connection.stream.decode(data)
                if plain:
                    connection.session.receive_data(plain)
                if connection.stream.peer_closed:  # TLS close_notify: the end, as EOF is
                    connection.ended = True
                    connection.session.receive_data(b"")
        except Exception as exc:  # TLS that does not decrypt: raised by its task
            connection.ended = True
            connection.failure = exc
            connection.stream.abort()
            if not connection.blocked:
                self._hand_over(connection, exc)
            return
        if not connection.blocked:
            self._take_frames(connection)
        elif not connection.paused and connection.session.buffered_bytes > _READ_BYTES:
            connection.paused = True  # until its task has done what it awaits
            connection.stream.pause_reading()

    def _take_frames(self, connection: _Connection) -> None:
        """Handle the session's whole frames in order, until one needs its task."""
        loop = asyncio.get_running_loop()
        while not connection.blocked:
            outcome: object
            try:
                frame = connection.session.next_frame()
                if frame is NEED_DATA:
                    return
                if frame is CLOSED:
                    outcome = CLOSED
                else:
                    connection.last_frame_at = loop.time()
                    outcome = self._handle(connection, frame)  # type: ignore[arg-type]
                    if outcome is None and connection.stream.write_buffer_size() > _WRITE_BUFFER_HIGH_BYTES:
                        outcome = _DRAIN
            except Exception as exc:  # raised by its task, not into the transport's callback
                outcome = exc
            if outcome is not None:
                self._hand_over(connection, outcome)

    def _hand_over(self, connection: _Connection, outcome: object) -> None:
        """Stop handling `connection`'s frames; its task does `outcome`."""
        connection.blocked = True
        connection.outcome = outcome
        if connection.handoff is not None and not connection.handoff.done():
            connection.handoff.set_result(None)

    def _watch_idle(self, connection: _Connection, idle_s: float) -> None:
        """Close `connection` once it has sent no frame for `idle_s`: one timer
        per idle period, re-armed when it comes due, rather than one per read."""
        loop = asyncio.get_running_loop()
        due = connection.last_frame_at + idle_s
        if loop.time() < due:
            connection.idle_timer = loop.call_at(due, self._watch_idle, connection, idle_s)
            return
        connection.idle_timer = None
        connection.idled = True
        connection.stream.abort()  # its read ends, and the handler refuses it as idle

    def _handle(self, connection: _Connection, frame: Frame) -> Error | Done | None:
        """Handle one frame of an open session now; returns what its task must
        do instead: an ERROR to refuse it with, or a DONE to check and answer."""
        hello, relay = connection.hello, connection.relay
        assert hello is not None and relay is not None
        if isinstance(frame, Head):
            if frame.shard != hello.shard:
                raise RemoteProtocolError(f"shard {hello.shard} sent a HEAD for shard {frame.shard}")
            refusal = relay.hooks.on_head(hello, frame)
            if refusal is not None:
                return refusal
            head = relay.heads.setdefault(frame.shard, frame)
            now = time.monotonic()
            waiters = relay.waiting.pop(frame.shard, {})
            for waiter, since in waiters.items():
                self.handshake_wait_s.observe(now - since)
                timer = waiter.wants.pop(frame.shard, None)
                if timer is not None:
                    timer.cancel()
            # Every waiter at once, before anything else happens: a push is a
            # write the transport buffers, so a slow reader delays neither the
            # other waiters nor this session.  What a waiter may be sent without
            # reading is bounded by its WANTs (each answered once).
            for waiter in waiters:
                self._push_now(waiter, head)
        elif isinstance(frame, Want):
            known = relay.heads.get(frame.shard)
            if known is not None:
                self.handshake_wait_s.observe(0.0)
                self._push_now(connection, known)
            elif frame.shard not in connection.wants:
                relay.waiting.setdefault(frame.shard, {})[connection] = time.monotonic()
                connection.wants[frame.shard] = None
                self._hold_pending(connection, relay, frame.shard, asyncio.get_running_loop().time())
        elif isinstance(frame, Progress):
            relay.hooks.on_progress(hello, frame)
        elif isinstance(frame, Done):
            return frame
        elif isinstance(frame, Failed):
            relay.hooks.on_failed(hello, frame)
            connection.send_now(Ack(committed=False))
        elif isinstance(frame, Error):
            log.warning("exchange: worker shard %d attempt %d reported: %s", hello.shard, hello.attempt, frame.message)
        return None

    def _hold_pending(self, connection: _Connection, relay: _JobRelay, shard: int, since: float) -> None:
        """Answer `connection`'s WANT for `shard` with PENDING unless the HEAD
        arrives first: within PENDING_HOLD_S of the WANT while the shard has a
        session, PENDING_GRACE_S while it has none.  The WANT still stands
        after PENDING: the FRAGMENT follows whenever the HEAD arrives."""
        if shard not in connection.wants:
            return  # pushed meanwhile, or the connection is gone
        loop = asyncio.get_running_loop()
        hold_s = PENDING_HOLD_S if relay.sessions[shard] > 0 else PENDING_GRACE_S
        if since + hold_s > loop.time():
            due = since + hold_s
            connection.wants[shard] = loop.call_at(due, self._hold_pending, connection, relay, shard, since)
            return
        connection.wants[shard] = None  # still waiting; PENDING sent
        try:  # from this timer, no task: bounded like a push (one PENDING per WANT)
            connection.send_now(Pending(shard=shard))
        except (OSError, RuntimeError, ProtocolError) as exc:  # the waiter left; nothing to tell it
            log.debug("exchange: could not answer PENDING for shard %d to %s: %s", shard, connection.peer, exc)

    def _push_now(self, connection: _Connection, head: Head) -> None:
        """Push a head to a session that wants it."""
        try:
            connection.send_now(Fragment.relaying(head))
        except (OSError, RuntimeError, ProtocolError) as exc:  # the waiter left; it will use the marker or scan
            log.info("exchange: could not push shard %d's head to %s: %s", head.shard, connection.peer, exc)
