"""What each process of one `shardline run` spends, for `bench/pool_cpu.py`.

A process started with SHARDLINE_BENCH_POOLCPU=DIR and the `sitecustomize`
of `site_dir()` first on PYTHONPATH writes ``DIR/ROLE-PID.json`` as it
exits: its own CPU seconds (user, system; its threads included, its
children not), its main thread's CPU seconds, and its reaped children's.
ROLE is "pool" for ``python -m shardline.worker --pool`` and "cli" for
``python -m shardline run``.  With SHARDLINE_BENCH_POOLCPU_PROFILE set as
well, a pool process runs `cProfile` on its main thread timed by
`time.thread_time` (CPU, not wall: time blocked in epoll or a vfork is not
counted) and writes ``DIR/pool-PID.prof`` too.

A pool process ends by `os._exit` (it skips the interpreter's teardown),
and so does the CLI, so the figures are taken in a wrapper of `os._exit`.  Instrumentation only: nothing in `src/`
changes, and nothing of shardline is imported here.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import _sitehook

ENV = "SHARDLINE_BENCH_POOLCPU"
PROFILE_ENV = "SHARDLINE_BENCH_POOLCPU_PROFILE"


def site_dir(parent: str) -> str:
    """A new directory under `parent` with a `sitecustomize.py` that installs the hook
    when SHARDLINE_BENCH_POOLCPU is set; put it first on the run's PYTHONPATH."""
    return _sitehook.site_dir(parent, prefix="poolcpu-site-", env=ENV, module="_poolcpu", call="install")


def _stdlib_cprofile() -> Any:
    """The standard library's cProfile: bench/profile.py, first on sys.path
    here, would shadow the `profile` module it imports."""
    bench = str(Path(__file__).resolve().parent)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in ("", bench) and Path(p or ".").resolve() != Path(bench)]
    try:
        return importlib.import_module("cProfile")
    finally:
        sys.path[:] = saved


def _role() -> str | None:
    argv = sys.orig_argv
    if "shardline.worker" in argv and "--pool" in argv:
        return "pool"
    if "shardline" in argv and "run" in argv:
        return "cli"
    return None


def install() -> None:
    role = _role()
    if role is None:
        return
    directory = Path(os.environ[ENV])
    profiler: Any = None
    if role == "pool" and os.environ.get(PROFILE_ENV):
        profiler = _stdlib_cprofile().Profile(timer=time.thread_time)
        profiler.enable()
    written = False

    def write() -> None:
        nonlocal written
        if written:
            return
        written = True
        main_thread_s = time.thread_time()  # called from the main thread in both cases
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(directory / f"{role}-{os.getpid()}.prof")
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures = {
            "pid": os.getpid(),
            "role": role,
            "user_s": own.ru_utime,
            "system_s": own.ru_stime,
            "main_thread_s": main_thread_s,
            "children_s": children.ru_utime + children.ru_stime,
            "voluntary_switches": own.ru_nvcsw,
            "involuntary_switches": own.ru_nivcsw,
            "loop_calls": loop_calls,
        }
        (directory / f"{role}-{os.getpid()}.json").write_text(json.dumps(figures))

    # Both end by `os._exit` (they skip the interpreter's teardown); atexit
    # covers an ordinary exit.
    original_exit = os._exit

    def exit_after_writing(status: int) -> None:
        write()
        original_exit(status)

    os._exit = exit_after_writing  # type: ignore[assignment]
    atexit.register(write)
    if profiler is not None:
        _count_loop_calls()


#: Calls of the event loop's methods, counted while profiling (uvloop's are
#: Cython methods, which cProfile does not see).
loop_calls: dict[str, int] = {}


def _count_loop_calls() -> None:
    import uvloop  # the loop the pool process runs (imported a little earlier than it would be)

    for name in ("create_task", "run_in_executor", "call_soon_threadsafe", "call_later", "call_at"):
        original = getattr(uvloop.Loop, name)

        def counted(self: Any, *args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
            loop_calls[__name] = loop_calls.get(__name, 0) + 1
            return __original(self, *args, **kwargs)

        setattr(uvloop.Loop, name, counted)
