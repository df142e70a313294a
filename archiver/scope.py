"""What a run was asked to archive, and where it stands: always read from the ledger.

A backfill's *scope* is everything its filters cover: every id its listings saw, and every owed
row the ledger holds within the same filters (observed earlier, not listed this time: failed
before, still processing, deleted at the source before it was archived). Whether the run is
done is the ledger's ``tally`` over that scope, never the run's own counters, so a rerun cannot
report "done" for recordings an earlier run failed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from archiver.filters import Filters
from archiver.ledger.base import Tally, WorkLedger
from archiver.manifest import day_range
from archiver.models import LedgerRow, Recording, _int, _text, parse_timestamp
from archiver.sources import COMPOSITIONS

# How many ids of each owed group a report prints; `archiver status` has them all.
SHOWN = 20


@dataclass(frozen=True, slots=True)
class Facts:
    """What the filters test, of an API entry or of a ledger row alike (None: unknown)."""

    ended_at: datetime | None = None
    started_at: datetime | None = None
    room_id: str | None = None
    session_id: str | None = None
    participant_id: str | None = None
    status: str | None = None
    type: str | None = None
    duration_secs: int | None = None

    @classmethod
    def of_recording(cls, rec: Recording) -> Facts:
        return cls(
            ended_at=rec.ended_at,
            started_at=rec.started_at,
            room_id=rec.room_id,
            session_id=rec.session_id,
            participant_id=rec.participant_id,
            status=rec.status,
            type=rec.type,
            duration_secs=rec.duration_secs,
        )

    @classmethod
    def of_entry(cls, entry: Any) -> Facts:
        """An entry that could not be read as a recording (no usable id, too big): its fields
        as a recording's would be read; nothing is known of one that is not an object."""
        if not isinstance(entry, Mapping):
            return cls()
        return cls(
            ended_at=parse_timestamp(entry.get("ended_at")),
            started_at=parse_timestamp(entry.get("started_at")),
            room_id=_text(entry.get("room_id")),
            session_id=_text(entry.get("session_id")),
            participant_id=_text(entry.get("participant_id")),
            status=_text(entry.get("status")),
            type=_text(entry.get("type")),
            duration_secs=_int(entry.get("duration_secs")),
        )

    @classmethod
    def of_row(cls, row: LedgerRow) -> Facts:
        """A ledger row: its columns, and what only its kept entry says (type, duration)."""
        return cls(
            ended_at=row.ended_at,
            started_at=row.started_at,
            room_id=row.room_id,
            session_id=row.session_id,
            participant_id=row.participant_id,
            status=row.source_status,
            # As ``Recording.from_api`` reads it: a composition is video.
            type=_text(row.metadata.get("type"))
            or ("video" if row.source == COMPOSITIONS else None),
            duration_secs=_int(row.metadata.get("duration_secs")),
        )


def admits(filters: Filters, facts: Facts) -> bool:
    """True when ``facts`` meet every filter given. The one test of the filters, for an entry
    the API returned (the lister queues only those) and for a ledger row (a backfill's scope,
    its sweep and its deletions): an API that ignores a filter cannot widen either. An unknown
    value fails any filter on it."""
    for name in ("room_id", "session_id", "participant_id"):
        wanted = getattr(filters, name)
        value = getattr(facts, name)
        # UUIDs: the API may spell them in either case.
        if wanted is not None and (value is None or value.lower() != wanted.lower()):
            return False
    if filters.status is not None and facts.status != filters.status:
        return False
    if filters.type is not None and facts.type != filters.type:
        return False
    return (
        _within(
            _day(facts.ended_at),
            filters.date_ended_at_eq,
            filters.date_ended_at_gte,
            filters.date_ended_at_lte,
        )
        and _within(
            _day(facts.started_at),
            filters.date_started_at_eq,
            filters.date_started_at_gte,
            filters.date_started_at_lte,
        )
        and _within(
            facts.duration_secs,
            filters.duration_secs_eq,
            filters.duration_secs_gte,
            filters.duration_secs_lte,
        )
    )


def _day(moment: datetime | None) -> date | None:
    return moment.astimezone(UTC).date() if moment is not None else None


@dataclass(frozen=True, slots=True)
class Scope:
    """The ledger's view of a set of filters: ended_at bounds and a row test."""

    since: datetime | None
    until: datetime | None
    match: Callable[[LedgerRow], bool]

    @classmethod
    def of(cls, filters: Filters) -> Scope:
        """The rows a listing with ``filters`` covers, so that a backfill's sweep (and its
        deletions) reach no further than that backfill could have archived."""
        since, until = day_range(
            filters.date_ended_at_eq or filters.date_ended_at_gte,
            filters.date_ended_at_eq or filters.date_ended_at_lte,
        )
        return cls(since, until, lambda row: admits(filters, Facts.of_row(row)))

    @classmethod
    def everything(cls) -> Scope:
        return cls(None, None, lambda row: True)

    async def owed_ids(self, ledger: WorkLedger) -> list[str]:
        return [
            row.id
            async for row in ledger.iter_owed(since=self.since, until=self.until)
            if self.match(row)
        ]

    async def tally(self, ledger: WorkLedger, seen: Iterable[str]) -> Tally:
        """Where the scope stands: the ids seen plus the owed rows the filters cover."""
        ids = list(dict.fromkeys([*seen, *await self.owed_ids(ledger)]))
        return await ledger.tally(ids)


def _within(value: Any, eq: Any, gte: Any, lte: Any) -> bool:
    """True when every bound given holds; an unknown value fails any bound."""
    for bound, compare in ((eq, operator.eq), (gte, operator.ge), (lte, operator.le)):
        if bound is not None and (value is None or not compare(value, bound)):
            return False
    return True


def describe_owed(tally: Tally) -> list[str]:
    """What is still owed, by why, with the command that acts on it: one line a group, then a
    few ids each."""
    lines: list[str] = []
    groups = (
        (
            "failed for good, needs an operator",
            tally.needs_action,
            "`archiver retry --all-failed` tries them again; `archiver give-up --id ID` "
            "stops owing one",
        ),
        ("failed, will be retried", tally.retrying, "the next run retries them"),
        ("still processing at the source", tally.processing, "the next run archives them"),
        ("not archived yet", tally.pending, "the next run archives them"),
        ("being archived by another instance", tally.in_progress, "done when it finishes"),
    )
    for title, group, hint in groups:
        if not group:
            continue
        lines.append(f"  {len(group)} {title} ({hint}):")
        for rid, reason in sorted(group.items())[:SHOWN]:
            lines.append(f"    {rid[:80]}: {reason[:200]}")
        if len(group) > SHOWN:
            lines.append(f"    ... and {len(group) - SHOWN} more (archiver status)")
    return lines
