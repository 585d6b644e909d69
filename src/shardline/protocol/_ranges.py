# Range planning and the ownership rule (DESIGN §1), as pure functions.
#
# Object of `size` bytes, N shards, one-byte delimiter d.  Nominal starts are
# s_i = floor(i * size / N).  A line starts at 0 and right after every d.  A
# line belongs to the shard whose nominal range [s_i, s_{i+1}) holds its first
# byte, so shard i emits [h_i, h_{i+1}) where h_i is the first line start
# >= s_i.  Everything here is half-open and does no I/O: scanners are fed
# bytes and answer NEED_DATA until they can decide.

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError, LineTooLongError

__all__ = [
    "NEED_DATA",
    "Boundary",
    "HeadScanner",
    "LineLengthGuard",
    "ShardRange",
    "check_delimiter",
    "format_delimiter",
    "nominal_starts",
    "parse_delimiter",
    "plan_shards",
]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by a scanner that cannot decide until it is fed more bytes.
NEED_DATA = _NeedData()


def check_delimiter(delimiter: bytes) -> bytes:
    """Return `delimiter` if it is exactly one byte, else raise ConfigurationError."""
    if not isinstance(delimiter, (bytes, bytearray)) or len(delimiter) != 1:
        raise ConfigurationError(f"delimiter must be exactly one byte, got {delimiter!r}")
    return bytes(delimiter)


_ESCAPES = {"\\n": b"\n", "\\0": b"\0", "\\t": b"\t", "\\r": b"\r", "\\\\": b"\\"}
#: Where Python's "surrogateescape" puts an undecodable byte of a command line.
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)


def parse_delimiter(text: str, *, what: str = "delimiter") -> bytes:
    r"""The one-byte delimiter `text` names: ``\n``, ``\0``, ``\t``, ``\r``, ``\\``, ``\xHH``
    or one ASCII character (the CLI's ``--delimiter`` and the API's field alike).

    A non-ASCII character is refused rather than guessed at: it is several
    bytes in UTF-8, and splitting on one of them would cut characters.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f'{what}: must be a string such as "\\n", got {text!r}')
    if text in _ESCAPES:
        return _ESCAPES[text]
    if len(text) == 4 and text.startswith("\\x"):
        try:
            return bytes([int(text[2:], 16)])
        except ValueError:
            pass
    if len(text) == 1 and ord(text) < 0x80:
        return text.encode("ascii")
    if len(text) == 1 and ord(text) in _SURROGATE_ESCAPES:
        return bytes([ord(text) - 0xDC00])
    hint = ""
    if len(text) == 1:
        hint = f" ({text!r} is {len(text.encode('utf-8', 'surrogatepass'))} bytes in UTF-8; \\xHH names one byte)"
    raise ConfigurationError(
        f"{what}: must be one byte: \\n, \\0, \\t, \\r, \\xHH or a single ASCII character, got {text!r}{hint}"
    )


def format_delimiter(delimiter: bytes) -> str:
    """The form `parse_delimiter` reads back: the character itself if ASCII, else ``\\xHH``."""
    byte = check_delimiter(delimiter)[0]
    return chr(byte) if byte < 0x80 else f"\\x{byte:02x}"


def _check_plan(size: int, shards: int) -> None:
    if size < 0:
        raise ConfigurationError(f"object size must be >= 0, got {size}")
    if shards < 1:
        raise ConfigurationError(f"number of shards must be >= 1, got {shards}")


def nominal_starts(size: int, shards: int) -> tuple[int, ...]:
    """The N+1 nominal starts s_0..s_N; s_0 = 0 and s_N = size."""
    _check_plan(size, shards)
    return tuple(i * size // shards for i in range(shards + 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRange:
    """Shard `index`'s nominal range [start, end) of an object of `size` bytes."""

    index: int
    shards: int
    start: int
    end: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.shards:
            raise ConfigurationError(f"shard index {self.index} outside 0..{self.shards - 1}")
        if not 0 <= self.start <= self.end <= self.size:
            raise ConfigurationError(
                f"shard {self.index} range [{self.start}, {self.end}) is not inside [0, {self.size})"
            )

    @classmethod
    def of(cls, size: int, shards: int, index: int) -> ShardRange:
        """Shard `index`'s range, computed from its two starts alone (O(1))."""
        _check_plan(size, shards)
        return cls(
            index=index, shards=shards, start=index * size // shards, end=(index + 1) * size // shards, size=size
        )

    @property
    def is_last(self) -> bool:
        return self.index == self.shards - 1

    @property
    def fetch_start(self) -> int:
        """Where the worker's download begins: one byte early, to see s_i - 1."""
        return self.start - 1 if self.start > 0 else 0


