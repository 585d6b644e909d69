"""The Lambda test harness itself: real RIE processes behind the Invoke API,
driven by a real aiobotocore ``lambda`` client.

The handler is a tiny module written into a temporary directory that is put
on the RIE processes' PYTHONPATH; one ``dispatch`` function switches on the
event's ``op``.  Nothing here waits on wall-clock guesses: concurrency is
proven by a two-party barrier, load throttling by a handler blocked on a file
the test creates.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import textwrap
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from lambdaemu import LambdaEmulator, RieUnavailableError, find_or_fetch_rie, is_rie_line
from polling import eventually

PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    def _wait_for(path, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not Path(path).exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def dispatch(event, context):
        op = event.get("op")
        print(json.dumps({"level": "INFO", "message": "invoked", "op": op}))
        print("a line on stderr", file=sys.stderr)
        if op == "echo":
            return {
                "event": event,
                "function_name": context.function_name,
                "memory": context.memory_limit_in_mb,
                "arn": context.invoked_function_arn,
                "pid": os.getpid(),
                "env": {k: os.environ.get(k) for k in ("AWS_REGION", "PROBE_SETTING", "TMPDIR", "HOME")},
            }
        if op == "touch":
            Path(event["path"]).write_text(context.aws_request_id)
            return {"ok": True}
        if op == "barrier":  # both parties must be inside the handler at once
            directory = Path(event["dir"])
            (directory / f"arrived-{os.getpid()}").touch()
            deadline = time.monotonic() + event["timeout_s"]
            while len(list(directory.glob("arrived-*"))) < event["parties"]:
                if time.monotonic() > deadline:
                    return {"met": False, "pid": os.getpid()}
                time.sleep(0.01)
            return {"met": True, "pid": os.getpid()}
        if op == "block":  # signal that we are running, then wait for the test's go-ahead
            Path(event["started"]).touch()
            return {"released": _wait_for(event["release"], event["timeout_s"])}
        if op == "sleep":
            time.sleep(event["seconds"])
            return {"slept": event["seconds"]}
        if op == "remaining":
            first = context.get_remaining_time_in_millis()
            time.sleep(0.3)
            return {"first": first, "second": context.get_remaining_time_in_millis()}
        if op == "fail":
            raise ValueError("probe failure")
        if op == "exit":  # the runtime process dies mid-invoke
            os._exit(3)
        return {"unknown": op}
    """
)


@pytest.fixture(scope="session")
def rie_binary() -> Path:
    return find_or_fetch_rie()


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lambdaemu-probe")
    (directory / "lambdaemu_probe.py").write_text(PROBE)
    return directory


@pytest.fixture
def emulator(rie_binary: Path, probe_dir: Path, tmp_path: Path) -> Iterator[Callable[..., LambdaEmulator]]:
    """Factory: start a LambdaEmulator running the probe; all stopped at teardown."""
    started: list[LambdaEmulator] = []

    def make(**kwargs: Any) -> LambdaEmulator:
        kwargs.setdefault("timeout_s", 20)
        emu = LambdaEmulator(
            "lambdaemu_probe.dispatch",
            rie=rie_binary,
            pythonpath=[probe_dir],
            log_dir=tmp_path / f"emu-{len(started)}",
            **kwargs,
        )
        started.append(emu)
        emu.start()
        return emu

    yield make
    for emu in started:
        emu.stop()


@asynccontextmanager
async def lambda_client(emu: LambdaEmulator) -> AsyncIterator[Any]:
    session = get_session()
    session.set_credentials("testing", "testing")
    # One attempt: botocore would otherwise retry 429s and hide them.
    config = AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=60)
    async with session.create_client("lambda", region_name=emu.region, endpoint_url=emu.url, config=config) as client:
        yield client


async def invoke(client: Any, event: dict[str, Any], *, function: str, kind: str = "RequestResponse") -> dict:
    response = await client.invoke(FunctionName=function, InvocationType=kind, Payload=json.dumps(event).encode())
    body = await response["Payload"].read()
    return {
        "status": response["StatusCode"],
        "error": response.get("FunctionError"),
        "payload": json.loads(body) if body else None,
    }


