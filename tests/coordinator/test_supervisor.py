"""The sans-I/O supervisor, driven with plain events: no sockets, processes or stores.

Every test runs with `socket.socket` replaced by a function that raises, so
nothing here can reach a network even by accident.
"""

from __future__ import annotations

import random
import socket

import pytest

from shardline.coordinator import (
    CommitShard,
    CoordinatorMetrics,
    FailJob,
    Launch,
    RaiseFence,
    SaveShard,
    StopAttempt,
    Supervisor,
    SupervisorSettings,
)
from shardline.errors import ShardFailedError
from shardline.protocol import Done, Failed, Head, Hello, Progress, ShardRecord, ShardState, ShardTimeouts

JOB = "job1"
NONCE = "0" * 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the supervisor must not open sockets")

    monkeypatch.setattr(socket, "socket", refuse)


def make(
    shards: int = 4,
    *,
    size: int = 400,
    fresh: bool = True,
    next_attempt: int = 1,
    max_attempts: int = 3,
    timeouts: ShardTimeouts | None = None,
    **settings,
) -> Supervisor:
    records = [
        ShardRecord(job_id=JOB, index=i, state=ShardState.PENDING, next_attempt=next_attempt) for i in range(shards)
    ]
    return Supervisor(
        job_id=JOB,
        size=size,
        records=records,
        fresh=fresh,
        settings=SupervisorSettings(
            max_attempts=max_attempts,
            timeouts=timeouts or ShardTimeouts(start_s=10, heartbeat_s=5, total_s=100),
            **settings,
        ),
        metrics=CoordinatorMetrics(),
        rng=random.Random(1),
    )


def hello(shard: int, attempt: int) -> Hello:
    return Hello(job_id=JOB, shard=shard, attempt=attempt, nonce=NONCE)


def done_for(sup: Supervisor, shard: int) -> Done:
    r = sup.range(shard)
    return Done(
        emitted_start=r.start,
        emitted_end=r.end,
        line_start=True,
        bytes=r.end - r.start,
        checksum="crc32c:00000000",
        output_bytes=7,
    )


def of(kind, actions):
    return [a for a in actions if isinstance(a, kind)]


def connect_all(sup: Supervisor, actions, now: float) -> None:
    for launch in of(Launch, actions):
        sup.backend_started(launch.shard, launch.attempt, now)
        assert sup.on_connect(hello(launch.shard, launch.attempt), now) is None


def commit(sup: Supervisor, shard: int, attempt: int, now: float):
    committed, actions = sup.on_done(
        hello(shard, attempt),
        done_for(sup, shard),
        output_path=f"/spool/{shard}.{attempt}",
        output_problem=None,
        now=now,
    )
    return committed, actions


def test_a_fresh_job_launches_every_shard_in_order_without_fences_or_reservations():
    sup = make(4)
    actions = sup.start(0.0)
    assert of(Launch, actions) == [Launch(i, 0, speculative=False, reserve=False) for i in range(4)]
    assert not of(RaiseFence, actions)
    assert all(sup.state(i) is ShardState.STARTING for i in range(4))


def test_a_resumed_job_fences_every_reserved_attempt_and_reserves_before_launching():
    sup = make(2, fresh=False, next_attempt=3)
    actions = sup.start(0.0)
    assert of(RaiseFence, actions) == [RaiseFence(0, 3), RaiseFence(1, 3)]
    assert of(Launch, actions) == [Launch(0, 3, False, True), Launch(1, 3, False, True)]
    sup.saved(0, sup.record(0))
    assert sup.record(0).next_attempt == 4


def test_a_worker_that_never_connects_misses_its_start_deadline_and_is_retried_after_a_backoff():
    sup = make(1)
    sup.start(0.0)
    sup.backend_started(0, 0, 1.0)
    assert sup.tick(10.9) == []  # before the deadline nothing happens
    actions = sup.tick(11.5)
    assert StopAttempt(0, 0) in actions and RaiseFence(0, 1) in actions and SaveShard(0) in actions
    assert sup.state(0) is ShardState.PENDING
    assert sup.metrics.deadline_misses["start"] == 1
    assert "start deadline" in (sup.status(0).error or "")
    assert not of(Launch, sup.tick(11.5))  # still backing off
    assert of(Launch, sup.tick(60.0)) == [Launch(0, 1, speculative=False, reserve=True)]


def test_heartbeats_keep_an_attempt_alive_and_silence_ends_it():
    sup = make(1)
    sup.start(0.0)
    sup.backend_started(0, 0, 0.0)
    sup.on_connect(hello(0, 0), 1.0)
    for t in range(2, 30, 2):
        sup.on_progress(hello(0, 0), Progress(bytes_emitted=t), float(t))
        assert not of(StopAttempt, sup.tick(float(t)))
    assert sup.status(0).bytes == 28
    actions = sup.tick(28.0 + 5.1)
    assert StopAttempt(0, 0) in actions
    assert sup.metrics.deadline_misses["heartbeat"] == 1


