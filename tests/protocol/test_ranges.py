"""Range planning and the ownership rule, against the naive reference.

Every scanner is fed its input whole, byte by byte, in random chunk sizes and
with trailing data beyond what it needs (STYLE "Tests"), over objects biased
towards the awkward cases of DESIGN §1: many or no delimiters, runs of them, a
delimiter as first or last byte, lines longer than several shards, no final
delimiter, lines aligned exactly on shard starts, N > size and size 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shardline.errors import ConfigurationError, LineTooLongError
from shardline.protocol import (
    NEED_DATA,
    Boundary,
    HeadScanner,
    LineLengthGuard,
    ShardRange,
    check_delimiter,
    nominal_starts,
    plan_shards,
)

from reference import (
    reference_head_ends,
    reference_lines,
    reference_split,
    reference_starts,
)

FAST = settings(max_examples=150, deadline=None)
THOROUGH = settings(max_examples=300, deadline=None)

# --- generators ---------------------------------------------------------------

DELIMITERS = st.one_of(
    st.sampled_from([b"\n", b"\0"]),
    st.binary(min_size=1, max_size=1),
)


def _without(d: int, raw: bytes) -> bytes:
    """`raw` with every delimiter byte replaced by another byte."""
    return bytes(b if b != d else (d + 1) % 256 for b in raw)


@st.composite
def bodies(draw, delimiter: bytes, max_size: int = 240) -> bytes:
    """Object bytes for `delimiter`, biased towards the awkward shapes."""
    d = delimiter[0]
    other = (d + 1) % 256
    shape = draw(st.sampled_from(["many", "few", "none", "lines", "long", "runs", "raw"]))
    if shape == "many":  # about half the bytes are delimiters
        data = bytes(draw(st.lists(st.sampled_from([d, other, 0x41]), max_size=max_size)))
    elif shape == "few":  # one delimiter in ~25 bytes
        picks = draw(st.lists(st.integers(0, 24), max_size=max_size))
        data = bytes(d if p == 0 else (d + 1 + p) % 256 for p in picks)
    elif shape == "none":
        data = _without(d, draw(st.binary(max_size=max_size)))
    elif shape in ("lines", "long"):
        longest = 12 if shape == "lines" else 160
        lengths = draw(st.lists(st.integers(0, longest), max_size=30))
        data = b"".join(_without(d, bytes([0x78]) * n) + delimiter for n in lengths)
        data = data[:max_size]
    elif shape == "runs":  # alternating runs of delimiters and content
        runs = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 30)), max_size=12))
        data = b"".join(delimiter * k + _without(d, b"y" * n) for k, n in runs)
    else:  # arbitrary bytes; with a random delimiter, usually none occur
        data = draw(st.binary(max_size=max_size))
    if draw(st.booleans()):  # delimiter as the first byte
        data = delimiter + data
    ending = draw(st.sampled_from(["keep", "strip", "add"]))
    if ending == "strip":  # no trailing delimiter
        data = data.rstrip(delimiter)
    elif ending == "add":
        data = data + delimiter
    return data


@dataclass(frozen=True)
class Case:
    data: bytes
    delimiter: bytes
    shards: int

    @property
    def size(self) -> int:
        return len(self.data)


@st.composite
def cases(draw, max_size: int = 240) -> Case:
    delimiter = draw(DELIMITERS)
    data = draw(bodies(delimiter, max_size))
    size = len(data)
    shards = draw(
        st.one_of(
            st.integers(1, 6),
            st.integers(1, max(1, size)),
            st.integers(max(1, size), 2 * size + 8),  # N > size: empty shards
        )
    )
    if size and draw(st.integers(0, 3)) == 0:
        # Lines aligned exactly on shard starts: put a delimiter right before
        # some nominal starts, so s_i itself is a line start.
        starts = reference_starts(size, shards)
        chosen = draw(st.sets(st.integers(1, shards - 1), max_size=8)) if shards > 1 else set()
        buf = bytearray(data)
        for i in chosen:
            if starts[i] > 0:
                buf[starts[i] - 1] = delimiter[0]
        data = bytes(buf)
    return Case(data=data, delimiter=delimiter, shards=shards)


CHUNK_PATTERNS = st.lists(st.integers(0, 17), min_size=1, max_size=8)


def chunked(buf: bytes, pattern: list[int]) -> list[bytes]:
    """Split `buf` cycling through chunk sizes in `pattern` (0 = an empty chunk)."""
    if not any(pattern):
        pattern = [*pattern, 1]
    chunks, pos, k = [], 0, 0
    while pos < len(buf):
        n = pattern[k % len(pattern)]
        chunks.append(buf[pos : pos + n])
        pos += n
        k += 1
    return chunks


def feedings(data: bytes, shard: ShardRange, pattern: list[int]) -> dict[str, list[bytes]]:
    """The ways of feeding a shard's scanner: all start at shard.fetch_start."""
    own = data[shard.fetch_start : shard.end]
    rest = data[shard.end :]
    trailing = chunked(own, pattern) or [b""]
    trailing[-1] = trailing[-1] + rest + b"<beyond the object>"
    return {
        "whole": [own],
        "whole+trailing": [data[shard.fetch_start :] + b"<junk>"],
        "byte by byte": [own[k : k + 1] for k in range(len(own))],
        "chunks": chunked(own, pattern),
        "chunks+trailing": trailing,
        "memoryview": [memoryview(c) for c in chunked(own, pattern)],
        # What the reader yields: views of whole part buffers (searched in place) ...
        "bytearray views": [memoryview(bytearray(c)) for c in chunked(own, pattern)],
        # ... and views of part of a buffer (copied, then searched).
        "partial views": [memoryview(b"<" + c + b">")[1:-1] for c in chunked(own, pattern)],
    }


