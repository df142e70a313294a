"""The ledger's rules, written once for every ledger (the contract is ``archiver.ledger.base``).

Each transition is a *program*: a generator that asks its ledger for what it needs (``Load`` a
row, the ``Clock``), decides by the rules below, and says what to write (``Insert``, ``Update``,
``Audit``: ``archiver.ledger.ops``). A ledger carries a program out inside one transaction of
its own, answering each request in its dialect (``ops.run_sync`` for SQLite's thread,
``ops.run_async`` for PostgreSQL). So the
rules never touch a connection, both ledgers obey the same ones, and a ledger module holds only
its SQL, its transactions and its schema.

The rules:

- **Owed** (``is_owed``): pending, in progress and failed rows; archived and given-up rows are
  not. Failed for good (``permanent``) is owed and needs an operator.
- **Claimable** (``claimable``): pending; failed with attempts left; in progress with an expired
  lease (its owner stopped). Archived, given up and failed-for-good rows never are.
- **Attempts**: only ``fail`` uses one. Reaching ``Budget.max_attempts`` fails the row for good.
  Taking over an expired lease, or finding in-progress rows at the start of the only instance
  (``recover_orphans``), counts an *interruption* instead; more than
  ``Budget.max_interruptions`` of them fail the row for good.
- **One owner, one transfer**: ``owner`` names one transfer, so a call repeated with the same
  owner is that call retried after its answer was lost, and finds its own commit.
- A sighting refreshes what the API says about a row but never its state, except that an entry
  rejected for what it said is judged again when listed again.

What the reads mean (where a row stands, a tally, the summary) is ``archiver.ledger.reads``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from archiver import audit
from archiver.errors import LedgerError
from archiver.ledger.base import OWED_STATES, AuditEntry, Budget
from archiver.ledger.ops import (
    Audit,
    Clock,
    Insert,
    Load,
    LoadMany,
    LoadState,
    LoadStates,
    Program,
    Update,
)
from archiver.ledger.rows import dumps
from archiver.models import LedgerRow, Recording, State, StoredObject
from archiver.sources import RECORDINGS

T = TypeVar("T")


# -- the rules ---------------------------------------------------------------------------------
# Rows a sighting never changes, and a tally counts by their state alone.
SETTLED = frozenset({State.ARCHIVED, State.GIVEN_UP, State.EXPIRED})


def is_owed(row: LedgerRow) -> bool:
    return row.state in OWED_STATES


def needs_action(row: LedgerRow, budget: Budget) -> bool:
    """Owed and not retried until an operator acts."""
    return row.state is State.FAILED and (row.permanent or row.attempts >= budget.max_attempts)


def lease_live(row: LedgerRow, now: datetime) -> bool:
    return row.lease_expires is not None and row.lease_expires >= now


def claimable(row: LedgerRow, now: datetime, budget: Budget) -> bool:
    if row.state is State.PENDING:
        return True
    if row.state is State.FAILED:
        return not needs_action(row, budget)
    if row.state is State.IN_PROGRESS:
        return not lease_live(row, now)
    return False


def chain_entry(
    prev_seq: int,
    prev_hash: str,
    at: datetime,
    action: str,
    recording_id: str | None,
    details: Mapping[str, Any],
) -> tuple[AuditEntry, str]:
    """The next entry of the chain, and its details as the JSON text to store. The hash covers
    what will be read back, so the entry re-verifies whatever ``details`` held."""
    text = dumps(details)
    stored = json.loads(text)
    seq = prev_seq + 1
    digest = audit.entry_hash(prev_hash, seq, at, action, recording_id, stored)
    entry = AuditEntry(
        seq=seq,
        at=at,
        action=action,
        recording_id=recording_id,
        details=stored,
        prev_hash=prev_hash,
        hash=digest,
    )
    return entry, text


# -- rows as values ----------------------------------------------------------------------------
def new_row(recording_id: str, now: datetime, **values: Any) -> dict[str, Any]:
    """Every column of a new row: the defaults, then ``values``."""
    row: dict[str, Any] = {
        "id": recording_id,
        "state": State.PENDING,
        "attempts": 0,
        "permanent": False,
        "last_error": None,
        "storage_key": None,
        "size": None,
        "sha256": None,
        "version_id": None,
        "retain_until": None,
        "source_status": None,
        "room_id": None,
        "session_id": None,
        "participant_id": None,
        "started_at": None,
        "ended_at": None,
        "metadata": {},
        "lease_owner": None,
        "lease_expires": None,
        "first_seen_at": now,
        "updated_at": now,
        "archived_at": None,
        "deleted_at_source": None,
        "claims": 0,
        "interruptions": 0,
        "rejected": False,
        "completed_by": None,
        "upload": {},
        "quarantined": {},
        "legal_hold": False,
        "expired_at": None,
        "source": RECORDINGS,
    }
    unknown = set(values) - set(row)
    if unknown:
        raise LedgerError(f"no such ledger column(s): {', '.join(sorted(unknown))}")
    row.update(values)
    return row


def _sighting(rec: Recording) -> dict[str, Any]:
    return {
        "source": rec.source,
        "source_status": rec.status,
        "room_id": rec.room_id,
        "session_id": rec.session_id,
        "participant_id": rec.participant_id,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "metadata": dict(rec.metadata),
    }


def _refresh(row: LedgerRow, rec: Recording) -> dict[str, Any]:
    """What a new sighting changes: the API's fields, keeping known values it leaves out. It
    is no transition: ``updated_at`` stays the time of the row's last one."""
    seen = _sighting(rec)
    for name in ("room_id", "session_id", "participant_id", "started_at", "ended_at"):
        if seen[name] is None:
            seen[name] = getattr(row, name)
    return seen


