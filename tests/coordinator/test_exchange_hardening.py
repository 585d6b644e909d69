"""The exchange port against strangers (DESIGN §9: before authentication a
peer gets a few KiB and a few seconds), and job secrets that are derived,
per attempt, instead of stored.

Everything here talks to a real ExchangeServer over real sockets on
127.0.0.1 (and other loopback addresses, to be "other peers").  The same
defences against a flood, on a `shardline serve` process while a job runs:
tests/integration/test_flood.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator

from shardline.coordinator import Coordinator, CoordinatorMetrics, ExchangeServer, render_prometheus, server_tls_context
from shardline.coordinator import _exchange as exchange_module
from shardline.io.aws import client
from shardline.io.store import MemoryJobStore, ensure_marker_table
from shardline.protocol import (
    CLOSED,
    DEFAULT_MARKER_TABLE,
    MAX_HANDSHAKE_FRAME_BYTES,
    NEED_DATA,
    Ack,
    Done,
    Error,
    ExchangeSession,
    Fragment,
    Frame,
    Head,
    Hello,
    JobSpec,
    Pending,
    Progress,
    Want,
    Welcome,
    attempt_secret,
    job_secret,
)
from shardline.worker import ExchangeClient

from jobs import GatedBackend
from polling import PATIENCE_S, eventually
from tlsca import make_ca

JOB = "hardening-job"
KEY = bytes(range(32))
JOB_SECRET = job_secret(KEY, JOB)
_HEADER = struct.Struct("!2sBBI")


class Hooks:
    """A job that accepts every live session and records what happened."""

    def __init__(self, *, idle_s: float = 30.0) -> None:
        self.idle_s = idle_s
        self.connects: list[Hello] = []
        self.disconnects = 0
        self.done: list[Done] = []

    def session_idle_timeout_s(self) -> float:
        return self.idle_s

    def on_connect(self, hello: Hello) -> Error | None:
        self.connects.append(hello)
        return None

    def on_head(self, hello: Hello, head: Head) -> Error | None:
        return None

    def on_progress(self, hello: Hello, progress: Progress) -> None:
        pass

    async def on_done(self, hello: Hello, done: Done) -> bool:
        self.done.append(done)
        return True

    def on_failed(self, hello: Hello, failed: object) -> None:
        pass

    def on_disconnect(self, hello: Hello) -> None:
        self.disconnects += 1


@contextlib.asynccontextmanager
async def exchange(*, idle_s: float = 30.0, **settings: object) -> AsyncIterator[tuple[ExchangeServer, Hooks]]:
    hooks = Hooks(idle_s=idle_s)
    async with ExchangeServer(host="127.0.0.1", **settings) as server:  # type: ignore[arg-type]
        server.register(JOB, JOB_SECRET, hooks)
        yield server, hooks


class Peer:
    """One raw connection to the exchange, optionally from another loopback address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int], source_host: str = "127.0.0.1") -> Peer:
        reader, writer = await asyncio.open_connection(*address, local_addr=(source_host, 0))
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_closed(self) -> bytes:
        """Everything the exchange sent until it closed the connection."""
        received = bytearray()
        async with asyncio.timeout(PATIENCE_S):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
        return bytes(received)

    async def next_frame(self, session: ExchangeSession) -> Frame | None:
        """The next frame of `session` from this connection; None once it is closed."""
        async with asyncio.timeout(PATIENCE_S):
            while True:
                frame = session.next_frame()
                if frame is CLOSED:
                    return None
                if frame is not NEED_DATA:
                    assert isinstance(frame, Frame)
                    return frame
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    data = b""
                session.receive_data(data)

    def close(self) -> None:
        self.writer.close()


def worker_client(port: int, *, shard: int) -> ExchangeClient:
    """The exchange client a worker of attempt 0 of `shard` would use."""
    secret = attempt_secret(JOB_SECRET, shard, 0)
    return ExchangeClient(host="127.0.0.1", port=port, job_id=JOB, shard=shard, attempt=0, secret=secret)


