# The worker's TCP session with the coordinator's exchange (DESIGN §3).
#
# A thin asyncio shell around protocol.ExchangeSession: the worker dials out
# (Lambda accepts no inbound TCP), says HELLO, then sends its HEAD fragment,
# asks for its neighbours' heads with WANT, heartbeats with PROGRESS and
# reports DONE or FAILED.  A background task reads pushed FRAGMENTs into a
# dict.  Losing the session never stops the shard: fragments it did not get
# are taken from markers or S3 instead; only the final report needs the
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
        self._session: ExchangeSession | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._fragments: dict[int, Fragment] = {}
        self._wanted: set[int] = set()
        self._answered: set[int] = set()  # WANTs answered with FRAGMENT or PENDING
        self._answer_arrived = asyncio.Event()
        self._head: Head | None = None  # resent after a reconnect
        self._ack: asyncio.Future[Ack] | None = None
        self._fenced = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None  # connect_soon()'s
        self.connected = False
        self.rejection: str | None = None  # set when the coordinator sent ERROR

    async def __aenter__(self) -> ExchangeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self, *, timeout_s: float | None = None) -> None:
        """Open the session (HELLO / WELCOME) and resend earlier WANTs.

        Each of the TCP (and TLS) connect and the handshake gets `timeout_s`
        (default: the client's connect timeout).
        """
        timeout_s = self._connect_timeout_s if timeout_s is None else timeout_s
        await self._drop_connection()
        session = ExchangeSession.client(**self._identity)  # type: ignore[arg-type]
        try:
            # asyncio.timeout rather than wait_for throughout: on 3.11 wait_for
            # can swallow a cancellation that arrives as its operation finishes.
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(
                    *self._address, ssl=self._tls, server_hostname=self._address[0] if self._tls else None
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
        self._session, self._reader, self._writer = session, reader, writer
        try:
            writer.write(session.send(session.hello))  # type: ignore[arg-type]
            await writer.drain()
            async with asyncio.timeout(timeout_s):
                welcome = await self._read_frame()
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
            if isinstance(welcome, Error):
                raise ExchangeRefusedError(f"exchange refused the session: {welcome.message}")
            raise ExchangeNetworkError("the exchange closed the connection during the handshake")
        self.connected = True
        self._read_task = asyncio.create_task(self._read_loop(), name="exchange-reader")
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

    async def _read_frame(self) -> Frame | None:
        assert self._session is not None and self._reader is not None
        while True:
            frame = self._session.next_frame()
            if frame is CLOSED:
                return None
            if frame is not NEED_DATA:
                return frame  # type: ignore[return-value]
            self._session.receive_data(await self._reader.read(_READ_BYTES))

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._read_frame()
                if frame is None:
                    break
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
                    break
        except (OSError, ProtocolError) as exc:
            log.warning("exchange session lost: %s", exc)
        finally:
            self.connected = False
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
        async with self._send_lock:
            if not self.connected or self._writer is None or self._session is None:
                raise ExchangeNetworkError("not connected to the exchange")
            try:
                self._writer.write(self._session.send(frame))
                await self._writer.drain()
            except OSError as exc:
                self.connected = False
                raise ExchangeNetworkError(f"exchange write failed: {exc}") from exc

    async def send(self, frame: Frame) -> bool:
        """Best-effort send; False if the session is gone (the shard goes on)."""
        try:
            await self._send(frame)
            return True
        except ExchangeUnavailable as exc:
            log.info("exchange send of %s skipped: %s", frame.TYPE.name, exc)
            return False

    async def publish_head(self, head: Head) -> bool:
        """Send our HEAD (and again after any reconnect); False if not connected now."""
        self._head = head
        if self._opening:
            return False  # connect() sends it as the session opens
        return await self.send(head)

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
        self.connected = False
        task, self._read_task = self._read_task, None
        writer, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        await asyncio.shield(self._drop_connection())


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
