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
    """Attempts at ``what`` under ``policy``: a warning before each wait, and at debug level the
    decision not to try again (a permanent error, or the attempts or time used up)."""
    stop = stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_seconds)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return backoff_seconds(policy, state.attempt_number, exc)

    def worth_retrying(exc: BaseException) -> bool:
        transient = is_transient(exc)
        if not transient:
            log.debug("%s: not retried, %s is permanent: %s", what, type(exc).__name__, exc)
        return transient

    def should_stop(state: RetryCallState) -> bool:
        done = stop(state)
        if done:
            log.debug(
                "%s: giving up after %d attempt(s) in %.1fs",
                what,
                state.attempt_number,
                state.seconds_since_start or 0.0,
            )
        return done

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics.RETRIES.labels(what=what).inc()
        log.warning(
            "%s failed (attempt %d/%d), retrying in %.1fs: %s",
            what,
            state.attempt_number,
            policy.attempts,
            state.upcoming_sleep,
            _without_subject(str(exc), what),
        )

    return AsyncRetrying(
        stop=should_stop,
        wait=wait,
        retry=retry_if_exception(worth_retrying),
        before_sleep=before_sleep,
        reraise=True,
    )


def _without_subject(message: str, what: str) -> str:
    """An error that begins with what ``what`` already names ("download ID" and "ID: ...")
    need not name it twice in one line."""
    subject = what.rsplit(" ", 1)[-1]
    return message.removeprefix(f"{subject}: ")


async def call_with_retry(policy: RetryPolicy, what: str, fn: Callable[[], Awaitable[T]]) -> T:
    async for attempt in retrying(policy, what):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")