def client_session(shard: int = 0, attempt: int = 0, *, secret: bytes | None = None) -> ExchangeSession:
    secret = attempt_secret(JOB_SECRET, shard, attempt) if secret is None else secret
    return ExchangeSession.client(job_id=JOB, shard=shard, attempt=attempt, secret=secret)


async def authenticate(peer: Peer, session: ExchangeSession) -> Frame | None:
    """Send `session`'s HELLO over `peer`; the exchange's answer (WELCOME) or None if it closed."""
    peer.send(session.send(session.hello))  # type: ignore[arg-type]
    return await peer.next_frame(session)


def refused(server: ExchangeServer) -> dict[str, int]:
    return {cause: count for cause, count in server.refused.items() if count}


# --- a few KiB before authentication --------------------------------------------


async def test_oversized_pre_auth_frame_is_closed_at_once():
    # A deadline far beyond the hang guard: closing must come from the size check.
    async with exchange(handshake_deadline_s=3600.0) as (server, _):
        peer = await Peer.connect(server.address)
        # What an attacker pinning memory sends: a header for a 3.9 MB HELLO,
        # then nothing more; the exchange must not wait for the rest.
        peer.send(_HEADER.pack(b"SL", 1, 1, 3_900_000))
        assert await peer.until_closed() == b""
        # Just over the handshake limit is refused too, from the header alone.
        peer = await Peer.connect(server.address)
        peer.send(_HEADER.pack(b"SL", 1, 1, MAX_HANDSHAKE_FRAME_BYTES))
        assert await peer.until_closed() == b""
        assert refused(server) == {"preauth_oversized": 2}


async def test_full_frame_limit_applies_once_the_hello_verified():
    async with exchange() as (server, hooks):
        peer = await Peer.connect(server.address)
        session = client_session()
        assert isinstance(await authenticate(peer, session), Welcome)
        big = b"x" * (256 * 1024)  # 64 times the handshake frame limit
        peer.send(session.send(Head(shard=0, start=0, head_end=len(big), line_start=True, has_data=True, data=big)))
        peer.send(session.send(Want(shard=1)))
        assert isinstance(await peer.next_frame(session), Pending)  # the session is alive and well
        assert refused(server) == {} and len(hooks.connects) == 1
        peer.close()


# --- a few seconds: one absolute deadline -------------------------------------------


async def trickle(peer: Peer, data: bytes, interval_s: float) -> int:
    """Send `data` one byte per `interval_s` until it is sent or the connection breaks; bytes sent."""
    sent = 0
    with contextlib.suppress(OSError):
        for byte in data:
            peer.send(bytes([byte]))
            await peer.writer.drain()
            sent += 1
            await asyncio.sleep(interval_s)
    return sent


async def test_trickling_client_is_closed_at_the_absolute_deadline():
    # One byte every 0.2 s keeps every single read well within any per-read
    # timeout; the HELLO would take a minute to arrive.  The deadline counts
    # from accept, so the exchange closes it after 1.5 s all the same.
    async with exchange(handshake_deadline_s=1.5) as (server, hooks):
        session = client_session()
        hello = session.send(session.hello)  # type: ignore[arg-type]
        peer = await Peer.connect(server.address)
        trickler = asyncio.create_task(trickle(peer, hello * 100, 0.2))
        assert await peer.until_closed() == b""
        trickler.cancel()
        assert refused(server) == {"handshake_deadline": 1}
        assert hooks.connects == []


