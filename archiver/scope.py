"""What a run was asked to archive, and where it stands: always read from the ledger.

A backfill's *scope* is everything its filters cover: every id its listings saw, and every owed
row the ledger holds within the same filters (observed earlier, not listed this time: failed
before, still processing, deleted at the source before it was archived). Whether the run is
done is the ledger's ``tally`` over that scope, never the run's own counters, so a rerun cannot
report "done" for recordings an earlier run failed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from archiver.ledger.base import Tally, WorkLedger
from archiver.manifest import day_range
from archiver.models import LedgerRow
from archiver.telnyx import Filters

# How many ids of each owed group a report prints; `archiver status` has them all.
SHOWN = 20


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

        def match(row: LedgerRow) -> bool:
            for name in ("room_id", "session_id", "participant_id"):
                wanted = getattr(filters, name)
                if wanted is not None and getattr(row, name) != wanted:
                    return False
            started = row.started_at.astimezone(UTC).date() if row.started_at else None
            if not _within(
                started,
                filters.date_started_at_eq,
                filters.date_started_at_gte,
                filters.date_started_at_lte,
            ):
                return False
            if filters.type is not None and row.metadata.get("type") != filters.type:
                return False
            if filters.status is not None and row.source_status != filters.status:
                return False
            duration = row.metadata.get("duration_secs")
            return _within(
                duration if isinstance(duration, int) else None,
                filters.duration_secs_eq,
                filters.duration_secs_gte,
                filters.duration_secs_lte,
            )

        return cls(since, until, match)

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
