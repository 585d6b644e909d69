# The exchange session: a sans-I/O state machine in the style of h11.
#
# Feed it bytes with `receive_data` (b"" is EOF), pull verified frames with
# `next_frame`, and turn frames into bytes with `send`.  It never touches a
# socket.  The wire format and the MAC scheme are described in `_frames.py`:
# HELLO and WELCOME are keyed with the shard attempt's secret, every later
# frame with a session key derived from it and both nonces, and each
# direction's implicit sequence number is part of every MAC.  Until the
# session is open, frames are limited to MAX_HANDSHAKE_FRAME_BYTES.

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable

from ..errors import AuthenticationError, FrameTooLargeError, LocalProtocolError, RemoteProtocolError
from ._frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    MAC_BYTES,
    MAGIC,
    MAX_HANDSHAKE_FRAME_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    SEQUENCE,
    Frame,
    FrameType,
    Hello,
    Welcome,
    decode_payload,
    encode_payload,
)
from ._ranges import NEED_DATA

__all__ = ["CLOSED", "ExchangeSession", "Role", "SessionState"]


class _Closed:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


#: Returned by `next_frame` after the peer's EOF once all frames are consumed.
CLOSED = _Closed()


class SessionState(enum.Enum):
    IDLE = "idle"  # client, before HELLO is sent
    AWAIT_HELLO = "await_hello"  # server, before HELLO arrives
    AWAIT_WELCOME = "await_welcome"  # client, HELLO sent
    SEND_WELCOME = "send_welcome"  # server, HELLO verified, WELCOME not yet sent
    OPEN = "open"
    CLOSED = "closed"
    BROKEN = "broken"


class Role(enum.Enum):
    CLIENT = "client"  # the worker
    SERVER = "server"  # the coordinator's exchange


# Which frames each role may send / receive while the session is OPEN.  The
# handshake frames are handled by the state machine itself.
_OPEN_FRAMES: dict[Role, frozenset[FrameType]] = {
    Role.CLIENT: frozenset(
        {FrameType.HEAD, FrameType.WANT, FrameType.PROGRESS, FrameType.DONE, FrameType.FAILED, FrameType.ERROR}
    ),
    Role.SERVER: frozenset({FrameType.FRAGMENT, FrameType.PENDING, FrameType.ACK, FrameType.ERROR}),
}


def _mac(key: bytes, sequence: int, header: bytes, payload: bytes) -> bytes:
    # One-shot HMAC (one C call): several times cheaper per frame than an
    # `hmac.new` object, and copying the payload once costs less than hashing it.
    return hmac.digest(key, SEQUENCE.pack(sequence) + header + payload, "sha256")


def _session_key(secret: bytes, client_nonce: str, server_nonce: str) -> bytes:
    material = b"shardline-session-v1|" + client_nonce.encode() + b"|" + server_nonce.encode()
    return hmac.new(secret, material, hashlib.sha256).digest()


