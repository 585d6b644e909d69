# The worker's TCP session with the coordinator's exchange (DESIGN §3).
#
# A thin asyncio shell around protocol.ExchangeSession: the worker dials out
# (Lambda accepts no inbound TCP), says HELLO, then sends its HEAD fragment,
# asks for its neighbours' heads with WANT, heartbeats with PROGRESS and
# reports DONE or FAILED.  The connection is an `asyncio.Protocol`: frames are
# taken as their bytes arrive, in the loop's read callback (pushed FRAGMENTs
# into a dict), and written straight to the transport -- no reader task, no
# coroutine per frame read or written, no lock: a pool process runs
# thousands of short attempts, each with its own session.  Losing the
# session never stops the shard: fragments it did not get are taken from
# markers or S3 instead; only the final report needs the
# coordinator, and for that the client reconnects, with backoff, for up to
# its whole timeout: a flood of strangers on the exchange port may cost a
# worker's connections (the exchange evicts the oldest unauthenticated
# ones), and must cost it seconds, not the attempt.
#
# An ERROR from the coordinator is a refusal.  One marked `stale` (this attempt is
# superseded by a retry, or the shard is settled) *fences* it: `fenced`
# wakes whoever waits on `wait_fenced()`, and `report()` raises
# StaleAttemptError instead of trying again.

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import typing

from ..errors import (
    ConfigurationError,
    ExchangeNetworkError,
    ExchangeRefusedError,
    ExchangeTimeoutError,
    ExchangeUnavailable,
    ProtocolError,
    StaleAttemptError,
)
from ..io.retry import RetryPolicy, retry
from ..protocol import (
    CLOSED,
    NEED_DATA,
    Ack,
    Error,
    ExchangeSession,
    Fragment,
    Frame,
    Head,
    Pending,
    Want,
    Welcome,
)

__all__ = ["ExchangeClient", "client_tls_context"]

log = logging.getLogger("shardline.worker.exchange")

_READ_BYTES = 256 * 1024
#: Between tries of the final report: from 0.1 s doubling to 2 s, jittered.
#: Reporting DONE/FAILED tries again through a flood or a restart of the exchange, for up to its timeout.
REPORT_BACKOFF = RetryPolicy(attempts=1_000, base_delay_s=0.1, max_delay_s=2.0)


