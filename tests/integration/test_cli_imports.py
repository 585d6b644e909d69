"""What each kind of `shardline` command loads, in a fresh interpreter.

`--help` must stay quick: no network library, no coordinator.  The client
commands (`run --coordinator`, `status`, `cancel`) need nothing of the
daemon, so they import no coordinator module; neither does
`shardline.client`.  Each probe really runs the command, against a
loopback port that refuses connections, so the client path is the one
measured.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

#: Run `main(argv)` and report the modules loaded (stdout is the command's).
_PROBE = """
import json, sys
from shardline.cli import main
argv = json.loads(sys.argv[1])
try:
    status = main(argv)
except SystemExit as exc:
    status = exc.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

_DAEMON_MODULES = ("shardline.coordinator", "shardline.daemon", "shardline.embedded")
_NETWORK_LIBRARIES = ("aiohttp", "aioboto3", "aiobotocore", "botocore")


def _loaded(argv: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv)], env=env, capture_output=True, text=True, timeout=60
    )
    *messages, report = result.stderr.strip().splitlines()
    found = json.loads(report)
    return found["status"], found["modules"], "\n".join(messages)


def _of(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The `modules` that are one of `packages` or inside one."""
    return [name for name in modules if any(name == p or name.startswith(f"{p}.") for p in packages)]


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """This environment without shardline's variables; the state directory (a token) in `tmp_path`."""
    state = tmp_path / "state"
    state.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")}
    return {**clean, "SHARDLINE_STATE_DIR": str(state)}


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback URL whose port is held by a socket that never listens: connecting is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["serve", "--help"], ["status", "--help"]])
def test_help_loads_no_network_library_and_no_coordinator(env, argv):
    status, modules, _ = _loaded(argv, env)
    assert status == 0
    assert _of(modules, _NETWORK_LIBRARIES) == []
    assert _of(modules, _DAEMON_MODULES) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "some-job"],
        ["cancel", "some-job"],
        ["output", "some-job"],
        ["run", "/dev/null", "--no-progress"],
    ],
)
def test_client_commands_load_no_coordinator_module(env, refusing_url, argv):
    status, modules, messages = _loaded([*argv, "--coordinator", refusing_url], env)
    assert "cannot reach the coordinator" in messages, messages  # the client really ran
    assert status == 2
    assert _of(modules, _DAEMON_MODULES) == []


def test_client_module_imports_no_coordinator_module(env):
    probe = "import json, sys, shardline.client; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert _of(json.loads(result.stdout), _DAEMON_MODULES) == []


def test_a_local_run_to_stdout_loads_no_network_library_nor_what_it_does_not_use(env, tmp_path):
    # The fixed start of a local run is mostly imports: no HTTP server, no
    # Lambda backend, no output destination, no AWS library for a local file.
    source = tmp_path / "lines.txt"
    source.write_bytes(b"one\ntwo\n")
    status, modules, messages = _loaded(["run", str(source), "-n", "1", "--no-progress", "--", "true"], env)
    assert status == 0, messages
    assert _of(modules, _NETWORK_LIBRARIES) == []
    unused = ("shardline.coordinator._http", "shardline.coordinator._lambda", "shardline.coordinator._outputs")
    assert _of(modules, unused) == []


def test_an_embedded_s3_run_loads_no_async_aws_stack(env, moto, s3, bucket, tmp_path):
    # The coordinator's few calls (stat, table check) use blocking botocore
    # clients in threads; the worker processes, not this one, read the parts.
    data = b"".join(b"line %04d\n" % i for i in range(500))
    s3.put_object(Bucket=bucket, Key="input", Body=data)
    argv = ["run", f"s3://{bucket}/input", "-n", "3", "--exact-shards", "--workers=process", "--no-progress"]
    argv += ["--store=dynamodb", f"--markers-table=imports-{bucket}", f"--output={tmp_path / 'out'}"]
    status, modules, messages = _loaded(argv, {**env, **moto.env()})
    assert status == 0, messages
    assert b"".join(part.read_bytes() for part in sorted((tmp_path / "out").glob("part-*"))) == data
    assert "botocore" in modules
    assert _of(modules, ("aiohttp", "aiobotocore", "aioboto3")) == []
