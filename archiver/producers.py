"""What the engine is asked to do: finite backfill passes, or polling windows with a mark.

Both are policy over the lister, the ledger and a clock, driven through ``pipeline.Work``; they
open nothing themselves (``archiver.service`` and ``archiver.daemon`` do the wiring), so they
are tested in-process with a fake clock.

**Backfill** lists everything its filters match, sweeps the ledger for owed rows in the same
scope that the listing did not bring, waits for the queue, and lists again while the last pass
found work (a page shift may have hidden something) or only recordings still processing at the
source are left (after ``backfill.processing_wait``).

**Polling** (``archiver run``): each pass lists a closed window of ``date_ended_at`` days,

    start = high-water mark - daemon.overlap_days        end = today (UTC)

widened to ``today - daemon.rescan_days`` every ``daemon.rescan_interval``. On a ledger without a
mark the first window is the whole history (``daemon.first_start = "all"``) or that many days (at
least ``daemon.rescan_days``: the first pass is also the first wide re-scan).
Every pass also sweeps the ledger for claimable owed rows (an expired lease of a stopped
instance, a pending row no window lists any more), so a dead instance's work is resumed within
its lease plus one poll.

The high-water mark (ledger meta ``daemon.high_water_mark``) means "every recording that ended
before this day is archived, or owed and known to the ledger". It moves only after a pass whose
listing finished without error or suspected shift, and never past the ``ended_at`` day of any
owed recording the ledger holds in the daemon's scope (read from the ledger, so it holds across
instances: a row another instance is transferring, or left behind when it died, holds it too).
Rows that need an operator do not hold it: listing them again cannot archive them, ``archiver
retry`` hands them back, and the sweep takes them from the ledger directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from archiver import metrics
from archiver.config import BackfillSettings, DaemonSettings, FilterSettings
from archiver.errors import ArchiverError, AuthError
from archiver.filters import Filters
from archiver.ledger.base import Ledger, PassRecord
from archiver.lister import PassStats
from archiver.models import utcnow
from archiver.pipeline import Counts, Work
from archiver.progress import human_bytes
from archiver.redact import redact
from archiver.scope import Scope

log = logging.getLogger(__name__)

HWM_KEY = "daemon.high_water_mark"
RESCAN_KEY = "daemon.last_wide_rescan"
# Re-listings in a row when a page shift is suspected, before waiting for the next poll.
MAX_RELISTS = 3


def filters_label(filters: Filters) -> str:
    return filters.label()


class Flush(Protocol):
    """Deletions at the source held back while a pass lists (``purge.SourceDeleter``)."""

    async def flush(self) -> None: ...


# -- backfill -----------------------------------------------------------------------------------
@dataclass(slots=True)
class Backfill:
    """Finite passes over ``filters``; ``seen`` gathers every id they listed (the scope)."""

    filters: Filters
    ledger: Ledger
    settings: BackfillSettings
    instance: str
    deleter: Flush | None = None
    clock: Callable[[], datetime] = utcnow
    passes: int = 0
    seen: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)

    @property
    def scope(self) -> Scope:
        return Scope.of(self.filters)

    async def __call__(self, work: Work) -> None:
        max_passes = 1 + self.settings.max_passes
        scope = self.scope
        for number in range(1, max_passes + 1):
            started = self.clock()
            before = work.counts.snapshot()
            stats = await work.list_pass(self.filters)
            self.seen |= stats.seen
            self.rejected |= stats.rejected_ids
            swept = 0 if work.stop.is_set() else await work.sweep(scope, exclude=stats.seen)
            await work.drain()
            if self.deleter is not None:
                await self.deleter.flush()
            self.passes = number
            done = work.counts.since(before)
            await self._record(number, started, stats, swept, done, ok=not work.stop.is_set())
            if work.stop.is_set() or number == max_passes:
                return
            if stats.enqueued + swept == 0 and not stats.shift_suspected:
                if not stats.processing:
                    return
                # Only recordings still processing at the source are left: give them a moment.
                wait = self.settings.processing_wait
                log.info(
                    "%d recordings still processing; listing again in %.0fs", stats.processing, wait
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(work.stop.wait(), timeout=wait)

    async def _record(
        self,
        number: int,
        started: datetime,
        stats: PassStats,
        swept: int,
        done: Counts,
        *,
        ok: bool,
    ) -> None:
        await self.ledger.record_pass(
            PassRecord(
                started_at=started,
                finished_at=self.clock(),
                ok=ok,
                listed=stats.listed,
                enqueued=stats.enqueued + swept,
                archived=done.archived,
                failed=done.failed,
                window=filters_label(self.filters),
                instance=self.instance,
                extra={
                    "kind": "backfill",
                    "pass": number,
                    "unique": stats.unique,
                    "rejected": stats.rejected,
                    "outside_filters": stats.outside,
                    "processing": stats.processing,
                    "from_ledger": swept,
                    "bytes": done.bytes,
                },
            )
        )
        log.info(
            "pass %d: %d listed (%d unique), %d queued (%d from the ledger), %d archived, "
            "%d failed, %d not claimable, %d processing, %d rejected, %d outside the filters",
            number,
            stats.listed,
            stats.unique,
            stats.enqueued + swept,
            swept,
            done.archived,
            done.failed,
            stats.already_done,
            stats.processing,
            stats.rejected,
            stats.outside,
            extra={"pass_number": number},
        )


# -- polling ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Window:
    start: date | None  # None: the whole history
    end: date
    wide: bool

    def label(self) -> str:
        start = self.start.isoformat() if self.start is not None else "(all)"
        return f"{start}..{self.end.isoformat()}" + (" (wide)" if self.wide else "")


@dataclass(frozen=True, slots=True)
class PassResult:
    ok: bool
    complete: bool
    stats: PassStats | None
    error: str | None = None
    window: Window | None = None
    done: Counts = field(default_factory=Counts)
    high_water_mark: date | None = None
    # From the ledger after the pass: the lag to alert on, and what is still owed.
    oldest_unarchived: datetime | None = None
    owed: int = 0
    number: int = 0
    seconds: float = 0.0
    line: str = ""


class PassObserver(Protocol):
    """Told when a polling pass starts and ends (health, metrics, systemd status)."""

    def pass_started(self) -> None: ...

    def pass_finished(self, result: PassResult) -> None: ...


class Polling:
    """The polling producer of ``archiver run``: passes until stop (or one, with ``once``)."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        settings: DaemonSettings,
        filters: FilterSettings,
        instance: str,
        observer: PassObserver,
        once: bool = False,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._ledger = ledger
        self._daemon = settings
        self._filters = filters
        self._instance = instance
        self._observer = observer
        self._once = once
        self._clock = clock
        self.scope = Scope.of(Filters.standing(filters))
        self.number = 0
        self.last: PassResult | None = None

    async def __call__(self, work: Work) -> None:
        relists = 0
        while True:
            began = time.monotonic()
            result = await self.one_pass(work)
            shifted = result.ok and result.stats is not None and result.stats.shift_suspected
            if shifted and relists < MAX_RELISTS:
                relists += 1
                log.info("a page shift may have hidden recordings: listing again now")
                continue
            relists = 0
            if self._once or work.stop.is_set():
                return
            await asyncio.sleep(max(self._daemon.poll_interval - (time.monotonic() - began), 0))

    async def window(self) -> Window:
        now = self._clock()
        today = now.astimezone(UTC).date()
        hwm = await self._read_date(HWM_KEY)
        start: date | None
        if hwm is None:
            first = self._daemon.first_start
            start = None if first == "all" else today - timedelta(days=int(first))
            log.info(
                "first pass on this ledger: listing %s",
                "the whole history" if start is None else f"recordings that ended since {start}",
            )
        else:
            # A mark ahead of this host's clock (another host's clock ran ahead, or this one
            # was stepped back) still leaves the overlap before today: clamping after the
            # subtraction would list today alone and skip yesterday's late arrivals.
            start = min(hwm, today) - timedelta(days=self._daemon.overlap_days)
        wide = False
        if self._daemon.rescan_days > 0:
            last_at = _parse_datetime(await self._ledger.get_meta(RESCAN_KEY))
            due = last_at is None or (now - last_at).total_seconds() >= self._daemon.rescan_interval
            if due:
                wide = True
                wide_start = today - timedelta(days=self._daemon.rescan_days)
                start = None if start is None else min(start, wide_start)
        return Window(start=start, end=today, wide=wide)

    async def one_pass(self, work: Work) -> PassResult:
        self.number += 1
        started = self._clock()
        began = time.monotonic()
        before = work.counts.snapshot()
        self._observer.pass_started()
        window: Window | None = None
        filters: Filters | None = None
        stats: PassStats | None = None
        error: str | None = None
        swept = 0
        try:
            window = await self.window()
            filters = Filters.standing(
                self._filters, date_ended_at_gte=window.start, date_ended_at_lte=window.end
            )
            stats = await work.list_pass(filters)
        except AuthError:
            raise
        except ArchiverError as exc:
            error = redact(str(exc))
        except Exception as exc:
            log.exception("pass %d: unexpected listing error", self.number)
            error = redact(f"internal error: {type(exc).__name__}: {exc}")
        try:
            if not work.stop.is_set():
                # The ledger's owed rows need no listing: taken even when the listing failed.
                swept = await work.sweep(self.scope, exclude=stats.seen if stats else set())
        except ArchiverError as exc:
            error = error or redact(str(exc))
        # Whatever was queued before an error is still transferred before the pass ends.
        await work.drain()
        ok = error is None and stats is not None and not work.stop.is_set()
        complete = ok and stats is not None and not stats.shift_suspected
        seconds = time.monotonic() - began
        metrics.PASS_SECONDS.observe(seconds)
        result = PassResult(
            ok=ok,
            complete=complete,
            stats=stats,
            error=error,
            window=window,
            done=work.counts.since(before),
        )
        try:
            result = await self._after_pass(result, filters, started, seconds, swept)
        except ArchiverError as exc:
            # The ledger is having a bad moment: this pass is not recorded, the next one is.
            log.error("pass %d: could not record the pass: %s", self.number, redact(str(exc)))
        self._observer.pass_finished(result)
        self.last = result
        return result

    async def _after_pass(
        self,
        result: PassResult,
        filters: Filters | None,
        started: datetime,
        seconds: float,
        swept: int,
    ) -> PassResult:
        window = result.window
        if result.complete and window is not None:
            hwm = await self._advance(window)
        else:
            hwm = await self._read_date(HWM_KEY)
        # Only a complete wide pass counts as the re-scan: a shift may have hidden recordings
        # anywhere in the wide window, so the immediate re-listing must be wide as well.
        if result.complete and window is not None and window.wide:
            await self._ledger.set_meta(RESCAN_KEY, started.isoformat())
        stats = result.stats or PassStats()
        done = result.done
        summary = await self._ledger.summary()
        oldest = summary.oldest_unarchived_ended_at
        lag = 0.0 if oldest is None else max((self._clock() - oldest).total_seconds(), 0.0)
        await self._ledger.record_pass(
            PassRecord(
                started_at=started,
                finished_at=self._clock(),
                ok=result.ok,
                listed=stats.listed,
                enqueued=stats.enqueued + swept,
                archived=done.archived,
                failed=done.failed,
                window=filters_label(filters) if filters is not None else None,
                error=result.error,
                instance=self._instance,
                extra={
                    "kind": "rescan" if window is not None and window.wide else "poll",
                    "pass": self.number,
                    "complete": result.complete,
                    "high_water_mark": hwm.isoformat() if hwm else None,
                    "unique": stats.unique,
                    "processing": stats.processing,
                    "rejected": stats.rejected,
                    "outside_filters": stats.outside,
                    "from_ledger": swept,
                    "bytes": done.bytes,
                },
            )
        )
        label = window.label() if window is not None else "?"
        if result.ok:
            line = (
                f"pass {self.number} ok in {seconds:.1f}s: {stats.listed} listed, "
                f"{done.archived} archived ({human_bytes(done.bytes)}), "
                f"{done.failed} failed, {stats.processing} processing; window {label}; "
                f"{summary.owed} owed, lag {duration(lag)}"
            )
        else:
            line = (
                f"pass {self.number} failed: {result.error or 'stopped'}; "
                f"retrying in {self._daemon.poll_interval:g}s; {summary.owed} owed, "
                f"lag {duration(lag)}"
            )
        return PassResult(
            ok=result.ok,
            complete=result.complete,
            stats=result.stats,
            error=result.error,
            window=window,
            done=done,
            high_water_mark=hwm,
            oldest_unarchived=oldest,
            owed=summary.owed,
            number=self.number,
            seconds=round(seconds, 3),
            line=line,
        )

    async def _advance(self, window: Window) -> date | None:
        """Move the mark to the window's end, held back at the oldest owed recording."""
        # Instances sharing a ledger all list; only one whose view is current moves the mark.
        seen = await self._ledger.get_meta(HWM_KEY)
        current = _parse_date(seen)
        target = window.end
        holding = await self.oldest_owed()
        if holding is not None and holding < target:
            target = holding
        if current is not None and target <= current:
            return current
        if not await self._ledger.advance_meta(HWM_KEY, seen, target.isoformat()):
            return await self._read_date(HWM_KEY)
        if target < window.end:
            log.info("high-water mark held at %s by recordings still owed", target)
        return target

    async def oldest_owed(self) -> date | None:
        """The ``ended_at`` day of the oldest owed recording in scope that will be retried."""
        rows = {row.id: row async for row in self._ledger.iter_owed() if self.scope.match(row)}
        if not rows:
            return None
        waiting = await self._ledger.tally(list(rows))
        days = [
            row.ended_at.astimezone(UTC).date()
            for rid, row in rows.items()
            if rid not in waiting.needs_action and row.ended_at is not None
        ]
        return min(days) if days else None

    async def _read_date(self, key: str) -> date | None:
        value = await self._ledger.get_meta(key)
        parsed = _parse_date(value)
        if value is not None and parsed is None:
            log.warning("ignoring unreadable ledger meta %s=%r", key, value)
        return parsed


def _parse_date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _parse_datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
