"""The Lambda handler's own contract, called directly: a bad event or a bad
setting is a structured answer naming the problem, never a raise (an error
raised from an asynchronous invoke would be retried by Lambda itself), and
log records are one JSON object per line."""

from __future__ import annotations

import json
import logging

import pytest

from shardline.worker.lambda_handler import JsonLogFormatter, handler


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

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


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
