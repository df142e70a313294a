"""Reading ledger rows back into models, the same way for every ledger.

Drivers hand rows back as mappings (``sqlite3.Row``, asyncpg's ``Record``) and differ only in how
a time comes back (SQLite: ISO text; PostgreSQL: ``timestamptz``): each ledger passes its reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from archiver.errors import LedgerError
from archiver.ledger.base import AuditEntry, PassRecord
from archiver.models import LedgerRow, State

TimeReader = Callable[[Any], datetime | None]


def dumps(value: Mapping[str, Any]) -> str:
    """Canonical JSON for the ledger's object columns (sorted keys, no spaces)."""
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), default=str)


def json_object(text: str | None, what: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LedgerError(f"the ledger holds unreadable JSON in {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise LedgerError(f"the ledger holds {type(value).__name__} in {what}, not an object")
    return value


def decode_row(row: Any, when: TimeReader) -> LedgerRow:
    """A recordings row; one read without its metadata column gives empty metadata."""
    keys = row.keys()
    try:
        return LedgerRow(
            id=row["id"],
            state=State(row["state"]),
            attempts=row["attempts"],
            last_error=row["last_error"],
            storage_key=row["storage_key"],
            size=row["size"],
            sha256=row["sha256"],
            source_status=row["source_status"],
            room_id=row["room_id"],
            session_id=row["session_id"],
            participant_id=row["participant_id"],
            started_at=when(row["started_at"]),
            ended_at=when(row["ended_at"]),
            metadata=(
                json_object(row["metadata"], f"the metadata of {row['id']!r}")
                if "metadata" in keys
                else {}
            ),
            lease_owner=row["lease_owner"],
            lease_expires=when(row["lease_expires"]),
            first_seen_at=when(row["first_seen_at"]),
            updated_at=when(row["updated_at"]),
            archived_at=when(row["archived_at"]),
            retain_until=when(row["retain_until"]),
            version_id=row["version_id"],
            deleted_at_source=when(row["deleted_at_source"]),
            permanent=bool(row["permanent"]),
            claims=row["claims"],
            interruptions=row["interruptions"],
            rejected=bool(row["rejected"]),
            completed_by=row["completed_by"],
            upload=json_object(row["upload"], f"the upload of {row['id']!r}"),
            quarantined=json_object(row["quarantined"], f"the quarantine of {row['id']!r}"),
            legal_hold=bool(row["legal_hold"]),
            expired_at=when(row["expired_at"]),
            source=row["source"],
        )
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"the ledger row {row['id']!r} cannot be read: {exc}") from exc


def decode_audit(row: Any, when: TimeReader) -> AuditEntry:
    try:
        at = when(row["at"])
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"audit entry {row['seq']} has an unreadable time: {exc}") from exc
    if at is None:
        raise LedgerError(f"audit entry {row['seq']} has no time")
    return AuditEntry(
        seq=row["seq"],
        at=at,
        action=row["action"],
        recording_id=row["recording_id"],
        details=json_object(row["details"], f"audit entry {row['seq']}"),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def decode_pass(row: Any, when: TimeReader) -> PassRecord:
    started, finished = when(row["started_at"]), when(row["finished_at"])
    if started is None or finished is None:
        raise LedgerError(f"pass {row['id']} has no start or finish time")
    return PassRecord(
        started_at=started,
        finished_at=finished,
        ok=bool(row["ok"]),
        listed=row["listed"],
        enqueued=row["enqueued"],
        archived=row["archived"],
        failed=row["failed"],
        window=row["listing_window"],
        error=row["error"],
        instance=row["instance"],
        extra=json_object(row["extra"], f"pass {row['id']}"),
    )