def test_connecting_brings_a_short_heartbeat_deadline_forward():
    sup = make(1, timeouts=ShardTimeouts(start_s=60, heartbeat_s=2, total_s=100))
    sup.start(0.0)
    sup.backend_started(0, 0, 0.0)
    sup.on_connect(hello(0, 0), 1.0)
    assert StopAttempt(0, 0) in sup.tick(3.5)  # not at the start deadline, 60 s


def test_a_shard_out_of_attempts_fails_the_job_naming_the_shard_and_stops_the_others():
    sup = make(2, max_attempts=2, timeouts=ShardTimeouts(start_s=500, heartbeat_s=500, total_s=1000))
    connect_all(sup, sup.start(0.0), 0.0)
    actions = sup.on_failed(hello(1, 0), Failed(kind="CommandFailedError", message="boom", retryable=True), 1.0)
    assert sup.state(1) is ShardState.PENDING
    launches = of(Launch, sup.tick(100.0))
    assert launches == [Launch(1, 1, False, True)]
    connect_all(sup, launches, 100.0)
    actions = sup.on_failed(hello(1, 1), Failed(kind="CommandFailedError", message="boom", retryable=True), 101.0)
    (fail,) = of(FailJob, actions)
    assert isinstance(fail.error, ShardFailedError) and fail.error.shard == 1
    assert "boom (2 attempts)" in str(fail.error)
    assert StopAttempt(0, 0) in actions  # the healthy shard's attempt goes too
    assert sup.state(1) is ShardState.FAILED
    assert sup.on_connect(hello(0, 0), 102.0) is not None  # refused as stale from now on


def test_a_commands_exit_status_is_not_retried_unless_the_job_allows_command_retries():
    exited = Failed(kind="CommandExitError", message="command exited with status 1: (no stderr)", retryable=True)
    sup = make(2, timeouts=ShardTimeouts(start_s=500, heartbeat_s=500, total_s=1000))
    connect_all(sup, sup.start(0.0), 0.0)
    (fail,) = of(FailJob, sup.on_failed(hello(1, 0), exited, 1.0))
    assert "status 1" in str(fail.error) and "attempts" not in str(fail.error)
    assert sup.state(1) is ShardState.FAILED and sup.retries == 0

    sup = make(2, command_retries=1, timeouts=ShardTimeouts(start_s=500, heartbeat_s=500, total_s=1000))
    connect_all(sup, sup.start(0.0), 0.0)
    assert not of(FailJob, sup.on_failed(hello(1, 0), exited, 1.0))
    launches = of(Launch, sup.tick(100.0))
    assert launches == [Launch(1, 1, False, True)]
    connect_all(sup, launches, 100.0)
    (fail,) = of(FailJob, sup.on_failed(hello(1, 1), exited, 101.0))  # its one retry used
    assert sup.retries == 1


def test_a_command_killed_by_a_signal_is_retried_by_default():
    killed = Failed(kind="CommandFailedError", message="command killed by signal SIGKILL", retryable=True)
    sup = make(2, timeouts=ShardTimeouts(start_s=500, heartbeat_s=500, total_s=1000))
    connect_all(sup, sup.start(0.0), 0.0)
    assert not of(FailJob, sup.on_failed(hello(1, 0), killed, 1.0))
    assert sup.state(1) is ShardState.PENDING


def test_a_failure_no_retry_can_fix_fails_the_job_at_once():
    sup = make(1, max_attempts=5)
    connect_all(sup, sup.start(0.0), 0.0)
    actions = sup.on_failed(hello(0, 0), Failed(kind="InputError", message="gzip", retryable=False), 1.0)
    (fail,) = of(FailJob, actions)
    assert str(fail.error) == "shard 0 failed: gzip"


def test_a_commit_is_announced_and_recorded_and_a_stale_done_is_refused():
    sup = make(2)
    connect_all(sup, sup.start(0.0), 0.0)
    committed, actions = commit(sup, 0, 0, 2.0)
    assert committed and actions == [CommitShard(0, 0)]
    record = sup.record(0)
    assert record.state is ShardState.DONE and record.committed.output_path == "/spool/0.0"
    assert sup.done_count == 1
    assert commit(sup, 0, 0, 3.0) == (False, [])  # the same DONE again: not live any more
    assert sup.may_commit(hello(0, 0), done_for(sup, 0)) == "stale"
    assert sup.metrics.fenced_writes == 2


def test_a_done_whose_output_does_not_check_out_is_retried():
    sup = make(1)
    connect_all(sup, sup.start(0.0), 0.0)
    committed, actions = sup.on_done(
        hello(0, 0), done_for(sup, 0), output_path="/x", output_problem="output /x has 3 bytes, DONE says 7", now=1.0
    )
    assert not committed and StopAttempt(0, 0) in actions
    assert "3 bytes" in sup.status(0).error