async def test_request_response_round_trip_and_logs(emulator) -> None:
    emu = emulator(env={"PROBE_SETTING": "from-the-test"}, memory_mb=256)
    async with lambda_client(emu) as client:
        answer = await invoke(client, {"op": "echo", "n": 1}, function=emu.function_name)
        by_arn = await invoke(client, {"op": "echo", "n": 2}, function=emu.arn)
        with pytest.raises(ClientError) as missing:
            await invoke(client, {"op": "echo"}, function="no-such-function")
    assert answer["status"] == 200 and answer["error"] is None
    payload = answer["payload"]
    assert payload["event"] == {"op": "echo", "n": 1}
    assert payload["function_name"] == "shardline-worker"
    assert str(payload["memory"]) == "256"
    assert payload["env"]["PROBE_SETTING"] == "from-the-test"
    assert payload["env"]["AWS_REGION"] == "us-east-1"
    assert payload["env"]["TMPDIR"].startswith(str(emu.log_dir))
    assert by_arn["payload"]["event"]["n"] == 2
    assert by_arn["payload"]["pid"] == payload["pid"]  # warm: the same runtime served both
    assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    ran = emu.ran()
    assert [i.event["n"] for i in ran] == [1, 2]
    assert all(i.status == 200 and i.function_error is None and i.duration_s is not None for i in ran)
    # The handler's output, RIE's own lines filtered out; stderr is captured too.
    lines = emu.handler_lines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records == [{"level": "INFO", "message": "invoked", "op": "echo"}] * 2
    assert lines.count("a line on stderr") == 2
    assert all("RequestId:" not in line for line in lines)
    assert any(is_rie_line(line) for line in emu.log_text().splitlines())  # START/END/REPORT are there


async def test_event_returns_202_and_runs_in_background(emulator, tmp_path: Path) -> None:
    emu = emulator()
    marker = tmp_path / "touched"
    async with lambda_client(emu) as client:
        answer = await invoke(client, {"op": "touch", "path": str(marker)}, function=emu.function_name, kind="Event")
    assert answer["status"] == 202 and answer["payload"] is None
    await emu.until_idle(timeout_s=20)
    (record,) = emu.ran()
    assert record.invocation_type == "Event" and record.status == 202
    assert record.function_error is None and record.json() == {"ok": True}
    assert marker.read_text()  # the handler really ran (it wrote its request id)


async def test_function_error_is_reported_like_lambda(emulator) -> None:
    emu = emulator()
    async with lambda_client(emu) as client:
        answer = await invoke(client, {"op": "fail"}, function=emu.function_name)
        crashed = await invoke(client, {"op": "exit"}, function=emu.function_name)
        after = await invoke(client, {"op": "echo"}, function=emu.function_name)
    assert answer["status"] == 200 and answer["error"] == "Unhandled"
    assert answer["payload"]["errorType"] == "ValueError"
    assert answer["payload"]["errorMessage"] == "probe failure"
    assert crashed["status"] == 200 and crashed["error"] == "Unhandled"
    assert crashed["payload"]["errorType"] == "Runtime.ExitError"
    assert after["error"] is None  # RIE started a new runtime
    assert [i.function_error for i in emu.ran()] == ["Unhandled", "Unhandled", None]


async def test_concurrency_two_runs_two_invokes_at_once(emulator, tmp_path: Path) -> None:
    emu = emulator(concurrency=2)
    event = {"op": "barrier", "dir": str(tmp_path), "parties": 2, "timeout_s": 15}
    async with lambda_client(emu) as client:
        first, second = await asyncio.gather(
            invoke(client, event, function=emu.function_name),
            invoke(client, event, function=emu.function_name),
        )
    assert first["payload"]["met"] and second["payload"]["met"]
    assert first["payload"]["pid"] != second["payload"]["pid"]
    assert sorted(i.process for i in emu.ran()) == [0, 1]