def expected_boundary(case: Case, i: int) -> Boundary:
    starts = reference_starts(case.size, case.shards)
    h = reference_head_ends(case.data, case.shards, case.delimiter)[i]
    line_start = h < starts[i + 1]  # some line start lies in [s_i, s_{i+1})
    return Boundary(start=starts[i], head_end=h if line_start else starts[i + 1], line_start=line_start)


def decision_point(case: Case, shard: ShardRange) -> int:
    """Absolute offset the bytes fed must reach before the scanner can decide."""
    d = case.delimiter[0]
    for q in range(shard.fetch_start, shard.end - 1):
        if case.data[q] == d:
            return q + 1
    return shard.end - 1


def scan(case: Case, shard: ShardRange, chunks: list[bytes], **kwargs) -> Boundary:
    """Feed `chunks`, checking NEED_DATA exactly until the decision point."""
    scanner = HeadScanner(shard, case.delimiter, **kwargs)
    if shard.start == shard.end or shard.start == 0:
        assert isinstance(scanner.result, Boundary), "decides without data"
        decided_at = shard.fetch_start
    else:
        assert scanner.result is None
        decided_at = decision_point(case, shard)
    fed_end = shard.fetch_start
    result = scanner.result
    for chunk in chunks:
        answer = scanner.feed(chunk)
        fed_end += len(chunk)
        if fed_end >= decided_at:
            assert isinstance(answer, Boundary), (fed_end, decided_at)
            if result is not None:
                assert answer == result, "a decided scanner never changes its mind"
            result = answer
            assert scanner.result == answer
        else:
            assert answer is NEED_DATA, (fed_end, decided_at, answer)
            assert scanner.position == fed_end
    assert result is not None, "fed everything up to the shard's end but still undecided"
    return result


def emitted_by_boundaries(data: bytes, boundaries: list[Boundary]) -> list[bytes]:
    """The worker's tail rule, using nothing but the per-shard boundaries.

    Shard i emits from its own head_end (nothing at all if it holds no line
    start) to the next shard's head_end, skipping shards whose boundary says
    "no line start here", up to the end of the object.
    """
    size = len(data)

    def follow(j: int) -> int:
        while j < len(boundaries):
            if boundaries[j].line_start:
                return boundaries[j].head_end
            j += 1
        return size

    out = []
    for i, own in enumerate(boundaries):
        out.append(data[own.head_end : follow(i + 1)] if own.line_start else b"")
    return out


# --- reference sanity ----------------------------------------------------------


def test_reference_on_a_known_example() -> None:
    data = b"aa\nbbbbbbbb\nc\n\nd"
    # size 16, N 4: s = 0, 4, 8, 12, 16; line starts 0, 3, 12, 14, 15.
    assert reference_starts(len(data), 4) == [0, 4, 8, 12, 16]
    assert reference_head_ends(data, 4, b"\n") == [0, 12, 12, 12, 16]
    assert reference_split(data, 4, b"\n") == [b"aa\nbbbbbbbb\n", b"", b"", b"c\n\nd"]
    assert reference_lines(b"", b"\n") == []
    assert reference_split(b"", 3, b"\n") == [b"", b"", b""]


# --- nominal starts and plans -------------------------------------------------


