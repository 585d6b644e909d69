"""The one retry loop: bounded attempts (and optionally a total time), capped
exponential backoff with full jitter.

Operations translate their library errors first (`shardline.io.aws.translate_error`
for storage; the exchange client for its own), so what is retryable is decided
in one place per kind: by default only RetryableStorageError is retried.
Operations that must resume (ranged GETs) keep their own position in a closure
and are simply called again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import RetryableStorageError, ShardlineError

__all__ = ["RetryPolicy", "retry"]

log = logging.getLogger("shardline.io.retry")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to try: `attempts` tries at most, and no
    new try once `total_s` (if set) has passed since the first."""

    attempts: int = 8
    base_delay_s: float = 0.05
    max_delay_s: float = 5.0
    total_s: float | None = None

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff after `failures` consecutive failures (>= 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (failures - 1)))
        return (rng or random).uniform(0, ceiling)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    describe: str,
    retryable: tuple[type[ShardlineError], ...] = (RetryableStorageError,),
    on_retry: Callable[[ShardlineError], None] | None = None,
) -> T:
    """Await `operation()` until it succeeds or fails for good.

    An error of a `retryable` class is tried again after a backoff; once the
    policy's attempts (or total time) are used up, the last one is raised again
    with the count in its message.  Any other exception passes through at once.
    """
    loop = asyncio.get_running_loop()
    give_up_at = None if policy.total_s is None else loop.time() + policy.total_s
    failures = 0
    while True:
        try:
            return await operation()
        except retryable as exc:
            failures += 1
            delay = policy.delay_s(failures)
            out_of_time = give_up_at is not None and loop.time() + delay >= give_up_at
            if failures >= policy.attempts or out_of_time:
                raise _gave_up(exc, failures) from exc
            log.info("%s: %s; retry %d/%d in %.2fs", describe, exc, failures, policy.attempts - 1, delay)
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)


def _gave_up(exc: ShardlineError, failures: int) -> ShardlineError:
    """`exc` again, of the same class, saying how often it was tried."""
    message = f"{exc} (gave up after {failures} attempts)"
    try:
        return type(exc)(message)
    except TypeError:  # an error class with a richer constructor: keep it as it is
        return exc
