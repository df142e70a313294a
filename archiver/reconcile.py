"""Reconcile: the source and the archive side by side for a range of end dates.

Lists the source with the config's standing filters and ``date_ended_at`` bounds, reads the
ledger's archived rows for the same days (by ended_at), and sorts every difference into:

- missing: at Telnyx, not archived (still-processing recordings are counted apart: not yet due);
- gone: archived, but Telnyx no longer has it. A row absent from the listing is confirmed with a
  retrieve first, since a listing can miss an entry when pages shift under new recordings;
- deleted by us: archived and deleted at the source by archiver (expected, listed apart);
- size mismatches: Telnyx's ``size_mb`` is approximate (rounded, and perhaps MiB), so only a
  difference beyond ``max(SIZE_SLACK_BYTES, SIZE_SLACK_SHARE * size)`` counts;
- damaged in the archive: the ledger says archived, but the stored copy is missing or has
  another size than the ledger's (``archiver verify --repair`` fetches it again).

Missing completed recordings, size mismatches and damaged copies make the outcome not ok
(exit 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any, NamedTuple, Protocol

from archiver.errors import NotFound
from archiver.filters import Filters
from archiver.ledger.base import Ledger
from archiver.manifest import day_range, utc_iso
from archiver.models import LedgerRow, Recording, State
from archiver.scope import Facts, admits
from archiver.sources import RECORDINGS, source_of
from archiver.storage.base import StorageBackend
from archiver.telnyx import Page

SIZE_SLACK_BYTES = 1_048_576
SIZE_SLACK_SHARE = 0.05
PARALLEL = 4
# Lines per section in the text output; --json always has everything.
SHOWN = 50


class Source(Protocol):
    def iter_pages(self, filters: Filters) -> AsyncIterator[Page]: ...

    async def retrieve(self, recording_id: str, source: str = ...) -> Recording: ...


class _Archived(NamedTuple):
    ended_at: datetime | None
    storage_key: str | None
    size: int | None
    deleted_at_source: datetime | None
    source: str


@dataclass(frozen=True, slots=True)
class Missing:
    id: str
    ended_at: str | None
    status: str | None
    ledger_state: str | None  # None: the ledger never saw it
    source: str = RECORDINGS


@dataclass(frozen=True, slots=True)
class Gone:
    id: str
    ended_at: str | None
    storage_key: str | None
    size: int | None
    deleted_at_source: str | None = None


@dataclass(frozen=True, slots=True)
class Damaged:
    id: str
    storage_key: str | None
    what: str


@dataclass(frozen=True, slots=True)
class SizeMismatch:
    id: str
    telnyx_size_mb: float
    archived_size: int


@dataclass(slots=True)
class ReconcileReport:
    since: date | None
    until: date | None
    listed: int = 0
    archived: int = 0
    unusable: int = 0
    # Listed although outside the filters (a source that ignores one): left out of the rest.
    outside: int = 0
    missing: list[Missing] = field(default_factory=list)
    processing: list[Missing] = field(default_factory=list)
    gone: list[Gone] = field(default_factory=list)
    deleted_by_us: list[Gone] = field(default_factory=list)
    # Marked deleted at the source by us, yet still listed there.
    deleted_but_listed: list[str] = field(default_factory=list)
    size_mismatches: list[SizeMismatch] = field(default_factory=list)
    # Archived by the ledger, but missing or resized in the archive.
    damaged: list[Damaged] = field(default_factory=list)
    # Still listed at the source; archived once, the copy deleted at the end of its retention.
    expired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.size_mismatches and not self.damaged

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


def size_differs(size_mb: float, size: int) -> bool:
    tolerance = max(SIZE_SLACK_BYTES, SIZE_SLACK_SHARE * size)
    return abs(size_mb * 1_000_000 - size) > tolerance


async def reconcile(
    source: Source,
    ledger: Ledger,
    storage: StorageBackend,
    *,
    standing: Filters,
    since: date | None = None,
    until: date | None = None,
) -> ReconcileReport:
    report = ReconcileReport(since=since, until=until)
    start, end = day_range(since, until)
    archived: dict[str, _Archived] = {}

    async def check_copy(row: LedgerRow) -> None:
        info = None if row.storage_key is None else await storage.stat(row.storage_key)
        if info is None:
            report.damaged.append(Damaged(row.id, row.storage_key, "missing from the archive"))
        elif row.size is not None and info.size != row.size:
            what = f"size in the archive is {info.size}, the ledger says {row.size}"
            report.damaged.append(Damaged(row.id, row.storage_key, what))

    batch: list[LedgerRow] = []
    async for row in ledger.iter_archived(since=start, until=end):
        archived[row.id] = _archived_of(row)
        batch.append(row)
        if len(batch) >= 64:
            await asyncio.gather(*(check_copy(r) for r in batch))
            batch = []
    await asyncio.gather(*(check_copy(r) for r in batch))
    report.archived = len(archived)

    filters = dataclasses.replace(standing, date_ended_at_gte=since, date_ended_at_lte=until)
    seen: set[str] = set()
    async for page in source.iter_pages(filters):
        report.listed += len(page.recordings) + len(page.malformed)
        report.unusable += len(page.malformed)
        fresh = [rec for rec in page.recordings if rec.id not in seen]
        seen.update(rec.id for rec in fresh)
        # A source that ignores a filter cannot make recordings outside it owed (as the lister).
        inside = [rec for rec in fresh if admits(filters, Facts.of_recording(rec))]
        report.outside += len(fresh) - len(inside)
        fresh = inside
        states = await ledger.states([rec.id for rec in fresh if rec.id not in archived])
        for rec in fresh:
            if states.get(rec.id) is State.EXPIRED:
                # Archived once, its copy deleted when its retention ended: settled, not owed.
                report.expired.append(rec.id)
                continue
            known = archived.get(rec.id)
            if known is None and states.get(rec.id) is State.ARCHIVED:
                # Archived, though its end date in the ledger falls outside the range.
                elsewhere = await ledger.get(rec.id)
                known = None if elsewhere is None else _archived_of(elsewhere)
            if known is None:
                entry = Missing(
                    rec.id,
                    utc_iso(rec.ended_at),
                    rec.status,
                    None if rec.id not in states else states[rec.id].value,
                    rec.source,
                )
                waiting = rec.status in source_of(rec.source).waiting
                (report.processing if waiting else report.missing).append(entry)
                continue
            if known.deleted_at_source is not None:
                report.deleted_but_listed.append(rec.id)
            _check_size(report, rec, known)

    absent = [(rid, a) for rid, a in archived.items() if rid not in seen]
    limit = asyncio.Semaphore(PARALLEL)

    async def confirm(rid: str, known: _Archived) -> None:
        gone = Gone(
            rid,
            utc_iso(known.ended_at),
            known.storage_key,
            known.size,
            utc_iso(known.deleted_at_source),
        )
        if known.deleted_at_source is not None:
            report.deleted_by_us.append(gone)
            return
        async with limit:
            try:
                rec = await source.retrieve(rid, known.source)
            except NotFound:
                report.gone.append(gone)
                return
        _check_size(report, rec, known)  # listed under other filters, or missed by a shift

    async with asyncio.TaskGroup() as tg:
        for rid, known in absent:
            tg.create_task(confirm(rid, known))
    for section in (report.missing, report.processing, report.gone, report.deleted_by_us):
        section.sort(key=lambda item: (item.ended_at or "", item.id))
    report.size_mismatches.sort(key=lambda item: item.id)
    report.damaged.sort(key=lambda item: item.id)
    report.deleted_but_listed.sort()
    return report


def _archived_of(row: LedgerRow) -> _Archived:
    return _Archived(row.ended_at, row.storage_key, row.size, row.deleted_at_source, row.source)


def _check_size(report: ReconcileReport, rec: Recording, known: _Archived) -> None:
    if rec.size_mb is not None and known.size is not None and size_differs(rec.size_mb, known.size):
        report.size_mismatches.append(SizeMismatch(rec.id, rec.size_mb, known.size))


# -- text output ---------------------------------------------------------------------------------


def format_report(report: ReconcileReport) -> list[str]:
    if report.since is None and report.until is None:
        days = "all recordings"
    else:
        start = f"from {report.since} " if report.since else ""
        end = f"through {report.until} " if report.until else ""
        days = f"recordings that ended {start}{end}(UTC days, inclusive)"
    completed = len(report.missing)
    lines = [
        f"reconcile: {days}",
        f"  {'':<38}{'Telnyx':>10}{'archive':>10}",
        f"  {'recordings':<38}{report.listed:>10}{report.archived:>10}",
        f"  {'in Telnyx, not archived':<38}{completed + len(report.processing):>10}{'-':>10}"
        f"   ({completed} completed, {len(report.processing)} still processing)",
        f"  {'archived, no longer in Telnyx':<38}{'-':>10}{len(report.gone):>10}",
        f"  {'deleted at source by archiver':<38}{'-':>10}{len(report.deleted_by_us):>10}"
        "   (expected)",
        f"  {'size mismatches':<38}{len(report.size_mismatches):>10}"
        f"{len(report.size_mismatches):>10}",
        f"  {'unusable entries at Telnyx':<38}{report.unusable:>10}{'-':>10}",
        f"  {'listed outside the filters (ignored)':<38}{report.outside:>10}{'-':>10}",
        f"  {'in Telnyx, expired in the archive':<38}{len(report.expired):>10}{'-':>10}"
        "   (retention ended)",
        f"  {'archived, missing or resized in archive':<38}{'-':>10}{len(report.damaged):>10}",
    ]
    _section(
        lines,
        "in Telnyx, completed, not archived",
        [
            f"{m.id}  ended={m.ended_at}  status={m.status}  ledger={m.ledger_state or 'unseen'}"
            for m in report.missing
        ],
    )
    _section(
        lines,
        "in Telnyx, still processing (not yet archivable)",
        [
            f"{m.id}  ended={m.ended_at}  ledger={m.ledger_state or 'unseen'}"
            for m in report.processing
        ],
    )
    _section(
        lines,
        "archived, no longer in Telnyx",
        [f"{g.id}  ended={g.ended_at}  key={g.storage_key}  size={g.size}" for g in report.gone],
    )
    _section(
        lines,
        "size mismatch (Telnyx size_mb | archived bytes)",
        [f"{s.id}  {s.telnyx_size_mb} MB | {s.archived_size} B" for s in report.size_mismatches],
    )
    _section(
        lines,
        "damaged in the archive (archiver verify --repair fetches them again)",
        [f"{d.id}  key={d.storage_key}  {d.what}" for d in report.damaged],
    )
    _section(
        lines,
        "marked deleted at source, still listed by Telnyx",
        report.deleted_but_listed,
    )
    lines.append("reconcile: ok" if report.ok else "reconcile: differences found")
    return lines


def _section(lines: list[str], title: str, items: list[str]) -> None:
    if not items:
        return
    lines.append(f"{title} ({len(items)}):")
    lines.extend(f"  {item}" for item in items[:SHOWN])
    if len(items) > SHOWN:
        lines.append(f"  ... and {len(items) - SHOWN} more (--json lists all)")