def _client_hello() -> bytes:
    """The first flight of a real TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_trickled_tls_handshake_is_closed_at_the_same_deadline(tmp_path):
    ca = make_ca(tmp_path)
    tls = server_tls_context(str(ca.server_cert), str(ca.server_key))
    async with exchange(tls=tls, handshake_deadline_s=1.5) as (server, _):
        peer = await Peer.connect(server.address)
        trickler = asyncio.create_task(trickle(peer, _client_hello(), 0.2))
        assert await peer.until_closed() == b""
        trickler.cancel()
        # A client that never sends a byte is closed at the deadline too.
        silent = await Peer.connect(server.address)
        assert await silent.until_closed() == b""
        # And one that speaks the exchange protocol without TLS at once.
        plain = await Peer.connect(server.address)
        session = client_session()
        plain.send(session.send(session.hello))  # type: ignore[arg-type]
        await plain.until_closed()
        assert refused(server) == {"handshake_deadline": 2, "tls_failed": 1}


# --- caps, with eviction of the oldest --------------------------------------------


async def test_caps_evict_the_oldest_unauthenticated_connection():
    async with exchange(max_unauthenticated=4, max_unauthenticated_per_peer=2) as (server, hooks):
        address = server.address
        a1 = await Peer.connect(address, "127.0.0.1")
        a2 = await Peer.connect(address, "127.0.0.1")
        a3 = await Peer.connect(address, "127.0.0.1")  # a third from one address: a1, the oldest, goes
        assert await a1.until_closed() == b""
        assert refused(server) == {"evicted": 1}
        b1 = await Peer.connect(address, "127.0.0.2")
        c1 = await Peer.connect(address, "127.0.0.3")
        d1 = await Peer.connect(address, "127.0.0.4")  # a fifth in all: a2, the oldest now, goes
        assert await a2.until_closed() == b""
        assert refused(server) == {"evicted": 2}
        # The newer ones were kept: each of them still authenticates.
        sessions = {peer: client_session(shard) for shard, peer in enumerate((a3, b1, c1, d1))}
        for peer, session in sessions.items():
            assert isinstance(await authenticate(peer, session), Welcome)
        assert len(hooks.connects) == 4
        # Authenticated sessions no longer count: three more strangers from
        # 127.0.0.1 evict only one another, and a3's session carries on.
        strangers = [await Peer.connect(address, "127.0.0.1") for _ in range(3)]
        assert await strangers[0].until_closed() == b""
        assert refused(server) == {"evicted": 3}
        a3.send(sessions[a3].send(Want(shard=1)))
        assert isinstance(await a3.next_frame(sessions[a3]), Pending)
        for peer in (a3, b1, c1, d1, *strangers[1:]):
            peer.close()


async def test_a_worker_gets_through_a_flood_of_slow_strangers():
    # Strangers keep a per-address cap of 8 full from the worker's own
    # address, reconnecting whenever they are evicted.  The worker's session
    # evicts the oldest of them and authenticates before eight newer ones
    # arrive, and once authenticated it no longer counts.
    async with exchange(max_unauthenticated=64, max_unauthenticated_per_peer=8) as (server, hooks):
        stop = asyncio.Event()

        async def stranger() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    peer = await Peer.connect(server.address)
                    peer.send(b"S")  # the first byte of a frame, and then nothing
                    await peer.until_closed()
                    peer.close()

        strangers = [asyncio.create_task(stranger()) for _ in range(32)]
        try:
            await eventually(lambda: server.refused["evicted"] >= 32, "the strangers fill the cap")
            async with worker_client(server.address[1], shard=2) as worker:
                done = Done(emitted_start=0, emitted_end=5, line_start=True, bytes=5, checksum="", output_bytes=5)
                ack = await worker.report(done, timeout_s=PATIENCE_S)
            assert ack.committed and hooks.done == [done]
        finally:
            stop.set()
            for task in strangers:
                task.cancel()
            await asyncio.gather(*strangers, return_exceptions=True)


async def test_final_report_retries_with_backoff_until_it_gets_through():
    # A path to the exchange that drops the first six connections outright
    # (as a flood's evictions might): the report keeps trying, with backoff,
    # within its timeout, rather than giving up after three quick tries.
    async with exchange() as (server, hooks):
        dropped = 0

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal dropped
            if dropped < 6:
                dropped += 1
                writer.transport.abort()
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(*server.address)
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

        relay = await asyncio.start_server(path, "127.0.0.1", 0)
        try:
            async with worker_client(relay.sockets[0].getsockname()[1], shard=1) as worker:
                done = Done(emitted_start=3, emitted_end=9, line_start=True, bytes=6, checksum="", output_bytes=6)
                ack = await worker.report(done, timeout_s=PATIENCE_S)
        finally:
            relay.close()
        assert ack.committed and dropped == 6 and hooks.done == [done]


# --- idle authenticated sessions --------------------------------------------------


async def test_silent_authenticated_session_is_closed_after_the_heartbeat_deadline():
    async with exchange(idle_s=2.0) as (server, hooks):
        # A session that heartbeats far more often than its deadline stays.
        talker, talking = await Peer.connect(server.address), client_session(0)
        assert isinstance(await authenticate(talker, talking), Welcome)
        # A session that goes silent is closed.
        silent, quiet = await Peer.connect(server.address), client_session(1)
        assert isinstance(await authenticate(silent, quiet), Welcome)
        closed = asyncio.create_task(silent.until_closed())

        async def heartbeat_until_closed() -> bool:
            talker.send(talking.send(Progress(bytes_emitted=0)))
            await asyncio.wait({closed}, timeout=0.05)
            return closed.done()

        await eventually(heartbeat_until_closed, "the silent session is closed", interval_s=0)
        assert closed.result() == b""
        assert refused(server) == {"idle": 1} and hooks.disconnects == 1
        talker.send(talking.send(Want(shard=3)))
        assert isinstance(await talker.next_frame(talking), Pending)
        talker.close()


# --- refusals counted by cause, logged once per cause ---------------------------------


async def test_refusals_are_counted_by_cause_and_logged_once_per_cause(caplog):
    caplog.set_level(logging.DEBUG, logger="shardline.coordinator.exchange")
    wrong = client_session(0, secret=b"w" * 32)
    payloads = (
        b"GET / HTTP/1.1\r\n\r\n",  # bad_frame
        _HEADER.pack(b"SL", 1, 1, 1 << 30),  # preauth_oversized
        wrong.send(wrong.hello),  # type: ignore[arg-type]  # auth_failed
    )
    rounds = 12
    async with exchange(handshake_deadline_s=1.0) as (server, _):
        for _ in range(rounds):
            for payload in payloads:
                peer = await Peer.connect(server.address)
                peer.send(payload)
                assert await peer.until_closed() == b""
        silent = [await Peer.connect(server.address) for _ in range(3)]
        for peer in silent:
            assert await peer.until_closed() == b""
        counts = refused(server)
        metrics = render_prometheus(
            CoordinatorMetrics(),
            jobs_by_state={},
            shards_by_state={},
            exchange_refused=server.refused,
            handshake_wait_s=server.handshake_wait_s,
        )
    assert counts == {"bad_frame": rounds, "preauth_oversized": rounds, "auth_failed": rounds, "handshake_deadline": 3}
    for cause, count in counts.items():
        assert f'shardline_exchange_refused_total{{cause="{cause}"}} {count}' in metrics
    assert 'shardline_exchange_refused_total{cause="evicted"} 0' in metrics
    messages = [record.getMessage() for record in caplog.records]
    first = Counter(m.split("(cause ")[1].split(")")[0] for m in messages if "refused a connection (cause" in m)
    assert first == dict.fromkeys(counts, 1)
    # What was not logged one by one is summed up once (here: when the exchange closed).
    summed = {
        match[2]: int(match[1])
        for m in messages
        if (match := re.search(r"refused (\d+) more connection\(s\) \(cause (\w+)\)", m))
    }
    assert summed == {cause: count - 1 for cause, count in counts.items() if count > 1}


# --- secrets: derived per attempt, never stored, never shown --------------------------------


async def test_each_attempt_gets_its_own_secret_which_opens_no_other_session(tmp_path, aws_settings):
    data = b"".join(b"line %04d\n" % i for i in range(400))
    source = tmp_path / "input"
    source.write_bytes(data)
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
    backend, store = GatedBackend(), MemoryJobStore()
    output = io.BytesIO()
    async with (
        ExchangeServer() as server,
        Coordinator(
            aws=aws_settings, backends={backend.name: backend}, store=store, exchange=server, coordinator_key=KEY
        ) as coordinator,
    ):
        view = await coordinator.submit(JobSpec(source=str(source), shards=3))
        await eventually(lambda: len(backend.tasks) == 3, "all attempts launched")
        secret = job_secret(KEY, view.id)
        for task in backend.tasks:
            assert task.secret == attempt_secret(secret, task.shard, task.attempt)
        assert len({task.secret for task in backend.tasks}) == 3
        # Nothing secret is kept in the store, nor shown in a repr.
        loaded = await store.load_job(view.id)
        assert loaded is not None
        shown = [loaded[0].to_json(), repr(loaded[0]), repr(coordinator.context), *map(repr, backend.tasks)]
        for value in (KEY, secret, *(task.secret for task in backend.tasks)):
            assert not any(value.hex() in text or repr(value) in text for text in shown)
        # Shard 0's secret opens shard 0's session, and no other attempt's.
        task0 = next(task for task in backend.tasks if task.shard == 0)
        for shard, attempt in ((1, 0), (0, 1)):
            peer = await Peer.connect(server.address)
            other = ExchangeSession.client(job_id=view.id, shard=shard, attempt=attempt, secret=task0.secret)
            assert await authenticate(peer, other) is None
        assert refused(server) == {"auth_failed": 2}
        peer = await Peer.connect(server.address)
        own = ExchangeSession.client(job_id=view.id, shard=0, attempt=0, secret=task0.secret)
        assert isinstance(await authenticate(peer, own), Welcome)
        peer.close()
        backend.gate.set()
        async with asyncio.timeout(PATIENCE_S):
            async for piece in coordinator.output(view.id):
                with open(piece.path, "rb") as file:
                    file.seek(piece.start)
                    output.write(file.read(piece.end - piece.start))
    assert output.getvalue() == data


# --- the relay ------------------------------------------------------------------------


async def test_a_want_for_a_connected_neighbour_is_answered_by_its_fragment_not_pending(monkeypatch):
    """While the neighbour has a session, PENDING is held back (PENDING_HOLD_S,
    here longer than the test) and the FRAGMENT is the answer the moment the
    HEAD arrives: the worker at its tail gets the push, not a fallback."""
    monkeypatch.setattr(exchange_module, "PENDING_HOLD_S", 3600.0)
    async with exchange() as (server, _):
        wanting, neighbour = await Peer.connect(server.address), await Peer.connect(server.address)
        wanting_session, neighbour_session = client_session(0), client_session(1)
        assert isinstance(await authenticate(wanting, wanting_session), Welcome)
        assert isinstance(await authenticate(neighbour, neighbour_session), Welcome)
        wanting.send(wanting_session.send(Want(shard=1)))
        await asyncio.sleep(exchange_module.PENDING_GRACE_S * 2)  # past the grace, well within the hold
        head = Head(shard=1, start=100, head_end=107, line_start=True, has_data=True, data=b"ragment")
        neighbour.send(neighbour_session.send(head))
        answer = await wanting.next_frame(wanting_session)
        assert isinstance(answer, Fragment) and answer.shard == 1 and answer.data == b"ragment"
        wanting.close()
        neighbour.close()


async def test_pending_for_a_neighbour_without_a_session_and_the_fragment_still_follows(monkeypatch):
    monkeypatch.setattr(exchange_module, "PENDING_GRACE_S", 0.0)
    async with exchange() as (server, _):
        wanting = await Peer.connect(server.address)
        wanting_session = client_session(0)
        assert isinstance(await authenticate(wanting, wanting_session), Welcome)
        wanting.send(wanting_session.send(Want(shard=1)))
        assert isinstance(await wanting.next_frame(wanting_session), Pending)
        neighbour, neighbour_session = await Peer.connect(server.address), client_session(1)
        assert isinstance(await authenticate(neighbour, neighbour_session), Welcome)
        neighbour.send(neighbour_session.send(Head(shard=1, start=100, head_end=100, line_start=True, has_data=True)))
        answer = await wanting.next_frame(wanting_session)
        assert isinstance(answer, Fragment) and answer.shard == 1 and answer.head_end == 100
        wanting.close()
        neighbour.close()


# --- frames handled as they arrive ---------------------------------------------------


async def test_frames_sent_in_one_write_are_answered_in_order():
    async with exchange() as (server, hooks):
        head_peer, head_session = await Peer.connect(server.address), client_session(shard=1)
        assert isinstance(await authenticate(head_peer, head_session), Welcome)
        head_peer.send(
            head_session.send(Head(shard=1, start=10, head_end=12, line_start=True, has_data=True, data=b"ab"))
        )
        probe, probe_session = await Peer.connect(server.address), client_session(shard=3)
        assert isinstance(await authenticate(probe, probe_session), Welcome)
        probe.send(probe_session.send(Want(shard=1)))
        assert isinstance(await probe.next_frame(probe_session), Fragment)  # the head is known now
        peer, session = await Peer.connect(server.address), client_session(shard=0)
        assert isinstance(await authenticate(peer, session), Welcome)
        done = Done(
            emitted_start=0, emitted_end=10, line_start=True, bytes=10, checksum="c", output_bytes=0, tail_sources=[]
        )
        # WANT (answered at once), PROGRESS, DONE (its check awaits) and another WANT, in one write.
        peer.send(b"".join(session.send(f) for f in (Want(shard=1), Progress(bytes_emitted=5), done, Want(shard=1))))
        first, second, third = [await peer.next_frame(session) for _ in range(3)]
        assert isinstance(first, Fragment) and first.data == b"ab"
        assert isinstance(second, Ack) and second.committed and hooks.done == [done]
        assert isinstance(third, Fragment) and third.data == b"ab"  # the frame after the DONE, after its ACK
        assert refused(server) == {}
        for each in (peer, head_peer, probe):
            each.close()


async def test_a_head_is_relayed_while_another_sessions_done_is_being_checked():
    async with exchange() as (server, hooks):
        checking = asyncio.Event()
        release = asyncio.Event()

        async def slow_done(hello: Hello, done: Done) -> bool:
            checking.set()
            await release.wait()  # e.g. the output's size asked of S3
            return True

        hooks.on_done = slow_done  # type: ignore[method-assign]
        done = Done(
            emitted_start=0, emitted_end=0, line_start=True, bytes=0, checksum="c", output_bytes=0, tail_sources=[]
        )
        busy, busy_session = await Peer.connect(server.address), client_session(shard=2)
        assert isinstance(await authenticate(busy, busy_session), Welcome)
        busy.send(busy_session.send(done))
        async with asyncio.timeout(PATIENCE_S):
            await checking.wait()
        waiter, waiter_session = await Peer.connect(server.address), client_session(shard=0)
        assert isinstance(await authenticate(waiter, waiter_session), Welcome)
        waiter.send(waiter_session.send(Want(shard=1)))
        head_peer, head_session = await Peer.connect(server.address), client_session(shard=1)
        assert isinstance(await authenticate(head_peer, head_session), Welcome)
        head_peer.send(head_session.send(Head(shard=1, start=5, head_end=6, line_start=True, has_data=True, data=b"z")))
        fragment = await waiter.next_frame(waiter_session)
        assert isinstance(fragment, Fragment) and fragment.data == b"z"
        assert not release.is_set()  # the DONE's check is still pending
        release.set()
        ack = await busy.next_frame(busy_session)
        assert isinstance(ack, Ack) and ack.committed
        for peer in (busy, waiter, head_peer):
            peer.close()


async def test_a_tls_session_that_the_worker_closes_ends_at_once(tmp_path):
    # The worker's close sends close_notify and waits for the exchange to close
    # too (asyncio: up to 30 s); a Lambda worker would time out meanwhile.
    ca = make_ca(tmp_path)
    tls = server_tls_context(str(ca.server_cert), str(ca.server_key))
    async with exchange(tls=tls) as (server, hooks):
        context = ssl.create_default_context(cafile=str(ca.ca_cert))
        reader, writer = await asyncio.open_connection(*server.address, ssl=context, server_hostname="localhost")
        peer, session = Peer(reader, writer), client_session()
        assert isinstance(await authenticate(peer, session), Welcome)
        peer.send(session.send(Progress(bytes_emitted=1)))
        writer.close()
        # A hang guard: generous, yet below the 30 s asyncio would wait for an exchange that never closes.
        async with asyncio.timeout(20.0):
            await writer.wait_closed()
        await eventually(lambda: hooks.disconnects == 1, "the exchange ends the session")
        assert refused(server) == {}
