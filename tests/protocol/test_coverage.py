"""The tiling invariant of DESIGN §1: emitted ranges cover [0, size) exactly."""

from __future__ import annotations

import pytest

from shardline.errors import CoverageError
from shardline.protocol import Coverage, check_tiling


def test_coverage_accepts_an_exact_tiling_with_empty_shards():
    check = Coverage(30)
    check.admit(0, nominal=(0, 10), emitted=(0, 25))
    check.admit(1, nominal=(10, 20), emitted=(20, 20))  # a long line covers shard 1
    check.admit(2, nominal=(20, 30), emitted=(25, 30))
    check.finish()


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([(0, 16), (18, 30)], r"gap: bytes \[16, 18\) before shard 1"),
        ([(0, 20), (18, 30)], r"overlap: bytes \[18, 20\) emitted twice \(shard 1\)"),
        ([(0, 15), (15, 29)], r"gap: bytes \[29, 30\) at the end"),
        ([(0, 15), (9, 30)], r"shard 1 emitted from 9, outside its range \[15, 30\)"),
    ],
)
def test_coverage_names_gaps_and_overlaps(results, message):
    check = Coverage(30)
    with pytest.raises(CoverageError, match=message):
        for index, (start, end) in enumerate(results):
            check.admit(index, nominal=(15 * index, 15 * (index + 1)), emitted=(start, end))
        check.finish()


def test_shards_must_come_in_index_order():
    check = Coverage(10)
    check.admit(0, nominal=(0, 5), emitted=(0, 5))
    with pytest.raises(CoverageError, match="not in index order"):
        check.admit(0, nominal=(0, 5), emitted=(0, 5))


def test_check_tiling_checks_a_whole_job_at_once():
    check_tiling(9, [(0, (0, 4), (0, 6)), (1, (4, 9), (6, 9))])
    with pytest.raises(CoverageError, match=r"gap: bytes \[6, 7\) before shard 1"):
        check_tiling(9, [(0, (0, 4), (0, 6)), (1, (4, 9), (7, 9))])
