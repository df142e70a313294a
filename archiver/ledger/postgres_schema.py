"""The PostgreSQL ledger's schema and the migrations that bring a database to it.

Migrations run at start-up, each in a transaction holding an advisory lock, so instances that
start together apply every version once.
"""

from __future__ import annotations

from typing import Any

from archiver.errors import LedgerError
from archiver.ledger.portable import V1_MAX_ATTEMPTS

# Applied in order, each in its own transaction; MIGRATIONS[n] takes the schema from n to n + 1.
# Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE recordings (
        id                text PRIMARY KEY,
        state             text NOT NULL
                          CHECK (state IN ('pending', 'in_progress', 'archived', 'failed')),
        attempts          integer NOT NULL DEFAULT 0,
        permanent         boolean NOT NULL DEFAULT false,
        last_error        text,
        storage_key       text,
        size              bigint,
        sha256            text,
        version_id        text,
        retain_until      timestamptz,
        source_status     text,
        room_id           text,
        session_id        text,
        participant_id    text,
        started_at        timestamptz,
        ended_at          timestamptz,
        metadata          jsonb NOT NULL DEFAULT '{}',
        lease_owner       text,
        lease_expires     timestamptz,
        -- The token of the call that last claimed / archived the row: a call retried after
        -- its answer was lost recognises its own commit.
        claim_token       text,
        completion_token  text,
        first_seen_at     timestamptz NOT NULL,
        updated_at        timestamptz NOT NULL,
        archived_at       timestamptz,
        deleted_at_source timestamptz
    );
    -- (state, ended_at, id) also serves iter_archived's keyset pages without a sort.
    CREATE INDEX recordings_state ON recordings (state, ended_at, id);
    CREATE INDEX recordings_ended_at ON recordings (ended_at);

    CREATE TABLE audit (
        seq          bigint PRIMARY KEY,
        at           timestamptz NOT NULL,
        action       text NOT NULL,
        recording_id text,
        -- Text, not jsonb: exactly the JSON that was hashed.
        details      text NOT NULL,
        prev_hash    text NOT NULL,
        hash         text NOT NULL,
        token        text UNIQUE
    );
    -- The chain head: every append locks this one row, so appends from many instances queue
    -- into one linear chain.
    CREATE TABLE audit_head (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        seq       bigint NOT NULL,
        hash      text NOT NULL
    );
    INSERT INTO audit_head (singleton, seq, hash) VALUES (true, 0, repeat('0', 64));

    CREATE TABLE passes (
        id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        started_at     timestamptz NOT NULL,
        finished_at    timestamptz NOT NULL,
        ok             boolean NOT NULL,
        listed         integer NOT NULL DEFAULT 0,
        enqueued       integer NOT NULL DEFAULT 0,
        archived       integer NOT NULL DEFAULT 0,
        failed         integer NOT NULL DEFAULT 0,
        listing_window text,
        error          text,
        instance       text,
        extra          jsonb NOT NULL DEFAULT '{}',
        token          text UNIQUE
    );
    CREATE INDEX passes_finished_at ON passes (finished_at);

    CREATE TABLE meta (
        key   text PRIMARY KEY,
        value text NOT NULL,
        token text
    );
    """,
    # 2: claims told from attempts (only failures use one now), interruptions, rejected entries
    # that are judged again, the transfer that archived a row (replacing the call tokens), and
    # the given_up state.
    f"""
    ALTER TABLE recordings DROP CONSTRAINT recordings_state_check;
    ALTER TABLE recordings ADD CONSTRAINT recordings_state_check
        CHECK (state IN ('pending', 'in_progress', 'archived', 'failed', 'given_up'));
    ALTER TABLE recordings
        ADD COLUMN claims        integer NOT NULL DEFAULT 0,
        ADD COLUMN interruptions integer NOT NULL DEFAULT 0,
        ADD COLUMN rejected      boolean NOT NULL DEFAULT false,
        ADD COLUMN completed_by  text;
    UPDATE recordings SET
        claims = attempts,
        -- Rejected entries were failed for good without a claim: judged again from now on.
        rejected = (state = 'failed' AND permanent AND attempts = 0),
        permanent = permanent OR (state = 'failed' AND attempts >= {V1_MAX_ATTEMPTS});
    ALTER TABLE recordings DROP COLUMN claim_token, DROP COLUMN completion_token;
    """,
    # 3: an upload in progress the next claimer may continue; copies kept in quarantine.
    """
    ALTER TABLE recordings
        ADD COLUMN upload      jsonb NOT NULL DEFAULT '{}',
        ADD COLUMN quarantined jsonb NOT NULL DEFAULT '{}';
    """,
    # 4: the expired state (retention that ends), legal holds, and each row's source.
    """
    ALTER TABLE recordings DROP CONSTRAINT recordings_state_check;
    ALTER TABLE recordings ADD CONSTRAINT recordings_state_check
        CHECK (state IN ('pending', 'in_progress', 'archived', 'failed', 'given_up', 'expired'));
    ALTER TABLE recordings
        ADD COLUMN legal_hold boolean NOT NULL DEFAULT false,
        ADD COLUMN expired_at timestamptz,
        ADD COLUMN source     text NOT NULL DEFAULT 'room_recordings';
    -- The few rows status lists by these, found without reading every row.
    CREATE INDEX recordings_held ON recordings (id) WHERE legal_hold = TRUE;
    CREATE INDEX recordings_quarantined ON recordings (id) WHERE quarantined <> '{}';
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# Held (per database) while migrating: the bytes of "ARCHIVER" as a bigint.
_MIGRATION_LOCK = int.from_bytes(b"ARCHIVER", "big")


async def migrate_step(conn: Any, where: str) -> tuple[int, bool]:
    """One step towards ``SCHEMA_VERSION``, in the caller's transaction: (the version the
    database is at now, whether that is this archiver's)."""
    # Instances starting together queue here; the next one finds the version applied.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_version (
               version    integer PRIMARY KEY,
               applied_at timestamptz NOT NULL DEFAULT now()
           )"""
    )
    current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
    if current > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger {where} has schema version {current}, newer than the "
            f"{SCHEMA_VERSION} this archiver knows; upgrade archiver to use it"
        )
    if current == SCHEMA_VERSION:
        return current, True
    await conn.execute(MIGRATIONS[current])
    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", current + 1)
    return current + 1, False