async def test_throttling_answers_too_many_requests(emulator, tmp_path: Path) -> None:
    emu = emulator(concurrency=1, max_queue=0)
    started, release = tmp_path / "started", tmp_path / "release"
    async with lambda_client(emu) as client:
        # Explicit throttles first: the next invoke is refused, the one after runs.
        emu.throttle_next(1)
        with pytest.raises(ClientError) as forced:
            await invoke(client, {"op": "echo"}, function=emu.function_name)
        assert (await invoke(client, {"op": "echo"}, function=emu.function_name))["error"] is None

        # Load: the only process is busy and no queue is allowed.
        blocked = asyncio.ensure_future(
            invoke(
                client,
                {"op": "block", "started": str(started), "release": str(release), "timeout_s": 15},
                function=emu.function_name,
            )
        )
        await eventually(started.exists, "the blocking invoke started")
        with pytest.raises(ClientError) as busy:
            await invoke(client, {"op": "echo"}, function=emu.function_name, kind="Event")
        release.touch()
        assert (await blocked)["payload"] == {"released": True}
    for caught in (forced.value, busy.value):
        assert caught.response["Error"]["Code"] == "TooManyRequestsException"
        assert caught.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert caught.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert [i.throttled for i in emu.invocations] == [True, False, False, True]


async def test_timeout_is_reported_and_the_process_recovers(emulator) -> None:
    emu = emulator(timeout_s=1)
    async with lambda_client(emu) as client:
        answer = await invoke(client, {"op": "sleep", "seconds": 5}, function=emu.function_name)
        event = await invoke(client, {"op": "sleep", "seconds": 5}, function=emu.function_name, kind="Event")
        await emu.until_idle(timeout_s=20)
        after = await invoke(client, {"op": "echo"}, function=emu.function_name)
    assert answer["status"] == 200 and answer["error"] == "Unhandled"
    assert answer["payload"]["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in answer["payload"]["errorMessage"]
    assert event["status"] == 202
    assert after["error"] is None and after["payload"]["event"] == {"op": "echo"}
    timed_out, event_record, ok = emu.ran()
    assert timed_out.timed_out and event_record.timed_out and not ok.timed_out
    assert event_record.invocation_type == "Event" and event_record.function_error == "Unhandled"
    assert timed_out.duration_s < 4  # RIE cut it off; it did not sleep 5 s


async def test_remaining_time_is_visible_to_the_handler(emulator) -> None:
    emu = emulator(timeout_s=7)
    async with lambda_client(emu) as client:
        answer = await invoke(client, {"op": "remaining"}, function=emu.function_name)
    first, second = answer["payload"]["first"], answer["payload"]["second"]
    assert 0 < second < first <= 7000
    assert first - second >= 250  # the handler slept 0.3 s between the two readings


async def test_dry_run_and_payload_limits(emulator) -> None:
    emu = emulator()
    async with lambda_client(emu) as client:
        dry = await client.invoke(FunctionName=emu.function_name, InvocationType="DryRun", Payload=b"{}")
        with pytest.raises(ClientError) as too_big:
            await invoke(client, {"op": "echo", "pad": "x" * 300_000}, function=emu.function_name, kind="Event")
    assert dry["StatusCode"] == 204
    assert too_big.value.response["Error"]["Code"] == "RequestEntityTooLargeException"
    assert emu.ran() == []


def test_rie_binary_from_environment(monkeypatch, tmp_path: Path) -> None:
    binary = tmp_path / "my-rie"
    binary.write_bytes(b"#!/bin/sh\n")
    monkeypatch.setenv("SHARDLINE_RIE", str(binary))
    assert find_or_fetch_rie(tmp_path / "unused") == binary
    assert os.access(binary, os.X_OK)
    monkeypatch.setenv("SHARDLINE_RIE", str(tmp_path / "missing"))
    with pytest.raises(RieUnavailableError, match="SHARDLINE_RIE"):
        find_or_fetch_rie(tmp_path / "unused")


def test_rie_binary_extracted_from_a_cached_wheel(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SHARDLINE_RIE", raising=False)
    arch = "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"
    with zipfile.ZipFile(tmp_path / "aws_sam_cli-0.0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"samcli/local/rapid/aws-lambda-rie-{arch}", b"fake binary")
    found = find_or_fetch_rie(tmp_path)  # no download: the wheel is there
    assert found == tmp_path / f"aws-lambda-rie-{arch}"
    assert found.read_bytes() == b"fake binary" and os.access(found, os.X_OK)
    assert find_or_fetch_rie(tmp_path) == found  # cached


def test_timeout_must_be_whole_seconds() -> None:
    with pytest.raises(ValueError):
        LambdaEmulator("m.f", timeout_s=1.5)  # type: ignore[arg-type]