class ExchangeClient:
    """One shard attempt's connection to the exchange; use as an async context manager."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        job_id: str,
        shard: int,
        attempt: int,
        secret: bytes,
        connect_timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._address = (host, port)
        self._tls = tls
        self._identity = dict(job_id=job_id, shard=shard, attempt=attempt, secret=secret)
        self._connect_timeout_s = connect_timeout_s
        #: The open session's connection (None before connect() and once it is dropped).
        self._connection: _Connection | None = None
        self._fragments: dict[int, Fragment] = {}
        self._wanted: set[int] = set()
        self._answered: set[int] = set()  # WANTs answered with FRAGMENT or PENDING
        self._answer_arrived = asyncio.Event()
        self._head: Head | None = None  # resent after a reconnect
        self._ack: asyncio.Future[Ack] | None = None
        self._fenced = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None  # connect_soon()'s
        self.rejection: str | None = None  # set when the coordinator sent ERROR

    async def __aenter__(self) -> ExchangeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        """True while a session is open (WELCOME received, the connection not lost)."""
        connection = self._connection
        return connection is not None and connection.open

    async def connect(self, *, timeout_s: float | None = None) -> None:
        """Open the session (HELLO / WELCOME) and resend earlier WANTs.

        Each of the TCP (and TLS) connect and the handshake gets `timeout_s`
        (default: the client's connect timeout).
        """
        timeout_s = self._connect_timeout_s if timeout_s is None else timeout_s
        await self._drop_connection()
        session = ExchangeSession.client(**self._identity)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout rather than wait_for throughout: on 3.11 wait_for
            # can swallow a cancellation that arrives as its operation finishes.
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    functools.partial(_Connection, self, session),
                    *self._address,
                    ssl=self._tls,
                    server_hostname=self._address[0] if self._tls else None,
                )
        except ssl.SSLCertVerificationError as exc:
            # No retry fixes a certificate we do not trust: say so at once.
            raise ConfigurationError(
                f"exchange at {self._address[0]}:{self._address[1]} presented a certificate we cannot verify: "
                f"{exc.verify_message or exc}"
            ) from exc
        except TimeoutError as exc:
            raise ExchangeTimeoutError(
                f"no connection to the exchange at {self._where()} within {timeout_s:g}s"
            ) from exc
        except OSError as exc:
            raise ExchangeNetworkError(f"cannot reach the exchange at {self._where()}: {exc}") from exc
        self._connection = connection
        try:
            connection.write(session.send(session.hello))  # type: ignore[arg-type]
            async with asyncio.timeout(timeout_s):
                await connection.drain()
                welcome = await connection.welcome
        except TimeoutError as exc:
            await self._drop_connection()
            raise ExchangeTimeoutError(
                f"the exchange at {self._where()} did not answer HELLO in {timeout_s:g}s"
            ) from exc
        except (OSError, ProtocolError) as exc:
            await self._drop_connection()
            raise ExchangeNetworkError(f"exchange handshake failed: {exc}") from exc
        if isinstance(welcome, Error) or welcome is None:
            await self._drop_connection()
            if isinstance(welcome, Error):
                self._refused(welcome)
                raise ExchangeRefusedError(f"exchange refused the session: {welcome.message}")
            raise ExchangeNetworkError("the exchange closed the connection during the handshake")
        connection.opened()
        if self._head is not None:
            await self._send(self._head)
        for shard in sorted(self._wanted):
            await self._send(Want(shard=shard))

    def connect_soon(self) -> None:
        """Open the session in the background, so that the shard's first GET
        does not wait for the handshake.  Until it is open, HEAD and WANT are
        kept and sent as it opens; `fragment()` and `report()` wait for it.
        A session that cannot be opened only costs the push path (the shard
        can still finish); a certificate we cannot verify fails the shard at
        its next `fragment()` or `report()`."""
        assert self._connecting is None, "connect_soon() is called once, first"
        self._connecting = asyncio.create_task(self._connect_or_warn(), name="exchange-connect")

    @property
    def connecting(self) -> bool:
        """True while `connect_soon()`'s handshake is still in progress."""
        return self._connecting is not None and not self._connecting.done()

    @property
    def _opening(self) -> bool:
        """`connect_soon()`'s handshake is under way and has not yet reached
        the point where it sends the kept HEAD and WANTs."""
        return self.connecting and not self.connected

    async def _connect_or_warn(self) -> None:
        try:
            await self.connect()
        except ExchangeUnavailable as exc:
            if self.fenced:  # the job ended or moved on: the heartbeat stops this attempt
                log.info("shard %d: %s", self._identity["shard"], exc)
            else:
                log.warning("shard %d: %s; continuing without the exchange", self._identity["shard"], exc)

    async def _connect_settled(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for `connect_soon()`'s handshake; raise what
        it raised, other than the exchange being unavailable."""
        connecting = self._connecting
        if connecting is None:
            return
        if not connecting.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, timeout_s)):
                    await asyncio.shield(connecting)
        if connecting.done() and not connecting.cancelled() and connecting.exception() is not None:
            raise connecting.exception()  # type: ignore[misc]

    def _frame_arrived(self, frame: Frame) -> bool:
        """Take a frame of the open session (from the read callback); False: the session ends here."""
        if isinstance(frame, (Fragment, Pending)):
            if isinstance(frame, Fragment):
                self._fragments[frame.shard] = frame
            self._answered.add(frame.shard)
            self._answer_arrived.set()
        elif isinstance(frame, Ack):
            if self._ack is not None and not self._ack.done():
                self._ack.set_result(frame)
        elif isinstance(frame, Error):
            self._refused(frame)
            # A fenced attempt is routine (its job ended, or another
            # attempt won): it stops with StaleAttemptError, and no
            # user should see a warning about it on their terminal.
            level = logging.INFO if frame.stale else logging.WARNING
            log.log(level, "exchange closed our session: %s", frame.message)
            return False
        return True

    def _session_ended(self, connection: _Connection) -> None:
        """`connection`'s session is over (lost, closed, refused, broken): wake whoever waits on it."""
        if connection is not self._connection:
            return  # an earlier connection, already dropped
        self._answer_arrived.set()
        if self._ack is not None and not self._ack.done():
            lost: ExchangeUnavailable = (
                ExchangeRefusedError(self.rejection)
                if self.rejection is not None
                else ExchangeNetworkError("exchange session lost before ACK")
            )
            self._ack.set_exception(lost)

    def _refused(self, error: Error) -> None:
        self.rejection = error.message
        if error.stale:
            self._fenced.set()

    @property
    def fenced(self) -> bool:
        """True once the coordinator refused us as a stale attempt."""
        return self._fenced.is_set()

    async def wait_fenced(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a stale-attempt refusal; returns `fenced`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._fenced.wait()
        return self.fenced

    def _raise_if_fenced(self) -> None:
        if self.fenced:
            raise StaleAttemptError(f"the coordinator fenced this attempt: {self.rejection}")

    async def _send(self, frame: Frame) -> None:
        connection = self._connection
        if connection is None or not connection.open:
            raise ExchangeNetworkError("not connected to the exchange")
        try:
            # Encoded and written in one step: frames reach the wire in the
            # order of their sequence numbers, whoever else is sending.
            connection.write(connection.session.send(frame))
            await connection.drain()
        except OSError as exc:
            raise ExchangeNetworkError(f"exchange write failed: {exc}") from exc

    async def send(self, frame: Frame) -> bool:
        """Best-effort send; False if the session is gone (the shard goes on)."""
        try:
            await self._send(frame)
            return True
        except ExchangeUnavailable as exc:
            log.info("exchange send of %s skipped: %s", frame.TYPE.name, exc)
            return False

    def publish_head(self, head: Head) -> bool:
        """Send our HEAD now (and again after any reconnect); False if not connected now.

        Written without waiting for it to drain: a HEAD is one frame of at
        most a fragment's push limit, and the shard has nothing else to send
        until its tail."""
        self._head = head
        if self._opening:
            return False  # connect() sends it as the session opens
        connection = self._connection
        try:
            if connection is None or not connection.open:
                raise ExchangeNetworkError("not connected to the exchange")
            connection.write(connection.session.send(head))
            return True
        except (OSError, ExchangeUnavailable) as exc:
            log.info("exchange send of HEAD skipped: %s", exc)
            return False

    async def want(self, shard: int) -> None:
        """Ask to be pushed `shard`'s head fragment as soon as it is known."""
        self._wanted.add(shard)
        if not self._opening:  # else connect() sends it as the session opens
            await self.send(Want(shard=shard))

    async def fragment(self, shard: int, *, answer_timeout_s: float) -> Fragment | None:
        """The head of `shard` if it has been pushed to us, else None.

        If our WANT for `shard` is still unanswered on a live session, wait
        up to `answer_timeout_s` for the answer: one round trip to the
        coordinator is far cheaper than the S3 reads a fallback costs.
        """
        deadline = asyncio.get_running_loop().time() + answer_timeout_s
        await self._connect_settled(answer_timeout_s)
        if shard not in self._wanted:
            await self.want(shard)  # a tail that runs past our next neighbour
        while shard not in self._answered and self.connected:  # a FRAGMENT is an answer too
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._answer_arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._answer_arrived.wait()
        return self._fragments.get(shard)

    async def report(self, frame: Frame, *, timeout_s: float) -> Ack:
        """Send DONE or FAILED and wait for the coordinator's ACK, reconnecting
        with backoff (the one retry loop) as often as needed within `timeout_s` in all.

        Raises StaleAttemptError if the coordinator has fenced this attempt,
        ExchangeRefusedError if it refused the report, and the last
        ExchangeUnavailable once `timeout_s` has run out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._connect_settled(timeout_s)  # not a second handshake beside the first

        async def attempt() -> Ack:
            self._raise_if_fenced()
            try:
                async with asyncio.timeout_at(deadline):
                    if not self.connected:
                        await self.connect(timeout_s=min(self._connect_timeout_s, deadline - loop.time()))
                    self._ack = loop.create_future()
                    await self._send(frame)
                    return await self._ack
            except TimeoutError:
                await self._drop_connection()
                raise ExchangeTimeoutError(f"no ACK for {frame.TYPE.name} within {timeout_s:g}s") from None
            except ExchangeUnavailable:
                self._raise_if_fenced()
                await self._drop_connection()
                raise

        policy = RetryPolicy(
            attempts=REPORT_BACKOFF.attempts,
            base_delay_s=REPORT_BACKOFF.base_delay_s,
            max_delay_s=REPORT_BACKOFF.max_delay_s,
            total_s=timeout_s,
        )
        return await retry(
            attempt,
            policy=policy,
            describe=f"reporting {frame.TYPE.name} to the exchange",
            retryable=(ExchangeTimeoutError, ExchangeNetworkError),
        )

    def _where(self) -> str:
        return f"{self._address[0]}:{self._address[1]}"

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()
            self._answer_arrived.set()  # whoever waits for an answer on it: none will come

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        await asyncio.shield(self._drop_connection())


class _Connection(asyncio.Protocol):
    """One connection of an `ExchangeClient`: bytes go into its session as
    they arrive, and each verified frame goes to the client at once."""

    def __init__(self, client: ExchangeClient, session: ExchangeSession) -> None:
        loop = asyncio.get_running_loop()
        self._client = client
        self.session = session
        self._transport: asyncio.Transport | None = None
        #: The WELCOME, an ERROR refusing the session, or None: closed first.
        self.welcome: asyncio.Future[Frame | None] = loop.create_future()
        #: Set once the connection is gone (`connection_lost`).
        self._closed: asyncio.Future[None] = loop.create_future()
        self._ended = False  # no more frames are taken (EOF, ERROR, a protocol error, closed)
        #: The client has taken the WELCOME and nothing has ended the session since.
        self.open = False
        self._writable: asyncio.Future[None] | None = None  # while the transport's buffer is full
        self._write_error: OSError | None = None

    def opened(self) -> None:
        """The client took the WELCOME: from now on it sends on this session
        (frames that arrived meanwhile went to it already)."""
        self.open = not self._ended

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is no asyncio.Transport subclass, but has its methods.
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        self.session.receive_data(data)
        self._take_frames()

    def eof_received(self) -> bool:
        if not self._ended:
            self.session.receive_data(b"")
            self._take_frames()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self._write_error = exc
        self._end(None)
        self._set_writable()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._set_writable()

    # -- frames ----------------------------------------------------------------

    def _take_frames(self) -> None:
        session = self.session
        try:
            while not self._ended:
                frame = session.next_frame()
                if frame is NEED_DATA:
                    return
                if frame is CLOSED:
                    self._end(None)
                elif not self.welcome.done():
                    self.welcome.set_result(frame)  # type: ignore[arg-type]
                    if not isinstance(frame, Welcome):
                        self._end(None)  # an ERROR: refused
                elif not self._client._frame_arrived(frame):  # type: ignore[arg-type]
                    self._end(None)
        except ProtocolError as exc:
            if self.welcome.done():
                log.warning("exchange session lost: %s", exc)
            self._end(exc)

    def _end(self, error: ProtocolError | None) -> None:
        """Take no more frames, close the connection, and tell the client."""
        if self._ended:
            return
        self._ended = True
        self.open = False
        if not self.welcome.done():
            if error is not None:
                self.welcome.set_exception(error)
            else:
                self.welcome.set_result(None)
        if self._transport is not None:
            self._transport.close()
        self._client._session_ended(self)

    # -- writing ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._ended or self._transport is None:
            raise self._write_error or ConnectionResetError("the exchange connection is closed")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its limit; OSError if the connection broke."""
        if self._writable is not None:
            await asyncio.shield(self._writable)
        if self._write_error is not None:
            raise self._write_error

    def _set_writable(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def aclose(self) -> None:
        """Close the connection and wait until it is closed."""
        self._end(None)
        await asyncio.shield(self._closed)


@functools.lru_cache(maxsize=8)
def client_tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """Verify the exchange's certificate against `ca_pem`, or the system's
    trust store when None; host names are checked.

    One context per CA for the whole process: loading a trust store costs
    milliseconds, and every shard of a job names the same CA.
    """
    try:
        return ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigurationError(f"the task's exchange CA is not a usable PEM certificate: {exc}") from exc
