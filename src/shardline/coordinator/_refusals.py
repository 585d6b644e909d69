# Refusals of strangers, counted and logged without becoming a flood of
# their own: every refusal is counted by cause (a Prometheus counter), the
# first of each cause is logged with its detail, and later ones of that cause
# only as a count, at most once per interval.  The exchange and the HTTP API
# both use it.

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection

__all__ = ["REFUSAL_LOG_INTERVAL_S", "Refusals"]

#: After the first refusal of a cause is logged, the next log line for it
#: (a count) comes at most this much later.
REFUSAL_LOG_INTERVAL_S = 60.0


class Refusals:
    """Counts refusals of `unit`s ("connection", "request") by `what` ("exchange", "HTTP")
    into `counts`; logs as the module comment says."""

    def __init__(
        self,
        what: str,
        *,
        causes: Collection[str],
        counts: Counter[str],
        metric: str,
        unit: str,
        log: logging.Logger,
        log_interval_s: float = REFUSAL_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.counts = counts
        self._causes = frozenset(causes)
        self._metric = metric
        self._unit = unit
        self._log = log
        self._log_interval_s = log_interval_s
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def refuse(self, cause: str, detail: str) -> None:
        assert cause in self._causes, cause
        self.counts[cause] += 1
        now = self._clock()
        logged_at = self._logged_at.get(cause)
        if logged_at is None:
            self._logged_at[cause] = now
            self._log.warning(
                '%s refused a %s (cause %s): %s; more are counted in %s{cause="%s"} and logged at most every %.0fs',
                self.what,
                self._unit,
                cause,
                detail,
                self._metric,
                cause,
                self._log_interval_s,
            )
            return
        self._unlogged[cause] += 1
        if now - logged_at >= self._log_interval_s:
            self._summarise(cause, now - logged_at, f"; the latest: {detail}")
            self._logged_at[cause] = now

    def flush(self) -> None:
        """Log the counts not logged yet (at shutdown)."""
        now = self._clock()
        for cause in list(self._unlogged):
            self._summarise(cause, now - self._logged_at[cause], "")

    def _summarise(self, cause: str, elapsed_s: float, latest: str) -> None:
        count = self._unlogged.pop(cause, 0)
        if count:
            self._log.warning(
                "%s refused %d more %s(s) (cause %s) in the last %.0fs%s",
                self.what,
                count,
                self._unit,
                cause,
                elapsed_s,
                latest,
            )
