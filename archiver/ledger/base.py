"""The ledger contract: the single source of truth about what is archived.

One row per recording id. A row changes state only through the named transitions below, each
one atomic, each one written to the audit chain in the same transaction:

    observe   new id → pending (metadata refreshed on every sighting, state untouched)
    claim     pending | failed (retryable, attempts < max) | in_progress with an expired lease
              (attempts < max) → in_progress, attempts += 1, lease = (owner, expiry).
              Returns None if the row is not claimable.
    heartbeat extend a lease still held by owner.
    complete  in_progress held by owner → archived with key, size, SHA-256. Returns False (and
              changes nothing) if the lease was lost and someone else archived it meanwhile.
    fail      in_progress held by owner → failed with the error; ``permanent`` rows are never
              claimed again, others are retried on later passes while attempts < max_attempts.
    release   in_progress held by owner → pending, the attempt not counted (shutdown).
    reject    a hostile or unusable entry → failed permanently, without ever being claimed.

An archived row is never claimed again: that is how nothing is fetched twice. A lease left by a
killed process expires and the row becomes claimable for any instance. A ledger opened by the only
instance allowed (SQLite's exclusive lock) turns leftover in_progress rows into retryable failures
at once ("interrupted"), since nobody else can be holding them. A shared ledger (PostgreSQL) never
does that: other instances may be alive, so their rows come back only when their leases expire.

Settings (``meta``) change with ``set_meta``, or with ``advance_meta``, a compare-and-set: when
several instances share the ledger, only the one whose view is current moves a value such as the
daemon's high-water mark.

Every implementation passes ``tests/test_ledger_conformance.py``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from archiver.models import LedgerRow, Recording, State, StoredObject


@dataclass(frozen=True, slots=True)
class Summary:
    counts: Mapping[State, int]
    permanent_failures: int
    retryable_failures: int
    # ended_at of the oldest recording seen but not archived, permanent failures aside (they
    # are counted apart and would hold the alert forever): the lag an operator alerts on.
    oldest_unarchived_ended_at: datetime | None
    archived_bytes: int


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


class Ledger(Protocol):
    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    # -- transitions -------------------------------------------------------------------------
    async def observe(self, recordings: Sequence[Recording], *, max_attempts: int) -> set[str]:
        """Record a page of sightings in one transaction; return the ids that need work now:
        pending, retryable failed, or in_progress with an expired lease."""
        ...

    async def claim(
        self, recording_id: str, *, owner: str, lease_seconds: float, max_attempts: int
    ) -> int | None:
        """Take the row for one transfer. Returns the attempt number, or None if not claimable."""
        ...

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool: ...

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool: ...

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None: ...

    async def release(self, recording_id: str, *, owner: str) -> None: ...

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None: ...

    async def mark_deleted_at_source(self, recording_id: str) -> None: ...

    # -- reads --------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None: ...

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        """The state of each id the ledger knows, in one query (ids it lacks are absent)."""
        ...

    async def summary(self) -> Summary: ...

    async def failures(self, limit: int = 100) -> list[LedgerRow]: ...

    def iter_archived(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        """Archived rows ordered by ended_at; since/until bound ended_at (inclusive, exclusive)."""
        ...

    # -- audit chain, passes, settings ---------------------------------------------------------
    async def append_audit(
        self, action: str, recording_id: str | None, details: Mapping[str, Any]
    ) -> AuditEntry:
        """Append an entry chained to the previous one (see ``archiver.audit``)."""
        ...

    def iter_audit(self) -> AsyncIterator[AuditEntry]: ...

    async def record_pass(self, record: PassRecord) -> None: ...

    async def last_passes(self, limit: int = 10) -> list[PassRecord]: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def advance_meta(self, key: str, expected: str | None, new: str) -> bool:
        """Set ``key`` to ``new`` only if it still holds ``expected`` (None: not set), atomically.
        True if this call made the change."""
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
