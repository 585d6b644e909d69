"""`shardline package-worker`: the Lambda zip holds the worker and only what
it needs, and the handler imports from it alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shardline.errors import ConfigurationError
from shardline.packaging import build_worker_zip

SHARDLINE = str(Path(sys.executable).with_name("shardline"))


def _names(package: Path) -> set[str]:
    with zipfile.ZipFile(package) as archive:
        return set(archive.namelist())


def test_zip_holds_the_worker_and_its_dependencies(worker_package):
    names = _names(worker_package)
    for required in (
        "shardline/__init__.py",
        "shardline/worker/lambda_handler.py",
        "shardline/worker/_shard.py",
        "shardline/protocol/_frames.py",
        "shardline/io/s3bucket.py",
        "aiobotocore/__init__.py",
        "botocore/__init__.py",
    ):
        assert required in names, required
    tops = {name.split("/")[0] for name in names}
    # Not the coordinator side, the embedded endpoint, or what Lambda provides.
    for excluded in ("moto", "uvloop", "awslambdaric", "flask", "werkzeug", "pytest"):
        assert excluded not in tops, excluded
    for excluded in ("shardline/coordinator/", "shardline/cli/", "shardline/daemon.py", "shardline/embedded.py"):
        assert not any(name.startswith(excluded) for name in names), excluded
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_handler_imports_from_the_package_alone(worker_package_dir):
    """No site-packages (-S), no environment (-E): only the unzipped package."""
    probe = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(worker_package_dir)!r})\n"
        "import shardline.worker.lambda_handler as h\n"
        "print(json.dumps({'handler': h.handler.__module__, 'file': h.__file__,"
        " 'modules': sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('shardline', 'moto', 'uvloop', 'boto3'))}))"
    )
    result = subprocess.run([sys.executable, "-S", "-E", "-c", probe], capture_output=True, text=True, check=True)
    found = json.loads(result.stdout)
    assert found["file"].startswith(str(worker_package_dir))
    assert not any(m.startswith(("shardline.coordinator", "moto", "uvloop", "boto3")) for m in found["modules"])


def test_cli_writes_the_zip(tmp_path):
    target = tmp_path / "out" / "worker.zip"
    result = subprocess.run(
        [SHARDLINE, "package-worker", "-o", str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "handler shardline.worker.lambda_handler.handler" in result.stderr
    assert "shardline/worker/lambda_handler.py" in _names(target)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="architecture"):
        build_worker_zip(tmp_path / "w.zip", architecture="sparc")
    with pytest.raises(ConfigurationError, match="python-version"):
        build_worker_zip(tmp_path / "w.zip", python_version="eleven")
