# Running a command's coroutine: on uvloop when it is installed (unless
# --no-uvloop), and, for commands that run a job, with SIGTERM turned into
# cancellation so the job's workers are stopped on the way out (exit 143).

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["cancel_on_sigterm", "run_job_loop", "run_loop"]


def run_loop(coroutine_factory: Callable[[], Coroutine[Any, Any, int]], *, use_uvloop: bool) -> int:
    """Run the coroutine `coroutine_factory` makes and return its exit status."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine_factory())
    return asyncio.run(coroutine_factory())


def run_job_loop(coroutine_factory: Callable[[], Coroutine[Any, Any, int]], *, use_uvloop: bool) -> int:
    """`run_loop` for a coroutine that runs a job and calls `cancel_on_sigterm`:
    a cancelled job (SIGTERM) exits 143."""
    try:
        return run_loop(coroutine_factory, use_uvloop=use_uvloop)
    except asyncio.CancelledError:
        print("shardline: terminated; job cancelled and its workers stopped", file=sys.stderr)
        return 143


def cancel_on_sigterm() -> None:
    """Turn SIGTERM into cancellation of the running job, so every worker
    process is stopped on the way out instead of being orphaned."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