_CLEAR_LEASE = {"lease_owner": None, "lease_expires": None}


# -- transitions -------------------------------------------------------------------------------
def observe(recordings: Sequence[Recording], budget: Budget) -> Program[set[str]]:
    latest = {rec.id: rec for rec in recordings}  # the last sighting in a page wins
    if not latest:
        return set()
    # A sighting never changes a settled row: those are told by their state alone, so a pass
    # over an archive that is up to date reads one index lookup per id and writes nothing.
    states: Mapping[str, State] = yield LoadStates(sorted(latest))
    settled = {rid for rid, state in states.items() if state in SETTLED}
    unsettled = sorted(rid for rid in states if rid not in settled)
    rows: Mapping[str, LedgerRow] = (yield LoadMany(unsettled)) if unsettled else {}
    now: datetime = yield Clock()
    inserts: list[dict[str, Any]] = []
    updates: list[tuple[str, Mapping[str, Any]]] = []
    readmitted: list[tuple[str, str | None]] = []
    claimable_now: set[str] = set()
    for rid in sorted(latest):  # one lock order for every instance inserting
        rec = latest[rid]
        if rid in settled:
            continue
        row = rows.get(rid)
        if row is None:
            inserts.append(new_row(rid, now, **_sighting(rec)))
            claimable_now.add(rid)
            continue
        if row.state in SETTLED:
            continue  # settled between the two reads
        values = _refresh(row, rec)
        if row.state is State.FAILED and row.rejected:
            # Refused for what its entry said before; listed in a usable form now.
            values.update(state=State.PENDING, permanent=False, rejected=False, last_error=None)
            values["updated_at"] = now
            readmitted.append((rid, row.last_error))
            claimable_now.add(rid)
        elif claimable(row, now, budget):
            claimable_now.add(rid)
        updates.append((rid, values))
    if inserts:
        yield Insert(inserts)
    if updates:
        yield Update(updates)
    for rid, reason in readmitted:
        yield Audit("readmitted", rid, {"previous_reason": reason})
    return claimable_now


