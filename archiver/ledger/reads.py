"""What a ledger's reads mean, written once for every ledger: where a row stands and why (the
categories of ``Tally``), a tally of a set of ids, and the summary of the whole ledger folded from
the groups a ledger's summary query returns. The rules they apply are ``archiver.ledger.core``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from archiver.errors import LedgerError
from archiver.ledger.base import OWED_STATES, Budget, Summary, Tally
from archiver.ledger.core import lease_live, needs_action
from archiver.models import LedgerRow, State
from archiver.sources import RECORDINGS, source_of


def standing(row: LedgerRow, now: datetime, budget: Budget) -> tuple[str, str]:
    """Where one row stands: (category, a short reason). Categories: archived, given_up,
    expired, and
    the owed ones of ``Tally``: needs_action, retrying, processing, pending, in_progress."""
    if row.state is State.ARCHIVED:
        return "archived", ""
    if row.state is State.GIVEN_UP:
        return "given_up", row.last_error or "given up by an operator"
    if row.state is State.EXPIRED:
        return "expired", "its retention ended: the copy was deleted"
    if row.state is State.FAILED:
        error = row.last_error or "failed"
        if needs_action(row, budget):
            return "needs_action", error
        return "retrying", f"{error} (attempt {row.attempts} of {budget.max_attempts})"
    if row.state is State.IN_PROGRESS:
        if lease_live(row, now):
            return "in_progress", f"being archived by {row.lease_owner or 'another instance'}"
        return "pending", "its archiver stopped mid-transfer; taken over by the next claim"
    if row.source_status in source_of(row.source).waiting:
        return "processing", f"still {row.source_status} at the source"
    return "pending", row.last_error or "not archived yet"


def tally(
    ids: Iterable[str],
    rows: Mapping[str, LedgerRow],
    now: datetime,
    budget: Budget,
    states: Mapping[str, State] | None = None,
) -> Tally:
    """Where each id stands: ``rows`` holds the unsettled ones in full, ``states`` may tell the
    settled ones by state alone."""
    groups: dict[str, dict[str, str]] = {
        name: {} for name in ("needs_action", "retrying", "processing", "pending", "in_progress")
    }
    archived = given_up = expired = unknown = 0
    for rid in dict.fromkeys(ids):
        row = rows.get(rid)
        if row is None:
            state = None if states is None else states.get(rid)
            if state is State.ARCHIVED:
                archived += 1
            elif state is State.GIVEN_UP:
                given_up += 1
            elif state is State.EXPIRED:
                expired += 1
            else:
                unknown += 1
            continue
        category, reason = standing(row, now, budget)
        if category == "archived":
            archived += 1
        elif category == "given_up":
            given_up += 1
        elif category == "expired":
            expired += 1
        else:
            groups[category][rid] = reason
    return Tally(archived=archived, given_up=given_up, expired=expired, unknown=unknown, **groups)


@dataclass(frozen=True, slots=True)
class SummaryGroup:
    """One row of a ledger's summary query, grouped by state and by whether the rows need an
    operator (``needs_action``: failed for good, or out of attempts)."""

    state: str
    permanent: bool
    count: int
    oldest_ended_at: datetime | None
    bytes: int
    source: str = RECORDINGS


def fold_summary(groups: Iterable[SummaryGroup]) -> Summary:
    counts = dict.fromkeys(State, 0)
    by_source: dict[str, dict[State, int]] = {}
    bytes_by_source: dict[str, int] = {}
    permanent = retryable = archived_bytes = 0
    oldest: datetime | None = None
    for group in groups:
        try:
            state = State(group.state)
        except ValueError as exc:
            raise LedgerError(f"the ledger holds rows in unknown state {group.state!r}") from exc
        counts[state] += group.count
        of_source = by_source.setdefault(group.source, dict.fromkeys(State, 0))
        of_source[state] += group.count
        if state is State.ARCHIVED:
            archived_bytes += group.bytes
            bytes_by_source[group.source] = bytes_by_source.get(group.source, 0) + group.bytes
        if state is State.FAILED:
            if group.permanent:
                permanent += group.count
            else:
                retryable += group.count
        # Rows that need an operator would hold the lag (and the high-water mark) forever.
        candidate = group.oldest_ended_at
        if (
            state in OWED_STATES
            and not group.permanent
            and candidate is not None
            and (oldest is None or candidate < oldest)
        ):
            oldest = candidate
    return Summary(
        counts=counts,
        permanent_failures=permanent,
        retryable_failures=retryable,
        oldest_unarchived_ended_at=oldest,
        archived_bytes=archived_bytes,
        by_source=by_source,
        archived_bytes_by_source=bytes_by_source,
    )


def summary_query(budget_mark: str) -> str:
    """The one query every ledger's summary runs, grouping rows by state and by
    ``core.needs_action`` (failed for good, or out of attempts under the budget passed as the
    parameter ``budget_mark``)."""
    return f"""SELECT state, state = 'failed' AND (permanent OR attempts >= {budget_mark}) AS spent,
                      count(*) AS n, min(ended_at) AS oldest, coalesce(sum(size), 0) AS bytes,
                      source
               FROM recordings GROUP BY state, spent, source"""


def summary_of(rows: Iterable[Any], when: Callable[[Any], datetime | None]) -> Summary:
    """The summary from the rows of ``summary_query`` (``when`` reads the dialect's times)."""
    return fold_summary(
        SummaryGroup(
            row["state"],
            bool(row["spent"]),
            int(row["n"]),
            when(row["oldest"]),
            int(row["bytes"]),
            row["source"],
        )
        for row in rows
    )
