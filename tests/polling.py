"""The one way a test waits for something to happen: `eventually`.

A wait is a hang guard, never a timing check (a noisy 2-core machine):
the bound is generous, nothing is asserted about how long the wait took,
and when the bound passes the test fails naming what never happened.
`eventually_blocking` is the same wait for synchronous tests and threads.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest

#: How long a condition may take to come true before the test fails.
PATIENCE_S = 60.0
#: How often a condition is evaluated.
POLL_INTERVAL_S = 0.02

#: What a condition did not achieve: a sentence, or a function giving one
#: when the wait fails (to show the state it ended in).
What = str | Callable[[], str]


def _failure(what: What, timeout_s: float) -> str:
    return f"never happened within {timeout_s:g} s: {what() if callable(what) else what}"


async def eventually(
    condition: Callable[[], Any],
    what: What,
    *,
    timeout_s: float = PATIENCE_S,
    interval_s: float = POLL_INTERVAL_S,
) -> Any:
    """Evaluate `condition()` (awaiting it if it returns an awaitable) until it
    is truthy, and return that value; fail the test naming `what` once
    `timeout_s` has passed, however long a single evaluation takes."""
    try:
        async with asyncio.timeout(timeout_s) as scope:
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(interval_s)
    except TimeoutError:
        if not scope.expired():
            raise  # the condition's own timeout, not ours
    pytest.fail(_failure(what, timeout_s))


def eventually_blocking(
    condition: Callable[[], Any],
    what: What,
    *,
    timeout_s: float = PATIENCE_S,
    interval_s: float = POLL_INTERVAL_S,
) -> Any:
    """`eventually` for synchronous code: sleeps between evaluations of
    `condition()` and returns its first truthy value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            pytest.fail(_failure(what, timeout_s))
        time.sleep(interval_s)
    return value