def test_a_done_outside_its_range_or_against_its_head_is_not_committed():
    sup = make(2)
    connect_all(sup, sup.start(0.0), 0.0)
    assert (
        sup.on_head(hello(1, 0), Head(shard=1, start=200, head_end=205, line_start=True, has_data=False), 1.0) is None
    )
    disagrees = sup.on_head(hello(1, 0), Head(shard=1, start=200, head_end=210, line_start=True, has_data=False), 1.0)
    assert disagrees is not None and not disagrees.stale
    outside = sup.on_head(hello(1, 0), Head(shard=1, start=100, head_end=100, line_start=True, has_data=False), 1.0)
    assert outside is not None and "outside shard range" in outside.message
    bad = Done(emitted_start=210, emitted_end=400, line_start=True, bytes=190, checksum="c", output_bytes=0)
    committed, _ = sup.on_done(hello(1, 0), bad, output_path="/x", output_problem=None, now=2.0)
    assert not committed and "disagrees with the HEAD" in sup.status(1).error


def test_a_straggler_gets_one_speculative_twin_and_the_first_commit_stops_the_other():
    sup = make(4, speculate_min_s=1.0, timeouts=ShardTimeouts(start_s=500, heartbeat_s=500, total_s=1000))
    connect_all(sup, sup.start(0.0), 0.0)
    for shard in range(3):
        commit(sup, shard, 0, 2.0)
    assert not of(Launch, sup.tick(5.0))  # 5 s < 3 x the 2 s median
    (twin,) = of(Launch, sup.tick(6.5))
    assert twin == Launch(3, 1, speculative=True, reserve=True)
    assert sup.metrics.retries["speculative"] == 1
    assert not of(Launch, sup.tick(60.0))  # one twin at most
    connect_all(sup, [twin], 7.0)
    committed, actions = commit(sup, 3, 1, 8.0)
    assert committed and StopAttempt(3, 0) in actions and CommitShard(3, 1) in actions


def test_live_attempts_are_capped_and_a_commit_frees_a_slot():
    sup = make(5, max_live_attempts=2)
    launches = of(Launch, sup.start(0.0))
    assert [launch.shard for launch in launches] == [0, 1]
    connect_all(sup, launches, 0.0)
    _, actions = commit(sup, 0, 0, 1.0)
    assert [launch.shard for launch in of(Launch, actions)] == [2]


def test_an_attempt_whose_backend_run_ends_without_a_result_is_retried():
    sup = make(1)
    connect_all(sup, sup.start(0.0), 0.0)
    actions = sup.attempt_exited(0, 0, "worker process killed by signal 9 before its result was committed", 1.0)
    assert StopAttempt(0, 0) in actions and sup.state(0) is ShardState.PENDING
    assert sup.attempt_exited(0, 0, "again", 1.0) == []  # already ended


def test_finishing_a_failed_job_cancels_unfinished_shards_without_saving_each_one():
    """The job's final record implies the cancelled shards (shards_as_stored), so none is saved."""
    sup = make(3)
    connect_all(sup, sup.start(0.0), 0.0)
    commit(sup, 0, 0, 1.0)
    actions = sup.finish(succeeded=False)
    assert actions == []
    assert [sup.state(i) for i in range(3)] == [ShardState.DONE, ShardState.CANCELLED, ShardState.CANCELLED]


def test_twenty_thousand_shards_start_and_tick_without_visiting_every_shard_per_event():
    sup = make(20_000, size=20_000_000)
    actions = sup.start(0.0)
    assert len(of(Launch, actions)) == 20_000
    for launch in of(Launch, actions):
        sup.backend_started(launch.shard, launch.attempt, 0.0)
    # Nothing is due: a tick pops nothing and returns nothing.
    assert sup.tick(1.0) == []
    assert len(sup._deadlines) == 20_000  # one entry per attempt, not one per tick


def test_counts_kept_as_shards_change_agree_with_counting_every_shard():
    """state_counts, retries and bytes_emitted are kept incrementally (so a
    view costs O(1)); through launches, progress, failures, retries, commits
    and the end of the job they agree with a recount over every shard."""
    sup = make(5, max_attempts=5)

    def check() -> None:
        recount = {state: 0 for state in ShardState}
        for index in range(len(sup)):
            recount[sup.state(index)] += 1
        assert sup.state_counts() == recount
        assert sup.retries == sum(sup.status(index).retries for index in range(len(sup)))
        assert sup.bytes_emitted == sum(sup.status(index).bytes for index in range(len(sup)))

    check()
    actions = sup.start(0.0)
    check()
    connect_all(sup, actions, 0.5)
    check()
    sup.on_progress(hello(1, 0), Progress(bytes_emitted=30), 1.0)
    check()
    sup.on_failed(hello(2, 0), Failed(kind="CommandFailedError", message="boom", retryable=True), 1.0)
    check()
    assert sup.state_counts()[ShardState.PENDING] == 1 and sup.retries == 1
    commit(sup, 0, 0, 2.0)
    commit(sup, 1, 0, 2.0)
    check()
    assert sup.state_counts()[ShardState.DONE] == 2
    relaunched = sup.tick(60.0)
    connect_all(sup, relaunched, 60.0)
    check()
    sup.finish(succeeded=False)
    check()
    assert sup.state_counts()[ShardState.DONE] == 2 and sup.state_counts()[ShardState.CANCELLED] == 3
