"""Small asyncio helpers shared by the I/O layer, the worker and the coordinator."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["completes_within", "wait_uncancellable"]


async def wait_uncancellable(future: asyncio.Future[Any]) -> None:
    """Await `future` to the end even if we are cancelled meanwhile, then re-raise."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                break
            cancelled = True
    future.result()
    if cancelled:
        raise asyncio.CancelledError


async def completes_within(future: asyncio.Future[Any], timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `future` without cancelling it on timeout; True if it is done."""
    if future.done():
        return True  # the common case (a command's stderr closed as it exited): no timer, no loop turn
    done, _ = await asyncio.wait({future}, timeout=timeout_s)
    return bool(done)