def claim(
    recording_id: str, *, owner: str, lease_seconds: float, budget: Budget
) -> Program[int | None]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        return None
    now: datetime = yield Clock()
    if row.state is State.IN_PROGRESS and row.lease_owner == owner:
        return row.attempts + 1  # this very call, retried after its answer was lost
    if not claimable(row, now, budget):
        return None
    values: dict[str, Any] = {}
    if row.state is State.IN_PROGRESS:
        # Taking over an expired lease: the transfer holding it stopped (killed, or lost).
        interruptions = row.interruptions + 1
        if interruptions > budget.max_interruptions:
            yield from _interrupted_for_good(row, now, interruptions)
            return None
        values["interruptions"] = interruptions
    values.update(
        state=State.IN_PROGRESS,
        lease_owner=owner,
        lease_expires=now + timedelta(seconds=lease_seconds),
        claims=row.claims + 1,
        updated_at=now,
    )
    yield Update([(recording_id, values)])
    return row.attempts + 1


def _interrupted_for_good(row: LedgerRow, now: datetime, interruptions: int) -> Program[None]:
    """A recording whose claims keep being cut short (it may be what kills the process)."""
    error = (
        f"interrupted {interruptions} times: the process archiving it stopped each time "
        "(killed, or lost its lease)"
    )
    yield from _fail_for_good(row, now, error, interruptions=interruptions)


def _fail_for_good(row: LedgerRow, now: datetime, error: str, **values: Any) -> Program[None]:
    yield Update(
        [
            (
                row.id,
                {
                    "state": State.FAILED,
                    "permanent": True,
                    "last_error": error,
                    "updated_at": now,
                    **_CLEAR_LEASE,
                    **values,
                },
            )
        ]
    )
    yield Audit("failed", row.id, {"error": error, "permanent": True, "attempt": row.attempts})


def heartbeat(recording_id: str, *, owner: str, lease_seconds: float) -> Program[bool]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.IN_PROGRESS or row.lease_owner != owner:
        return False
    now: datetime = yield Clock()
    expires = now + timedelta(seconds=lease_seconds)
    yield Update([(recording_id, {"lease_expires": expires, "updated_at": now})])
    return True


def complete(recording_id: str, *, owner: str, stored: StoredObject) -> Program[bool]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        raise LedgerError(f"complete: the ledger has no row for {recording_id!r}")
    if row.state is State.ARCHIVED:
        return row.completed_by == owner  # True only for this very call, retried
    held = row.state is State.IN_PROGRESS and row.lease_owner == owner
    # A lost lease is still accepted: our bytes are stored and verified, and recording that is
    # the truth; the other transfer's complete then returns False. Only a row nobody ever
    # claimed is a caller's bug.
    if not held and row.claims == 0:
        raise LedgerError(
            f"complete: {recording_id!r} was never claimed; claim it before completing"
        )
    now: datetime = yield Clock()
    values: dict[str, Any] = {
        "state": State.ARCHIVED,
        "storage_key": stored.key,
        "size": stored.size,
        "sha256": stored.sha256,
        "version_id": stored.version_id,
        "retain_until": stored.retain_until,
        "permanent": False,
        "rejected": False,
        "last_error": None,
        "archived_at": now,
        "updated_at": now,
        "completed_by": owner,
        "upload": {},
        **_CLEAR_LEASE,
    }
    yield Update([(recording_id, values)])
    details = {
        "key": stored.key,
        "size": stored.size,
        "sha256": stored.sha256,
        "version_id": stored.version_id,
        "retain_until": None if stored.retain_until is None else stored.retain_until.isoformat(),
    }
    yield Audit("archived", recording_id, details)
    return True


def note_upload(recording_id: str, *, owner: str, upload: Mapping[str, Any]) -> Program[bool]:
    """Record how far the storage upload of the transfer holding the row has come (``{}``:
    none), so that whoever claims it next can continue it. False if the lease was lost."""
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.IN_PROGRESS or row.lease_owner != owner:
        return False
    yield Update([(recording_id, {"upload": dict(upload)})])
    return True


