"""Time stamps of one `shardline run`, CLI and worker processes alike, for `bench/cli_start.py`.

A process started with SHARDLINE_BENCH_CLITIMELINE=FILE and the
`sitecustomize` of `site_dir()` first on PYTHONPATH appends one JSON line
`[pid, label, monotonic seconds, the process's CPU seconds]` to FILE per event (CLOCK_MONOTONIC is one
clock for every process on Linux).  Modules are instrumented *after* they
are imported, by a finder that wraps their loader, so the run imports what
it imports when it would have: the timeline moves no import earlier.
Instrumentation only: nothing in `src/` changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import _sitehook

ENV = "SHARDLINE_BENCH_CLITIMELINE"


def stamp(label: str) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as file:
            file.write(f'[{os.getpid()}, "{label}", {time.monotonic():.6f}, {time.process_time():.6f}]\n')


def site_dir(parent: str) -> str:
    """A new directory under `parent` with a `sitecustomize.py` that installs the hooks
    when SHARDLINE_BENCH_CLITIMELINE is set; put it first on the run's PYTHONPATH."""
    return _sitehook.site_dir(parent, prefix="clitimeline-site-", env=ENV, module="_clitimeline", call="install")


def _wrap_async(owner: Any, name: str, label: str, *, once: bool = False) -> None:
    original = getattr(owner, name)
    seen = False

    @functools.wraps(original)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        first = not seen
        seen = True
        if first or not once:
            stamp(f"{label} begin")
        try:
            return await original(*args, **kwargs)
        finally:
            if first or not once:
                stamp(f"{label} end")

    setattr(owner, name, wrapped)


def _wrap_sync(owner: Any, name: str, label: str, *, end: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        stamp(f"{label} begin" if end else label)
        try:
            return original(*args, **kwargs)
        finally:
            if end:
                stamp(f"{label} end")

    setattr(owner, name, wrapped)


def _cli(module: Any) -> None:
    _wrap_sync(module, "_exit_now", "cli exit")


def _run(module: Any) -> None:
    _wrap_sync(module, "run_command", "cli run_command")


def _loop(module: Any) -> None:
    _wrap_sync(module, "run_job_loop", "cli event loop", end=True)


def _embedded(module: Any) -> None:
    _wrap_async(module, "ensure_marker_table", "markers table check")
    _wrap_async(module, "run_job", "run_job")


def _aws(module: Any) -> None:
    original = module.LazyClient.get

    async def get(self: Any) -> Any:
        if self._client is not None:
            return self._client
        stamp(f"{self._service} client begin")
        try:
            return await original(self)
        finally:
            stamp(f"{self._service} client made")

    module.LazyClient.get = get
    _wrap_async(module.ClientPool, "aclose", "client pool close")


def _sources(module: Any) -> None:
    _wrap_async(module.S3Source, "stat", "stat")
    original = module.S3Source.read_into
    first = True

    async def read_into(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal first
        if first:
            first = False
            stamp("first GET begin")
            try:
                return await original(self, *args, **kwargs)
            finally:
                stamp("first GET end")
        return await original(self, *args, **kwargs)

    module.S3Source.read_into = read_into


def _backends(module: Any) -> None:
    _wrap_async(module.LocalProcessBackend, "prestart", "prestart")
    _wrap_async(module._WorkerProcess, "run", "task sent", once=True)
    _wrap_async(module.LocalProcessBackend, "aclose", "worker processes stop")


def _service(module: Any) -> None:
    _wrap_async(module.Coordinator, "submit", "submit")


def _runjob(module: Any) -> None:
    _wrap_sync(module, "copy_piece", "output piece")


def _worker_main(module: Any) -> None:
    _wrap_async(module, "serve_pool", "worker serve_pool")
    _wrap_async(module, "_warm", "worker warm")
    original = module.run_task

    async def run_task(task: Any, **kwargs: Any) -> Any:
        stamp("worker task begin")
        try:
            return await original(task, **kwargs)
        finally:
            stamp("worker task end")

    module.run_task = run_task


#: module name -> what to do once it is imported ("-" names only stamp the import's span).
HOOKS: dict[str, Callable[[Any], None] | None] = {
    "shardline.cli": _cli,
    "shardline.cli._run": _run,
    "shardline.cli._loop": _loop,
    "shardline.embedded": _embedded,
    "shardline.io.aws": _aws,
    "shardline.io.sources": _sources,
    "shardline.coordinator": None,
    "shardline.coordinator._backends": _backends,
    "shardline.coordinator._service": _service,
    "shardline.coordinator._runjob": _runjob,
    "shardline.worker._main": _worker_main,
    "aioboto3": None,
    "aiohttp": None,
    "aiobotocore.session": None,
    "botocore.session": None,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        stamp(f"import {self._name} begin")
        self._inner.exec_module(module)
        stamp(f"import {self._name} end")
        hook = HOOKS[self._name]
        if hook is not None:
            hook(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def install() -> None:
    stamp("python up")
    sys.meta_path.insert(0, _Finder())
