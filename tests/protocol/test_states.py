"""The job and shard state tables: every transition, legal or not."""

from __future__ import annotations

import pytest

from shardline.errors import LocalProtocolError
from shardline.protocol import JobEvent, JobState, ShardEvent, ShardState, next_job_state, next_shard_state

# Written out here independently of _states.py: every legal transition.

J, JE = JobState, JobEvent
EXPECTED_JOB = {
    (J.PENDING, JE.START): J.RUNNING,
    (J.PENDING, JE.FAIL): J.FAILED,
    (J.PENDING, JE.CANCEL): J.CANCELLED,
    (J.RUNNING, JE.SUCCEED): J.SUCCEEDED,
    (J.RUNNING, JE.FAIL): J.FAILED,
    (J.RUNNING, JE.CANCEL): J.CANCELLED,
}
S, SE = ShardState, ShardEvent
EXPECTED_SHARD = {
    (S.PENDING, SE.LAUNCH): S.STARTING,
    (S.PENDING, SE.FAIL): S.FAILED,
    (S.PENDING, SE.CANCEL): S.CANCELLED,
    (S.STARTING, SE.CONNECT): S.RUNNING,
    (S.STARTING, SE.RETRY): S.PENDING,
    (S.STARTING, SE.FAIL): S.FAILED,
    (S.STARTING, SE.CANCEL): S.CANCELLED,
    (S.RUNNING, SE.COMMIT): S.DONE,
    (S.RUNNING, SE.RETRY): S.PENDING,
    (S.RUNNING, SE.FAIL): S.FAILED,
    (S.RUNNING, SE.CANCEL): S.CANCELLED,
}


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(JobEvent), ids=lambda e: e.value)
def test_job_transitions(state: JobState, event: JobEvent) -> None:
    if (state, event) in EXPECTED_JOB:
        assert next_job_state(state, event) is EXPECTED_JOB[(state, event)]
    else:
        with pytest.raises(LocalProtocolError, match=f"job cannot {event.value} in state {state.value}"):
            next_job_state(state, event)


@pytest.mark.parametrize("state", list(ShardState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(ShardEvent), ids=lambda e: e.value)
def test_shard_transitions(state: ShardState, event: ShardEvent) -> None:
    if (state, event) in EXPECTED_SHARD:
        assert next_shard_state(state, event) is EXPECTED_SHARD[(state, event)]
    else:
        with pytest.raises(LocalProtocolError, match=f"shard cannot {event.value} in state {state.value}"):
            next_shard_state(state, event)


def test_final_states() -> None:
    assert {s for s in JobState if s.is_final} == {J.SUCCEEDED, J.FAILED, J.CANCELLED}
    for state in JobState:
        outgoing = [e for e in JobEvent if (state, e) in EXPECTED_JOB]
        assert (not outgoing) == state.is_final
    assert {s for s in ShardState if s.is_final} == {S.DONE, S.FAILED, S.CANCELLED}
    for state in ShardState:
        outgoing = [e for e in ShardEvent if (state, e) in EXPECTED_SHARD]
        assert (not outgoing) == state.is_final


def test_every_state_is_reachable_from_pending() -> None:
    for start, table, states in ((J.PENDING, EXPECTED_JOB, JobState), (S.PENDING, EXPECTED_SHARD, ShardState)):
        seen, todo = {start}, [start]
        while todo:
            state = todo.pop()
            for (src, _), dst in table.items():
                if src is state and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        assert seen == set(states)


def test_state_names_are_stable_strings() -> None:
    # persisted in DynamoDB and shown by the API: values must round-trip
    for enum_cls in (JobState, JobEvent, ShardState, ShardEvent):
        for member in enum_cls:
            assert isinstance(member, str) and enum_cls(member.value) is member
    assert [s.value for s in JobState] == ["pending", "running", "succeeded", "failed", "cancelled"]
    assert [s.value for s in ShardState] == ["pending", "starting", "running", "done", "failed", "cancelled"]
