"""docker/invoke_server.py, the compose stack's Lambda Invoke API, through botocore's Lambda client.

The server runs on 127.0.0.1 with a stand-in handler; botocore must read
its answers exactly as it reads Lambda's: 202 for an Event invoke, the
handler's result for RequestResponse, TooManyRequestsException (which the
coordinator's lambda backend retries) when every slot is busy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from polling import eventually_blocking

SERVER = Path(__file__).resolve().parents[2] / "docker" / "invoke_server.py"

HANDLER_MODULE = """
import json, os, time

def handler(event, context):
    remaining = context.get_remaining_time_in_millis()
    time.sleep(event.get("sleep_s", 0))
    path = os.path.join(os.environ["INVOKE_TEST_DIR"], event["name"])
    with open(path + ".partial", "w") as f:
        json.dump({"event": event, "remaining_ms": remaining}, f)
    os.replace(path + ".partial", path)  # the test sees the whole file or none
    return {"ok": True, "name": event["name"]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def invoke_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    (tmp_path / "fakehandler.py").write_text(HANDLER_MODULE)
    results = tmp_path / "results"
    results.mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "INVOKE_TEST_DIR": str(results),
        "SHARDLINE_HANDLER": "fakehandler.handler",
        "SHARDLINE_INVOKE_PORT": str(port),
        "SHARDLINE_INVOKE_BIND": "127.0.0.1",
        "SHARDLINE_INVOKE_CONCURRENCY": "1",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "30",
    }
    process = subprocess.Popen([sys.executable, str(SERVER)], env=env, stderr=subprocess.DEVNULL)
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                assert process.poll() is None, "invoke_server.py exited"
                return False
            return True

        eventually_blocking(listening, "invoke_server.py listens", timeout_s=20)
        yield f"http://127.0.0.1:{port}", results
    finally:
        process.terminate()
        process.wait(timeout=10)


def _client(endpoint: str):
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"total_max_attempts": 1}),
    )


def _wait_for(path: Path, timeout_s: float = 20) -> dict:
    eventually_blocking(path.exists, f"{path.name} appears", timeout_s=timeout_s)
    return json.loads(path.read_text())


def test_event_invoke_answers_202_and_runs_the_handler(invoke_server: tuple[str, Path]) -> None:
    endpoint, results = invoke_server
    client = _client(endpoint)
    started = time.monotonic()
    response = client.invoke(
        FunctionName="shardline-worker", InvocationType="Event", Payload=json.dumps({"name": "a", "sleep_s": 1})
    )
    assert response["StatusCode"] == 202
    assert time.monotonic() - started < 1, "an Event invoke must not wait for the handler"
    written = _wait_for(results / "a")
    assert written["event"] == {"name": "a", "sleep_s": 1}
    assert 25_000 < written["remaining_ms"] <= 30_000


def test_request_response_returns_the_result(invoke_server: tuple[str, Path]) -> None:
    endpoint, _ = invoke_server
    response = _client(endpoint).invoke(FunctionName="any-name", Payload=json.dumps({"name": "b"}))
    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {"ok": True, "name": "b"}


def test_busy_slots_answer_too_many_requests(invoke_server: tuple[str, Path]) -> None:
    endpoint, results = invoke_server
    client = _client(endpoint)
    client.invoke(FunctionName="f", InvocationType="Event", Payload=json.dumps({"name": "slow", "sleep_s": 2}))
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke(FunctionName="f", InvocationType="Event", Payload=json.dumps({"name": "refused"}))
    _wait_for(results / "slow")

    # The slot is free again once the handler's process has exited.
    def invoked() -> dict | None:
        try:
            return client.invoke(FunctionName="f", InvocationType="Event", Payload=json.dumps({"name": "c"}))
        except client.exceptions.TooManyRequestsException:
            return None

    response = eventually_blocking(invoked, "the slot is released", timeout_s=10, interval_s=0.1)
    assert response["StatusCode"] == 202
    _wait_for(results / "c")
    assert not (results / "refused").exists()
