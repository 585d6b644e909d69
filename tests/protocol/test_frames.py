"""The exchange frame codec and the ExchangeSession state machine.

Streams are fed whole, byte by byte, frame by frame and with trailing bytes of
the next frame (STYLE "Tests").  Malformed input is built with `forge`, an
independent encoder of the wire format documented in `_frames.py`:

    magic "SL" | version u8 | type u8 | payload length u32 | payload | mac[32]
    payload = meta length u32 | meta (UTF-8 JSON object) | data
    mac     = HMAC-SHA256(key, sequence u64 | header | payload)

so every rejection below is of a frame with a *valid* MAC unless the test is
about authentication.  The session key itself is read from the session
(`_key`), since its derivation is an implementation detail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.errors import (
    AuthenticationError,
    FrameTooLargeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from shardline.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Done,
    Error,
    ExchangeSession,
    Failed,
    Fragment,
    Frame,
    FrameType,
    Head,
    Hello,
    Pending,
    Progress,
    Role,
    SessionState,
    Want,
    Welcome,
    attempt_secret,
    job_secret,
    new_coordinator_key,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
JOB = "job-7"
CLIENT_NONCE = "c1" * 16
SERVER_NONCE = "5e" * 16


def lookup(hello: Hello) -> bytes | None:
    return SECRET if hello.job_id == JOB else None


# --- helpers ---------------------------------------------------------------------


def make_client(*, secret: bytes = SECRET, nonce: str = CLIENT_NONCE, job: str = JOB, **kw) -> ExchangeSession:
    hello = Hello(job_id=job, shard=kw.get("shard", 3), attempt=kw.get("attempt", 0), nonce=nonce)
    return ExchangeSession(
        Role.CLIENT, secret=secret, hello=hello, max_frame_bytes=kw.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
    )


def make_server(**kw) -> ExchangeSession:
    return ExchangeSession.server(kw.pop("lookup_secret", lookup), **kw)


def pump(session: ExchangeSession, frames: list[Frame], server_nonce: str = SERVER_NONCE) -> object:
    """Pull frames until NEED_DATA or CLOSED; a server answers HELLO at once."""
    while True:
        frame = session.next_frame()
        if frame is NEED_DATA or frame is CLOSED:
            return frame
        assert isinstance(frame, Frame)
        frames.append(frame)
        if session.role is Role.SERVER and isinstance(frame, Hello):
            session.send(Welcome(nonce=server_nonce))


def open_pair(**kw) -> tuple[ExchangeSession, ExchangeSession]:
    client, server = make_client(**kw), make_server()
    server.receive_data(client.send(client.hello))
    assert server.next_frame() == client.hello
    assert server.state is SessionState.SEND_WELCOME
    welcome = Welcome(nonce=kw.get("server_nonce", SERVER_NONCE))
    client.receive_data(server.send(welcome))
    assert client.next_frame() == welcome
    assert client.state is server.state is SessionState.OPEN
    return client, server


def conversation(client_frames: list[Frame], server_frames: list[Frame]) -> tuple[list[bytes], list[bytes]]:
    """The bytes each side sends, frame by frame, with the fixed nonces."""
    client, server = make_client(), make_server()
    client_bytes = [client.send(client.hello)]
    server.receive_data(client_bytes[0])
    assert server.next_frame() == client.hello
    server_bytes = [server.send(Welcome(nonce=SERVER_NONCE))]
    client.receive_data(server_bytes[0])
    assert isinstance(client.next_frame(), Welcome)
    client_bytes += [client.send(f) for f in client_frames]
    server_bytes += [server.send(f) for f in server_frames]
    return client_bytes, server_bytes


def server_receives(chunks: list[bytes]) -> list[Frame]:
    server = make_server()
    frames: list[Frame] = []
    for chunk in chunks:
        server.receive_data(chunk)
        assert pump(server, frames) is NEED_DATA
    server.receive_data(b"")
    assert pump(server, frames) is CLOSED
    assert server.state is SessionState.CLOSED
    assert server.next_frame() is CLOSED  # and stays closed
    return frames


def client_receives(chunks: list[bytes]) -> list[Frame]:
    client = make_client()
    client.send(client.hello)
    frames: list[Frame] = []
    for chunk in chunks:
        client.receive_data(chunk)
        assert pump(client, frames) is NEED_DATA
    client.receive_data(b"")
    assert pump(client, frames) is CLOSED
    return frames


def feedings(frames: list[bytes]) -> dict[str, list[bytes]]:
    stream = b"".join(frames)
    trailing, carried = [], 0
    for k, frame in enumerate(frames):
        nxt = frames[k + 1][:5] if k + 1 < len(frames) else b""
        trailing.append(frame[carried:] + nxt)  # each chunk ends 5 bytes into the next frame
        carried = len(nxt)
    assert b"".join(trailing) == stream
    return {
        "whole": [stream],
        "frame by frame": list(frames),
        "byte by byte": [stream[k : k + 1] for k in range(len(stream))],
        "with trailing data of the next frame": trailing,
    }


def chunked(buf: bytes, pattern: list[int]) -> list[bytes]:
    """Split `buf` cycling through sizes in `pattern`; never an empty chunk (b"" is EOF)."""
    sizes = [n for n in pattern if n > 0] or [1]
    chunks, pos, k = [], 0, 0
    while pos < len(buf):
        n = sizes[k % len(sizes)]
        chunks.append(buf[pos : pos + n])
        pos += n
        k += 1
    return chunks


def meta_payload(meta: object, data: bytes = b"") -> bytes:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return struct.pack("!I", len(raw)) + raw + data


def forge(
    key: bytes,
    sequence: int,
    type_code: int,
    payload: bytes,
    *,
    magic: bytes = b"SL",
    version: int = 1,
    length: int | None = None,
) -> bytes:
    header = struct.pack("!2sBBI", magic, version, type_code, len(payload) if length is None else length)
    mac = hmac.new(key, struct.pack("!Q", sequence) + header + payload, hashlib.sha256).digest()
    return header + payload + mac


def hello_meta(**changes: object) -> dict[str, object]:
    meta: dict[str, object] = {"job_id": JOB, "shard": 3, "attempt": 0, "nonce": CLIENT_NONCE}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not ...}


def head_meta(**changes: object) -> dict[str, object]:
    meta: dict[str, object] = {"shard": 2, "start": 10, "head_end": 13, "line_start": True, "has_data": True}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not ...}


def done_meta(**changes: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "emitted_start": 10,
        "emitted_end": 20,
        "line_start": True,
        "bytes": 10,
        "checksum": "ab" * 4,
        "output_bytes": 7,
        "tail_sources": ["pushed"],
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not ...}


CLIENT_FRAMES: list[Frame] = [
    Head(shard=3, start=100, head_end=104, line_start=True, has_data=True, data=b"abc\n"),
    Head(shard=3, start=100, head_end=200, line_start=False, has_data=False),
    Want(shard=4),
    Progress(bytes_emitted=12345),
    Done(
        emitted_start=104,
        emitted_end=300,
        line_start=True,
        bytes=196,
        checksum="0" * 64,
        output_bytes=9,
        tail_sources=["pushed", "scan"],
        output_checksum="crc32c:12345678",
    ),
    Failed(kind="CommandFailedError", message="exit 3: boom \u00e9", retryable=False),
    Error(message="bye"),
]
SERVER_FRAMES: list[Frame] = [
    Fragment(shard=4, start=200, head_end=203, line_start=True, has_data=True, data=b"\0\n\n"),
    Fragment(shard=5, start=300, head_end=300, line_start=True, has_data=True),
    Pending(shard=4),
    Ack(committed=True),
    Error(message="shutting down"),
]


# --- the documented wire format ---------------------------------------------------


def test_wire_format_is_as_documented() -> None:
    client, server = make_client(), make_server()
    hello_bytes = client.send(client.hello)
    magic, version, type_code, length = struct.unpack_from("!2sBBI", hello_bytes)
    assert (magic, version, type_code) == (b"SL", PROTOCOL_VERSION, FrameType.HELLO)
    assert len(hello_bytes) == 8 + length + 32
    payload = hello_bytes[8 : 8 + length]
    (meta_length,) = struct.unpack_from("!I", payload)
    assert json.loads(payload[4 : 4 + meta_length]) == hello_meta()
    assert forge(SECRET, 0, FrameType.HELLO, payload) == hello_bytes
    # Any JSON spelling of the meta is accepted, not only the sender's.
    server.receive_data(forge(SECRET, 0, FrameType.HELLO, meta_payload(hello_meta())))
    assert server.next_frame() == client.hello


def test_nonces_and_secrets_are_fresh() -> None:
    a = ExchangeSession.client(job_id=JOB, shard=0, attempt=0, secret=SECRET)
    b = ExchangeSession.client(job_id=JOB, shard=0, attempt=0, secret=SECRET)
    assert a.hello.nonce != b.hello.nonce
    server = make_server()
    assert server.welcome().nonce != server.welcome().nonce
    assert len(new_coordinator_key()) == 32 and new_coordinator_key() != new_coordinator_key()


def test_frames_are_frozen_keyword_only() -> None:
    frame = Want(shard=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.shard = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Want(1)  # type: ignore[misc]


# --- full handshake, every feeding ---------------------------------------------------


def test_full_conversation_every_feeding() -> None:
    client_bytes, server_bytes = conversation(CLIENT_FRAMES, SERVER_FRAMES)
    hello = make_client().hello
    for how, chunks in feedings(client_bytes).items():
        assert server_receives(chunks) == [hello, *CLIENT_FRAMES], how
    for how, chunks in feedings(server_bytes).items():
        assert client_receives(chunks) == [Welcome(nonce=SERVER_NONCE), *SERVER_FRAMES], how


def test_real_sessions_with_random_nonces() -> None:
    secret = attempt_secret(job_secret(new_coordinator_key(), "j"), 1, 2)
    client = ExchangeSession.client(job_id="j", shard=1, attempt=2, secret=secret)
    server = ExchangeSession.server(lambda hello: secret if hello.job_id == "j" else None)
    assert client.state is SessionState.IDLE and server.state is SessionState.AWAIT_HELLO
    server.receive_data(client.send(client.hello))
    assert client.state is SessionState.AWAIT_WELCOME
    assert server.next_frame() == client.hello and server.hello == client.hello
    client.receive_data(server.send(server.welcome()))
    assert isinstance(client.next_frame(), Welcome)
    server.receive_data(client.send(Want(shard=2)))
    assert server.next_frame() == Want(shard=2)
    assert server.next_frame() is NEED_DATA
    client.receive_data(server.send(Ack(committed=False)))
    assert client.next_frame() == Ack(committed=False)


# --- EOF -----------------------------------------------------------------------------


def test_clean_eof_closes() -> None:
    server = make_server()
    server.receive_data(b"")
    assert server.next_frame() is CLOSED
    assert server.state is SessionState.CLOSED
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"x")


def test_frames_before_eof_are_delivered_first() -> None:
    client_bytes, _ = conversation(CLIENT_FRAMES[:2], [])
    server = make_server()
    server.receive_data(b"".join(client_bytes))
    server.receive_data(b"")
    frames: list[Frame] = []
    assert pump(server, frames) is CLOSED
    assert len(frames) == 3


def test_eof_inside_a_frame_is_a_remote_error() -> None:
    client_bytes, _ = conversation([CLIENT_FRAMES[0]], [])
    hello_frame, head_frame = client_bytes
    for cut in range(1, len(head_frame)):
        server = make_server()
        server.receive_data(hello_frame + head_frame[:cut])
        frames: list[Frame] = []
        assert pump(server, frames) is NEED_DATA
        server.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="closed inside a frame"):
            server.next_frame()
        assert server.state is SessionState.BROKEN
        with pytest.raises(LocalProtocolError, match="broken"):
            server.next_frame()


# --- rejections: framing -----------------------------------------------------------


def assert_rejected(session: ExchangeSession, data: bytes, error: type[Exception], match: str) -> None:
    session.receive_data(data)
    with pytest.raises(error, match=match):
        pump(session, [])
    assert session.state is SessionState.BROKEN
    with pytest.raises(ProtocolError):
        session.next_frame()


@pytest.mark.parametrize("garbage", [b"G", b"GET / HTTP/1.1\r\n", b"S\x00", b"SM\x01\x01\x00\x00\x00\x00"])
def test_bad_magic_is_rejected_at_once(garbage: bytes) -> None:
    assert_rejected(make_server(), garbage, RemoteProtocolError, "bad magic")


def test_bad_magic_in_a_full_frame() -> None:
    frame = forge(SECRET, 0, FrameType.HELLO, meta_payload(hello_meta()), magic=b"LS")
    assert_rejected(make_server(), frame, RemoteProtocolError, "bad magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version: int) -> None:
    frame = forge(SECRET, 0, FrameType.HELLO, meta_payload(hello_meta()), version=version)
    assert_rejected(make_server(), frame[:8], RemoteProtocolError, f"unsupported protocol version {version}")


@pytest.mark.parametrize("type_code", [0, max(FrameType) + 1, 200, 255])
def test_unknown_frame_type(type_code: int) -> None:
    frame = forge(SECRET, 0, type_code, meta_payload(hello_meta()))
    assert_rejected(make_server(), frame[:8], RemoteProtocolError, f"unknown frame type {type_code}")


@pytest.mark.parametrize("length", [DEFAULT_MAX_FRAME_BYTES - 8 - 32 + 1, 2**32 - 1])
def test_oversized_frame_rejected_from_the_header_alone(length: int) -> None:
    header = forge(SECRET, 0, FrameType.HELLO, b"", length=length)[:8]
    assert_rejected(make_server(), header, FrameTooLargeError, "exceeds max")


@pytest.mark.parametrize("length", [MAX_HANDSHAKE_FRAME_BYTES - 8 - 32 + 1, 1 << 20])
def test_handshake_frames_are_limited_until_the_session_is_open(length: int) -> None:
    # A stranger can make us buffer at most a few KiB: the limit is checked
    # from the header, before any of the payload arrives, on both sides.
    header = forge(SECRET, 0, FrameType.HELLO, b"", length=length)[:8]
    assert_rejected(make_server(), header, FrameTooLargeError, "before the session is open")
    client = make_client()
    client.send(client.hello)
    header = forge(SECRET, 0, FrameType.WELCOME, b"", length=length)[:8]
    assert_rejected(client, header, FrameTooLargeError, "before the session is open")
    # Once open, the full frame limit applies.
    client, server = open_pair()
    data = b"z" * length
    server.receive_data(client.send(Head(shard=3, start=0, head_end=length, line_start=True, has_data=True, data=data)))
    assert server.next_frame().data == data


def test_secrets_are_derived_per_job_and_per_attempt() -> None:
    key = bytes(range(100, 132))
    secret = job_secret(key, "j-1")
    assert secret == hmac.new(key, b"shardline-job-v1|j-1", hashlib.sha256).digest()
    assert attempt_secret(secret, 2, 5) == hmac.new(secret, b"attempt|2|5", hashlib.sha256).digest()
    derived = {attempt_secret(job_secret(key, job), s, a) for job in ("j-1", "j-2") for s in range(3) for a in range(3)}
    assert len(derived) == 2 * 3 * 3
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        job_secret(b"short", "j-1")


def test_an_attempts_secret_authenticates_that_attempt_only() -> None:
    secret = job_secret(new_coordinator_key(), JOB)

    def derive(hello: Hello) -> bytes:
        return attempt_secret(secret, hello.shard, hello.attempt)

    mine = attempt_secret(secret, 1, 0)
    own = ExchangeSession.client(job_id=JOB, shard=1, attempt=0, secret=mine)
    server = ExchangeSession.server(derive)
    server.receive_data(own.send(own.hello))
    assert server.next_frame() == own.hello
    for shard, attempt in ((1, 1), (0, 0), (2, 0)):
        other = ExchangeSession.client(job_id=JOB, shard=shard, attempt=attempt, secret=mine)
        assert_rejected(ExchangeSession.server(derive), other.send(other.hello), AuthenticationError, "authentication")


def test_frame_of_exactly_the_maximum_size_is_accepted() -> None:
    client, server = open_pair()
    # Find the data size that makes the whole frame just fit.
    base = len(meta_payload(head_meta(start=0, head_end=0), b"")) + 8 + 32
    assert base < 200
    for extra_meta in range(0, 12):  # JSON length of head_end grows with the data length
        n = DEFAULT_MAX_FRAME_BYTES - base - extra_meta
        frame = Head(shard=2, start=0, head_end=n, line_start=True, has_data=True, data=b"x" * n)
        try:
            wire = client.send(frame)
        except LocalProtocolError:
            continue
        assert len(wire) <= DEFAULT_MAX_FRAME_BYTES
        server.receive_data(wire)
        assert server.next_frame() == frame
        break
    else:
        pytest.fail("could not build a frame close to the maximum size")


def test_smaller_max_frame_bytes() -> None:
    client = make_client()
    server = make_server(max_frame_bytes=200)
    server.receive_data(client.send(client.hello))
    server.next_frame()
    client.receive_data(server.send(Welcome(nonce=SERVER_NONCE)))
    client.next_frame()
    big = client.send(Head(shard=1, start=0, head_end=300, line_start=True, has_data=True, data=b"y" * 300))
    assert_rejected(server, big[:8], FrameTooLargeError, "HEAD frame of .* exceeds max 200")
    client2, server2 = make_client(), make_server(max_frame_bytes=200)
    server2.receive_data(client2.send(client2.hello))
    server2.next_frame()
    server2.send(Welcome(nonce=SERVER_NONCE))
    with pytest.raises(LocalProtocolError, match=r"FRAGMENT frame of .* exceeds max frame size 200"):
        server2.send(Fragment(shard=1, start=0, head_end=300, line_start=True, has_data=True, data=b"y" * 300))


# --- rejections: payload and fields ----------------------------------------------------

BAD_HELLOS = [
    (b"", "shorter than its meta length"),
    (b"\x00\x00\x01", "shorter than its meta length"),
    (struct.pack("!I", 50) + b"{}", "meta length exceeds payload"),
    (struct.pack("!I", 64 * 1024 + 1) + b"{}", "too large"),
    (meta_payload(b"\xff\xfe{}"), "not valid JSON"),
    (meta_payload(b'{"job_id": "j"'), "not valid JSON"),
    (meta_payload(b""), "not valid JSON"),
    (meta_payload([]), "not an object"),
    (meta_payload("hello"), "not an object"),
    (meta_payload(None), "not an object"),
    (meta_payload(7), "not an object"),
    (meta_payload(hello_meta(extra=1)), r"unknown fields \['extra'\]"),
    (meta_payload(hello_meta(data="x")), r"unknown fields \['data'\]"),
    (meta_payload(hello_meta(TYPE=1)), r"unknown fields \['TYPE'\]"),
    (meta_payload(hello_meta(nonce=...)), r"lacks fields \['nonce'\]"),
    (meta_payload({}), r"lacks fields \['attempt', 'job_id', 'nonce', 'shard'\]"),
    (meta_payload(hello_meta(job_id="")), "HELLO.job_id invalid"),
    (meta_payload(hello_meta(job_id="j" * 129)), "HELLO.job_id invalid"),
    (meta_payload(hello_meta(job_id=7)), "HELLO.job_id invalid"),
    (meta_payload(hello_meta(shard=True)), "HELLO.shard must be an int"),
    (meta_payload(hello_meta(shard=-1)), "HELLO.shard must be an int >= 0"),
    (meta_payload(hello_meta(attempt="0")), "HELLO.attempt must be an int"),
    (meta_payload(hello_meta(attempt=1.0)), "HELLO.attempt must be an int"),
    (meta_payload(hello_meta(attempt=None)), "HELLO.attempt must be an int"),
    (meta_payload(hello_meta(nonce="ab")), "HELLO.nonce invalid"),
    (meta_payload(hello_meta(nonce=["c1"] * 16)), "HELLO.nonce invalid"),
    (meta_payload(hello_meta(), b"x"), "HELLO carries no data"),
]


@pytest.mark.parametrize("payload, match", BAD_HELLOS)
def test_malformed_hello(payload: bytes, match: str) -> None:
    frame = forge(SECRET, 0, FrameType.HELLO, payload)
    assert_rejected(make_server(), frame, RemoteProtocolError, match)


BAD_CLIENT_FRAMES = [
    (FrameType.WANT, b"", "WANT payload shorter than its meta length"),
    (FrameType.WANT, meta_payload(b"[1, 2"), "WANT meta is not valid JSON"),
    (FrameType.WANT, meta_payload([1]), "WANT meta is not an object"),
    (FrameType.WANT, meta_payload({"shard": 1, "x": 2}), r"WANT has unknown fields \['x'\]"),
    (FrameType.WANT, meta_payload({}), r"WANT lacks fields \['shard'\]"),
    (FrameType.WANT, meta_payload({"shard": True}), "WANT.shard must be an int"),
    (FrameType.WANT, meta_payload({"shard": False}), "WANT.shard must be an int"),
    (FrameType.WANT, meta_payload({"shard": "1"}), "WANT.shard must be an int"),
    (FrameType.WANT, meta_payload({"shard": -2}), "WANT.shard must be an int >= 0"),
    (FrameType.WANT, meta_payload({"shard": 1}, b"x"), "WANT carries no data"),
    (FrameType.PROGRESS, meta_payload({"bytes_emitted": 1.5}), "PROGRESS.bytes_emitted must be an int"),
    (FrameType.PROGRESS, meta_payload({"bytes_emitted": 1}, b"\0"), "PROGRESS carries no data"),
    (FrameType.HEAD, meta_payload(head_meta(), b"ab"), "HEAD data is 2 bytes, range says 3"),
    (FrameType.HEAD, meta_payload(head_meta(), b"abcd"), "HEAD data is 4 bytes, range says 3"),
    (FrameType.HEAD, meta_payload(head_meta(has_data=False), b"abc"), "HEAD has data but has_data is false"),
    (FrameType.HEAD, meta_payload(head_meta(head_end=9), b""), "HEAD.head_end before start"),
    (FrameType.HEAD, meta_payload(head_meta(line_start=1), b"abc"), "HEAD.line_start must be a bool"),
    (FrameType.HEAD, meta_payload(head_meta(has_data="yes"), b"abc"), "HEAD.has_data must be a bool"),
    (FrameType.HEAD, meta_payload(head_meta(start=None), b"abc"), "HEAD.start must be an int"),
    (FrameType.HEAD, meta_payload(head_meta(shard=...), b"abc"), r"HEAD lacks fields \['shard'\]"),
    (FrameType.DONE, meta_payload(done_meta(bytes=11)), "DONE.bytes disagrees with range"),
    (FrameType.DONE, meta_payload(done_meta(emitted_end=5, bytes=-5)), "DONE"),
    (FrameType.DONE, meta_payload(done_meta(checksum="x" * 65)), "DONE.checksum invalid"),
    (FrameType.DONE, meta_payload(done_meta(checksum=12)), "DONE.checksum invalid"),
    (FrameType.DONE, meta_payload(done_meta(output_checksum="x" * 65)), "DONE.output_checksum invalid"),
    (FrameType.DONE, meta_payload(done_meta(output_checksum=7)), "DONE.output_checksum invalid"),
    (FrameType.DONE, meta_payload(done_meta(tail_sources=["bogus"])), "DONE.tail_sources invalid"),
    (FrameType.DONE, meta_payload(done_meta(tail_sources="pushed")), "DONE.tail_sources invalid"),
    (FrameType.DONE, meta_payload(done_meta(tail_sources=[["pushed"]])), "DONE.tail_sources invalid"),
    (FrameType.FAILED, meta_payload({"kind": "X", "message": "m", "retryable": 0}), "FAILED.retryable must be a bool"),
    (FrameType.FAILED, meta_payload({"kind": "X" * 65, "message": "m", "retryable": True}), "FAILED.kind invalid"),
    (FrameType.FAILED, meta_payload({"kind": "X", "message": None, "retryable": True}), "FAILED.message invalid"),
    (FrameType.ERROR, meta_payload({"message": 5}), "ERROR.message invalid"),
]
BAD_SERVER_FRAMES = [
    (FrameType.PENDING, meta_payload({"shard": "4"}), "PENDING.shard must be an int"),
    (FrameType.PENDING, meta_payload({"shard": 4}, b"x"), "PENDING carries no data"),
    (FrameType.PENDING, meta_payload({}), r"PENDING lacks fields \['shard'\]"),
    (FrameType.FRAGMENT, meta_payload(head_meta(), b"ab"), "FRAGMENT data is 2 bytes, range says 3"),
    (FrameType.ACK, meta_payload({"committed": "true"}), "ACK.committed must be a bool"),
    (FrameType.ACK, meta_payload({"committed": True, "x": 1}), r"ACK has unknown fields \['x'\]"),
]


@pytest.mark.parametrize("type_code, payload, match", BAD_CLIENT_FRAMES)
def test_malformed_frame_with_a_valid_mac(type_code: int, payload: bytes, match: str) -> None:
    _client, server = open_pair()
    assert_rejected(server, forge(server._key, 1, type_code, payload), RemoteProtocolError, match)


@pytest.mark.parametrize("type_code, payload, match", BAD_SERVER_FRAMES)
def test_malformed_server_frame_with_a_valid_mac(type_code: int, payload: bytes, match: str) -> None:
    client, _server = open_pair()
    assert_rejected(client, forge(client._key, 1, type_code, payload), RemoteProtocolError, match)


def test_every_frame_type_is_covered() -> None:
    # a new frame type must be added to ANY_FRAME and the LEGAL_* tables here
    assert set(ANY_FRAME) == set(FrameType)
    assert all(f.TYPE is t for t, f in ANY_FRAME.items())


def test_optional_fields_may_be_omitted() -> None:
    _client, server = open_pair()
    server.receive_data(forge(server._key, 1, FrameType.DONE, meta_payload(done_meta(tail_sources=...))))
    frame = server.next_frame()
    assert isinstance(frame, Done) and frame.tail_sources == []


def test_malformed_welcome() -> None:
    client = make_client()
    client.send(client.hello)
    bad = forge(SECRET, 0, FrameType.WELCOME, meta_payload({"nonce": "zz"}))
    assert_rejected(client, bad, RemoteProtocolError, "WELCOME.nonce invalid")


@pytest.mark.parametrize("depth", [2_000, 60_000])
def test_deeply_nested_meta_is_a_remote_error(depth: int) -> None:
    # json.loads raises RecursionError, not ValueError, on deeply nested
    # input, and a HELLO is decoded before its MAC is checked: what anyone may
    # send must still be a remote error that breaks the session.
    # (The handshake frame limit would refuse the deeper one unread: lift it.)
    frame = forge(b"anything", 0, FrameType.HELLO, meta_payload(b"[" * depth))
    server = make_server(max_handshake_frame_bytes=DEFAULT_MAX_FRAME_BYTES)
    assert_rejected(server, frame, RemoteProtocolError, "not valid JSON")


def test_surrogate_nonces_are_remote_errors() -> None:
    # 32 lone surrogates are valid JSON of the right length, but no session
    # key can be derived from them: such a nonce is invalid.  (Both frames
    # need the job secret's MAC, so only a buggy or compromised peer can send
    # them.)
    nonce = "\udc80" * 32
    client = make_client()
    client.send(client.hello)
    welcome = forge(SECRET, 0, FrameType.WELCOME, meta_payload({"nonce": nonce}))
    assert_rejected(client, welcome, RemoteProtocolError, "WELCOME.nonce invalid")
    hello = forge(SECRET, 0, FrameType.HELLO, meta_payload(hello_meta(nonce=nonce)))
    assert_rejected(make_server(), hello, RemoteProtocolError, "HELLO.nonce invalid")


# --- authentication, unknown jobs, replay ------------------------------------------------


def test_wrong_secret() -> None:
    client = make_client(secret=OTHER_SECRET)
    assert_rejected(
        make_server(), client.send(client.hello), AuthenticationError, "HELLO frame #0 failed authentication"
    )


def test_welcome_under_the_wrong_secret() -> None:
    client = make_client()
    client.send(client.hello)
    bad = forge(OTHER_SECRET, 0, FrameType.WELCOME, meta_payload({"nonce": SERVER_NONCE}))
    assert_rejected(client, bad, AuthenticationError, "WELCOME frame #0 failed authentication")


def test_hello_for_an_unknown_job() -> None:
    client = make_client(job="no-such-job")
    assert_rejected(make_server(), client.send(client.hello), AuthenticationError, "unknown job 'no-such-job'")


@pytest.mark.parametrize("where", ["header", "meta", "data", "mac"])
def test_tampered_frame(where: str) -> None:
    client, server = open_pair()
    wire = bytearray(client.send(CLIENT_FRAMES[0]))
    index = {"header": 3, "meta": 20, "data": len(wire) - 33, "mac": len(wire) - 1}[where]
    if where == "header":
        wire[index] = FrameType.WANT  # still a legal type for a client
    else:
        wire[index] ^= 0x01
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(bytes(wire))
        pump(server, [])
    if where in ("data", "mac"):
        assert isinstance(info.value, AuthenticationError)
    assert server.state is SessionState.BROKEN


def test_frame_replayed_within_a_session() -> None:
    client, server = open_pair()
    wire = client.send(Progress(bytes_emitted=1))
    server.receive_data(wire)
    assert server.next_frame() == Progress(bytes_emitted=1)
    assert_rejected(server, wire, AuthenticationError, r"PROGRESS frame #2 failed authentication .*replayed")


def test_frames_reordered_within_a_session() -> None:
    client, server = open_pair()
    first, second = client.send(Want(shard=1)), client.send(Want(shard=2))
    assert_rejected(server, second + first, AuthenticationError, "failed authentication")


def test_frame_replayed_from_another_session() -> None:
    recorded_client, _ = open_pair(nonce="aa" * 16)
    recorded = recorded_client.send(Want(shard=9))
    _, server = open_pair(nonce="bb" * 16)
    assert_rejected(server, recorded, AuthenticationError, "WANT frame #1 failed authentication")


def test_replayed_hello_gets_nothing_under_a_new_server_nonce() -> None:
    client_bytes, _ = conversation([Want(shard=9)], [])
    hello_frame, want_frame = client_bytes
    server = make_server()
    server.receive_data(hello_frame)  # the HELLO itself verifies: it is keyed by the job secret
    assert isinstance(server.next_frame(), Hello)
    server.send(Welcome(nonce="99" * 16))  # ... but the session key differs
    assert_rejected(server, want_frame, AuthenticationError, "failed authentication")


def test_server_frame_replayed_to_a_client() -> None:
    client, server = open_pair()
    wire = server.send(Ack(committed=True))
    client.receive_data(wire)
    assert client.next_frame() == Ack(committed=True)
    assert_rejected(client, wire, AuthenticationError, "ACK frame #2 failed authentication")


# --- frames out of place: remote side ------------------------------------------------------


def _session_in(state: str) -> ExchangeSession:
    if state == "server await_hello":
        return make_server()
    if state == "server send_welcome":
        server = make_server()
        client = make_client()
        server.receive_data(client.send(client.hello))
        server.next_frame()
        return server
    if state == "server open":
        return open_pair()[1]
    if state == "client idle":
        return make_client()
    if state == "client await_welcome":
        client = make_client()
        client.send(client.hello)
        return client
    if state == "client open":
        return open_pair()[0]
    raise AssertionError(state)


LEGAL_TO_RECEIVE = {
    "server await_hello": {FrameType.HELLO},
    "server send_welcome": set(),
    "server open": {
        FrameType.HEAD,
        FrameType.WANT,
        FrameType.PROGRESS,
        FrameType.DONE,
        FrameType.FAILED,
        FrameType.ERROR,
    },
    "client idle": set(),
    "client await_welcome": {FrameType.WELCOME, FrameType.ERROR},
    "client open": {FrameType.FRAGMENT, FrameType.PENDING, FrameType.ACK, FrameType.ERROR},
}


@pytest.mark.parametrize("state", sorted(LEGAL_TO_RECEIVE))
@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_frames_out_of_place_are_remote_errors(state: str, frame_type: FrameType) -> None:
    if frame_type in LEGAL_TO_RECEIVE[state]:
        return
    session = _session_in(state)
    key = session._key or SECRET
    wire = forge(key, session._receive_sequence, frame_type, meta_payload({}))
    state_name = state.split(" ", 1)[1]
    assert_rejected(session, wire, RemoteProtocolError, f"unexpected {frame_type.name} frame in state {state_name}")


def test_error_accepted_before_welcome() -> None:
    client = make_client()
    client.send(client.hello)
    client.receive_data(forge(SECRET, 0, FrameType.ERROR, meta_payload({"message": "attempt fenced"})))
    assert client.next_frame() == Error(message="attempt fenced")


def test_server_can_refuse_a_hello_with_error() -> None:
    # Instead of WELCOME (keyed by the job secret, sequence 0): how a server
    # refuses a stale attempt.
    client, server = make_client(), make_server()
    server.receive_data(client.send(client.hello))
    server.next_frame()
    client.receive_data(server.send(Error(message="attempt 0 is fenced")))
    assert client.next_frame() == Error(message="attempt 0 is fenced")


# --- frames out of place: our side ------------------------------------------------------------

ANY_FRAME = {
    FrameType.HELLO: Hello(job_id=JOB, shard=3, attempt=0, nonce=CLIENT_NONCE),
    FrameType.WELCOME: Welcome(nonce=SERVER_NONCE),
    FrameType.HEAD: CLIENT_FRAMES[0],
    FrameType.WANT: Want(shard=1),
    FrameType.FRAGMENT: SERVER_FRAMES[0],
    FrameType.PROGRESS: Progress(bytes_emitted=0),
    FrameType.DONE: CLIENT_FRAMES[4],
    FrameType.FAILED: CLIENT_FRAMES[5],
    FrameType.ERROR: Error(message="x"),
    FrameType.ACK: Ack(committed=True),
    FrameType.PENDING: Pending(shard=4),
}
LEGAL_TO_SEND = {
    "server await_hello": set(),
    "server send_welcome": {FrameType.WELCOME, FrameType.ERROR},
    "server open": LEGAL_TO_RECEIVE["client open"],
    "client idle": {FrameType.HELLO},
    "client await_welcome": set(),
    "client open": LEGAL_TO_RECEIVE["server open"],
}


@pytest.mark.parametrize("state", sorted(LEGAL_TO_SEND))
@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_sending_out_of_place_is_a_local_error(state: str, frame_type: FrameType) -> None:
    session = _session_in(state)
    frame = ANY_FRAME[frame_type]
    if frame_type is FrameType.HELLO and state == "client idle":
        frame = session.hello
    if frame_type in LEGAL_TO_SEND[state]:
        if state == "server send_welcome" and frame_type is FrameType.ERROR:
            return  # see test_server_can_refuse_a_hello_with_error
        assert session.send(frame).startswith(b"SL")
        return
    role, state_name = state.split(" ", 1)
    before = session.state
    with pytest.raises(LocalProtocolError, match=f"cannot send {frame_type.name} as {role} in state {state_name}"):
        session.send(frame)
    assert session.state is before


def test_client_sends_only_its_own_hello_once() -> None:
    client = make_client()
    with pytest.raises(LocalProtocolError, match="cannot send HELLO"):
        client.send(Hello(job_id=JOB, shard=3, attempt=0, nonce=CLIENT_NONCE))  # equal, but not ours
    client.send(client.hello)
    with pytest.raises(LocalProtocolError, match="cannot send HELLO as client in state await_welcome"):
        client.send(client.hello)


def test_server_sends_welcome_once() -> None:
    _client, server = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot send WELCOME as server in state open"):
        server.send(Welcome(nonce=SERVER_NONCE))


def test_next_frame_on_a_broken_session_raises() -> None:
    server = make_server()
    server.receive_data(b"XX")
    with pytest.raises(RemoteProtocolError):
        server.next_frame()
    for _ in range(2):
        with pytest.raises(LocalProtocolError, match="broken"):
            server.next_frame()


# --- hypothesis: round trips and garbage -----------------------------------------------------

COUNTS = st.integers(0, 2**64)
TEXT = st.text(max_size=40)


@st.composite
def boundary_frames(draw, cls: type[Frame]) -> Frame:
    start = draw(COUNTS)
    has_data = draw(st.booleans())
    data = draw(st.binary(max_size=300)) if has_data else b""
    head_end = start + (len(data) if has_data else draw(st.integers(0, 2**40)))
    return cls(
        shard=draw(COUNTS), start=start, head_end=head_end, line_start=draw(st.booleans()), has_data=has_data, data=data
    )


@st.composite
def done_frames(draw) -> Done:
    a, n = draw(COUNTS), draw(COUNTS)
    return Done(
        emitted_start=a,
        emitted_end=a + n,
        line_start=n > 0 or draw(st.booleans()),
        bytes=n,
        checksum=draw(st.text(max_size=64)),
        output_bytes=draw(COUNTS),
        tail_sources=draw(st.lists(st.sampled_from(["pushed", "marker", "scan"]), max_size=4)),
    )


CLIENT_FRAME_STRATEGY = st.one_of(
    boundary_frames(Head),
    st.builds(Want, shard=COUNTS),
    st.builds(Progress, bytes_emitted=COUNTS),
    done_frames(),
    st.builds(Failed, kind=st.text(max_size=64), message=TEXT, retryable=st.booleans()),
    st.builds(Error, message=TEXT),
)
SERVER_FRAME_STRATEGY = st.one_of(
    boundary_frames(Fragment),
    st.builds(Pending, shard=COUNTS),
    st.builds(Ack, committed=st.booleans()),
    st.builds(Error, message=TEXT),
)
PATTERNS = st.lists(st.integers(0, 64), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    client_frames=st.lists(CLIENT_FRAME_STRATEGY, max_size=6),
    server_frames=st.lists(SERVER_FRAME_STRATEGY, max_size=6),
    pattern=PATTERNS,
)
def test_arbitrary_frames_round_trip(
    client_frames: list[Frame], server_frames: list[Frame], pattern: list[int]
) -> None:
    client_bytes, server_bytes = conversation(client_frames, server_frames)
    hello = make_client().hello
    assert server_receives(chunked(b"".join(client_bytes), pattern)) == [hello, *client_frames]
    assert server_receives(client_bytes) == [hello, *client_frames]
    assert client_receives(chunked(b"".join(server_bytes), pattern)) == [Welcome(nonce=SERVER_NONCE), *server_frames]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted(
    {
        f.name
        for cls in (Hello, Welcome, Head, Want, Pending, Progress, Done, Failed, Error, Ack)
        for f in dataclasses.fields(cls)
    }
    | {"x", "TYPE"}
)


@st.composite
def garbage_frames(draw) -> bytes:
    """Mostly well-framed, mostly-valid-JSON frames with random contents."""
    kind = draw(st.sampled_from(["meta", "json", "bytes"]))
    if kind == "meta":
        meta = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=7))
        raw = json.dumps(meta).encode()
    elif kind == "json":
        raw = json.dumps(draw(JSON_VALUES)).encode()
    else:
        raw = draw(st.binary(max_size=40))
    meta_length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**32 - 1)))
    payload = struct.pack("!I", meta_length) + raw + draw(st.binary(max_size=20))
    if draw(st.booleans()):
        payload = payload[: draw(st.integers(0, len(payload)))]
    header = struct.pack(
        "!2sBBI",
        draw(st.sampled_from([b"SL", b"SL", b"SL", b"LS"])),
        draw(st.sampled_from([1, 1, 1, 0, 2])),
        draw(st.integers(0, 12)),
        draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1))),
    )
    return header + payload + draw(st.binary(min_size=0, max_size=32))


@st.composite
def mutated_stream(draw) -> bytes:
    client_bytes, _ = conversation(CLIENT_FRAMES, [])
    stream = bytearray(b"".join(client_bytes))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, len(stream)))
        if op == "flip" and pos < len(stream):
            stream[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del stream[pos : pos + draw(st.integers(1, 40))]
        else:
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=10))
    return bytes(stream)


@settings(max_examples=400, deadline=None)
@given(
    garbage=st.one_of(
        st.binary(max_size=200),
        garbage_frames(),
        mutated_stream(),
        st.lists(garbage_frames(), min_size=2, max_size=4).map(b"".join),
    ),
    state=st.sampled_from(sorted(LEGAL_TO_RECEIVE)),
    pattern=PATTERNS,
)
def test_garbage_only_raises_remote_protocol_errors(garbage: bytes, state: str, pattern: list[int]) -> None:
    session = _session_in(state)
    try:
        for chunk in chunked(garbage, pattern):
            session.receive_data(chunk)
            if pump(session, []) is CLOSED:
                break
        session.receive_data(b"")
        assert pump(session, []) is CLOSED
    except RemoteProtocolError:
        assert session.state is SessionState.BROKEN
        with pytest.raises(LocalProtocolError):
            session.next_frame()


def test_building_an_invalid_frame_is_a_local_error():
    # Our own bug, not the peer's: the decoder reports the same check as Remote.
    with pytest.raises(LocalProtocolError, match="data is 1 bytes"):
        Head(shard=1, start=0, head_end=5, line_start=True, has_data=True, data=b"x")
    with pytest.raises(LocalProtocolError, match="no line starts"):
        Done(emitted_start=0, emitted_end=3, line_start=False, bytes=3, checksum="", output_bytes=0)
