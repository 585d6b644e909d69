# The exchange wire format: typed frames and their encoding (`_session.py`
# drives them).
#
# A frame on the wire is
#
#     magic "SL" | version u8 | type u8 | payload length u32 | payload | mac[32]
#
# and its payload is ``meta length u32 | meta (UTF-8 JSON object) | data``.
# The MAC is HMAC-SHA256 over ``sequence u64 | header | payload``; the
# sequence number is implicit (each direction counts its own frames), so a
# reordered, dropped or replayed frame fails verification.  HELLO and WELCOME
# are keyed with the shard attempt's secret (`_secrets.py`); every later frame
# uses a session key derived from that secret and both sides' nonces, so
# frames recorded from one session are useless in another.  The server
# answers data only to frames under the session key, which a replayed HELLO
# cannot produce.
#
# Until the HELLO has verified, a frame may be at most MAX_HANDSHAKE_FRAME_BYTES:
# a stranger on the port can make us buffer a few KiB, never a full frame.
#
# Frames are frozen dataclasses that validate on construction (a
# LocalProtocolError: building a bad frame is our bug); `decode_payload`
# reports the same checks as RemoteProtocolError.

from __future__ import annotations

import enum
import json
import struct
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_HANDSHAKE_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "Done",
    "Error",
    "Failed",
    "Fragment",
    "Frame",
    "FrameType",
    "Head",
    "Hello",
    "Pending",
    "Progress",
    "TailSource",
    "Want",
    "Welcome",
]

PROTOCOL_VERSION = 1
MAGIC = b"SL"
HEADER = struct.Struct("!2sBBI")
_META_LENGTH = struct.Struct("!I")
SEQUENCE = struct.Struct("!Q")
MAC_BYTES = 32
NONCE_BYTES = 16
#: Frames carry at most one head fragment; larger fragments are announced
#: without data and the neighbour fetches them from the object store.  4 MiB
#: keeps a coordinator holding a fragment per shard for thousands of shards
#: within a few GiB in the worst case, and is one cheap round trip.
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024 + 64 * 1024
#: The largest frame either side accepts before the session is open.  HELLO
#: and WELCOME are about 200 bytes (a job id is at most 128 characters).
MAX_HANDSHAKE_FRAME_BYTES = 4 * 1024
#: JSON metadata is small by construction; a larger one is hostile.
MAX_META_BYTES = 64 * 1024


class TailSource(str, enum.Enum):
    """How a worker completed one neighbour's head fragment (DESIGN §3 step 4; reported in DONE)."""

    PUSHED = "pushed"  # bytes pushed to it over the exchange
    MARKER = "marker"  # offset from a marker (or a data-less push), bytes by one exact GET
    SCAN = "scan"  # its own forward scan in the object


_TAIL_SOURCES = frozenset(source.value for source in TailSource)


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


_HEX_DIGITS = frozenset("0123456789abcdef")


def _is_nonce(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and _HEX_DIGITS.issuperset(value)


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
        return {name: getattr(self, name) for name in _META_FIELDS[type(self)][0]}

    def _check_counts(self, *names: str) -> None:
        for name in names:
            if not _is_count(getattr(self, name)):  # the message only on failure: this runs per frame
                raise LocalProtocolError(f"{self.TYPE.name}.{name} must be an int >= 0")


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
        problem = self._boundary_problem()
        if problem is not None:  # the message only on failure: this runs for every HEAD and FRAGMENT
            raise LocalProtocolError(f"{self.TYPE.name}{problem}")

    def _boundary_problem(self) -> str | None:
        if self.head_end < self.start:
            return ".head_end before start"
        if not isinstance(self.line_start, bool):
            return ".line_start must be a bool"
        if not isinstance(self.has_data, bool):
            return ".has_data must be a bool"
        if self.has_data and len(self.data) != self.head_end - self.start:
            return f" data is {len(self.data)} bytes, range says {self.head_end - self.start}"
        if not self.has_data and self.data:
            return " has data but has_data is false"
        return None


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

    Every WANT is answered with FRAGMENT the moment the head is known, or
    with PENDING once the exchange stops holding the answer back (about a
    second while the neighbour is connected, less while it is not), so a
    worker that reaches its tail knows whether a push is on its way or it
    should fall back to the marker or its own scan.  After PENDING, the
    FRAGMENT follows as soon as the neighbour publishes its head.
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
    #: The output's checksum, from a worker whose output is remote (an S3
    #: object the coordinator does not read); None when the coordinator has it on disk.
    output_checksum: str | None = None

    def __post_init__(self) -> None:
        self._check_counts("emitted_start", "emitted_end", "bytes", "output_bytes")
        _require(self.emitted_end >= self.emitted_start, "DONE.emitted_end before emitted_start")
        _require(self.bytes == self.emitted_end - self.emitted_start, "DONE.bytes disagrees with range")
        _require(isinstance(self.line_start, bool), "DONE.line_start must be a bool")
        _require(self.line_start or self.bytes == 0, "DONE emits bytes although no line starts in its range")
        _require(isinstance(self.checksum, str) and len(self.checksum) <= 64, "DONE.checksum invalid")
        _require(
            self.output_checksum is None or (isinstance(self.output_checksum, str) and len(self.output_checksum) <= 64),
            "DONE.output_checksum invalid",
        )
        _require(
            isinstance(self.tail_sources, list)
            and all(isinstance(s, str) and s in _TAIL_SOURCES for s in self.tail_sources),
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
    """Either side: the session is being closed because of `message`.

    `stale` marks the coordinator refusing an attempt that is no longer
    current (fenced): the worker must stop it rather than try again.
    """

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    message: str
    stale: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.message, str), "ERROR.message invalid")
        _require(isinstance(self.stale, bool), "ERROR.stale must be a bool")
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


def _field_names(cls: type[Frame]) -> tuple[tuple[str, ...], frozenset[str], frozenset[str]]:
    names = tuple(f.name for f in fields(cls) if f.name != "data")
    required = frozenset(
        f.name for f in fields(cls) if f.name != "data" and f.default is MISSING and f.default_factory is MISSING
    )
    return names, frozenset(names), required


#: Each frame class's JSON field names, all and required: computed once
#: (`dataclasses.fields` is too slow to call for every frame).
_META_FIELDS = {cls: _field_names(cls) for cls in _FRAME_CLASSES.values()}


#: `json.dumps(..., separators=(",", ":"), sort_keys=True)` made once: dumps
#: with options builds a new encoder for every call, i.e. every frame.
_META_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def encode_payload(frame: Frame) -> bytes:
    meta = _META_ENCODER.encode(frame.meta()).encode()
    return _META_LENGTH.pack(len(meta)) + meta + frame.data


def decode_payload(frame_type: FrameType, payload: bytes) -> Frame:
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
    _, expected, required = _META_FIELDS[cls]
    if not (meta.keys() <= expected and required <= meta.keys()):
        unknown = meta.keys() - expected
        missing = required - meta.keys()
        _check_remote(not unknown, f"{frame_type.name} has unknown fields {sorted(unknown)}")
        _check_remote(not missing, f"{frame_type.name} lacks fields {sorted(missing)}")
    try:
        return cls(data=bytes(payload[end:]), **meta)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None
    except TypeError as exc:
        raise RemoteProtocolError(f"{frame_type.name} fields invalid: {exc}") from None
