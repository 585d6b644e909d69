# What the supervisor (`_supervisor.Supervisor`) works with: the actions the
# job performs for it, the rules it follows, its state of each shard and
# attempt, and what a view shows of one shard.  Plain data, no logic.

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ShardlineError
from ..protocol import (
    CommittedAttempt,
    ShardEvent,
    ShardRange,
    ShardState,
    ShardTimeouts,
    next_shard_state,
)

__all__ = [
    "Action",
    "AttemptState",
    "CommitShard",
    "FailJob",
    "Launch",
    "RaiseFence",
    "SaveShard",
    "ShardProgress",
    "ShardStatus",
    "StopAttempt",
    "SupervisorSettings",
]


@dataclass(frozen=True, slots=True)
class Launch:
    """Start attempt `attempt` of `shard`; save the shard's record first if `reserve`."""

    shard: int
    attempt: int
    speculative: bool
    reserve: bool


@dataclass(frozen=True, slots=True)
class StopAttempt:
    """Stop attempt `attempt` of `shard` (its backend run is cancelled)."""

    shard: int
    attempt: int


@dataclass(frozen=True, slots=True)
class RaiseFence:
    """Make `shard`'s marker refuse writes from attempts below `min_attempt`."""

    shard: int
    min_attempt: int


@dataclass(frozen=True, slots=True)
class SaveShard:
    """Persist `shard`'s record (`Supervisor.record`)."""

    shard: int


@dataclass(frozen=True, slots=True)
class CommitShard:
    """`shard` committed `attempt`: save its record before its output is released, and end the
    attempt's run if the backend cannot see it end by itself."""

    shard: int
    attempt: int


@dataclass(frozen=True, slots=True)
class FailJob:
    """The job cannot succeed any more."""

    error: ShardlineError


Action = Launch | StopAttempt | RaiseFence | SaveShard | CommitShard | FailJob


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorSettings:
    """The rules one job's supervision follows (built from the coordinator's settings and the job's spec)."""

    max_attempts: int
    timeouts: ShardTimeouts
    #: Retries of a command that exited with a status not in ok_exit (it is
    #: deterministic on the same bytes); crashes and signals are retried anyway.
    command_retries: int = 0
    #: Backoff before retry n is base/2 + jitter(min(max, base * 2**(n-1))).
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 15.0
    #: Speculate once this fraction of shards is done, on a shard running
    #: longer than `speculate_slowdown` x the median commit time (and at
    #: least `speculate_min_s`).
    speculate_after_fraction: float = 0.75
    speculate_slowdown: float = 3.0
    speculate_min_s: float = 10.0
    #: Live attempts at most (None: every pending shard launches at once and
    #: the backend queues them).
    max_live_attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardStatus:
    """What a view shows of one shard."""

    index: int
    state: ShardState
    attempt: int
    bytes: int
    committed: CommittedAttempt | None
    error: str | None
    retries: int


@dataclass(eq=False, slots=True)
class AttemptState:
    number: int
    speculative: bool
    started_at: float | None = None  # when the backend really started it
    connected: bool = False
    last_heard: float = 0.0
    #: Sequence number of the one deadline entry that still speaks for this attempt.
    watch: int = -1


@dataclass(eq=False, slots=True)
class ShardProgress:
    index: int
    range: ShardRange
    state: ShardState
    #: Attempt numbers below this may have been used (it is in the store).
    saved_next_attempt: int
    next_attempt: int
    committed: CommittedAttempt | None
    error: str | None
    retries: int
    live: dict[int, AttemptState] = field(default_factory=dict)
    failures: int = 0
    command_failures: int = 0  # failures by the command's own exit status
    bytes_emitted: int = 0
    boundary: tuple[int, bool] | None = None  # (h_i, line start) from the first HEAD
    retry_at: float | None = None
    speculated: bool = False
    fence: int = 0  # marker fence raised so far

    def move(self, event: ShardEvent) -> None:
        self.state = next_shard_state(self.state, event)
