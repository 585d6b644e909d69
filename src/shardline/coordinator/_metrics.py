# Counters the coordinator keeps for `GET /metrics`, and their rendering in
# the Prometheus text exposition format (version 0.0.4).  No client library:
# a handful of counters and one histogram do not need one.

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["HTTP_REFUSAL_CAUSES", "OUTPUT_RELAY_WAYS", "CoordinatorMetrics", "Histogram", "render_prometheus"]

#: Upper bounds (seconds) for handshake waits: mostly sub-millisecond relays,
#: up to a neighbour's cold start.
HANDSHAKE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)

#: Why the HTTP API refused a connection or request (`shardline_http_refused_total{cause}`).
HTTP_REFUSAL_CAUSES = (
    "connection_limit",  # more connections open than --max-connections
    "header_timeout",  # request head not complete in time
    "body_timeout",  # POST /jobs body not complete in time
    "body_too_large",
    "bad_host",  # Host header names another server (DNS rebinding)
    "bad_origin",  # sent by a web page of another origin
    "bad_token",  # missing or wrong bearer token
    "content_type",  # a body that is not application/json
)

#: How output bytes pass through the coordinator (`shardline_output_relayed_bytes_total{way}`).
OUTPUT_RELAY_WAYS = ("fetched", "uploaded")


@dataclass(eq=False)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        running, pairs = 0, []
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            pairs.append((_number(bound), running))
        pairs.append(("+Inf", self.count))
        return pairs


class RunningMedian:
    """Median of a growing set of numbers in O(log n) per insertion (two heaps)."""

    def __init__(self) -> None:
        self._low: list[float] = []  # max-heap, negated
        self._high: list[float] = []  # min-heap

    def __len__(self) -> int:
        return len(self._low) + len(self._high)

    def add(self, value: float) -> None:
        if self._low and value > -self._low[0]:
            heapq.heappush(self._high, value)
        else:
            heapq.heappush(self._low, -value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    def median(self) -> float:
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


@dataclass(eq=False)
class CoordinatorMetrics:
    """Monotonic counters since the coordinator started."""

    #: Attempts launched after the first, by reason: failed, start, heartbeat, total, speculative, resumed.
    retries: Counter[str] = field(default_factory=Counter)
    #: Deadlines missed, by kind: start, heartbeat, total.
    deadline_misses: Counter[str] = field(default_factory=Counter)
    #: How each committed shard completed its tail: pushed, marker, scan.
    tail_sources: Counter[str] = field(default_factory=Counter)
    #: Stale writes refused (exchange sessions, results) from fenced attempts.
    fenced_writes: int = 0
    bytes_emitted: int = 0
    output_bytes: int = 0
    #: Output bytes that passed through the coordinator, by way: "fetched"
    #: (remote shard outputs downloaded), "uploaded" (parts and reduce
    #: results it wrote to a destination).  Divided by output_bytes: the
    #: detour outputs take through this one machine.
    output_bytes_relayed: Counter[str] = field(default_factory=Counter)
    #: Remote shard outputs copied into an S3 destination by S3 itself.
    output_bytes_copied: int = 0
    #: HTTP connections and requests refused, by cause (HTTP_REFUSAL_CAUSES).
    http_refused: Counter[str] = field(default_factory=Counter)


def render_prometheus(
    metrics: CoordinatorMetrics,
    *,
    jobs_by_state: Mapping[str, int],
    shards_by_state: Mapping[str, int],
    exchange_refused: Mapping[str, int],
    handshake_wait_s: Histogram,
) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {_number(value)}")

    family("shardline_jobs", "gauge", "Jobs known to this coordinator, by state.", _by("state", jobs_by_state))
    family("shardline_shards", "gauge", "Shards of known jobs, by state.", _by("state", shards_by_state))
    family(
        "shardline_retries_total",
        "counter",
        "Shard attempts launched after the first, by reason.",
        _by("reason", metrics.retries),
    )
    family(
        "shardline_deadline_misses_total",
        "counter",
        "Shard attempts that missed a deadline, by kind.",
        _by("kind", metrics.deadline_misses),
    )
    family(
        "shardline_boundary_path_total",
        "counter",
        "Neighbour head fragments completed by each path (pushed over TCP, marker + exact GET, own scan).",
        _by("path", metrics.tail_sources),
    )
    family(
        "shardline_fenced_writes_total",
        "counter",
        "Writes refused because their attempt was stale.",
        [("", metrics.fenced_writes)],
    )
    family(
        "shardline_bytes_emitted_total",
        "counter",
        "Input bytes emitted by committed shards.",
        [("", metrics.bytes_emitted)],
    )
    family("shardline_output_bytes_total", "counter", "Output bytes of committed shards.", [("", metrics.output_bytes)])
    family(
        "shardline_output_relayed_bytes_total",
        "counter",
        "Output bytes that passed through the coordinator: remote outputs fetched, files uploaded to destinations.",
        _by("way", {way: metrics.output_bytes_relayed[way] for way in OUTPUT_RELAY_WAYS}),
    )
    family(
        "shardline_output_copied_bytes_total",
        "counter",
        "Remote shard outputs copied into an S3 destination server-side (not through the coordinator).",
        [("", metrics.output_bytes_copied)],
    )
    family(
        "shardline_exchange_refused_total",
        "counter",
        "Exchange connections closed by the exchange, by cause.",
        _by("cause", exchange_refused),
    )
    family(
        "shardline_http_refused_total",
        "counter",
        "HTTP connections and requests refused, by cause.",
        _by("cause", {cause: metrics.http_refused[cause] for cause in HTTP_REFUSAL_CAUSES}),
    )
    name = "shardline_handshake_wait_seconds"
    lines.append(f"# HELP {name} Time a worker's request for its neighbour's head fragment waited at the exchange.")
    lines.append(f"# TYPE {name} histogram")
    for bound, count in handshake_wait_s.cumulative():
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines.append(f"{name}_sum {_number(handshake_wait_s.total)}")
    lines.append(f"{name}_count {handshake_wait_s.count}")
    return "\n".join(lines) + "\n"


def _by(label: str, values: Mapping[str, int]) -> list[tuple[str, float]]:
    return [(f'{{{label}="{key}"}}', value) for key, value in sorted(values.items())]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
