"""TaggedLines: a command's stderr passed on tagged, bounded and rate-limited (a fake clock, no sleeps)."""

from __future__ import annotations

import io

from shardline.io.stderrlines import TaggedLines, attempt_route, routed_lines, shard_tag, tagged_lines_only


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_line_is_tagged_whatever_the_chunking_and_the_last_one_at_the_end():
    sink = io.BytesIO()
    lines = TaggedLines(sink, "shard 3: ")
    for byte in b"one\ntwo\nthree":
        lines.write(bytes([byte]))
    assert sink.getvalue() == b"shard 3: one\nshard 3: two\n"
    lines.end()
    assert sink.getvalue() == b"shard 3: one\nshard 3: two\nshard 3: three\n"


def test_long_lines_are_cut_and_the_held_bytes_bounded():
    sink = io.BytesIO()
    lines = TaggedLines(sink, "s: ", max_line_bytes=10)
    lines.write(b"x" * 25)  # no newline yet: at most a line's worth is held
    lines.write(b"\nok\n")
    lines.write(b"y" * 25 + b"\n")
    assert sink.getvalue().splitlines() == [
        b"s: " + b"x" * 10 + b" [line cut]",
        b"s: ok",
        b"s: " + b"y" * 10 + b" [line cut]",
    ]


def test_lines_beyond_the_rate_are_dropped_and_counted():
    sink = io.BytesIO()
    clock = Clock()
    lines = TaggedLines(sink, "s: ", lines_per_s=10, burst_lines=3, clock=clock)
    lines.write(b"".join(b"%d\n" % i for i in range(10)))
    assert sink.getvalue() == b"s: 0\ns: 1\ns: 2\n"
    clock.now = 1.0  # ten more lines' worth of time
    lines.write(b"later\n")
    assert sink.getvalue().splitlines()[3:] == [b"s: [7 lines of stderr not shown: too many per second]", b"s: later"]
    lines.write(b"".join(b"%d\n" % i for i in range(5)))
    lines.end()
    assert sink.getvalue().splitlines()[-1] == b"s: [3 lines of stderr not shown: too many per second]"


def test_only_tagged_lines_are_picked_out_of_a_workers_stderr():
    stderr = b"2026-01-01 shardline.worker WARNING lost\nshard 2: warn\nshard x: no\nshard 10: two\n"
    assert tagged_lines_only(stderr) == b"shard 2: warn\nshard 10: two\n"
    assert shard_tag(7) == "shard 7: "


def test_a_pool_process_attempts_lines_are_told_apart_by_their_route():
    """Several attempts share one pool process's stderr: each line comes behind
    its attempt's route, which the backend strips before passing it on."""
    sink = io.BytesIO()
    first = TaggedLines(sink, attempt_route("job-a", 3, 0) + shard_tag(3))
    other_job = TaggedLines(sink, attempt_route("job-b", 3, 1) + shard_tag(3))
    first.write(b"one\n")
    other_job.write(b"two\n")
    sink.write(b"2026-01-01 shardline.worker INFO a log line\n")
    first.write(b"\x1fjob-b/3/1\x1fforged\n")  # a command cannot move its line to another attempt
    assert routed_lines(sink.getvalue()) == [
        (attempt_route("job-a", 3, 0), b"shard 3: one\n"),
        (attempt_route("job-b", 3, 1), b"shard 3: two\n"),
        (attempt_route("job-a", 3, 0), b"shard 3: \x1fjob-b/3/1\x1fforged\n"),
    ]
    assert tagged_lines_only(sink.getvalue()).count(b"\x1fjob-a") == 0  # routes never reach the user
