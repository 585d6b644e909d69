"""The Lambda handler's own contract, called directly: a bad event or a bad
setting is a structured answer naming the problem, never a raise (an error
raised from an asynchronous invoke would be retried by Lambda itself), log
records are one JSON object per line, and invocations one after another in
one process share their AWS clients until the credentials change, failed
ones included.  The warm-process behaviour under the real Lambda runtime is
in tests/integration/test_lambda.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shardline.io.aws import AwsSettings
from shardline.worker import lambda_handler
from shardline.worker.lambda_handler import JsonLogFormatter, handler

from faultproxy import FaultProxy


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """The handler sets up logging as a Lambda process would: undo it for the
    rest of the test session."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    formatters = [(h, h.formatter) for h in handlers]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    for log_handler, formatter in formatters:
        log_handler.setFormatter(formatter)


class Context:
    """What the Lambda runtime passes: only the deadline matters here."""

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def warm_process(monkeypatch) -> Iterator[None]:
    """The handler keeps one loop and its clients per process: this test gets
    a process state of its own, closed at the end."""
    fresh = lambda_handler._WarmProcess()
    monkeypatch.setattr(lambda_handler, "_warm", fresh)
    yield
    fresh.discard()


@pytest.mark.parametrize("event", [{"shard": 1}, {"version": 99}, "not json", ["a", "list"]])
def test_bad_event_is_answered_not_raised(event):
    result = handler(event, Context())
    assert result["ok"] is False and result["retryable"] is False
    assert "invalid shard task" in result["detail"]


def test_bad_reserve_setting_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_LAMBDA_RESERVE_MS", "ten seconds")
    event = {
        "version": 1,
        "job_id": "j1",
        "shard": 0,
        "shards": 1,
        "attempt": 0,
        "source": str(tmp_path / "input"),
        "size": 0,
        "etag": "",
        "delimiter": "0a",
        "output_path": str(tmp_path / "out"),
        "secret": "",
        "markers": "dynamodb:shardline-markers",
    }
    result = handler(event, Context())
    assert result["ok"] is False and result["retryable"] is False
    assert (result["job_id"], result["shard"], result["attempt"]) == ("j1", 0, 0)
    assert "SHARDLINE_LAMBDA_RESERVE_MS" in result["detail"] and "ten seconds" in result["detail"]


def test_log_records_are_json_objects_with_the_attempt():
    record = logging.LogRecord("shardline.worker", logging.INFO, __file__, 1, "emitted %d bytes", (12,), None)
    record.bytes = 12
    record.tenant_id = None  # what awslambdaric adds; dropped when empty
    line = JsonLogFormatter(end="\n", job_id="j1", shard=3, attempt=1).format(record)
    assert line.endswith("}\n") and line.count("\n") == 1
    entry = json.loads(line)
    assert entry["message"] == "emitted 12 bytes" and entry["level"] == "INFO"
    assert (entry["job_id"], entry["shard"], entry["attempt"], entry["bytes"]) == ("j1", 3, 1, 12)
    assert "tenant_id" not in entry and entry["time"].endswith("Z")


async def _invoke(task: Any, context: Context | None = None) -> dict[str, Any]:
    """One invocation, as the runtime makes it: from a thread with no event loop running."""
    event = json.loads(task.to_json())
    result: dict[str, Any] = await asyncio.to_thread(handler, event, context or Context())
    return result


def _key_ids(records: list[Any]) -> set[str]:
    """The access key ids the requests in `records` were signed with."""
    return {r.headers["authorization"].split("Credential=")[1].split("/")[0] for r in records}


async def test_warm_invocations_share_clients_until_the_credentials_change(
    moto, bucket, make_task, monkeypatch, warm_process
):
    """Credentials come from the environment, as Lambda's role credentials do,
    and are rotated between invocations: the clients made under the old ones
    give way, and every request after signs with the new ones (seen on the wire)."""
    async with FaultProxy(moto.url) as proxy:
        aws = AwsSettings(region=moto.region, s3_endpoint_url=proxy.url, dynamodb_endpoint_url=proxy.url)

        def task() -> Any:  # the last of two shards: a marker to DynamoDB, the output to S3
            output = f"s3://{bucket}/out/{uuid.uuid4().hex}"
            return make_task(shards=2, index=1, aws=aws.to_dict(), output_path=output)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
        first = [await _invoke(task()) for _ in range(3)]
        before_rotation = len(proxy.records)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret")
        rotated = [await _invoke(task()) for _ in range(2)]
    assert all(r["bytes"] > 0 and r["detail"].startswith("finished") for r in first + rotated), first + rotated
    assert [r["invocation"] for r in first + rotated] == [1, 2, 3, 4, 5]
    # S3 and DynamoDB: made once, then once more for the new credentials.
    assert [r["clients_created"] for r in first + rotated] == [2, 2, 2, 4, 4]
    services = {r.operation is not None for r in proxy.records}
    assert services == {True, False}  # both services were really used
    assert _key_ids(proxy.records[:before_rotation]) == {"first-key"}
    assert _key_ids(proxy.records[before_rotation:]) == {"second-key"}


async def test_an_invocation_after_a_failed_one_succeeds(make_task, warm_process):
    """A shard out of its time budget (its command killed) leaves the loop and
    clients in working order, and they are kept; an internal error (here a
    task whose AWS settings this worker does not know) discards both, and
    the next invocation makes new ones."""
    first = await _invoke(make_task(shards=2, index=1))
    # 11 s left, 10 s kept in reserve: a budget of one second, for a command of 30.
    out_of_time = await _invoke(make_task(shards=2, index=1, command="sleep 30"), Context(remaining_ms=11_000))
    after_timeout = await _invoke(make_task(shards=2, index=1))
    broken = await _invoke(make_task(shards=2, index=1, aws={"no_such_setting": 1}))
    after_internal_error = await _invoke(make_task(shards=2, index=1))
    assert "TimeBudgetError" in out_of_time["detail"] and out_of_time["retryable"] is True
    assert broken["detail"].startswith("internal error: TypeError") and broken["retryable"] is True
    for result in (first, after_timeout, after_internal_error):
        assert result["bytes"] > 0 and result["detail"].startswith("finished"), result
    assert [r["invocation"] for r in (first, out_of_time, after_timeout, broken, after_internal_error)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    # One DynamoDB client (the source and output are local files) until the
    # internal error; a new one after it.
    assert [r["clients_created"] for r in (first, out_of_time, after_timeout, broken)] == [1, 1, 1, 1]
    assert after_internal_error["clients_created"] == 2
