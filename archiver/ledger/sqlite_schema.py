"""The SQLite ledger's file: its schema, the migrations that bring a file to it, and how each kind
of value is stored in it (times as fixed-width ISO 8601 text in UTC, so that text order is time
order; objects as canonical JSON text; booleans as integers)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from archiver.ledger.portable import V1_MAX_ATTEMPTS, Kind, iso
from archiver.ledger.rows import dumps
from archiver.models import State, utcnow

# Applied in order, each in its own transaction; MIGRATIONS[n] takes the schema from n to n + 1.
# Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE recordings (
        id                TEXT PRIMARY KEY,
        state             TEXT NOT NULL
                          CHECK (state IN ('pending', 'in_progress', 'archived', 'failed')),
        attempts          INTEGER NOT NULL DEFAULT 0,
        permanent         INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        storage_key       TEXT,
        size              INTEGER,
        sha256            TEXT,
        version_id        TEXT,
        retain_until      TEXT,
        source_status     TEXT,
        room_id           TEXT,
        session_id        TEXT,
        participant_id    TEXT,
        started_at        TEXT,
        ended_at          TEXT,
        metadata          TEXT NOT NULL DEFAULT '{}',
        lease_owner       TEXT,
        lease_expires     TEXT,
        first_seen_at     TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        archived_at       TEXT,
        deleted_at_source TEXT
    );
    -- (state, ended_at, id) also serves iter_archived's keyset pages without a sort.
    CREATE INDEX recordings_state ON recordings (state, ended_at, id);
    CREATE INDEX recordings_ended_at ON recordings (ended_at);

    CREATE TABLE audit (
        seq          INTEGER PRIMARY KEY,
        at           TEXT NOT NULL,
        action       TEXT NOT NULL,
        recording_id TEXT,
        details      TEXT NOT NULL,
        prev_hash    TEXT NOT NULL,
        hash         TEXT NOT NULL
    );

    CREATE TABLE passes (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at     TEXT NOT NULL,
        finished_at    TEXT NOT NULL,
        ok             INTEGER NOT NULL,
        listed         INTEGER NOT NULL DEFAULT 0,
        enqueued       INTEGER NOT NULL DEFAULT 0,
        archived       INTEGER NOT NULL DEFAULT 0,
        failed         INTEGER NOT NULL DEFAULT 0,
        listing_window TEXT,
        error          TEXT,
        instance       TEXT,
        extra          TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX passes_finished_at ON passes (finished_at);

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: claims told from attempts (only failures use one now), interruptions, rejected entries
    # that are judged again, the transfer that archived a row, and the given_up state.
    f"""
    CREATE TABLE recordings_v2 (
        id                TEXT PRIMARY KEY,
        state             TEXT NOT NULL
                          CHECK (state IN ('pending', 'in_progress', 'archived', 'failed',
                                           'given_up')),
        attempts          INTEGER NOT NULL DEFAULT 0,
        permanent         INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        storage_key       TEXT,
        size              INTEGER,
        sha256            TEXT,
        version_id        TEXT,
        retain_until      TEXT,
        source_status     TEXT,
        room_id           TEXT,
        session_id        TEXT,
        participant_id    TEXT,
        started_at        TEXT,
        ended_at          TEXT,
        metadata          TEXT NOT NULL DEFAULT '{{}}',
        lease_owner       TEXT,
        lease_expires     TEXT,
        first_seen_at     TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        archived_at       TEXT,
        deleted_at_source TEXT,
        claims            INTEGER NOT NULL DEFAULT 0,
        interruptions     INTEGER NOT NULL DEFAULT 0,
        rejected          INTEGER NOT NULL DEFAULT 0,
        completed_by      TEXT
    );
    INSERT INTO recordings_v2
    SELECT id, state, attempts,
           CASE WHEN state = 'failed' AND attempts >= {V1_MAX_ATTEMPTS} THEN 1 ELSE permanent END,
           last_error, storage_key, size, sha256, version_id, retain_until, source_status,
           room_id, session_id, participant_id, started_at, ended_at, metadata, lease_owner,
           lease_expires, first_seen_at, updated_at, archived_at, deleted_at_source,
           attempts, 0,
           -- Rejected entries were failed for good without a claim: judged again from now on.
           CASE WHEN state = 'failed' AND permanent = 1 AND attempts = 0 THEN 1 ELSE 0 END,
           NULL
    FROM recordings;
    DROP TABLE recordings;
    ALTER TABLE recordings_v2 RENAME TO recordings;
    CREATE INDEX recordings_state ON recordings (state, ended_at, id);
    CREATE INDEX recordings_ended_at ON recordings (ended_at);
    """,
    # 3: an upload in progress the next claimer may continue; copies kept in quarantine.
    """
    ALTER TABLE recordings ADD COLUMN upload TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE recordings ADD COLUMN quarantined TEXT NOT NULL DEFAULT '{}';
    """,
    # 4: the expired state (retention that ends), legal holds, and each row's source (room
    # recordings or room compositions). SQLite cannot change a CHECK: the table is made again,
    # every row copied as it is.
    """
    CREATE TABLE recordings_v4 (
        id                TEXT PRIMARY KEY,
        state             TEXT NOT NULL
                          CHECK (state IN ('pending', 'in_progress', 'archived', 'failed',
                                           'given_up', 'expired')),
        attempts          INTEGER NOT NULL DEFAULT 0,
        permanent         INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        storage_key       TEXT,
        size              INTEGER,
        sha256            TEXT,
        version_id        TEXT,
        retain_until      TEXT,
        source_status     TEXT,
        room_id           TEXT,
        session_id        TEXT,
        participant_id    TEXT,
        started_at        TEXT,
        ended_at          TEXT,
        metadata          TEXT NOT NULL DEFAULT '{}',
        lease_owner       TEXT,
        lease_expires     TEXT,
        first_seen_at     TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        archived_at       TEXT,
        deleted_at_source TEXT,
        claims            INTEGER NOT NULL DEFAULT 0,
        interruptions     INTEGER NOT NULL DEFAULT 0,
        rejected          INTEGER NOT NULL DEFAULT 0,
        completed_by      TEXT,
        upload            TEXT NOT NULL DEFAULT '{}',
        quarantined       TEXT NOT NULL DEFAULT '{}',
        legal_hold        INTEGER NOT NULL DEFAULT 0,
        expired_at        TEXT,
        source            TEXT NOT NULL DEFAULT 'room_recordings'
    );
    INSERT INTO recordings_v4
    SELECT id, state, attempts, permanent, last_error, storage_key, size, sha256, version_id,
           retain_until, source_status, room_id, session_id, participant_id, started_at,
           ended_at, metadata, lease_owner, lease_expires, first_seen_at, updated_at,
           archived_at, deleted_at_source, claims, interruptions, rejected, completed_by,
           upload, quarantined, 0, NULL, 'room_recordings'
    FROM recordings;
    DROP TABLE recordings;
    ALTER TABLE recordings_v4 RENAME TO recordings;
    CREATE INDEX recordings_state ON recordings (state, ended_at, id);
    CREATE INDEX recordings_ended_at ON recordings (ended_at);
    -- The few rows status lists by these, found without reading every row.
    CREATE INDEX recordings_held ON recordings (id) WHERE legal_hold = TRUE;
    CREATE INDEX recordings_quarantined ON recordings (id) WHERE quarantined <> '{}';
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> Iterator[str]:
    """Split a migration into statements; ``executescript`` would commit our transaction."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete statement in migration: {pending.strip()[:80]}")


# Fixed-width ISO 8601 in UTC, so that text order is time order.
ts = iso


def ts_or_none(value: datetime | None) -> str | None:
    return None if value is None else ts(value)


def dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def stamp() -> tuple[datetime, str]:
    """The current time both as stored text and as the datetime that text reads back as."""
    text = ts(utcnow())
    parsed = dt(text)
    assert parsed is not None
    return parsed, text


def encode(kind: Kind, value: Any) -> Any:
    """A value of a field of ``kind`` (``portable.FIELDS``) as its column stores it."""
    if value is None:
        return None
    if kind.startswith("ts"):
        return ts(value)
    if kind == "object":
        return dumps(value)
    if kind == "bool":
        return int(value)
    if isinstance(value, State):
        return value.value
    return value
