"""docker/: the coordinator and worker images, built and run on a real Docker engine.

Skipped, with the reason, when no engine answers `docker info` (DOCKER_HOST
is honoured) or when the base image is not on that engine: nothing is
pulled.  SHARDLINE_DOCKER_BASE_IMAGE names the base (default
python:3.11-slim); `docker/local-engine.sh start` provides both an engine
and a base made from Debian packages.  The worker image is built on
SHARDLINE_DOCKER_LAMBDA_BASE_IMAGE, else on the AWS Lambda base if the
engine has it, else on the same Python base.

Images are built with `--network host` (pip needs the package index) and
run with `--network none`: the coordinator's HTTP port, exchange and
embedded DynamoDB endpoint all stay inside the container, so nothing binds
a host port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from polling import eventually_blocking

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("SHARDLINE_DOCKER_BASE_IMAGE", "python:3.11-slim")
AWS_LAMBDA_BASE_IMAGE = "public.ecr.aws/lambda/python:3.11"

BUILD_TIMEOUT_S = 900
HEALTHY_TIMEOUT_S = 120
# The first test to use an image builds it (its fixture's setup counts).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + HEALTHY_TIMEOUT_S + 300)]
TAG = f"pytest-{os.getpid()}"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def _unavailable(reason: str) -> NoReturn:
    """Skip, saying why; fail instead where an engine was promised (CI sets
    SHARDLINE_REQUIRE_DOCKER=1 after starting one), so a broken engine is
    never a silent skip there."""
    if os.environ.get("SHARDLINE_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SHARDLINE_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def _has_image(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None:
        _unavailable("no docker client on PATH")
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        _unavailable("no Docker engine reachable: `docker info` timed out")
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        _unavailable(f"no Docker engine reachable: `docker info` failed: {lines[-1] if lines else info.returncode}")
    if not _has_image(BASE_IMAGE):
        _unavailable(
            f"base image {BASE_IMAGE} is not on the engine (nothing is pulled here): `docker pull {BASE_IMAGE}`, "
            'or eval "$(docker/local-engine.sh start)" and set SHARDLINE_DOCKER_BASE_IMAGE'
        )


def _build(dockerfile: str, tag: str, base: str) -> Iterator[str]:
    started = time.monotonic()
    docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-f",
        f"docker/{dockerfile}",
        "-t",
        tag,
        ".",
        timeout=BUILD_TIMEOUT_S,
    )
    print(f"built {tag} from {dockerfile} on {base} in {time.monotonic() - started:.0f}s")
    try:
        yield tag
    finally:
        docker("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def coordinator_image(engine: None) -> Iterator[str]:
    yield from _build("Dockerfile.coordinator", f"shardline-coordinator:{TAG}", BASE_IMAGE)


@pytest.fixture(scope="module")
def worker_image(engine: None) -> Iterator[str]:
    base = os.environ.get("SHARDLINE_DOCKER_LAMBDA_BASE_IMAGE") or (
        AWS_LAMBDA_BASE_IMAGE if _has_image(AWS_LAMBDA_BASE_IMAGE) else BASE_IMAGE
    )
    yield from _build("Dockerfile.worker", f"shardline-worker:{TAG}", base)


def _wait_healthy(container: str) -> None:
    def state() -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)

    def described(state: dict) -> str:
        logs = docker("logs", "--tail", "30", container, check=False)
        status = state.get("Health", {}).get("Status")
        return f"container is {status} (running: {state['Running']}):\n{logs.stdout}{logs.stderr}"

    def healthy() -> bool:
        now = state()
        if not now["Running"]:
            raise AssertionError(described(now))
        return now.get("Health", {}).get("Status") == "healthy"

    eventually_blocking(healthy, lambda: f"healthy: {described(state())}", timeout_s=HEALTHY_TIMEOUT_S, interval_s=1)


# The job inside the container: a file of uneven lines, then the daemon runs
# it identity (output must equal the file) and with `wc -l` per shard.
_JOB_SCRIPT = r"""
set -e
cd "$HOME"
python - <<'EOF'
import random
random.seed(4)
with open("in.txt", "w") as f:
    for i in range(50_000):
        f.write("line %d %s\n" % (i, "x" * random.randint(0, 400)))
EOF
export SHARDLINE_COORDINATOR=http://127.0.0.1:8080
if shardline status > /dev/null 2>&1; then echo "the API answered without its token"; exit 1; fi
shardline run --token-file /run/secrets/shardline-token in.txt -n 4 > out.txt
cmp in.txt out.txt
echo "lines $(wc -l < in.txt)"
shardline run --token-file /run/secrets/shardline-token in.txt -n 4 -- wc -l
"""


def test_coordinator_help(coordinator_image: str) -> None:
    result = docker("run", "--rm", "--network", "none", coordinator_image, "--help")
    assert "--exchange-port" in result.stdout


def test_coordinator_without_a_token_refuses_to_start(coordinator_image: str) -> None:
    result = docker("run", "--rm", "--network", "none", coordinator_image, check=False)
    assert result.returncode == 2
    assert "token file /run/secrets/shardline-token does not exist" in result.stderr


def test_coordinator_serves_jobs_healthy_and_stops_cleanly(coordinator_image: str, tmp_path: Path) -> None:
    name = f"shardline-coordinator-{TAG}"
    # A mounted secret, as an orchestrator provides it: readable by the image's user.
    token = tmp_path / "shardline-token"
    token.write_text("docker-test-token\n")
    token.chmod(0o644)
    secret = f"{token}:/run/secrets/shardline-token:ro"
    docker("run", "--detach", "--network", "none", "--volume", secret, "--name", name, coordinator_image)
    try:
        _wait_healthy(name)
        assert docker("exec", name, "id", "-u").stdout.strip() != "0", "the coordinator must not run as root"
        health = docker(
            "exec",
            name,
            "python",
            "-c",
            "import urllib.request as r; print(r.urlopen('http://127.0.0.1:8080/healthz').read().decode())",
        )
        assert json.loads(health.stdout) == {"status": "ok"}

        job = docker("exec", name, "sh", "-c", _JOB_SCRIPT, timeout=300)
        lines = job.stdout.split()
        assert lines[0] == "lines"
        total, per_shard = int(lines[1]), [int(n) for n in lines[2:]]
        assert total == 50_000 and len(per_shard) == 4 and sum(per_shard) == total, job.stdout

        docker("stop", "--time", "40", name, timeout=60)
        exit_code = docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = docker("logs", name, check=False)
        assert exit_code == "0", f"SIGTERM should drain and exit 0:\n{logs.stdout}{logs.stderr}"
    finally:
        docker("rm", "--force", name, check=False)


_HANDLER_CHECK = r"""
import importlib.util, json
import aiobotocore
from shardline.worker import lambda_handler

assert importlib.util.find_spec("moto") is None, "moto must not be in the worker image"

class Context:
    def get_remaining_time_in_millis(self):
        return 60_000

result = lambda_handler.handler({"version": 999}, Context())
print(json.dumps(result))
"""


def test_worker_image_has_the_handler_and_only_worker_dependencies(worker_image: str) -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", worker_image).stdout)
    assert config["Cmd"] == ["shardline.worker.lambda_handler.handler"]
    env = dict(item.split("=", 1) for item in config["Env"])
    task_root = env.get("LAMBDA_TASK_ROOT", "/var/task")
    result = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        "--env",
        f"PYTHONPATH={task_root}",
        worker_image,
        "-c",
        _HANDLER_CHECK,
    )
    # A malformed event is answered, not raised: Lambda must not retry it.
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False and answer["retryable"] is False, answer