@FAST
@given(
    size=st.one_of(st.integers(0, 50), st.integers(0, 10**13)),
    shards=st.one_of(st.integers(1, 70), st.integers(1, 10**5)),
)
def test_nominal_starts(size: int, shards: int) -> None:
    starts = nominal_starts(size, shards)
    assert len(starts) == shards + 1
    assert starts[0] == 0 and starts[-1] == size
    assert all(a <= b for a, b in itertools.pairwise(starts))
    lengths = {b - a for a, b in itertools.pairwise(starts)}
    assert lengths <= {size // shards, -(-size // shards)}, "ranges are as even as possible"
    if shards <= 200:
        assert list(starts) == reference_starts(size, shards)


@FAST
@given(size=st.integers(0, 300), shards=st.integers(1, 400))
def test_plan_shards_tiles_the_object(size: int, shards: int) -> None:
    plan = plan_shards(size, shards)
    assert [r.index for r in plan] == list(range(shards))
    assert plan[0].start == 0 and plan[-1].end == size
    for prev, nxt in itertools.pairwise(plan):
        assert prev.end == nxt.start
    starts = reference_starts(size, shards)
    for r in plan:
        assert (r.start, r.end, r.size, r.shards) == (starts[r.index], starts[r.index + 1], size, shards)
        assert r.fetch_start == (r.start - 1 if r.start > 0 else 0)
        assert r.is_last == (r.index == shards - 1)


@pytest.mark.parametrize("size, shards", [(-1, 1), (0, 0), (10, 0), (10, -3)])
def test_nominal_starts_rejects_bad_arguments(size: int, shards: int) -> None:
    with pytest.raises(ConfigurationError):
        nominal_starts(size, shards)
    with pytest.raises(ConfigurationError):
        plan_shards(size, shards)


def test_size_zero_plans_empty_shards() -> None:
    assert nominal_starts(0, 1) == (0, 0)
    assert nominal_starts(0, 3) == (0, 0, 0, 0)
    assert all(r.start == r.end == 0 for r in plan_shards(0, 3))


def test_shard_range_and_boundary_validate() -> None:
    with pytest.raises(ConfigurationError):
        ShardRange(index=2, shards=2, start=0, end=0, size=0)
    with pytest.raises(ConfigurationError):
        ShardRange(index=0, shards=1, start=3, end=2, size=5)
    with pytest.raises(ConfigurationError):
        ShardRange(index=0, shards=1, start=0, end=6, size=5)
    with pytest.raises(ConfigurationError):
        Boundary(start=5, head_end=4, line_start=True)
    assert Boundary(start=5, head_end=9, line_start=True).fragment_length == 4


# --- delimiters -----------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [b"\n", b"\0", b"\xff", bytearray(b";")])
def test_check_delimiter_accepts_one_byte(delimiter: bytes) -> None:
    assert check_delimiter(delimiter) == bytes(delimiter)
    assert type(check_delimiter(delimiter)) is bytes


@pytest.mark.parametrize("delimiter", [b"", b"ab", b"\r\n"])
def test_check_delimiter_rejects_multi_byte(delimiter: bytes) -> None:
    with pytest.raises(ConfigurationError, match="exactly one byte"):
        check_delimiter(delimiter)


@pytest.mark.parametrize("delimiter", ["\n", 10, None, [10]])
def test_check_delimiter_rejects_non_bytes(delimiter: object) -> None:
    # A configuration error naming the problem, not a TypeError from
    # formatting the message.
    with pytest.raises(ConfigurationError):
        check_delimiter(delimiter)  # type: ignore[arg-type]


def test_multi_byte_delimiter_rejected_by_scanner_and_guard() -> None:
    shard = plan_shards(10, 2)[1]
    with pytest.raises(ConfigurationError):
        HeadScanner(shard, b"\r\n")
    with pytest.raises(ConfigurationError):
        LineLengthGuard(b"", 10, start=0)


# --- HeadScanner against the reference -------------------------------------------


@THOROUGH
@given(case=cases(), pattern=CHUNK_PATTERNS)
def test_head_scanner_matches_reference(case: Case, pattern: list[int]) -> None:
    for shard in plan_shards(case.size, case.shards):
        expected = expected_boundary(case, shard.index)
        for how, chunks in feedings(case.data, shard, pattern).items():
            got = scan(case, shard, chunks)
            assert got == expected, (how, shard)
            if got.line_start:
                assert got.head_end == reference_head_ends(case.data, case.shards, case.delimiter)[shard.index]
            else:
                assert got.head_end == shard.end


@THOROUGH
@given(case=cases(), pattern=CHUNK_PATTERNS)
def test_boundaries_alone_reconstruct_every_shard(case: Case, pattern: list[int]) -> None:
    plan = plan_shards(case.size, case.shards)
    boundaries = [scan(case, shard, chunked(case.data[shard.fetch_start : shard.end], pattern)) for shard in plan]
    emitted = emitted_by_boundaries(case.data, boundaries)
    assert b"".join(emitted) == case.data
    assert emitted == reference_split(case.data, case.shards, case.delimiter)


def test_empty_shards_decide_without_data() -> None:
    # size 3, N 5: s = 0, 0, 1, 1, 2, 3; shards 0 and 2 are empty.
    plan = plan_shards(3, 5)
    for shard in plan:
        scanner = HeadScanner(shard, b"\n")
        if shard.start == shard.end:
            assert scanner.result == Boundary(start=shard.start, head_end=shard.end, line_start=False)
            assert scanner.feed(b"") == scanner.result
    assert HeadScanner(plan_shards(0, 1)[0], b"\n").result == Boundary(start=0, head_end=0, line_start=False)


def test_scanner_ignores_a_line_start_at_the_next_shard() -> None:
    # s = 0, 4, 8; byte 7 is "\n", so 8 is a line start owned by shard 2, not 1.
    data = b"abcdefg\nijk"
    data = data + b"x" * (12 - len(data))
    shard = plan_shards(12, 3)[1]
    assert (shard.start, shard.end) == (4, 8)
    assert HeadScanner(shard, b"\n").feed(data[3:]) == Boundary(start=4, head_end=8, line_start=False)
    # and s_i - 1 being a delimiter makes s_i itself the line start
    data = b"abc\nefghijkl"
    assert HeadScanner(shard, b"\n").feed(data[3:]) == Boundary(start=4, head_end=4, line_start=True)


def test_scanner_needs_data_then_decides_on_the_last_relevant_byte() -> None:
    shard = plan_shards(12, 3)[1]  # [4, 8), fetch from 3; bytes 3..6 matter
    scanner = HeadScanner(shard, b"\0")
    assert scanner.feed(b"") is NEED_DATA
    assert scanner.feed(b"abc") is NEED_DATA
    assert scanner.position == 6
    assert scanner.feed(b"d") == Boundary(start=4, head_end=8, line_start=False)


# --- LineLengthGuard ----------------------------------------------------------------


def first_too_long(data: bytes, delimiter: bytes, limit: int, base: int = 0) -> int | None:
    for start, line in reference_lines(data, delimiter):
        content = line[:-1] if line.endswith(delimiter) else line
        if len(content) > limit:
            return base + start
    return None


def guard_run(
    data: bytes, delimiter: bytes, limit: int, chunks: list[bytes], start: int, *, bounded: bool = False
) -> int | None:
    """Feed `chunks` whole, or (`bounded`) each inside a larger buffer with
    the bounds saying which bytes to check, as a shard feeds a part buffer."""
    guard = LineLengthGuard(delimiter, limit, start=start)
    try:
        for chunk in chunks:
            if bounded:
                padding = delimiter * 3 + b"x" * 3  # junk the bounds must keep out
                guard.feed(memoryview(bytearray(padding + chunk + padding)), len(padding), len(padding) + len(chunk))
            else:
                guard.feed(chunk)
        guard.finish()
    except LineTooLongError as exc:
        assert exc.limit == limit
        assert str(exc.offset) in str(exc) and str(limit) in str(exc)
        return exc.offset
    return None


@THOROUGH
@given(case=cases(), limit=st.integers(1, 40), pattern=CHUNK_PATTERNS)
def test_line_length_guard_matches_reference(case: Case, limit: int, pattern: list[int]) -> None:
    data, d = case.data, case.delimiter
    expected = first_too_long(data, d, limit)
    for chunks in ([data], [data[k : k + 1] for k in range(len(data))], chunked(data, pattern)):
        assert guard_run(data, d, limit, chunks, start=0) == expected
        assert guard_run(data, d, limit, chunks, start=0, bounded=True) == expected
    # per shard, on what the shard emits, with absolute offsets
    heads = reference_head_ends(data, case.shards, d)
    for i, emitted in enumerate(reference_split(data, case.shards, d)):
        expected = first_too_long(emitted, d, limit, base=heads[i])
        assert guard_run(emitted, d, limit, chunked(emitted, pattern), start=heads[i]) == expected


def test_line_length_guard_edges() -> None:
    with pytest.raises(ConfigurationError):
        LineLengthGuard(b"\n", 0, start=0)
    assert guard_run(b"abc\n", b"\n", 3, [b"abc\n"], start=0) is None  # delimiter not counted
    assert guard_run(b"abc", b"\n", 3, [b"abc"], start=0) is None  # last line exactly at the limit
    assert guard_run(b"abcd", b"\n", 3, [b"ab", b"cd"], start=0) == 0
    assert guard_run(b"ab\nabcd\n", b"\n", 3, [b"ab\na", b"", b"bcd\n"], start=50) == 53
    assert guard_run(b"\n\n\n", b"\n", 1, [b"\n\n\n"], start=0) is None  # empty lines
    guard = LineLengthGuard(b"\n", 3, start=0)
    with pytest.raises(ValueError, match="outside"):
        guard.feed(b"abc", 2, 4)


def test_line_length_guard_finish_checks_last_line() -> None:
    guard = LineLengthGuard(b"\n", 3, start=100)
    guard.feed(b"ab\nabc")
    guard.finish()  # "abc" is exactly 3 bytes
    guard = LineLengthGuard(b"\n", 3, start=100)
    guard.feed(b"ab\nabc")
    guard.feed(b"")
    guard.finish()
    guard = LineLengthGuard(b"\n", 3, start=100)
    with pytest.raises(LineTooLongError) as info:
        guard.feed(b"ab\nabcd")  # the 4th content byte is evidence enough
    assert info.value.offset == 103


# --- HeadScanner with max_line_bytes ---------------------------------------------------


def head_fragment_length(case: Case, i: int) -> int:
    return expected_boundary(case, i).fragment_length


@THOROUGH
@given(case=cases(), limit=st.integers(1, 40), pattern=CHUNK_PATTERNS)
def test_head_scanner_limit(case: Case, limit: int, pattern: list[int]) -> None:
    for shard in plan_shards(case.size, case.shards):
        too_long = head_fragment_length(case, shard.index) > limit
        for chunks in (
            [case.data[shard.fetch_start :]],
            chunked(case.data[shard.fetch_start : shard.end], pattern),
        ):
            try:
                got = scan(case, shard, chunks, max_line_bytes=limit)
            except LineTooLongError as exc:
                assert too_long, f"raised for fragment of {head_fragment_length(case, shard.index)} bytes"
                assert exc.offset == shard.start and exc.limit == limit
            else:
                assert not too_long, (
                    f"shard {shard.index} [{shard.start}, {shard.end}): head fragment of "
                    f"{got.fragment_length} bytes > max_line_bytes={limit} not reported"
                )
                assert got == expected_boundary(case, shard.index)


def test_head_scanner_limit_when_no_line_starts_in_the_shard() -> None:
    # s = 0, 4, 8; shard 1 = [4, 8) holds no line start, so its Boundary is
    # (4, 8, line_start=False): the whole range, 4 bytes, is part of one line,
    # which is therefore longer than max_line_bytes=3.
    data = b"x" * 12
    shard = plan_shards(12, 3)[1]
    with pytest.raises(LineTooLongError) as info:
        HeadScanner(shard, b"\n", max_line_bytes=3).feed(data[3:])
    assert info.value.offset == 4
    # one more allowed byte and it is fine
    assert HeadScanner(shard, b"\n", max_line_bytes=4).feed(data[3:]) == Boundary(start=4, head_end=8, line_start=False)


def test_head_scanner_limit_with_a_line_start() -> None:
    shard = plan_shards(12, 3)[1]  # [4, 8)
    data = b"abcdef\nhijkl"  # delimiter at 6: h_1 = 7, fragment [4, 7) is 3 bytes
    assert HeadScanner(shard, b"\n", max_line_bytes=3).feed(data[3:]).head_end == 7
    with pytest.raises(LineTooLongError):
        HeadScanner(shard, b"\n", max_line_bytes=2).feed(data[3:])


@example(case=Case(data=b"", delimiter=b"\n", shards=1))
@example(case=Case(data=b"\n", delimiter=b"\n", shards=3))
@example(case=Case(data=b"abc", delimiter=b"\0", shards=7))
@FAST
@given(case=cases(max_size=40))
def test_reference_examples_round_trip(case: Case) -> None:
    boundaries = [scan(case, s, [case.data[s.fetch_start :]]) for s in plan_shards(case.size, case.shards)]
    assert emitted_by_boundaries(case.data, boundaries) == reference_split(case.data, case.shards, case.delimiter)