def quarantine(
    recording_id: str, *, key: str, version_id: str | None, reason: str
) -> Program[None]:
    """A stored copy found wanting that storage will not remove (Object Lock): kept on the row
    with its version, audited, reported until its retention ends."""
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        raise LedgerError(f"quarantine: the ledger has no row for {recording_id!r}")
    now: datetime = yield Clock()
    entry = {"key": key, "version_id": version_id, "reason": reason, "at": now.isoformat()}
    copies = [*row.quarantined.get("copies", []), entry]
    yield Update([(recording_id, {"quarantined": {"copies": copies}, "updated_at": now})])
    yield Audit("quarantined", recording_id, entry)
    return None


def fail(
    recording_id: str, *, owner: str, error: str, permanent: bool, budget: Budget
) -> Program[None]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.IN_PROGRESS or row.lease_owner != owner:
        return None  # a lost lease changes nothing: the row is someone else's (or done) now
    now: datetime = yield Clock()
    attempts = row.attempts + 1
    for_good = permanent or attempts >= budget.max_attempts
    values = {
        "state": State.FAILED,
        "permanent": for_good,
        "last_error": error,
        "attempts": attempts,
        "updated_at": now,
        **_CLEAR_LEASE,
    }
    yield Update([(recording_id, values)])
    details = {"error": error, "permanent": for_good, "attempt": attempts}
    yield Audit("failed", recording_id, details)
    return None


def release(recording_id: str, *, owner: str, note: str | None) -> Program[None]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.IN_PROGRESS or row.lease_owner != owner:
        return None
    now: datetime = yield Clock()
    values: dict[str, Any] = {"state": State.PENDING, "updated_at": now, **_CLEAR_LEASE}
    if note is not None:
        values["last_error"] = note
    yield Update([(recording_id, values)])
    return None


def reject(recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None) -> Program[None]:
    row: LedgerRow | None = yield Load(recording_id)
    now: datetime = yield Clock()
    refused = {"state": State.FAILED, "permanent": True, "rejected": True, "last_error": reason}
    if row is None:
        inserted = yield Insert(
            [new_row(recording_id, now, metadata=dict(metadata or {}), **refused)]
        )
        if inserted:
            yield Audit("rejected", recording_id, {"reason": reason})
            return None
        row = yield Load(recording_id)  # another instance inserted it meanwhile
        if row is None:
            raise LedgerError(f"reject: {recording_id!r} vanished while being rejected")
    if row.state not in (State.PENDING, State.FAILED):
        return None  # archived, given up, or being transferred with a URL of its own
    if row.state is State.FAILED and row.rejected and row.last_error == reason:
        return None  # rejecting it again on every pass would only grow the audit chain
    values: dict[str, Any] = {**refused, "updated_at": now, **_CLEAR_LEASE}
    if metadata is not None:
        values["metadata"] = dict(metadata)
    yield Update([(recording_id, values)])
    yield Audit("rejected", recording_id, {"reason": reason})
    return None


def mark_deleted_at_source(recording_id: str) -> Program[None]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        raise LedgerError(f"mark_deleted_at_source: the ledger has no row for {recording_id!r}")
    if row.deleted_at_source is not None:
        return None
    now: datetime = yield Clock()
    yield Update([(recording_id, {"deleted_at_source": now, "updated_at": now})])
    yield Audit("deleted_at_source", recording_id, {})
    return None


def recover_orphans(budget: Budget) -> Program[int]:
    """At the start of the only instance a ledger admits: every in-progress row was left by a
    killed process. It is pending again at once (an interruption, not an attempt), so the
    next claim resumes it; the partial copy it left is continued or removed by that claim."""
    rows: list[LedgerRow] = yield LoadState(State.IN_PROGRESS)
    if not rows:
        return 0
    now: datetime = yield Clock()
    for row in rows:
        interruptions = row.interruptions + 1
        if interruptions > budget.max_interruptions:
            yield from _interrupted_for_good(row, now, interruptions)
            continue
        values = {
            "state": State.PENDING,
            "interruptions": interruptions,
            "last_error": "interrupted: the process stopped mid-transfer",
            "updated_at": now,
            **_CLEAR_LEASE,
        }
        yield Update([(row.id, values)])
    return len(rows)


