"""The one retry policy: tenacity, driven by the error's kind.

Only ``TransientError`` is retried; which answers are transient is decided once, where they are
read (for the API: ``telnyx.raise_for_api_status``: 408, 409, 429, 5xx, and ``x-should-retry``
obeyed both ways). A server's wait hint (``retry-after-ms``, ``Retry-After`` in seconds or as an
HTTP date, ``x-ratelimit-reset``) is honoured, capped at ``max_backoff``; otherwise exponential
backoff with full jitter. Attempts and total time are both capped.

Adapters never loop on their own: they raise, and one wrapper per call path decides, so attempts
never multiply (as restic's ``backend/retry``). The API: ``telnyx.TelnyxClient`` around the
single-attempt ``TelnyxApi`` (``telnyx.max_attempts``). A transfer: its own loop in
``archiver.transfer`` (``workers.transfer_attempts``), each attempt one retrieve at most and one
download. The ledger: ``archiver.ledger.retrying`` around a PostgreSQL ledger.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from archiver import metrics
from archiver.errors import TransientError, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 8
    total_seconds: float = 300.0
    initial_backoff: float = 0.5
    max_backoff: float = 60.0


def backoff_seconds(policy: RetryPolicy, attempt: int, exc: BaseException | None) -> float:
    """How long to wait before attempt ``attempt + 1``."""
    hint = exc.retry_after if isinstance(exc, TransientError) else None
    if hint is not None:
        # The server said when; a little jitter keeps many workers from returning in lockstep.
        return min(
            max(hint, 0.0) + random.uniform(0, policy.initial_backoff / 2), policy.max_backoff
        )
    ceiling = min(policy.initial_backoff * 2 ** (attempt - 1), policy.max_backoff)
    return random.uniform(ceiling / 2, ceiling)


def retrying(policy: RetryPolicy, what: str) -> AsyncRetrying:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return backoff_seconds(policy, state.attempt_number, exc)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics.RETRIES.labels(what=what).inc()
        log.warning(
            "%s failed (attempt %d/%d), retrying in %.1fs: %s",
            what,
            state.attempt_number,
            policy.attempts,
            state.upcoming_sleep,
            exc,
        )

    return AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_seconds),
        wait=wait,
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


async def call_with_retry(policy: RetryPolicy, what: str, fn: Callable[[], Awaitable[T]]) -> T:
    async for attempt in retrying(policy, what):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")
