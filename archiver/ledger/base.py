"""The ledger contract: the single source of truth about what is archived and what is owed.

One row per recording id. A row changes state only through the named transitions below, each
one atomic, each one that matters to an examiner written to the audit chain in the same
transaction. The rules behind them (guards, the owed rule, the attempt budget) are written once,
in ``archiver.ledger.core``; every ledger carries them out and passes
``tests/test_ledger_conformance.py``.

**Owed.** A recording is owed from the moment it is observed (a listing, a webhook) until it is
archived or an operator gives it up. Failed for good is still owed: it needs an operator
(``archiver retry``, ``archiver give-up``). Every claim that something is done is derived from
this, never from one run's memory.

**The attempt budget** (``Budget``) lives in the ledger, not in its callers. Only a failure of
the recording itself (``fail``) uses an attempt; a claim cut short by our own process (killed,
stopped, its lease lost: ``interruptions``) or given back (``release``: shutdown, processing at
the source, another instance holding its partial copy) does not. A row whose claims keep being
cut short is failed for good after ``Budget.max_interruptions``, so a recording that kills its
process every time does not loop forever.

The protocol comes in two parts: ``WorkLedger``, what the engine needs to move recordings, and
``RecordsLedger``, what the records, reports and operator commands need. ``Ledger`` is both.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from archiver.models import LedgerRow, Recording, State, StoredObject


@dataclass(frozen=True, slots=True)
class Budget:
    """How much trying a recording gets before it is failed for good and needs an operator."""

    # Failures of the recording itself (a bad answer, a refused URL, wrong bytes, ...).
    max_attempts: int = 5
    # Claims cut short by our own process stopping (SIGKILL, a lost lease): these use no
    # attempt, but a recording that kills its process every time must end somewhere.
    max_interruptions: int = 20


@dataclass(frozen=True, slots=True)
class Summary:
    counts: Mapping[State, int]
    # Failed for good: owed, not retried until an operator acts.
    permanent_failures: int
    retryable_failures: int
    # ended_at of the oldest owed recording that will be retried (needing an operator aside:
    # they are counted apart and would hold the alert forever): the lag an operator alerts on,
    # and the day the daemon's high-water mark may not pass.
    oldest_unarchived_ended_at: datetime | None
    archived_bytes: int
    # The counts by state, and the archived bytes, of each source the ledger has rows of.
    by_source: Mapping[str, Mapping[State, int]] = field(default_factory=dict)
    archived_bytes_by_source: Mapping[str, int] = field(default_factory=dict)

    @property
    def owed(self) -> int:
        return sum(n for state, n in self.counts.items() if state in OWED_STATES)


OWED_STATES = frozenset({State.PENDING, State.IN_PROGRESS, State.FAILED})


@dataclass(frozen=True, slots=True)
class Tally:
    """Where a set of recordings stands, from the ledger (the truth behind an exit code)."""

    archived: int = 0
    given_up: int = 0
    # Archived, then deleted when its retention ended (``archiver expire``): settled.
    expired: int = 0
    # Owed, by why: id → a short reason, per category (see ``archiver.ledger.reads.standing``).
    needs_action: Mapping[str, str] = field(default_factory=dict)
    retrying: Mapping[str, str] = field(default_factory=dict)
    processing: Mapping[str, str] = field(default_factory=dict)
    pending: Mapping[str, str] = field(default_factory=dict)
    in_progress: Mapping[str, str] = field(default_factory=dict)
    # Ids asked about that the ledger does not know (never observed).
    unknown: int = 0

    @property
    def owed(self) -> int:
        return sum(
            len(group)
            for group in (
                self.needs_action,
                self.retrying,
                self.processing,
                self.pending,
                self.in_progress,
            )
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    action: str
    recording_id: str | None
    details: Mapping[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One listing pass of backfill or run."""

    started_at: datetime
    finished_at: datetime
    ok: bool
    listed: int = 0
    enqueued: int = 0
    archived: int = 0
    failed: int = 0
    window: str | None = None
    error: str | None = None
    instance: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class WorkLedger(Protocol):
    """What the engine (lister, transfers, producers) needs. ``owner`` names one transfer: a
    call repeated with the same owner (a retry after a lost answer) finds its own commit."""

    async def observe(self, recordings: Sequence[Recording]) -> set[str]:
        """Record a page of sightings in one transaction; return the ids some instance may claim
        now. A row rejected for what its entry said is judged again (pending once more)."""
        ...

    async def would_observe(self, recordings: Sequence[Recording]) -> set[str]:
        """What ``observe`` would return, changing nothing (a dry run's view of the ledger)."""
        ...

    async def claim(self, recording_id: str, *, owner: str, lease_seconds: float) -> int | None:
        """Take the row for one transfer: the attempt number (failures so far + 1), or None if
        the row is not claimable. Taking over an expired lease counts an interruption."""
        ...

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool:
        """Extend a lease ``owner`` still holds; False when it was lost."""
        ...

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool:
        """Mark archived with key, size and SHA-256 (audited). False, changing nothing, when
        someone else archived it meanwhile; a lost lease is still accepted (the bytes are
        stored and verified). A row never claimed is refused (LedgerError)."""
        ...

    async def note_upload(
        self, recording_id: str, *, owner: str, upload: Mapping[str, Any]
    ) -> bool:
        """Keep how far the storage upload of the transfer holding the row has come (the
        storage's own description; ``{}``: none), for whoever claims the row next to continue
        it. Not audited; a ``complete`` clears it. False if ``owner`` lost the lease."""
        ...

    async def quarantine(
        self, recording_id: str, *, key: str, version_id: str | None, reason: str
    ) -> None:
        """A stored copy found wanting that storage will not remove (Object Lock): kept on the
        row (``LedgerRow.quarantined``) with its version and reason, audited."""
        ...

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None:
        """A failure of the recording itself: uses an attempt (audited). ``permanent`` (or the
        budget used up) fails it for good. Changes nothing if ``owner`` lost the lease."""
        ...

    async def release(self, recording_id: str, *, owner: str, note: str | None = None) -> None:
        """Give the row back (pending) without using an attempt: shutdown, processing at the
        source, another instance writing it. ``note`` says why, for ``status``."""
        ...

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """A listing entry that cannot be archived as it stands: failed for good, audited once
        per reason, judged again if ``observe`` sees it listed in a usable form."""
        ...

    def iter_owed(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        """Owed rows (metadata included) ordered like ``iter_archived``."""
        ...

    def iter_claimable(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        """The owed rows some instance may claim now (``core.claimable``), like ``iter_owed``:
        what no listing may bring again (expired leases, rows no window lists any more)."""
        ...

    async def tally(self, recording_ids: Sequence[str]) -> Tally:
        """Where each of these recordings stands (owed and why, archived, given up)."""
        ...


class RecordsLedger(Protocol):
    """What records, reports and operator commands need."""

    async def get(self, recording_id: str) -> LedgerRow | None: ...

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        """The state of each id the ledger knows, in one query (ids it lacks are absent)."""
        ...

    async def summary(self) -> Summary: ...

    async def failures(self, limit: int = 100) -> list[LedgerRow]:
        """Failed rows, the newest failure first."""
        ...

    async def holds(self, limit: int = 100) -> list[LedgerRow]:
        """Rows under a legal hold, the newest change first."""
        ...

    async def with_quarantine(self, limit: int = 1000) -> list[LedgerRow]:
        """Rows that keep copies in quarantine (``LedgerRow.quarantined``), by id."""
        ...

    def iter_archived(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        include_expired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Archived rows ordered by ended_at; since/until bound ended_at (inclusive, exclusive).
        Without bounds, rows with no known end come first. ``include_expired``: expired rows
        too, in the same order."""
        ...

    async def mark_deleted_at_source(self, recording_id: str) -> None: ...

    # -- operator transitions (each audited) ----------------------------------------------
    async def retry(self, recording_ids: Sequence[str] | None = None) -> list[str]:
        """Failed rows back to pending with their attempts reset: the given ids, or every
        failed row when None. Returns the ids that changed."""
        ...

    async def give_up(self, recording_id: str, *, reason: str) -> bool:
        """An owed recording an operator decides is not to be archived: no longer owed."""
        ...

    async def reopen(self, recording_id: str, *, reason: str) -> bool:
        """An archived copy found missing or damaged: owed again, to be fetched again."""
        ...

    async def expire(
        self, recording_id: str, *, rule: str, removed: Sequence[Mapping[str, Any]]
    ) -> bool:
        """An archived row whose copy was deleted at the end of its retention (``rule`` says
        which; ``removed`` lists what went): expired, audited. False if it was not archived."""
        ...

    async def hold(self, recording_id: str, *, on: bool, reason: str) -> bool:
        """Set or release a legal hold (audited): a held copy never expires. True if it
        changed; an unknown id, or a hold on an expired row, is a LedgerError."""
        ...

    def iter_expired(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        """Expired rows, ordered and bounded like ``iter_archived``."""
        ...

    # -- audit chain, passes, settings -------------------------------------------------------
    async def append_audit(
        self,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
        *,
        token: str | None = None,
    ) -> AuditEntry:
        """Append an entry chained to the previous one (see ``archiver.audit``). ``token``
        names one call across its attempts (``archiver.ledger.retrying`` makes one per call):
        an attempt whose token was committed already returns that entry, appending nothing."""
        ...

    def iter_audit(self) -> AsyncIterator[AuditEntry]:
        """Every entry of the chain in ``seq`` order."""
        ...

    async def record_pass(self, record: PassRecord, *, token: str | None = None) -> None:
        """Keep one pass; an attempt whose ``token`` was committed already adds nothing."""
        ...

    async def last_passes(self, limit: int = 10) -> list[PassRecord]: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def advance_meta(
        self, key: str, expected: str | None, new: str, *, token: str | None = None
    ) -> bool:
        """Set ``key`` to ``new`` only if it still holds ``expected`` (None: not set), atomically.
        True if this call made the change: also when an attempt with the same ``token`` made
        it, and only its answer was lost."""
        ...

    # -- schema and moving a whole ledger -----------------------------------------------------
    async def migrate(self) -> int:
        """Bring the schema to this archiver's version (opening does it too); return it."""
        ...

    def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Every row of every table from one consistent snapshot, as (type, record): all
        ``recording`` rows, then ``audit`` in chain order, ``pass`` oldest first, ``meta``.
        Fields and types: ``archiver.ledger.portable.FIELDS`` (times as datetimes)."""
        ...

    async def import_records(
        self, records: AsyncIterable[tuple[str, Mapping[str, Any]]], *, replace: bool = False
    ) -> None:
        """Load what ``export_records`` produced, in that order, in one transaction, keeping
        states, attempts and audit hashes as they are. Refuses (``LedgerError``) a ledger that
        holds anything unless ``replace``, which empties it first in the same transaction."""
        ...


class Ledger(WorkLedger, RecordsLedger, Protocol):
    """A whole ledger, used as ``async with``."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
