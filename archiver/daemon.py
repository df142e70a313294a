"""``archiver run``: the engine with the polling producer (``archiver.producers.Polling``), and
everything a long-running process needs around it: metrics and ``/healthz``, the webhook
receiver, systemd notify and watchdog, signals.

SIGTERM/SIGINT start the graceful shutdown (``archiver.pipeline``) and ``run`` exits 0; SIGHUP
reopens the logs. A listing error fails only that pass (logged, counted in
``archiver_retries_total{what="pass"}``, retried at the next poll); a 401 stops the daemon
(exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime

from archiver import metrics
from archiver.config import Settings
from archiver.expire import daily_sweep, sweep_daily
from archiver.health import Health, metrics_app, serve
from archiver.models import utcnow
from archiver.notify import Notifier
from archiver.pipeline import Engine, Listener
from archiver.producers import HWM_KEY, RESCAN_KEY, PassResult, Polling
from archiver.service import install_stop_signals, make_engine, open_services
from archiver.transfer import Outcome
from archiver.webhook import WebhookReceiver, load_public_key

__all__ = ["HWM_KEY", "RESCAN_KEY", "run_daemon"]

log = logging.getLogger(__name__)


def health_threshold(poll_interval: float) -> float:
    return max(3 * poll_interval, 60.0)


class _Observer(Listener):
    """Passes and transfers → health, metrics and the systemd status line."""

    def __init__(self, health: Health, notifier: Notifier) -> None:
        self._health = health
        self._notifier = notifier
        self.oldest_unarchived: datetime | None = None
        metrics.OLDEST_UNARCHIVED_AGE.set_function(self.lag_seconds)

    def lag_seconds(self) -> float:
        if self.oldest_unarchived is None:
            return 0.0
        return max((utcnow() - self.oldest_unarchived).total_seconds(), 0.0)

    # -- Listener: any work done is a sign of life ------------------------------------------
    def enqueued(self, count: int) -> None:
        self._health.touch()

    def transferred(self, nbytes: int) -> None:
        self._health.touch()

    def finished(self, outcome: Outcome) -> None:
        self._health.touch()

    # -- PassObserver ------------------------------------------------------------------------
    def pass_started(self) -> None:
        self._health.pass_started()

    def pass_finished(self, result: PassResult) -> None:
        self.oldest_unarchived = result.oldest_unarchived
        extra = {"pass_number": result.number, "duration": result.seconds}
        if result.ok:
            self._health.succeeded()
            metrics.LAST_SUCCESS.set(time.time())
            log.info(result.line, extra=extra)
        else:
            self._health.failed(result.error or "stopped")
            metrics.RETRIES.labels(what="pass").inc()
            log.warning(result.line, extra=extra)
        if result.line:
            self._notifier.status(result.line)


async def run_daemon(
    settings: Settings,
    *,
    once: bool = False,
    reopen_logs: Callable[[], None] | None = None,
    notifier: Notifier | None = None,
) -> tuple[Engine, Polling]:
    """Run until SIGTERM/SIGINT (or one pass with ``once``)."""
    daemon_settings = settings.daemon
    notifier = notifier or Notifier()
    # Checked before anything opens: a bad key is a configuration error.
    webhook_key = (
        load_public_key(daemon_settings.webhook_public_key)
        if daemon_settings.webhook_port
        else None
    )
    health = Health(health_threshold(daemon_settings.poll_interval))
    async with AsyncExitStack() as stack:
        stack.callback(_install_reload(reopen_logs))
        services = await stack.enter_async_context(open_services(settings, exclusive=True))
        observer = _Observer(health, notifier)
        engine = make_engine(services, [observer])
        polling = Polling(
            ledger=services.ledger,
            settings=daemon_settings,
            filters=settings.filters,
            instance=services.owner,
            observer=observer,
            once=once,
        )
        if daemon_settings.metrics_port:
            url = await stack.enter_async_context(
                serve(
                    metrics_app(health),
                    daemon_settings.metrics_host,
                    daemon_settings.metrics_port,
                    "daemon.metrics_port",
                )
            )
            log.info("metrics on %s/metrics, health on %s/healthz", url, url)
        if webhook_key is not None:
            receiver = WebhookReceiver(
                engine,
                webhook_key,
                tolerance=daemon_settings.webhook_tolerance,
                sources=settings.sources.enabled(),
            )
            url = await stack.enter_async_context(
                serve(
                    receiver.app(),
                    daemon_settings.webhook_host,
                    daemon_settings.webhook_port,
                    "daemon.webhook_port",
                )
            )
            log.info("webhook receiver on %s/webhook", url)
        stack.callback(install_stop_signals(engine))
        side = [
            asyncio.create_task(_watchdog(notifier, health)),
            asyncio.create_task(_announce_stop(engine, notifier)),
        ]
        days = settings.retention.delete_after_days
        if days is not None and once:
            await daily_sweep(services.ledger, services.storage, days=days)
        elif days is not None:
            side.append(
                asyncio.create_task(
                    sweep_daily(services.ledger, services.storage, days=days, stop=engine.stop)
                )
            )
        stack.push_async_callback(_cancel, side)
        notifier.ready(status="started; first pass running")
        log.info(
            "archiver running: polling every %gs, shutdown grace %gs",
            daemon_settings.poll_interval,
            daemon_settings.shutdown_grace,
        )
        await engine.run(polling)
        if engine.stopped:
            log.info("stopped")
    return engine, polling


async def _watchdog(notifier: Notifier, health: Health) -> None:
    interval = notifier.watchdog_interval
    if interval is None:
        return
    was_healthy = True
    while True:
        healthy = health.healthy()
        if healthy:
            notifier.watchdog()
        elif was_healthy:
            log.error("unhealthy: no pass has succeeded lately; the systemd watchdog is not pinged")
        was_healthy = healthy
        await asyncio.sleep(interval)


async def _announce_stop(engine: Engine, notifier: Notifier) -> None:
    await engine.stop.wait()
    notifier.stopping(status="stopping: finishing in-flight transfers")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _install_reload(reopen_logs: Callable[[], None] | None) -> Callable[[], None]:
    """SIGHUP reopens the log file (after logrotate). Returns an uninstaller."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            if reopen_logs is not None:
                reopen_logs()
        except OSError as exc:
            log.error("SIGHUP: could not reopen the logs: %s", exc)
            return
        log.info("SIGHUP: logs reopened")

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
        return lambda: None

    def uninstall() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return uninstall
