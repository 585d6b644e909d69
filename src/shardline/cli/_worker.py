# The worker's own commands: `shardline worker` (one shard task by hand,
# the way containers run it) and `shardline package-worker` (the AWS Lambda
# deployment zip).  Neither imports the coordinator.

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigurationError

__all__ = ["package_worker_command", "worker_command"]


def worker_command(args: argparse.Namespace) -> int:
    """`shardline worker [--task FILE]`: run one shard task, its exit status ours."""
    from ..worker._main import run_task_file

    if args.task == "-":
        return run_task_file(sys.stdin.buffer, use_uvloop=not args.no_uvloop)
    try:
        with open(args.task, "rb") as f:
            return run_task_file(f, use_uvloop=not args.no_uvloop)
    except OSError as exc:
        raise ConfigurationError(f"cannot read task file {args.task}: {exc.strerror}") from None


def package_worker_command(args: argparse.Namespace) -> int:
    """`shardline package-worker`: write the Lambda deployment zip."""
    from ..packaging import HANDLER, build_worker_zip

    package = build_worker_zip(
        args.output, architecture=args.architecture, python_version=args.python_version, pip_args=args.pip_arg
    )
    print(
        f"wrote {package.path} ({package.files} files, {package.zipped_bytes / 2**20:.1f} MiB zipped, "
        f"{package.unzipped_bytes / 2**20:.1f} MiB unzipped); handler {HANDLER}, runtime python{args.python_version}, "
        f"{args.architecture}",
        file=sys.stderr,
    )
    return 0
