"""``archiver run``: the backfill engine with a polling producer, kept up for years.

Each pass lists a closed window of ``date_ended_at`` days (the API's filters are whole UTC days):

    start = high-water mark - daemon.overlap_days        end = today (UTC)

widened to ``today - daemon.rescan_days`` every ``daemon.rescan_interval`` seconds, which catches
stragglers and recordings that were still processing when their day was listed. Ids are deduped
by the lister and the ledger, so overlapping windows cost one listing, never a second download.

The high-water mark (HWM, ledger meta ``daemon.high_water_mark``) means "every recording that
ended before this day is archived or failed for good". After a pass it moves forward only if the
whole window succeeded: the listing finished without error, stop was not requested and no page
shift was suspected; and it moves no further than the day of the oldest recording this pass
left retryable (a failure that will be retried, a lease held elsewhere), so the next windows
still list that recording. A partial failure therefore never skips anything: the worst it costs
is listing a few days again. On first start (no HWM) the window starts at
``today - daemon.rescan_days``; older recordings are ``archiver backfill``'s job.

Between passes the daemon sleeps ``daemon.poll_interval`` (measured from the start of a pass); a
suspected page shift re-lists at once. A listing error fails only that pass (logged, counted in
``archiver_retries_total{what="pass"}``, retried at the next poll); a 401 stops the daemon (exit
2). SIGTERM/SIGINT start the graceful shutdown (``archiver.pipeline``); SIGHUP reopens the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from archiver import metrics
from archiver.config import Settings
from archiver.errors import ArchiverError, AuthError
from archiver.health import Health, metrics_app, serve
from archiver.ledger.base import Ledger, PassRecord
from archiver.lister import Lister, PassStats
from archiver.models import State, utcnow
from archiver.notify import Notifier
from archiver.pipeline import Engine, ProgressSink, RunReport
from archiver.progress import human_bytes
from archiver.redact import redact
from archiver.service import (
    Services,
    filters_label,
    install_stop_signals,
    make_engine,
    open_services,
)
from archiver.telnyx import Filters
from archiver.transfer import Outcome, Result
from archiver.webhook import WebhookReceiver, load_public_key

log = logging.getLogger(__name__)

HWM_KEY = "daemon.high_water_mark"
RESCAN_KEY = "daemon.last_wide_rescan"
# Re-listings in a row when a page shift is suspected, before waiting for the next poll.
MAX_RELISTS = 3


def health_threshold(poll_interval: float) -> float:
    return max(3 * poll_interval, 60.0)


@dataclass(frozen=True, slots=True)
class Window:
    start: date
    end: date
    wide: bool

    def label(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}" + (
            " (wide)" if self.wide else ""
        )


@dataclass(frozen=True, slots=True)
class PassResult:
    ok: bool
    complete: bool
    stats: PassStats | None
    error: str | None = None


class PassTracker(ProgressSink):
    """The daemon's progress sink: what this pass's transfers left behind, and a heartbeat for
    ``Health`` whenever work is done."""

    def __init__(self, health: Health) -> None:
        self._health = health
        self.reset()

    def reset(self) -> None:
        self.archived = 0
        self.failed = 0
        self.bytes = 0
        # Ids whose outcome leaves them to be retried: they hold the high-water mark.
        self.unfinished: set[str] = set()

    def enqueued(self, count: int) -> None:
        self._health.touch()

    def transferred(self, nbytes: int) -> None:
        self._health.touch()

    def finished(self, outcome: Outcome) -> None:
        self._health.touch()
        rid = outcome.recording_id
        if outcome.result is Result.ARCHIVED:
            self.archived += 1
            self.bytes += outcome.bytes
            self.unfinished.discard(rid)
        elif outcome.result is Result.FAILED:
            self.failed += 1
            if not outcome.permanent:
                self.unfinished.add(rid)
        elif outcome.result in (Result.SKIPPED, Result.RELEASED):
            # Leased by another instance (or given back): not known to be done.
            self.unfinished.add(rid)


class Daemon:
    """The polling producer for ``Engine.run``."""

    def __init__(
        self,
        services: Services,
        engine: Engine,
        tracker: PassTracker,
        health: Health,
        notifier: Notifier,
        *,
        once: bool = False,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._services = services
        self._ledger: Ledger = services.ledger
        self._settings = services.settings
        self._daemon = services.settings.daemon
        self._engine = engine
        self._tracker = tracker
        self._health = health
        self._notifier = notifier
        self._once = once
        self._clock = clock
        self.number = 0
        self.last: PassResult | None = None
        self.oldest_unarchived: datetime | None = None
        metrics.OLDEST_UNARCHIVED_AGE.set_function(self.lag_seconds)

    def lag_seconds(self) -> float:
        if self.oldest_unarchived is None:
            return 0.0
        return max((self._clock() - self.oldest_unarchived).total_seconds(), 0.0)

    async def produce(self, lister: Lister, drain: Callable[[], Awaitable[None]]) -> None:
        relists = 0
        while True:
            began = time.monotonic()
            result = await self.one_pass(lister, drain)
            shifted = result.ok and result.stats is not None and result.stats.shift_suspected
            if shifted and relists < MAX_RELISTS:
                relists += 1
                log.info("a page shift may have hidden recordings: listing again now")
                continue
            relists = 0
            if self._once:
                return
            await asyncio.sleep(max(self._daemon.poll_interval - (time.monotonic() - began), 0))

    # -- one pass ------------------------------------------------------------------------------

    async def window(self) -> Window:
        now = self._clock()
        today = now.date()
        hwm = await self._read_date(HWM_KEY)
        if hwm is None:
            start = today - timedelta(days=self._daemon.rescan_days)
            log.info(
                "first pass: listing recordings that ended since %s (older ones: archiver "
                "backfill)",
                start,
            )
        else:
            start = min(hwm - timedelta(days=self._daemon.overlap_days), today)
        wide = False
        if self._daemon.rescan_days > 0:
            last = await self._ledger.get_meta(RESCAN_KEY)
            last_at = _parse_datetime(last)
            due = last_at is None or (now - last_at).total_seconds() >= self._daemon.rescan_interval
            wide_start = today - timedelta(days=self._daemon.rescan_days)
            if due:
                wide = True
                start = min(start, wide_start)
        return Window(start=start, end=today, wide=wide)

    async def one_pass(self, lister: Lister, drain: Callable[[], Awaitable[None]]) -> PassResult:
        self.number += 1
        started = self._clock()
        began = time.monotonic()
        self._tracker.reset()
        self._health.pass_started()
        window: Window | None = None
        filters: Filters | None = None
        stats: PassStats | None = None
        error: str | None = None
        try:
            window = await self.window()
            filters = Filters.standing(
                self._settings.filters,
                date_ended_at_gte=window.start,
                date_ended_at_lte=window.end,
            )
            stats = await lister.list_pass(filters)
        except AuthError:
            raise
        except ArchiverError as exc:
            error = redact(str(exc))
        except Exception as exc:
            log.exception("pass %d: unexpected listing error", self.number)
            error = redact(f"internal error: {type(exc).__name__}: {exc}")
        # Whatever was queued before an error is still transferred before the pass ends.
        await drain()
        ok = error is None and stats is not None and not self._engine.stop.is_set()
        complete = ok and stats is not None and not stats.shift_suspected
        result = PassResult(ok=ok, complete=complete, stats=stats, error=error)
        seconds = time.monotonic() - began
        metrics.PASS_SECONDS.observe(seconds)
        if result.ok:
            self._health.succeeded()
            metrics.LAST_SUCCESS.set(time.time())
        else:
            self._health.failed(result.error or "stopped")
            metrics.RETRIES.labels(what="pass").inc()
        try:
            await self._after_pass(window, filters, result, started, seconds)
        except ArchiverError as exc:
            # The ledger is having a bad moment: this pass is not recorded, the next one is.
            log.error("pass %d: could not record the pass: %s", self.number, redact(str(exc)))
        self.last = result
        return result

    async def _after_pass(
        self,
        window: Window | None,
        filters: Filters | None,
        result: PassResult,
        started: datetime,
        seconds: float,
    ) -> None:
        if result.complete and window is not None:
            hwm = await self._advance(window)
        else:
            hwm = await self._read_date(HWM_KEY)
        if result.ok and window is not None and window.wide:
            await self._ledger.set_meta(RESCAN_KEY, started.isoformat())
        summary = await self._ledger.summary()
        self.oldest_unarchived = summary.oldest_unarchived_ended_at
        stats = result.stats or PassStats()
        tracker = self._tracker
        label = window.label() if window is not None else "?"
        await self._ledger.record_pass(
            PassRecord(
                started_at=started,
                finished_at=self._clock(),
                ok=result.ok,
                listed=stats.listed,
                enqueued=stats.enqueued,
                archived=tracker.archived,
                failed=tracker.failed,
                window=filters_label(filters) if filters is not None else None,
                error=result.error,
                instance=self._services.owner,
                extra={
                    "kind": "rescan" if window is not None and window.wide else "poll",
                    "pass": self.number,
                    "complete": result.complete,
                    "high_water_mark": hwm.isoformat() if hwm else None,
                    "processing": stats.processing,
                    "rejected": stats.rejected,
                    "retryable": len(tracker.unfinished),
                },
            )
        )
        lag = self.lag_seconds()
        if result.ok:
            line = (
                f"pass {self.number} ok in {seconds:.1f}s: {stats.listed} listed, "
                f"{tracker.archived} archived ({human_bytes(tracker.bytes)}), "
                f"{tracker.failed} failed, {stats.processing} processing; "
                f"window {label}; lag {_duration(lag)}"
            )
            log.info(line, extra={"pass_number": self.number, "duration": round(seconds, 3)})
        else:
            line = (
                f"pass {self.number} failed: {result.error or 'stopped'}; "
                f"retrying in {self._daemon.poll_interval:g}s; lag {_duration(lag)}"
            )
            log.warning(line, extra={"pass_number": self.number})
        self._notifier.status(line)

    async def _advance(self, window: Window) -> date | None:
        """Move the HWM to the window's end, held back at the oldest recording left to retry."""
        # Instances sharing a ledger all list; only one whose view is current moves the mark.
        seen = await self._ledger.get_meta(HWM_KEY)
        current = await self._read_date(HWM_KEY)
        target: date | None = window.end
        max_attempts = self._settings.workers.max_attempts
        for rid in sorted(self._tracker.unfinished):
            row = await self._ledger.get(rid)
            if row is None or row.state is State.ARCHIVED:
                continue
            if row.state is State.FAILED and row.attempts >= max_attempts:
                continue  # failed for good: reported, never retried
            if row.ended_at is None:
                target = None  # cannot place it in a day: keep the mark where it is
                break
            assert target is not None
            target = min(target, row.ended_at.date())
        if target is None:
            return current
        if current is not None and target <= current:
            return current
        if not await self._ledger.advance_meta(HWM_KEY, seen, target.isoformat()):
            return await self._read_date(HWM_KEY)
        if target < window.end:
            log.info("high-water mark held at %s by recordings left to retry", target)
        return target

    async def _read_date(self, key: str) -> date | None:
        value = await self._ledger.get_meta(key)
        if value is None:
            return None
        try:
            return date.fromisoformat(value)
        except ValueError:
            log.warning("ignoring unreadable ledger meta %s=%r", key, value)
            return None


def _parse_datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# -- the process ------------------------------------------------------------------------------


async def run_daemon(
    settings: Settings,
    *,
    once: bool = False,
    reopen_logs: Callable[[], None] | None = None,
    notifier: Notifier | None = None,
) -> tuple[RunReport, Daemon]:
    """Run until SIGTERM/SIGINT (or one pass with ``once``); returns the engine's report."""
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
        tracker = PassTracker(health)
        engine = make_engine(services, tracker)
        daemon = Daemon(services, engine, tracker, health, notifier, once=once)
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
                engine, webhook_key, tolerance=daemon_settings.webhook_tolerance
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
        stack.push_async_callback(_cancel, side)
        notifier.ready(status="started; first pass running")
        log.info(
            "archiver running: polling every %gs, shutdown grace %gs",
            daemon_settings.poll_interval,
            daemon_settings.shutdown_grace,
        )
        report = await engine.run(daemon.produce)
        if report.stopped:
            log.info("stopped")
    return report, daemon


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
