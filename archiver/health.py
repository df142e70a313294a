"""The daemon's health, and the HTTP server that shows it: ``/metrics`` (Prometheus) and
``/healthz``.

Healthy means passes keep succeeding: the last successful pass is younger than the threshold
(``max(3 * daemon.poll_interval, 60 s)``), or a pass is running and still making progress (a
first pass over a large backlog can take hours, transferring all along). Before the first pass
has finished, the daemon's start counts as its last success. ``/healthz`` answers 200 while
healthy and 503 otherwise; the systemd watchdog is pinged on the same condition.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from archiver.errors import ConfigError


class Health:
    def __init__(self, threshold: float, clock: Callable[[], float] = time.time) -> None:
        self.threshold = threshold
        self._clock = clock
        self.started_at = clock()
        self.last_success: float | None = None
        self.last_activity = self.started_at
        self.pass_running = False
        self.passes = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None

    def pass_started(self) -> None:
        self.pass_running = True
        self.touch()

    def touch(self) -> None:
        """Work is being done (a page listed, bytes written, a transfer finished)."""
        self.last_activity = self._clock()

    def succeeded(self) -> None:
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

    def healthy(self) -> bool:
        now = self._clock()
        reference = self.last_success if self.last_success is not None else self.started_at
        if now - reference < self.threshold:
            return True
        return self.pass_running and now - self.last_activity < self.threshold

    def document(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "status": "ok" if self.healthy() else "failing",
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
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        doc = health.document()
        return web.json_response(doc, status=200 if doc["status"] == "ok" else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
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
