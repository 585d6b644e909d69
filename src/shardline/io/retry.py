"""The one retry loop: bounded attempts, capped exponential backoff, full jitter.

Only RetryableStorageError is retried; operations translate their library
errors first (`shardline.io.aws.translate_error`), so what is retryable is
decided in exactly one place.  Operations that must resume (ranged GETs) keep
their own position in a closure and are simply called again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import RetryableStorageError

__all__ = ["RetryPolicy", "retry"]

log = logging.getLogger("shardline.io.retry")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int = 8
    base_delay_s: float = 0.05
    max_delay_s: float = 5.0

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff after `failures` consecutive failures (>= 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (failures - 1)))
        return (rng or random).uniform(0, ceiling)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    describe: str,
    on_retry: Callable[[RetryableStorageError], None] | None = None,
) -> T:
    """Await `operation()` until it succeeds or fails for good.

    Raises the last RetryableStorageError (with the attempt count in its
    message) once `policy.attempts` are used up; any other exception passes
    through at once.
    """
    failures = 0
    while True:
        try:
            return await operation()
        except RetryableStorageError as exc:
            failures += 1
            if failures >= policy.attempts:
                raise RetryableStorageError(f"{exc} (gave up after {failures} attempts)") from exc
            delay = policy.delay_s(failures)
            log.info("%s: %s; retry %d/%d in %.2fs", describe, exc, failures, policy.attempts - 1, delay)
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
