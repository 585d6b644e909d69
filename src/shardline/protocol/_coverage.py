# The invariant checked at the end of every job (DESIGN §1): the ranges the
# shards emitted tile [0, size) exactly -- no gap, no overlap -- with each
# shard's emission starting inside its own nominal range.  One check, used
# by the ordered release (shard by shard, as commits arrive) and by the
# manifest (all at once).  No I/O.

from __future__ import annotations

from collections.abc import Iterable

from ..errors import CoverageError

__all__ = ["Coverage", "check_tiling"]


class Coverage:
    """Admit shards in index order; `finish()` once all are in.  Raises CoverageError naming the shard."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.covered = 0  # the emitted ranges so far tile [0, covered)
        self._last_index = -1

    def admit(self, index: int, *, nominal: tuple[int, int], emitted: tuple[int, int]) -> None:
        """Shard `index` (nominal range [s_i, s_{i+1})) emitted [h_i, h_{i+1}); empty: no line starts in it."""
        if index <= self._last_index:
            raise CoverageError(f"shard {index} admitted after shard {self._last_index}: not in index order")
        self._last_index = index
        start, end = emitted
        if start == end:
            return  # no line starts here: it lies inside a predecessor's range
        if not nominal[0] <= start < nominal[1]:
            raise CoverageError(f"shard {index} emitted from {start}, outside its range [{nominal[0]}, {nominal[1]})")
        if end < start:
            raise CoverageError(f"shard {index} emitted [{start}, {end}): not a byte range")
        if start > self.covered:
            raise CoverageError(f"gap: bytes [{self.covered}, {start}) before shard {index} were emitted by no shard")
        if start < self.covered:
            raise CoverageError(f"overlap: bytes [{start}, {self.covered}) emitted twice (shard {index})")
        self.covered = end

    def finish(self) -> None:
        if self.covered != self.size:
            raise CoverageError(f"gap: bytes [{self.covered}, {self.size}) at the end were emitted by no shard")


def check_tiling(size: int, shards: Iterable[tuple[int, tuple[int, int], tuple[int, int]]]) -> None:
    """Check (index, nominal range, emitted range) of every shard, in index order."""
    coverage = Coverage(size)
    for index, nominal, emitted in shards:
        coverage.admit(index, nominal=nominal, emitted=emitted)
    coverage.finish()
