"""`shardline package-worker`: the AWS Lambda deployment zip of a worker.

The zip holds shardline's `worker`, `protocol` and `io` packages (the layers
a worker may import; a test checks the imports), and the worker's one
third-party requirements, aiobotocore and crc32c, with their dependencies,
installed by pip for Lambda's platform (manylinux, the chosen architecture
and Python version).  Not included: the coordinator, the CLI, moto, uvloop,
and awslambdaric (Lambda's Python runtime provides it).

The zip is reproducible: entries are sorted and carry a fixed timestamp, so
the same inputs give the same bytes (and CloudFormation sees no change).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError, ShardlineError

__all__ = ["HANDLER", "WorkerPackage", "build_worker_zip", "worker_requirements"]

HANDLER = "shardline.worker.lambda_handler.handler"
#: Third-party distributions the worker imports (the rest of the project's
#: dependencies serve the coordinator and the embedded mode).
_WORKER_DISTRIBUTIONS = ("aiobotocore", "crc32c")
#: Lambda's limit on a function's unzipped code.
LAMBDA_UNZIPPED_LIMIT_BYTES = 250 * 1024 * 1024
_PLATFORMS = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP = re.compile(r"(^|/)(__pycache__|bin)(/|$)|\.pyc$")


@dataclass(frozen=True, slots=True)
class WorkerPackage:
    path: Path
    files: int
    unzipped_bytes: int
    zipped_bytes: int


def worker_requirements() -> list[str]:
    """The worker's requirements with the versions this shardline declares."""
    declared = importlib.metadata.requires("shardline") or []
    found = [r for r in declared if "extra ==" not in r and _name(r) in _WORKER_DISTRIBUTIONS]
    missing = set(_WORKER_DISTRIBUTIONS) - {_name(r) for r in found}
    if missing:
        raise ShardlineError(f"shardline's metadata does not declare {', '.join(sorted(missing))}")
    return found


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    return match.group(0).lower().replace("_", "-") if match else ""


#: What a worker deployment needs of shardline: the layers the worker may
#: import (tests/test_layers.py holds them to that), never the coordinator or the CLI.
WORKER_PACKAGES = ("protocol", "io", "worker")
WORKER_MODULES = ("__init__.py", "errors.py")


def _shardline_modules() -> list[Path]:
    """Files of the shardline modules a worker deployment ships."""
    package_root = Path(__file__).resolve().parent
    files = [package_root / name for name in WORKER_MODULES]
    for package in WORKER_PACKAGES:
        files += (package_root / package).rglob("*.py")  # with subpackages (io/store)
    return sorted(files)


def build_worker_zip(
    output: str | os.PathLike[str],
    *,
    architecture: str = "x86_64",
    python_version: str = "3.11",
    pip_args: list[str] | None = None,
) -> WorkerPackage:
    """Write the deployment zip to `output`; pip fetches the dependencies for
    Lambda's platform (extra `pip_args`, e.g. ``--find-links DIR``)."""
    if architecture not in _PLATFORMS:
        raise ConfigurationError(f"--architecture must be x86_64 or arm64, got {architecture!r}")
    if not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise ConfigurationError(f"--python-version must look like 3.11, got {python_version!r}")
    package_root = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="shardline-package-") as staging_dir:
        staging = Path(staging_dir)
        for source in _shardline_modules():
            target = staging / "shardline" / source.relative_to(package_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(staging),
            "--platform",
            _PLATFORMS[architecture],
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            "--only-binary=:all:",
            *(pip_args or []),
            *worker_requirements(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ShardlineError(
                f"pip could not fetch the worker's dependencies for {architecture}/Python {python_version}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        return _write_zip(staging, Path(output))


def _write_zip(staging: Path, output: Path) -> WorkerPackage:
    entries = sorted(
        p for p in staging.rglob("*") if p.is_file() and not _SKIP.search(p.relative_to(staging).as_posix())
    )
    unzipped = sum(p.stat().st_size for p in entries)
    if unzipped > LAMBDA_UNZIPPED_LIMIT_BYTES:
        raise ShardlineError(
            f"the worker package would be {unzipped / 2**20:.0f} MiB unzipped, over Lambda's 250 MiB limit"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path in entries:
            info = zipfile.ZipInfo(path.relative_to(staging).as_posix(), date_time=_ZIP_TIME)
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    partial.replace(output)
    return WorkerPackage(path=output, files=len(entries), unzipped_bytes=unzipped, zipped_bytes=output.stat().st_size)
