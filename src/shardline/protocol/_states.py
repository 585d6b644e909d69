# Job and shard state names, and every legal transition between them.  All
# transition logic lives in these tables (as h11 keeps its in _state.py): a
# caller asks `next_shard_state(state, event)` and gets the new state or an
# error naming both.

from __future__ import annotations

import enum

from ..errors import LocalProtocolError

__all__ = [
    "JobEvent",
    "JobState",
    "ShardEvent",
    "ShardState",
    "next_job_state",
    "next_shard_state",
]


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobEvent(str, enum.Enum):
    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"


class ShardState(str, enum.Enum):
    PENDING = "pending"  # planned, or waiting out a retry backoff
    STARTING = "starting"  # an attempt launched, no worker connected to the exchange yet
    RUNNING = "running"  # a worker connected
    DONE = "done"  # an attempt's result was committed
    FAILED = "failed"  # out of attempts, or a failure no retry can fix
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (ShardState.DONE, ShardState.FAILED, ShardState.CANCELLED)


class ShardEvent(str, enum.Enum):
    LAUNCH = "launch"
    CONNECT = "connect"
    COMMIT = "commit"
    RETRY = "retry"  # every live attempt ended without a result; another will follow
    FAIL = "fail"
    CANCEL = "cancel"


_JOB_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.PENDING, JobEvent.START): JobState.RUNNING,
    (JobState.PENDING, JobEvent.FAIL): JobState.FAILED,
    (JobState.PENDING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, JobEvent.SUCCEED): JobState.SUCCEEDED,
    (JobState.RUNNING, JobEvent.FAIL): JobState.FAILED,
    (JobState.RUNNING, JobEvent.CANCEL): JobState.CANCELLED,
}

# A shard's state summarises its attempts: several may be live at once (a
# speculative attempt beside a straggler), and the first to commit wins.
_SHARD_TRANSITIONS: dict[tuple[ShardState, ShardEvent], ShardState] = {
    (ShardState.PENDING, ShardEvent.LAUNCH): ShardState.STARTING,
    (ShardState.STARTING, ShardEvent.CONNECT): ShardState.RUNNING,
    (ShardState.STARTING, ShardEvent.RETRY): ShardState.PENDING,
    (ShardState.RUNNING, ShardEvent.RETRY): ShardState.PENDING,
    (ShardState.RUNNING, ShardEvent.COMMIT): ShardState.DONE,
    (ShardState.PENDING, ShardEvent.FAIL): ShardState.FAILED,
    (ShardState.STARTING, ShardEvent.FAIL): ShardState.FAILED,
    (ShardState.RUNNING, ShardEvent.FAIL): ShardState.FAILED,
    (ShardState.PENDING, ShardEvent.CANCEL): ShardState.CANCELLED,
    (ShardState.STARTING, ShardEvent.CANCEL): ShardState.CANCELLED,
    (ShardState.RUNNING, ShardEvent.CANCEL): ShardState.CANCELLED,
}


def next_job_state(state: JobState, event: JobEvent) -> JobState:
    try:
        return _JOB_TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalProtocolError(f"job cannot {event.value} in state {state.value}") from None


def next_shard_state(state: ShardState, event: ShardEvent) -> ShardState:
    try:
        return _SHARD_TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalProtocolError(f"shard cannot {event.value} in state {state.value}") from None
