# The exchange wire format: typed frames and a sans-I/O session.
#
# A frame on the wire is
#
#     magic "SL" | version u8 | type u8 | payload length u32 | payload | mac[32]
#
# and its payload is ``meta length u32 | meta (UTF-8 JSON object) | data``.
# The MAC is HMAC-SHA256 over ``sequence u64 | header | payload``; the
# sequence number is implicit (each direction counts its own frames), so a
# reordered, dropped or replayed frame fails verification.  HELLO and WELCOME
# are keyed with the job's secret; every later frame uses a session key
# derived from the secret and both sides' nonces, so frames recorded from one
# session are useless in another.  The server answers data only to frames
# under the session key, which a replayed HELLO cannot produce.
#
# `ExchangeSession` is a state machine in the style of h11: feed it bytes with
# `receive_data` (b"" is EOF), pull frames with `next_frame`, and turn frames
# into bytes with `send`.  It never touches a socket.

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ..errors import (
    AuthenticationError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from ._ranges import NEED_DATA

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "Done",
    "Error",
    "ExchangeSession",
    "Failed",
    "Fragment",
    "Frame",
    "FrameType",
    "Head",
    "Hello",
    "Pending",
    "Progress",
    "Role",
    "SessionState",
    "Want",
    "Welcome",
    "new_job_secret",
]

PROTOCOL_VERSION = 1
MAGIC = b"SL"
_HEADER = struct.Struct("!2sBBI")
_META_LENGTH = struct.Struct("!I")
_SEQUENCE = struct.Struct("!Q")
MAC_BYTES = 32
NONCE_BYTES = 16
#: Frames carry at most one head fragment; larger fragments are announced
#: without data and the neighbour fetches them from the object store.  4 MiB
#: keeps a coordinator holding a fragment per shard for thousands of shards
#: within a few GiB in the worst case, and is one cheap round trip.
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024 + 64 * 1024
#: JSON metadata is small by construction; a larger one is hostile.
MAX_META_BYTES = 64 * 1024


def new_job_secret() -> bytes:
    """A fresh random per-job secret for HMAC authentication."""
    return secrets.token_bytes(32)


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    HEAD = 3
    WANT = 4
    FRAGMENT = 5
    PROGRESS = 6
    DONE = 7
    FAILED = 8
    ERROR = 9
    ACK = 10
    PENDING = 11


def _require(condition: bool, message: str) -> None:
    """Frame validation.  Building a bad frame is our bug (Local); the
    decoder re-raises the same failure as the peer's (Remote)."""
    if not condition:
        raise LocalProtocolError(message)