def plan_shards(size: int, shards: int) -> list[ShardRange]:
    """All N nominal ranges; they tile [0, size) and some may be empty."""
    _check_plan(size, shards)
    return [ShardRange.of(size, shards, i) for i in range(shards)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Boundary:
    """What a shard learned about its own start: the content of its marker.

    If `line_start` is true, `head_end` is h_i: the shard's head fragment is
    [start, head_end) and it emits from head_end.  If false, no line starts in
    [start, end): the whole range is a fragment of an earlier shard's line and
    `head_end` equals `end`, so the predecessor must continue to the next shard.
    """

    start: int
    head_end: int
    line_start: bool

    def __post_init__(self) -> None:
        if self.head_end < self.start:
            raise ConfigurationError(f"boundary head_end {self.head_end} is before start {self.start}")

    @property
    def fragment_length(self) -> int:
        return self.head_end - self.start


def _searchable(chunk: bytes | bytearray | memoryview) -> bytes | bytearray:
    """`chunk` as an object with `find`/`rfind`, without copying it if possible.

    A memoryview of a whole bytes or bytearray (what the ranged reader
    yields: one part buffer) is searched in that buffer itself; only a view
    of part of one has to be copied, since Python cannot say where it starts.
    """
    if not isinstance(chunk, memoryview):
        return chunk
    base = chunk.obj
    if isinstance(base, (bytes, bytearray)) and chunk.contiguous and chunk.nbytes == len(base):
        return base
    return chunk.tobytes()


class HeadScanner:
    """Finds h_i for one shard from bytes that begin at ``shard.fetch_start``.

    Feed consecutive chunks with `feed()`; it returns NEED_DATA until it can
    decide and then a `Boundary`.  Only bytes [s_i - 1, s_{i+1} - 1) can matter:
    a delimiter at q makes q + 1 a line start, and a line start at s_{i+1}
    belongs to the next shard.  With `max_line_bytes`, a head fragment that
    grows past it raises LineTooLongError instead of scanning on.
    """

    def __init__(self, shard: ShardRange, delimiter: bytes, *, max_line_bytes: int | None = None) -> None:
        self._shard = shard
        self._delimiter = check_delimiter(delimiter)
        self._max_line_bytes = max_line_bytes
        self._position = shard.fetch_start  # absolute offset of the next byte fed
        self._result: Boundary | None = None
        if shard.start == shard.end:
            self._result = Boundary(start=shard.start, head_end=shard.end, line_start=False)
        elif shard.start == 0:
            self._result = Boundary(start=0, head_end=0, line_start=True)

    @property
    def result(self) -> Boundary | None:
        return self._result

    @property
    def position(self) -> int:
        """Absolute offset of the next byte the scanner expects."""
        return self._position

    def feed(self, chunk: bytes | memoryview) -> Boundary | _NeedData:
        if self._result is not None:
            return self._result
        shard = self._shard
        scan_end = shard.end - 1  # exclusive end of the bytes that can matter
        usable = min(len(chunk), scan_end - self._position)
        found = _searchable(chunk).find(self._delimiter, 0, usable) if usable > 0 else -1
        if found >= 0:
            head_end = self._position + found + 1
            self._check_fragment(head_end - shard.start)
            self._result = Boundary(start=shard.start, head_end=head_end, line_start=True)
            return self._result
        self._position += max(usable, 0)
        self._check_fragment(self._position + 1 - shard.start)
        if self._position >= scan_end:
            self._result = Boundary(start=shard.start, head_end=shard.end, line_start=False)
            return self._result
        return NEED_DATA

    def _check_fragment(self, length: int) -> None:
        limit = self._max_line_bytes
        if limit is not None and length > limit:
            raise LineTooLongError(offset=self._shard.start, limit=limit, starts_earlier=True)


class LineLengthGuard:
    """Raises LineTooLongError when a line's content exceeds `max_line_bytes`.

    Fed the bytes a shard emits, in order, starting at a line start.  It jumps
    from delimiter to the last delimiter within the next `max_line_bytes + 1`
    bytes, so checking costs O(size / max_line_bytes) searches, not one per line.
    """

    def __init__(self, delimiter: bytes, max_line_bytes: int, *, start: int) -> None:
        if max_line_bytes < 1:
            raise ConfigurationError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self._delimiter = check_delimiter(delimiter)
        self._limit = max_line_bytes
        self._line_start = start  # absolute offset where the current line began
        self._offset = start  # absolute offset of the next byte fed

    def feed(self, chunk: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> None:
        """Feed ``chunk[start:end]`` (searched in place: pass the whole
        buffer and the bounds rather than a slice, which costs a copy)."""
        data = _searchable(chunk)
        stop = len(data) if end is None else end
        if not 0 <= start <= stop <= len(data):
            raise ValueError(f"feed range [{start}, {stop}) outside a chunk of {len(data)} bytes")
        base = self._offset - start  # absolute offset of data[0]
        pos = start  # scan position inside `data`
        while True:
            # Bytes the current line may still use before it exceeds the limit,
            # plus one for its delimiter.
            allowed = self._line_start + self._limit + 1 - base
            window_end = min(stop, allowed)
            last = data.rfind(self._delimiter, pos, window_end)
            if last < 0:
                if allowed <= stop:
                    raise LineTooLongError(offset=self._line_start, limit=self._limit)
                break
            self._line_start = base + last + 1
            pos = last + 1
        self._offset = base + stop

    def finish(self) -> None:
        """The final line may lack a delimiter; it still must fit."""
        if self._offset - self._line_start > self._limit:
            raise LineTooLongError(offset=self._line_start, limit=self._limit)