# -- operator transitions ----------------------------------------------------------------------
def retry(recording_ids: Sequence[str] | None) -> Program[list[str]]:
    if recording_ids is None:
        rows: list[LedgerRow] = yield LoadState(State.FAILED)
    else:
        found: Mapping[str, LedgerRow] = yield LoadMany(sorted(set(recording_ids)))
        rows = list(found.values())
    now: datetime = yield Clock()
    changed: list[str] = []
    for row in sorted(rows, key=lambda r: r.id):
        if row.state is not State.FAILED:
            continue
        values = {
            "state": State.PENDING,
            "attempts": 0,
            "interruptions": 0,
            "permanent": False,
            "rejected": False,
            "last_error": None,
            "updated_at": now,
            **_CLEAR_LEASE,
        }
        yield Update([(row.id, values)])
        yield Audit(
            "retry_requested",
            row.id,
            {"attempts": row.attempts, "error": row.last_error, "permanent": row.permanent},
        )
        changed.append(row.id)
    return changed


def give_up(recording_id: str, *, reason: str) -> Program[bool]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        raise LedgerError(f"the ledger has no recording {recording_id!r}")
    if not is_owed(row):
        return False
    now: datetime = yield Clock()
    if row.state is State.IN_PROGRESS and lease_live(row, now):
        raise LedgerError(
            f"{recording_id} is being archived right now ({row.lease_owner}); "
            "give it up once that transfer has ended"
        )
    values = {
        "state": State.GIVEN_UP,
        "last_error": reason,
        "updated_at": now,
        **_CLEAR_LEASE,
    }
    yield Update([(recording_id, values)])
    yield Audit("given_up", recording_id, {"reason": reason, "was": row.state.value})
    return True


def reopen(recording_id: str, *, reason: str) -> Program[bool]:
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.ARCHIVED:
        return False
    now: datetime = yield Clock()
    # Key, size and hash stay as the record of the copy that was found wanting; the next
    # ``complete`` replaces them.
    values = {
        "state": State.PENDING,
        "attempts": 0,
        "interruptions": 0,
        "permanent": False,
        "last_error": f"repair: {reason}",
        "updated_at": now,
        **_CLEAR_LEASE,
    }
    yield Update([(recording_id, values)])
    details = {"reason": reason, "key": row.storage_key, "size": row.size, "sha256": row.sha256}
    yield Audit("reopened", recording_id, details)
    return True


def expire(recording_id: str, *, rule: str, removed: Sequence[Mapping[str, Any]]) -> Program[bool]:
    """An archived row whose copy was deleted because its retention ended (``archiver.expire``
    checks the holds and locks before it deletes): expired, never fetched again. The truth is
    recorded whatever else holds: the copy is gone."""
    row: LedgerRow | None = yield Load(recording_id)
    if row is None or row.state is not State.ARCHIVED:
        return False
    now: datetime = yield Clock()
    yield Update([(recording_id, {"state": State.EXPIRED, "expired_at": now, "updated_at": now})])
    details = {
        "rule": rule,
        "key": row.storage_key,
        "size": row.size,
        "sha256": row.sha256,
        "ended_at": None if row.ended_at is None else row.ended_at.isoformat(),
        "removed": [dict(copy) for copy in removed],
    }
    yield Audit("expired", recording_id, details)
    return True


def hold(recording_id: str, *, on: bool, reason: str) -> Program[bool]:
    """Set (``on``) or release a legal hold; True if that changed the row. A held row's copy
    never expires. An expired row has no copy left to hold."""
    row: LedgerRow | None = yield Load(recording_id)
    if row is None:
        raise LedgerError(f"the ledger has no recording {recording_id!r}")
    if row.state is State.EXPIRED and on:
        raise LedgerError(
            f"{recording_id} has expired: its copy was deleted, nothing is left to hold"
        )
    if row.legal_hold == on:
        return False
    now: datetime = yield Clock()
    yield Update([(recording_id, {"legal_hold": on, "updated_at": now})])
    details = {"reason": reason, "key": row.storage_key, "version_id": row.version_id}
    yield Audit("legal_hold" if on else "legal_hold_released", recording_id, details)
    return True