def _is_nonce(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def _check_remote(condition: bool, message: str) -> None:
    if not condition:
        raise RemoteProtocolError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base of all frames: JSON-able fields plus an optional raw `data` blob."""

    TYPE: ClassVar[FrameType]
    data: bytes = b""

    def meta(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "data"}

    def _check_counts(self, *names: str) -> None:
        for name in names:
            _require(_is_count(getattr(self, name)), f"{self.TYPE.name}.{name} must be an int >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Frame):
    """Worker -> coordinator: opens a session for one shard attempt."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    job_id: str
    shard: int
    attempt: int
    nonce: str

    def __post_init__(self) -> None:
        _require(isinstance(self.job_id, str) and 0 < len(self.job_id) <= 128, "HELLO.job_id invalid")
        self._check_counts("shard", "attempt")
        _require(_is_nonce(self.nonce), "HELLO.nonce invalid")
        _require(not self.data, "HELLO carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Frame):
    """Coordinator -> worker: accepts the session and contributes its nonce."""

    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    nonce: str

    def __post_init__(self) -> None:
        _require(_is_nonce(self.nonce), "WELCOME.nonce invalid")
        _require(not self.data, "WELCOME carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class _BoundaryFrame(Frame):
    shard: int
    start: int
    head_end: int
    line_start: bool
    has_data: bool

    def __post_init__(self) -> None:
        self._check_counts("shard", "start", "head_end")
        _require(self.head_end >= self.start, f"{self.TYPE.name}.head_end before start")
        _require(isinstance(self.line_start, bool), f"{self.TYPE.name}.line_start must be a bool")
        _require(isinstance(self.has_data, bool), f"{self.TYPE.name}.has_data must be a bool")
        if self.has_data:
            _require(
                len(self.data) == self.head_end - self.start,
                f"{self.TYPE.name} data is {len(self.data)} bytes, range says {self.head_end - self.start}",
            )
        else:
            _require(not self.data, f"{self.TYPE.name} has data but has_data is false")


@dataclass(frozen=True, slots=True, kw_only=True)
class Head(_BoundaryFrame):
    """Worker -> coordinator: my boundary, and my head fragment if it fits."""

    TYPE: ClassVar[FrameType] = FrameType.HEAD


@dataclass(frozen=True, slots=True, kw_only=True)
class Fragment(_BoundaryFrame):
    """Coordinator -> worker: a neighbour's boundary and head fragment."""

    TYPE: ClassVar[FrameType] = FrameType.FRAGMENT

    @classmethod
    def relaying(cls, head: Head) -> Fragment:
        """The FRAGMENT that passes `head` on to the neighbour that wants it."""
        return cls(
            shard=head.shard,
            start=head.start,
            head_end=head.head_end,
            line_start=head.line_start,
            has_data=head.has_data,
            data=head.data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Want(Frame):
    """Worker -> coordinator: push me shard `shard`'s head when you have it."""

    TYPE: ClassVar[FrameType] = FrameType.WANT
    shard: int

    def __post_init__(self) -> None:
        self._check_counts("shard")
        _require(not self.data, "WANT carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending(Frame):
    """Coordinator -> worker: answer to WANT when the head is not known yet.

    Every WANT is answered at once with FRAGMENT or PENDING, so a worker that
    reaches its tail knows whether a push is on its way or it should fall
    back to the marker or its own scan.  After PENDING, the FRAGMENT follows
    as soon as the neighbour publishes its head.
    """

    TYPE: ClassVar[FrameType] = FrameType.PENDING
    shard: int

    def __post_init__(self) -> None:
        self._check_counts("shard")
        _require(not self.data, "PENDING carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress(Frame):
    """Worker -> coordinator: heartbeat with bytes fed to the command so far."""

    TYPE: ClassVar[FrameType] = FrameType.PROGRESS
    bytes_emitted: int

    def __post_init__(self) -> None:
        self._check_counts("bytes_emitted")
        _require(not self.data, "PROGRESS carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Done(Frame):
    """Worker -> coordinator: the shard's result (DESIGN §3 step 5)."""

    TYPE: ClassVar[FrameType] = FrameType.DONE
    emitted_start: int  # = the shard's head_end: DONE carries the boundary too
    emitted_end: int
    line_start: bool
    bytes: int
    checksum: str
    output_bytes: int
    tail_sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_counts("emitted_start", "emitted_end", "bytes", "output_bytes")
        _require(self.emitted_end >= self.emitted_start, "DONE.emitted_end before emitted_start")
        _require(self.bytes == self.emitted_end - self.emitted_start, "DONE.bytes disagrees with range")
        _require(isinstance(self.line_start, bool), "DONE.line_start must be a bool")
        _require(self.line_start or self.bytes == 0, "DONE emits bytes although no line starts in its range")
        _require(isinstance(self.checksum, str) and len(self.checksum) <= 64, "DONE.checksum invalid")
        _require(
            isinstance(self.tail_sources, list) and all(s in ("pushed", "marker", "scan") for s in self.tail_sources),
            "DONE.tail_sources invalid",
        )
        _require(not self.data, "DONE carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(Frame):
    """Worker -> coordinator: the shard attempt failed; `kind` is the error class."""

    TYPE: ClassVar[FrameType] = FrameType.FAILED
    kind: str
    message: str
    retryable: bool

    def __post_init__(self) -> None:
        _require(isinstance(self.kind, str) and len(self.kind) <= 64, "FAILED.kind invalid")
        _require(isinstance(self.message, str), "FAILED.message invalid")
        _require(isinstance(self.retryable, bool), "FAILED.retryable must be a bool")
        _require(not self.data, "FAILED carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Frame):
    """Either side: the session is being closed because of `message`."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    message: str

    def __post_init__(self) -> None:
        _require(isinstance(self.message, str), "ERROR.message invalid")
        _require(not self.data, "ERROR carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Frame):
    """Coordinator -> worker: DONE (or FAILED) received; `committed` says if used."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    committed: bool

    def __post_init__(self) -> None:
        _require(isinstance(self.committed, bool), "ACK.committed must be a bool")
        _require(not self.data, "ACK carries no data")


_FRAME_CLASSES: dict[FrameType, type[Frame]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Head, Want, Fragment, Pending, Progress, Done, Failed, Error, Ack)
}


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
    mac = hmac.new(key, _SEQUENCE.pack(sequence), hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


def _session_key(secret: bytes, client_nonce: str, server_nonce: str) -> bytes:
    material = b"shardline-session-v1|" + client_nonce.encode() + b"|" + server_nonce.encode()
    return hmac.new(secret, material, hashlib.sha256).digest()


def _encode_payload(frame: Frame) -> bytes:
    meta = json.dumps(frame.meta(), separators=(",", ":"), sort_keys=True).encode()
    return _META_LENGTH.pack(len(meta)) + meta + frame.data


def _decode_payload(frame_type: FrameType, payload: bytes) -> Frame:
    _check_remote(len(payload) >= _META_LENGTH.size, f"{frame_type.name} payload shorter than its meta length")
    (meta_length,) = _META_LENGTH.unpack_from(payload)
    _check_remote(meta_length <= MAX_META_BYTES, f"{frame_type.name} meta of {meta_length} bytes is too large")
    end = _META_LENGTH.size + meta_length
    _check_remote(end <= len(payload), f"{frame_type.name} meta length exceeds payload")
    try:
        meta = json.loads(payload[_META_LENGTH.size : end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{frame_type.name} meta is not valid JSON: {exc}") from None
    _check_remote(isinstance(meta, dict), f"{frame_type.name} meta is not an object")
    cls = _FRAME_CLASSES[frame_type]
    expected = {f.name for f in fields(cls) if f.name != "data"}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown = set(meta) - expected
    missing = required - set(meta)
    _check_remote(not unknown, f"{frame_type.name} has unknown fields {sorted(unknown)}")
    _check_remote(not missing, f"{frame_type.name} lacks fields {sorted(missing)}")
    try:
        return cls(data=bytes(payload[end:]), **meta)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None
    except TypeError as exc:
        raise RemoteProtocolError(f"{frame_type.name} fields invalid: {exc}") from None


class ExchangeSession:
    """One authenticated exchange session, as seen from one side. No I/O.

    Build a client with `ExchangeSession.client(...)` (then `send` its
    `hello()`), or a server with `ExchangeSession.server(lookup_secret)` where
    `lookup_secret(job_id)` returns the job's secret or None.  Any malformed,
    unauthenticated or out-of-place frame raises a RemoteProtocolError
    subclass and leaves the session BROKEN.
    """

    def __init__(
        self,
        role: Role,
        *,
        secret: bytes | None = None,
        lookup_secret: Callable[[str], bytes | None] | None = None,
        hello: Hello | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.role = role
        self.state = SessionState.IDLE if role is Role.CLIENT else SessionState.AWAIT_HELLO
        self.hello = hello  # the client's own HELLO, or the one the server accepted
        self._secret = secret
        self._lookup_secret = lookup_secret
        self._key: bytes | None = secret
        self._max_frame_bytes = max_frame_bytes
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
        cls, lookup_secret: Callable[[str], bytes | None], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> ExchangeSession:
        return cls(Role.SERVER, lookup_secret=lookup_secret, max_frame_bytes=max_frame_bytes)

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
        payload = _encode_payload(frame)
        header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(payload))
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
        if len(buffer) < _HEADER.size:
            if buffer and not buffer.startswith(MAGIC[: len(buffer)]):
                raise RemoteProtocolError("bad magic: not a shardline exchange frame")
            return None
        magic, version, type_code, payload_length = _HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise RemoteProtocolError("bad magic: not a shardline exchange frame")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")
        try:
            frame_type = FrameType(type_code)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {type_code}") from None
        total = _HEADER.size + payload_length + MAC_BYTES
        if total > self._max_frame_bytes:
            raise FrameTooLargeError(f"{frame_type.name} frame of {total} bytes exceeds max {self._max_frame_bytes}")
        if len(buffer) < total:
            return None
        header = bytes(buffer[: _HEADER.size])
        payload = bytes(buffer[_HEADER.size : _HEADER.size + payload_length])
        mac = bytes(buffer[_HEADER.size + payload_length : total])
        del buffer[:total]
        self._check_expected(frame_type)
        if self.state is SessionState.AWAIT_HELLO:
            return self._accept_hello(header, payload, mac)
        self._verify(header, payload, mac, frame_type)
        frame = _decode_payload(frame_type, payload)
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
                "(wrong job secret, tampered or replayed)"
            )
        self._receive_sequence += 1

    def _accept_hello(self, header: bytes, payload: bytes, mac: bytes) -> Hello:
        hello = _decode_payload(FrameType.HELLO, payload)
        assert isinstance(hello, Hello)
        assert self._lookup_secret is not None
        secret = self._lookup_secret(hello.job_id)
        if secret is None:
            raise AuthenticationError(f"HELLO for unknown job {hello.job_id!r}")
        self._key = self._secret = secret
        self._verify(header, payload, mac, FrameType.HELLO)
        self.hello = hello
        self.state = SessionState.SEND_WELCOME
        return hello
