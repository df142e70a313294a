"""Retention that ends: an archived copy is deleted once ``retention.delete_after_days`` have
passed since its recording ended, and its ledger row becomes ``expired`` (never fetched again).

What keeps a copy, whatever its age: a legal hold (``archiver hold``: the ledger's flag, and on
an Object Lock bucket the object's own hold), Object Lock retention that has not run out (the
row's ``retain_until``, then every stored version checked by the storage before anything is
deleted), and an unknown end (a row without ``ended_at`` is never due). A copy is deleted whole
(media, sidecar, every version on S3) or not at all; the ledger records the expiry, with what was
deleted, only after the storage did. A sweep that stops midway leaves rows archived whose copy
is partly gone: the next sweep finds them due again and finishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from archiver import layout
from archiver.errors import ArchiverError
from archiver.ledger.base import Ledger
from archiver.models import LedgerRow, State, utcnow
from archiver.redact import redact
from archiver.storage.base import StorageBackend

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ExpiryReport:
    days: int
    # Archived rows whose recording ended more than ``days`` ago.
    due: int = 0
    expired: list[str] = field(default_factory=list)
    would_expire: list[str] = field(default_factory=list)
    # Due, and kept: id → why (a legal hold, Object Lock retention).
    kept: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        done = (
            f"{len(self.would_expire)} would be deleted"
            if self.would_expire and not self.expired
            else f"{len(self.expired)} deleted ({self.bytes} bytes)"
        )
        return (
            f"{self.due} archived copies past retention.delete_after_days = {self.days}: "
            f"{done}, {len(self.kept)} kept (held or locked), {len(self.failed)} failed"
        )


def keys_of(row: LedgerRow) -> list[str]:
    """Every key a row's copies are stored at: the copy, copies kept in quarantine, and each
    one's sidecar."""
    keys: list[str] = []
    copies = row.quarantined.get("copies", [])
    for key in [row.storage_key, *(c.get("key") for c in copies if isinstance(c, Mapping))]:
        if isinstance(key, str) and key and key not in keys:
            keys += [key, layout.sidecar_key(key)]
    return keys


def retention_end(days: int, now: datetime) -> datetime:
    """Copies of recordings that ended before this are past ``delete_after_days = days``."""
    return now - timedelta(days=days)


def retention_ended(row: LedgerRow, days: int | None, now: datetime) -> bool:
    """The row's copy is past its retention (never when unset or its end is unknown)."""
    return days is not None and row.ended_at is not None and row.ended_at < retention_end(days, now)


def kept_because(row: LedgerRow, now: datetime) -> str | None:
    """Why a due copy stays, as far as the ledger tells: a hold, retention not yet run out."""
    if row.legal_hold:
        return "under a legal hold"
    if row.retain_until is not None and row.retain_until > now:
        return f"under Object Lock retention until {row.retain_until:%Y-%m-%d %H:%M} UTC"
    return None


class Expirer:
    def __init__(
        self,
        ledger: Ledger,
        storage: StorageBackend,
        *,
        days: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._ledger = ledger
        self._storage = storage
        self._days = days
        self._clock = clock

    async def sweep(self, *, dry_run: bool = False) -> ExpiryReport:
        report = ExpiryReport(days=self._days)
        now = self._clock()
        # ``retention_ended``, as the ledger's bound (exclusive; a row with no known end is
        # never within it).
        async for row in self._ledger.iter_archived(until=retention_end(self._days, now)):
            report.due += 1
            why = kept_because(row, now)
            if why is not None:
                report.kept[row.id] = why
            elif dry_run:
                report.would_expire.append(row.id)
            else:
                await self._expire(row, now, report)
        return report

    async def _expire(self, listed: LedgerRow, now: datetime, report: ExpiryReport) -> None:
        # Read again: a hold placed since the page was read must stop the deletion.
        row = await self._ledger.get(listed.id)
        if row is None or row.state is not State.ARCHIVED:
            return
        why = kept_because(row, now)
        if why is not None:
            report.kept[row.id] = why
            return
        try:
            removal = await self._storage.remove_copy(keys_of(row), now)
        except ArchiverError as exc:
            report.failed[row.id] = redact(str(exc))
            log.warning(
                "could not delete the expired copy of %s: %s", row.id, report.failed[row.id]
            )
            return
        if removal.refused is not None:
            report.kept[row.id] = removal.refused
            return
        rule = f"retention.delete_after_days = {self._days}"
        if not await self._ledger.expire(row.id, rule=rule, removed=removal.removed):
            return  # another sweep recorded it first
        report.expired.append(row.id)
        report.bytes += row.size or 0
        log.info(
            "expired %s: its copy is deleted (%d object versions)",
            row.id,
            len(removal.removed),
            extra={"recording_id": row.id},
        )


LAST_SWEEP = "retention.last_expiry"
SWEEP_EVERY = timedelta(days=1)


async def daily_sweep(
    ledger: Ledger,
    storage: StorageBackend,
    *,
    days: int,
    clock: Callable[[], datetime] = utcnow,
) -> ExpiryReport | None:
    """The daemon's expiry pass, once a day across every instance on the ledger: the one that
    moves ``retention.last_expiry`` on sweeps; None when no sweep was due here."""
    now = clock()
    last = await ledger.get_meta(LAST_SWEEP)
    if last is not None and datetime.fromisoformat(last) + SWEEP_EVERY > now:
        return None
    if not await ledger.advance_meta(LAST_SWEEP, last, now.isoformat()):
        return None  # another instance took today's
    report = await Expirer(ledger, storage, days=days, clock=clock).sweep()
    log.info("expiry pass: %s", report.line())
    return report


async def sweep_daily(
    ledger: Ledger, storage: StorageBackend, *, days: int, stop: asyncio.Event
) -> None:
    """``daily_sweep`` every hour until ``stop``: a day's sweep runs within the hour it is due."""
    while not stop.is_set():
        try:
            await daily_sweep(ledger, storage, days=days)
        except ArchiverError as exc:
            log.error("expiry pass failed (tried again within the hour): %s", redact(str(exc)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=3600)
