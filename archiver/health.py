"""The daemon's health, and the HTTP server that shows it: ``/metrics`` (Prometheus) and
``/healthz``.

Healthy means passes keep succeeding: the last successful pass is younger than the threshold
(``max(3 * daemon.poll_interval, 60 s)``), or a pass is running and still making progress (a
first pass over a large backlog can take hours, transferring all along). Before the first pass
has finished, the daemon's start counts as its last success.

A pass that has run far longer than expected is unhealthy however busy it looks (a listing that
never ends keeps "making progress"): longer than ``OVERRUN_FACTOR`` times the longest of the
last successful passes (at least the threshold), or, before any pass has succeeded, longer than
``first_pass_limit``. ``/healthz`` answers 200 while healthy and 503 otherwise; the systemd
watchdog is pinged on the same condition.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from archiver.errors import ConfigError

# A pass running this many times longer than the longest recent successful one is overdue.
OVERRUN_FACTOR = 10.0
# Before any pass has succeeded: a first pass over a large backlog may take hours, not days.
FIRST_PASS_LIMIT = 24 * 3600.0
# How many successful passes "recent" means.
RECENT_PASSES = 20


class Health:
    def __init__(
        self,
        threshold: float,
        clock: Callable[[], float] = time.time,
        *,
        first_pass_limit: float = FIRST_PASS_LIMIT,
    ) -> None:
        self.threshold = threshold
        self.first_pass_limit = first_pass_limit
        self._clock = clock
        self.started_at = clock()
        self.last_success: float | None = None
        self.last_activity = self.started_at
        self.pass_started_at: float | None = None
        self._recent: deque[float] = deque(maxlen=RECENT_PASSES)
        self.pass_running = False
        self.passes = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None

    def pass_started(self) -> None:
        self.pass_running = True
        self.pass_started_at = self._clock()
        self.touch()

    def touch(self) -> None:
        """Work is being done (a page listed, bytes written, a transfer finished)."""
        self.last_activity = self._clock()

    def succeeded(self) -> None:
        if self.pass_running and self.pass_started_at is not None:
            self._recent.append(self._clock() - self.pass_started_at)
        self.pass_running = False
        self.passes += 1
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success = self._clock()

    def failed(self, error: str) -> None:
        self.pass_running = False
        self.passes += 1
        self.consecutive_failures += 1
        self.last_error = error

    def pass_limit(self) -> float:
        """How long a pass may run before it is overdue."""
        if not self._recent:
            return self.first_pass_limit
        return max(self.threshold, OVERRUN_FACTOR * max(self._recent))

    def pass_seconds(self) -> float | None:
        """How long the running pass has run (None: no pass is running)."""
        if not self.pass_running or self.pass_started_at is None:
            return None
        return self._clock() - self.pass_started_at

    def overdue(self) -> bool:
        running = self.pass_seconds()
        return running is not None and running > self.pass_limit()

    def healthy(self) -> bool:
        if self.overdue():
            return False
        now = self._clock()
        reference = self.last_success if self.last_success is not None else self.started_at
        if now - reference < self.threshold:
            return True
        return self.pass_running and now - self.last_activity < self.threshold

    def document(self) -> dict[str, Any]:
        now = self._clock()
        running = self.pass_seconds()
        return {
            "status": "ok" if self.healthy() else "failing",
            "pass_seconds": None if running is None else round(running, 1),
            "pass_limit_seconds": round(self.pass_limit(), 1),
            "pass_overdue": self.overdue(),
            "last_success": _iso(self.last_success),
            "seconds_since_success": (
                None if self.last_success is None else round(now - self.last_success, 1)
            ),
            "threshold_seconds": self.threshold,
            "pass_running": self.pass_running,
            "passes": self.passes,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat()


def metrics_app(health: Health) -> web.Application:
    """``/metrics``: prometheus-client's own handler over the default registry (it negotiates
    OpenMetrics and compression); ``/healthz``: ``health.document()``, 200 or 503."""

    async def healthz(request: web.Request) -> web.Response:
        doc = health.document()
        return web.json_response(doc, status=200 if doc["status"] == "ok" else 503)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler())
    app.router.add_get("/healthz", healthz)
    return app


@asynccontextmanager
async def serve(app: web.Application, host: str, port: int, key: str) -> AsyncIterator[str]:
    """Serve ``app`` on host:port until the block ends; yields its base URL. A port that cannot
    be bound is a configuration error naming ``key``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