class ExchangeSession:
    """One authenticated exchange session, as seen from one side. No I/O.

    Build a client with `ExchangeSession.client(...)` (then `send` its
    `hello`), or a server with `ExchangeSession.server(lookup_secret)` where
    `lookup_secret(hello)` returns the secret of the attempt the (not yet
    verified) HELLO names, or None for an unknown job.  Any malformed,
    unauthenticated or out-of-place frame raises a RemoteProtocolError
    subclass and leaves the session BROKEN.  Before the session is open no
    frame may exceed `max_handshake_frame_bytes`; after, `max_frame_bytes`.
    """

    def __init__(
        self,
        role: Role,
        *,
        secret: bytes | None = None,
        lookup_secret: Callable[[Hello], bytes | None] | None = None,
        hello: Hello | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_handshake_frame_bytes: int = MAX_HANDSHAKE_FRAME_BYTES,
    ) -> None:
        self.role = role
        self.state = SessionState.IDLE if role is Role.CLIENT else SessionState.AWAIT_HELLO
        self.hello = hello  # the client's own HELLO, or the one the server accepted
        self._secret = secret
        self._lookup_secret = lookup_secret
        self._key: bytes | None = secret
        self._max_frame_bytes = max_frame_bytes
        self._max_handshake_frame_bytes = min(max_handshake_frame_bytes, max_frame_bytes)
        self._buffer = bytearray()
        self._eof = False
        self._send_sequence = 0
        self._receive_sequence = 0

    @classmethod
    def client(
        cls, *, job_id: str, shard: int, attempt: int, secret: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> ExchangeSession:
        hello = Hello(job_id=job_id, shard=shard, attempt=attempt, nonce=secrets.token_hex(NONCE_BYTES))
        return cls(Role.CLIENT, secret=secret, hello=hello, max_frame_bytes=max_frame_bytes)

    @classmethod
    def server(
        cls,
        lookup_secret: Callable[[Hello], bytes | None],
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_handshake_frame_bytes: int = MAX_HANDSHAKE_FRAME_BYTES,
    ) -> ExchangeSession:
        return cls(
            Role.SERVER,
            lookup_secret=lookup_secret,
            max_frame_bytes=max_frame_bytes,
            max_handshake_frame_bytes=max_handshake_frame_bytes,
        )

    # -- sending -------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Encode `frame` for the wire, checking it is legal to send now."""
        kind = frame.TYPE
        if self.state is SessionState.IDLE and kind is FrameType.HELLO and frame is self.hello:
            next_state = SessionState.AWAIT_WELCOME
        elif self.state is SessionState.SEND_WELCOME and kind is FrameType.WELCOME:
            next_state = SessionState.OPEN
        elif self.state is SessionState.SEND_WELCOME and kind is FrameType.ERROR:
            next_state = SessionState.CLOSED
        elif self.state is SessionState.OPEN and kind in _OPEN_FRAMES[self.role]:
            next_state = SessionState.OPEN
        else:
            raise LocalProtocolError(f"cannot send {kind.name} as {self.role.value} in state {self.state.value}")
        assert self._key is not None
        payload = encode_payload(frame)
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(payload))
        if len(header) + len(payload) + MAC_BYTES > self._max_frame_bytes:
            raise LocalProtocolError(
                f"{kind.name} frame of {len(payload)} payload bytes exceeds max frame size {self._max_frame_bytes}"
            )
        mac = _mac(self._key, self._send_sequence, header, payload)
        self._send_sequence += 1
        if kind is FrameType.WELCOME:
            assert self.hello is not None and self._secret is not None
            self._key = _session_key(self._secret, self.hello.nonce, frame.nonce)  # type: ignore[attr-defined]
        self.state = next_state
        return header + payload + mac

    def welcome(self) -> Welcome:
        """The server's WELCOME for a verified HELLO (send it right away)."""
        return Welcome(nonce=secrets.token_hex(NONCE_BYTES))

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data called after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet taken as frames."""
        return len(self._buffer)

    def next_frame(self) -> Frame | object:
        """The next verified frame, NEED_DATA, or CLOSED after a clean EOF."""
        if self.state is SessionState.BROKEN:
            raise LocalProtocolError("session is broken; no more frames")
        try:
            frame = self._parse_one()
        except RemoteProtocolError:
            self.state = SessionState.BROKEN
            raise
        if frame is None:
            if self._eof:
                if self._buffer:
                    self.state = SessionState.BROKEN
                    raise RemoteProtocolError(f"connection closed inside a frame ({len(self._buffer)} bytes pending)")
                self.state = SessionState.CLOSED
                return CLOSED
            return NEED_DATA
        return frame

    def _parse_one(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            if buffer and not buffer.startswith(MAGIC[: len(buffer)]):
                raise RemoteProtocolError("bad magic: not a shardline exchange frame")
            return None
        magic, version, type_code, payload_length = HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise RemoteProtocolError("bad magic: not a shardline exchange frame")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")
        try:
            frame_type = FrameType(type_code)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {type_code}") from None
        total = HEADER.size + payload_length + MAC_BYTES
        if self.state in (SessionState.AWAIT_HELLO, SessionState.AWAIT_WELCOME):
            limit, before = self._max_handshake_frame_bytes, " before the session is open"
        else:
            limit, before = self._max_frame_bytes, ""
        if total > limit:
            raise FrameTooLargeError(f"{frame_type.name} frame of {total} bytes exceeds max {limit}{before}")
        if len(buffer) < total:
            return None
        header = bytes(buffer[: HEADER.size])
        payload = bytes(buffer[HEADER.size : HEADER.size + payload_length])
        mac = bytes(buffer[HEADER.size + payload_length : total])
        del buffer[:total]
        self._check_expected(frame_type)
        if self.state is SessionState.AWAIT_HELLO:
            return self._accept_hello(header, payload, mac)
        self._verify(header, payload, mac, frame_type)
        frame = decode_payload(frame_type, payload)
        if frame_type is FrameType.WELCOME:
            assert self.hello is not None and self._secret is not None
            self._key = _session_key(self._secret, self.hello.nonce, frame.nonce)  # type: ignore[attr-defined]
            self.state = SessionState.OPEN
        return frame

    def _check_expected(self, frame_type: FrameType) -> None:
        state = self.state
        if state is SessionState.AWAIT_HELLO:
            ok = frame_type is FrameType.HELLO
        elif state is SessionState.AWAIT_WELCOME:
            ok = frame_type in (FrameType.WELCOME, FrameType.ERROR)
        elif state is SessionState.OPEN:
            peer = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
            ok = frame_type in _OPEN_FRAMES[peer]
        else:
            ok = False
        if not ok:
            raise RemoteProtocolError(f"unexpected {frame_type.name} frame in state {state.value}")

    def _verify(self, header: bytes, payload: bytes, mac: bytes, frame_type: FrameType) -> None:
        assert self._key is not None
        expected = _mac(self._key, self._receive_sequence, header, payload)
        if not hmac.compare_digest(expected, mac):
            raise AuthenticationError(
                f"{frame_type.name} frame #{self._receive_sequence} failed authentication "
                "(wrong secret, tampered or replayed)"
            )
        self._receive_sequence += 1

    def _accept_hello(self, header: bytes, payload: bytes, mac: bytes) -> Hello:
        hello = decode_payload(FrameType.HELLO, payload)
        assert isinstance(hello, Hello)
        assert self._lookup_secret is not None
        secret = self._lookup_secret(hello)
        if secret is None:
            raise AuthenticationError(f"HELLO for unknown job {hello.job_id!r}")
        self._key = self._secret = secret
        self._verify(header, payload, mac, FrameType.HELLO)
        self.hello = hello
        self.state = SessionState.SEND_WELCOME
        return hello
