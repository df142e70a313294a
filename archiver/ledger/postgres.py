"""The ledger in PostgreSQL, shared by several archiver instances (contract in ``base``).

The semantics are the SQLite ledger's; what sharing adds:

- Leases run on the database's clock (``now()``), so hosts whose clocks disagree still agree on
  when a lease expires. A claim is one conditional ``UPDATE`` (one round trip): concurrent
  claimers of a row queue on its row lock, the loser re-reads the row and finds it taken. Nothing
  is recovered at start-up: other instances may be alive, so a dead one's rows come back when its
  leases expire.
- The audit chain stays one linear chain with many writers: an append locks the chain head (the
  single row of ``audit_head``) inside the transition's own transaction.
- Migrations run at start-up, each in a transaction holding an advisory lock, so instances that
  start together apply every version once.
- Connection lost or refused, a server shutting down or starting up, too many connections,
  serialization failures and deadlocks are ``LedgerUnavailable``; every call then retries its whole
  transaction (``archiver.retry``), so an instance rides out a database restart. Retrying is safe
  after a commit whose answer was lost: each call carries a token, so a retried claim, completion,
  audit append, pass or compare-and-set finds its own earlier commit instead of doing it twice.
- The password comes from ``password_file`` or ``PGPASSWORD`` and is registered with
  ``archiver.redact``; messages name host, port and database, never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import ssl
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import asyncpg

from archiver import audit
from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger.base import AuditEntry, PassRecord, Summary
from archiver.ledger.portable import AUDIT_FIELDS, PASS_FIELDS, RECORDING_FIELDS
from archiver.ledger.rows import decode_audit, decode_pass, decode_row, dumps, json_object
from archiver.models import LedgerRow, Recording, State, StoredObject
from archiver.redact import redact, register_secret
from archiver.retry import RetryPolicy, call_with_retry

_T = TypeVar("_T")

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
]

SCHEMA_VERSION = len(MIGRATIONS)

# Held (per database) while migrating: the bytes of "ARCHIVER" as a bigint.
_MIGRATION_LOCK = int.from_bytes(b"ARCHIVER", "big")

_BATCH = 1000  # rows per read in the streaming iterators and per import batch

DEFAULT_RETRY = RetryPolicy(attempts=30, total_seconds=120.0, initial_backoff=0.1, max_backoff=5.0)

# A row some instance may take now; $max is the max_attempts parameter.
_CLAIMABLE = """(
    {r}state = 'pending'
    OR ({r}state = 'failed' AND NOT {r}permanent AND {r}attempts < {max})
    OR ({r}state = 'in_progress' AND {r}lease_expires < now() AND {r}attempts < {max})
)"""

# A sighting refreshes what the API says but is no transition: updated_at stays the time of the
# row's last transition. Rows are sorted by id so that concurrent pages lock rows in one order.
_OBSERVE = f"""
INSERT INTO recordings AS r (
    id, state, source_status, room_id, session_id, participant_id,
    started_at, ended_at, metadata, first_seen_at, updated_at
)
SELECT u.id, 'pending', u.status, u.room_id, u.session_id, u.participant_id,
       u.started_at, u.ended_at, u.metadata::jsonb, now(), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::timestamptz[], $7::timestamptz[], $8::text[])
     AS u(id, status, room_id, session_id, participant_id, started_at, ended_at, metadata)
ON CONFLICT (id) DO UPDATE SET
    source_status  = excluded.source_status,
    room_id        = coalesce(excluded.room_id, r.room_id),
    session_id     = coalesce(excluded.session_id, r.session_id),
    participant_id = coalesce(excluded.participant_id, r.participant_id),
    started_at     = coalesce(excluded.started_at, r.started_at),
    ended_at       = coalesce(excluded.ended_at, r.ended_at),
    metadata       = excluded.metadata
WHERE r.state <> 'archived'
RETURNING r.id, {_CLAIMABLE.format(r="r.", max="$9")} AS needs_work
"""

_CLAIM = f"""
UPDATE recordings
SET state = 'in_progress',
    attempts = CASE WHEN claim_token = $2 AND state = 'in_progress'
                    THEN attempts ELSE attempts + 1 END,
    lease_owner = $3,
    lease_expires = now() + make_interval(secs => $4),
    claim_token = $2,
    updated_at = now()
WHERE id = $1
  AND ((claim_token = $2 AND state = 'in_progress' AND lease_owner = $3)
       OR {_CLAIMABLE.format(r="", max="$5")})
RETURNING attempts
"""

_RECORDING_COLUMNS = ", ".join(RECORDING_FIELDS)
_AUDIT_COLUMNS = ", ".join(AUDIT_FIELDS)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _clean(value: Any) -> Any:
    """What PostgreSQL text and jsonb can hold: no NUL, no lone surrogates (SQLite takes both)."""
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:
            return value
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, Mapping):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _jsonb(value: Mapping[str, Any]) -> str:
    text = dumps(value)  # ASCII: whatever jsonb refuses shows as a \u escape
    if "\\u0000" in text or "\\ud" in text:
        return dumps(_clean(value))
    return text


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise LedgerError(f"the ledger holds {type(value).__name__} where a time belongs")
    return value.astimezone(UTC)


def _is_transient(exc: BaseException | None) -> bool:
    """Worth retrying the transaction: the server or the connection, not the statement."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return False  # a certificate the server will keep presenting
        if isinstance(
            exc,
            OSError
            | TimeoutError
            | asyncpg.PostgresConnectionError  # 08xxx, and the connection closing mid-call
            | asyncpg.exceptions.OperatorInterventionError  # shutting down, starting up
            | asyncpg.exceptions.TooManyConnectionsError
            | asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
        ):
            return True
        # Rolling back on a connection that died raises about the closed connection; the
        # cause it hides is the one that counts.
        if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
            return True
        # The driver losing track of its protocol state: what a connection cut mid-operation
        # leaves behind (asyncpg raises it when the server goes away under a transaction).
        if isinstance(exc, asyncpg.exceptions.InternalClientError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def describe_url(url: str) -> str:
    """Where a ``postgresql://`` URL points, fit for messages: host, port and database only."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = parts.hostname or query.get("host", ["localhost"])[0]
        port = parts.port or int(query.get("port", ["5432"])[0])
        user = parts.username or query.get("user", [""])[0]
    except ValueError as exc:
        raise ConfigError(f"ledger.url: not a valid postgresql:// URL ({exc})") from None
    database = parts.path.lstrip("/") or query.get("dbname", [user or "postgres"])[0]
    return redact(f"postgresql://{host}:{port}/{database}")


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.password is not None or "password" in parse_qs(parts.query):
        # The URL ends up in process lists and config files: the password never goes there.
        raise ConfigError(
            "ledger.url: must not contain a password; set PGPASSWORD or ledger.password_file"
        )


class PostgresLedger:
    """The ``Ledger`` protocol over PostgreSQL. Use as ``async with PostgresLedger(url)``."""

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        instance: str | None = None,
        pool_size: int = 10,
        retry: RetryPolicy = DEFAULT_RETRY,
        command_timeout: float = 60.0,
    ) -> None:
        _check_url(url)
        self._url = url
        self.where = describe_url(url)
        self.password_file = password_file
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.pool_size = pool_size
        self.retry = retry
        self.command_timeout = command_timeout
        self._pool: Any = None

    def __repr__(self) -> str:
        return f"PostgresLedger({self.where!r})"

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._pool is not None:
            raise LedgerError(f"the ledger {self.where} is already open")
        password = self._password()
        try:
            # min_size=0: nothing connects here; the first call does, under the retry policy.
            self._pool = await asyncpg.create_pool(
                dsn=self._url,
                password=password,
                min_size=0,
                max_size=self.pool_size,
                command_timeout=self.command_timeout,
                server_settings={"application_name": f"archiver {self.instance}"[:63]},
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            raise self._translate(exc, "open") from exc
        try:
            await self.migrate()
        except BaseException:
            with contextlib.suppress(LedgerError, LedgerUnavailable):
                await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Shielded: a cancelled exit still closes the connections.
            await asyncio.shield(asyncio.wait_for(pool.close(), timeout=10))
        except _DRIVER_ERRORS:
            pool.terminate()
        except asyncio.CancelledError:
            pool.terminate()
            raise

    def _password(self) -> str | None:
        password: str | None
        if self.password_file is not None:
            try:
                password = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"ledger.password_file: cannot read {self.password_file}: "
                    f"{exc.strerror or type(exc).__name__}"
                ) from None
        else:
            password = os.environ.get("PGPASSWORD")
        register_secret(password)
        return password or None

    def _translate(self, exc: BaseException, what: str) -> LedgerError | LedgerUnavailable:
        detail = redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
        if _is_transient(exc):
            return LedgerUnavailable(
                f"the ledger {self.where} is unavailable right now ({what}): {detail}"
            )
        return LedgerError(f"the ledger {self.where} refused {what}: {detail}")

    async def _run(
        self, what: str, fn: Callable[[Any], Awaitable[_T]], *, transaction: bool = True
    ) -> _T:
        """``fn(connection)`` in one transaction, retried whole while the database is away."""
        pool = self._pool
        if pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")

        async def once() -> _T:
            try:
                async with pool.acquire() as conn:
                    if not transaction:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except _DRIVER_ERRORS as exc:
                raise self._translate(exc, what) from exc

        return await call_with_retry(self.retry, f"ledger {what}", once)

    # -- schema ------------------------------------------------------------------------------
    async def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; return the version the database is at."""
        while True:
            version, done = await self._run("migrate", self._migrate_step)
            if done:
                return version

    async def _migrate_step(self, conn: Any) -> tuple[int, bool]:
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
                f"the ledger {self.where} has schema version {current}, newer than the "
                f"{SCHEMA_VERSION} this archiver knows; upgrade archiver to use it"
            )
        if current == SCHEMA_VERSION:
            return current, True
        await conn.execute(MIGRATIONS[current])
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", current + 1)
        return current + 1, False

    # -- transitions -------------------------------------------------------------------------
    async def observe(self, recordings: Sequence[Recording], *, max_attempts: int) -> set[str]:
        if not recordings:
            return set()
        # The last sighting of an id in the page wins, as it would applied one by one.
        latest = {_clean(rec.id): rec for rec in recordings}
        ids = sorted(latest)
        recs = [latest[i] for i in ids]
        args = (
            ids,
            [_clean(r.status) for r in recs],
            [_clean(r.room_id) for r in recs],
            [_clean(r.session_id) for r in recs],
            [_clean(r.participant_id) for r in recs],
            [r.started_at for r in recs],
            [r.ended_at for r in recs],
            [_jsonb(r.metadata) for r in recs],
            max_attempts,
        )

        async def tx(conn: Any) -> set[str]:
            rows = await conn.fetch(_OBSERVE, *args)
            return {row["id"] for row in rows if row["needs_work"]}

        return await self._run("observe", tx, transaction=False)

    async def claim(
        self, recording_id: str, *, owner: str, lease_seconds: float, max_attempts: int
    ) -> int | None:
        token = secrets.token_hex(8)

        async def tx(conn: Any) -> int | None:
            attempts = await conn.fetchval(
                _CLAIM, recording_id, token, owner, float(lease_seconds), max_attempts
            )
            return None if attempts is None else int(attempts)

        return await self._run("claim", tx, transaction=False)

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool:
        async def tx(conn: Any) -> bool:
            status = await conn.execute(
                """UPDATE recordings
                   SET lease_expires = now() + make_interval(secs => $3), updated_at = now()
                   WHERE id = $1 AND state = 'in_progress' AND lease_owner = $2""",
                recording_id,
                owner,
                float(lease_seconds),
            )
            return bool(status == "UPDATE 1")

        return await self._run("heartbeat", tx, transaction=False)

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool:
        token = secrets.token_hex(8)
        retain_until = None if stored.retain_until is None else _iso(stored.retain_until)

        async def tx(conn: Any) -> bool:
            row = await conn.fetchrow(
                """SELECT state, lease_owner, attempts, completion_token
                   FROM recordings WHERE id = $1 FOR UPDATE""",
                recording_id,
            )
            if row is None:
                raise LedgerError(f"complete: the ledger has no row for {recording_id!r}")
            if row["state"] == State.ARCHIVED:
                # True only if it was this very call, retried after its answer was lost.
                return bool(row["completion_token"] == token)
            held = row["state"] == State.IN_PROGRESS and row["lease_owner"] == owner
            # As in SQLite: a lost lease is still accepted (our bytes are stored and verified;
            # the other worker's complete then returns False). Only a row nobody ever claimed
            # is a caller's bug.
            if not held and row["attempts"] == 0:
                raise LedgerError(
                    f"complete: {recording_id!r} was never claimed; claim it before completing"
                )
            await conn.execute(
                """UPDATE recordings
                   SET state = 'archived', storage_key = $2, size = $3, sha256 = $4,
                       version_id = $5, retain_until = $6, permanent = false, last_error = NULL,
                       lease_owner = NULL, lease_expires = NULL, completion_token = $7,
                       archived_at = now(), updated_at = now()
                   WHERE id = $1""",
                recording_id,
                stored.key,
                stored.size,
                stored.sha256,
                stored.version_id,
                stored.retain_until,
                token,
            )
            details = {
                "key": stored.key,
                "size": stored.size,
                "sha256": stored.sha256,
                "version_id": stored.version_id,
                "retain_until": retain_until,
            }
            await self._append_audit_tx(conn, "archived", recording_id, details)
            return True

        return await self._run("complete", tx)

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None:
        async def tx(conn: Any) -> None:
            # A lost lease changes nothing: the row is someone else's (or archived) now.
            attempts = await conn.fetchval(
                """UPDATE recordings
                   SET state = 'failed', permanent = $3, last_error = $4, lease_owner = NULL,
                       lease_expires = NULL, updated_at = now()
                   WHERE id = $1 AND state = 'in_progress' AND lease_owner = $2
                   RETURNING attempts""",
                recording_id,
                owner,
                permanent,
                _clean(error),
            )
            if attempts is not None:
                details = {"error": error, "permanent": permanent, "attempt": attempts}
                await self._append_audit_tx(conn, "failed", recording_id, details)

        await self._run("fail", tx)

    async def release(self, recording_id: str, *, owner: str) -> None:
        async def tx(conn: Any) -> None:
            await conn.execute(
                """UPDATE recordings
                   SET state = 'pending', attempts = greatest(attempts - 1, 0),
                       lease_owner = NULL, lease_expires = NULL, updated_at = now()
                   WHERE id = $1 AND state = 'in_progress' AND lease_owner = $2""",
                recording_id,
                owner,
            )

        await self._run("release", tx, transaction=False)

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        rec_id, reason = _clean(recording_id), _clean(reason)
        metadata_json = None if metadata is None else _jsonb(metadata)

        async def tx(conn: Any) -> None:
            # Rejecting the same entry again on every pass would only grow the audit chain.
            rejected = await conn.fetchval(
                """INSERT INTO recordings AS r (
                       id, state, permanent, last_error, metadata, first_seen_at, updated_at
                   ) VALUES ($1, 'failed', true, $2, coalesce($3::jsonb, '{}'), now(), now())
                   ON CONFLICT (id) DO UPDATE SET
                       state = 'failed', permanent = true, last_error = excluded.last_error,
                       metadata = coalesce($3::jsonb, r.metadata),
                       lease_owner = NULL, lease_expires = NULL, updated_at = excluded.updated_at
                   WHERE r.state <> 'archived'
                     AND NOT (r.state = 'failed' AND r.permanent
                              AND r.last_error IS NOT DISTINCT FROM excluded.last_error)
                   RETURNING id""",
                rec_id,
                reason,
                metadata_json,
            )
            if rejected is not None:
                await self._append_audit_tx(conn, "rejected", rec_id, {"reason": reason})

        await self._run("reject", tx)

    async def mark_deleted_at_source(self, recording_id: str) -> None:
        async def tx(conn: Any) -> None:
            row = await conn.fetchrow(
                "SELECT deleted_at_source FROM recordings WHERE id = $1 FOR UPDATE",
                recording_id,
            )
            if row is None:
                raise LedgerError(
                    f"mark_deleted_at_source: the ledger has no row for {recording_id!r}"
                )
            if row["deleted_at_source"] is not None:
                return
            await conn.execute(
                """UPDATE recordings SET deleted_at_source = now(), updated_at = now()
                   WHERE id = $1""",
                recording_id,
            )
            await self._append_audit_tx(conn, "deleted_at_source", recording_id, {})

        await self._run("mark_deleted_at_source", tx)

    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        async def read(conn: Any) -> LedgerRow | None:
            row = await conn.fetchrow("SELECT * FROM recordings WHERE id = $1", recording_id)
            return None if row is None else decode_row(row, _utc)

        return await self._run("get", read, transaction=False)

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        if not recording_ids:
            return {}
        ids = list(dict.fromkeys(recording_ids))

        async def read(conn: Any) -> dict[str, State]:
            rows = await conn.fetch(
                "SELECT id, state FROM recordings WHERE id = ANY($1::text[])", ids
            )
            try:
                return {row["id"]: State(row["state"]) for row in rows}
            except ValueError as exc:
                raise LedgerError(f"the ledger holds a row in an unknown state: {exc}") from exc

        return await self._run("states", read, transaction=False)

    async def summary(self) -> Summary:
        async def read(conn: Any) -> list[Any]:
            return cast(
                list[Any],
                await conn.fetch(
                    """SELECT state, count(*) AS n, count(*) FILTER (WHERE permanent) AS perm,
                              min(ended_at) FILTER (WHERE NOT permanent) AS oldest,
                              coalesce(sum(size), 0) AS bytes
                       FROM recordings GROUP BY state"""
                ),
            )

        counts = dict.fromkeys(State, 0)
        permanent = retryable = archived_bytes = 0
        oldest: datetime | None = None
        for row in await self._run("summary", read, transaction=False):
            try:
                state = State(row["state"])
            except ValueError as exc:
                raise LedgerError(
                    f"the ledger holds rows in unknown state {row['state']!r}"
                ) from exc
            counts[state] = int(row["n"])
            if state == State.FAILED:
                permanent, retryable = int(row["perm"]), int(row["n"]) - int(row["perm"])
            if state == State.ARCHIVED:
                archived_bytes = int(row["bytes"])
            elif row["oldest"] is not None and (oldest is None or row["oldest"] < oldest):
                oldest = row["oldest"]
        return Summary(
            counts=counts,
            permanent_failures=permanent,
            retryable_failures=retryable,
            oldest_unarchived_ended_at=_utc(oldest),
            archived_bytes=archived_bytes,
        )

    async def failures(self, limit: int = 100) -> list[LedgerRow]:
        async def read(conn: Any) -> list[LedgerRow]:
            rows = await conn.fetch(
                """SELECT * FROM recordings WHERE state = 'failed'
                   ORDER BY updated_at DESC, id LIMIT $1""",
                limit,
            )
            return [decode_row(row, _utc) for row in rows]

        return await self._run("failures", read, transaction=False)

    async def iter_archived(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        if since is None and until is None:
            # Rows with no known end come first, as in SQLite; a bound excludes them.
            after_id = ""
            while batch := await self._archived_batch(
                """SELECT * FROM recordings
                   WHERE state = 'archived' AND ended_at IS NULL AND id > $1
                   ORDER BY id LIMIT $2""",
                after_id,
                _BATCH,
            ):
                for row in batch:
                    yield row
                after_id = batch[-1].id
        where = ["state = 'archived'", "ended_at IS NOT NULL"]
        params: list[Any] = []
        if since is not None:
            params.append(since)
            where.append(f"ended_at >= ${len(params)}")
        if until is not None:
            params.append(until)
            where.append(f"ended_at < ${len(params)}")
        base = " AND ".join(where)
        n = len(params)
        first = f"SELECT * FROM recordings WHERE {base} ORDER BY ended_at, id LIMIT ${n + 1}"
        more = (
            f"SELECT * FROM recordings WHERE {base} AND (ended_at, id) > (${n + 1}, ${n + 2}) "
            f"ORDER BY ended_at, id LIMIT ${n + 3}"
        )
        batch = await self._archived_batch(first, *params, _BATCH)
        while batch:
            for row in batch:
                yield row
            last = batch[-1]
            batch = await self._archived_batch(more, *params, last.ended_at, last.id, _BATCH)

    async def _archived_batch(self, query: str, *args: Any) -> list[LedgerRow]:
        async def read(conn: Any) -> list[LedgerRow]:
            return [decode_row(row, _utc) for row in await conn.fetch(query, *args)]

        return await self._run("iter_archived", read, transaction=False)

    # -- audit chain, passes, settings -------------------------------------------------------
    async def append_audit(
        self, action: str, recording_id: str | None, details: Mapping[str, Any]
    ) -> AuditEntry:
        token = secrets.token_hex(8)

        async def tx(conn: Any) -> AuditEntry:
            mine = await conn.fetchrow("SELECT * FROM audit WHERE token = $1", token)
            if mine is not None:  # this very call, retried after its answer was lost
                return decode_audit(mine, _utc)
            return await self._append_audit_tx(conn, action, recording_id, details, token)

        return await self._run("append_audit", tx)

    @staticmethod
    async def _append_audit_tx(
        conn: Any,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
        token: str | None = None,
    ) -> AuditEntry:
        """Chain one entry inside the caller's transaction, holding the chain head until commit."""
        # The clock is read after the lock is granted, so times follow the chain's order.
        head = await conn.fetchrow(
            """WITH head AS (SELECT seq, hash FROM audit_head FOR UPDATE)
               SELECT seq, hash, clock_timestamp() AS at FROM head"""
        )
        if head is None:
            raise LedgerError("the ledger has no audit chain head (a damaged schema)")
        seq, prev_hash = int(head["seq"]) + 1, str(head["hash"])
        at = _utc(head["at"])
        assert at is not None
        details_text = dumps(details)
        # Hash what will be read back, so the entry re-verifies whatever ``details`` held.
        stored_details = json.loads(details_text)
        digest = audit.entry_hash(prev_hash, seq, at, action, recording_id, stored_details)
        await conn.execute(
            """WITH entry AS (
                   INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash,
                                      token)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               )
               UPDATE audit_head SET seq = $1, hash = $7""",
            seq,
            at,
            action,
            recording_id,
            details_text,
            prev_hash,
            digest,
            token,
        )
        return AuditEntry(
            seq=seq,
            at=at,
            action=action,
            recording_id=recording_id,
            details=stored_details,
            prev_hash=prev_hash,
            hash=digest,
        )

    async def iter_audit(self) -> AsyncIterator[AuditEntry]:
        after = 0
        while True:

            async def read(conn: Any, after: int = after) -> list[AuditEntry]:
                rows = await conn.fetch(
                    "SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2", after, _BATCH
                )
                return [decode_audit(row, _utc) for row in rows]

            batch = await self._run("iter_audit", read, transaction=False)
            if not batch:
                return
            for entry in batch:
                yield entry
            after = batch[-1].seq

    async def record_pass(self, record: PassRecord) -> None:
        token = secrets.token_hex(8)

        async def tx(conn: Any) -> None:
            await conn.execute(
                """INSERT INTO passes (
                       started_at, finished_at, ok, listed, enqueued, archived, failed,
                       listing_window, error, instance, extra, token
                   ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)
                   ON CONFLICT (token) DO NOTHING""",
                record.started_at,
                record.finished_at,
                record.ok,
                record.listed,
                record.enqueued,
                record.archived,
                record.failed,
                _clean(record.window),
                _clean(record.error),
                _clean(record.instance),
                _jsonb(record.extra),
                token,
            )

        await self._run("record_pass", tx, transaction=False)

    async def last_passes(self, limit: int = 10) -> list[PassRecord]:
        async def read(conn: Any) -> list[PassRecord]:
            rows = await conn.fetch(
                "SELECT * FROM passes ORDER BY finished_at DESC, id DESC LIMIT $1", limit
            )
            return [decode_pass(row, _utc) for row in rows]

        return await self._run("last_passes", read, transaction=False)

    async def get_meta(self, key: str) -> str | None:
        async def read(conn: Any) -> str | None:
            value = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
            return None if value is None else str(value)

        return await self._run("get_meta", read, transaction=False)

    async def set_meta(self, key: str, value: str) -> None:
        async def tx(conn: Any) -> None:
            await conn.execute(
                """INSERT INTO meta (key, value) VALUES ($1, $2)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value, token = NULL""",
                key,
                value,
            )

        await self._run("set_meta", tx, transaction=False)

    async def advance_meta(self, key: str, expected: str | None, new: str) -> bool:
        token = secrets.token_hex(8)

        async def tx(conn: Any) -> bool:
            if expected is None:
                done = await conn.fetchval(
                    """INSERT INTO meta (key, value, token) VALUES ($1, $2, $3)
                       ON CONFLICT (key) DO NOTHING RETURNING true""",
                    key,
                    new,
                    token,
                )
            else:
                done = await conn.fetchval(
                    """UPDATE meta SET value = $2, token = $3
                       WHERE key = $1 AND value = $4 RETURNING true""",
                    key,
                    new,
                    token,
                    expected,
                )
            if done:
                return True
            # Not changed now; changed by this very call if it is being retried.
            return bool(
                await conn.fetchval(
                    "SELECT true FROM meta WHERE key = $1 AND value = $2 AND token = $3",
                    key,
                    new,
                    token,
                )
            )

        return await self._run("advance_meta", tx)

    # -- export and import (``archiver.ledger.portable``) -------------------------------------
    async def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        pool = self._pool
        if pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")
        queries = (
            ("recording", f"SELECT {_RECORDING_COLUMNS} FROM recordings ORDER BY id"),
            ("audit", f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq"),
            (
                "pass",
                """SELECT started_at, finished_at, ok, listed, enqueued, archived, failed,
                          listing_window AS window, error, instance, extra
                   FROM passes ORDER BY id""",
            ),
            ("meta", "SELECT key, value FROM meta ORDER BY key"),
        )
        try:
            # One snapshot of every table, however long writing it out takes; instances keep
            # working meanwhile.
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                for kind, query in queries:
                    async for row in conn.cursor(query, prefetch=_BATCH):
                        yield kind, _export_record(kind, row)
        except _DRIVER_ERRORS as exc:
            raise self._translate(exc, "export") from exc

    async def import_records(
        self, records: AsyncIterable[tuple[str, Mapping[str, Any]]], *, replace: bool = False
    ) -> None:
        pool = self._pool
        if pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")
        # Not retried: a stream cannot be replayed. It is one transaction, so a failure leaves
        # the ledger as it was and the import can simply be run again.
        try:
            async with pool.acquire() as conn, conn.transaction():
                await self._import_begin(conn, replace)
                batch: list[Mapping[str, Any]] = []
                batch_kind = ""
                last_audit: Mapping[str, Any] | None = None
                async for kind, record in records:
                    if batch and (kind != batch_kind or len(batch) >= _BATCH):
                        await _import_batch(conn, batch_kind, batch)
                        batch = []
                    batch_kind = kind
                    batch.append(record)
                    if kind == "audit":
                        last_audit = record
                if batch:
                    await _import_batch(conn, batch_kind, batch)
                if last_audit is not None:
                    await conn.execute(
                        "UPDATE audit_head SET seq = $1, hash = $2",
                        last_audit["seq"],
                        last_audit["hash"],
                    )
        except _DRIVER_ERRORS as exc:
            raise self._translate(exc, "import") from exc

    async def _import_begin(self, conn: Any, replace: bool) -> None:
        # Nobody writes while the history is replaced underneath them.
        await conn.execute(
            "LOCK TABLE recordings, audit, audit_head, passes, meta IN EXCLUSIVE MODE"
        )
        tables = ("recordings", "audit", "passes", "meta")
        filled = [t for t in tables if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {t})")]
        if filled and not replace:
            raise LedgerError(
                f"the ledger {self.where} is not empty ({', '.join(filled)}); import only into "
                "a new ledger, or replace its contents explicitly"
            )
        await conn.execute("TRUNCATE recordings, audit, passes, meta RESTART IDENTITY")
        await conn.execute(f"UPDATE audit_head SET seq = 0, hash = '{audit.GENESIS}'")


def _export_record(kind: str, row: Any) -> dict[str, Any]:
    record = dict(row.items())
    if kind == "recording":
        record["metadata"] = json_object(record["metadata"], f"the metadata of {row['id']!r}")
    elif kind == "audit":
        record["details"] = json_object(record["details"], f"audit entry {row['seq']}")
    elif kind == "pass":
        record["extra"] = json_object(record["extra"], "a pass")
    for name, value in record.items():
        if isinstance(value, datetime):
            record[name] = value.astimezone(UTC)
    return record


async def _import_batch(conn: Any, kind: str, records: list[Mapping[str, Any]]) -> None:
    if kind == "recording":
        columns = list(RECORDING_FIELDS)
        rows = [
            tuple(_jsonb(r[name]) if name == "metadata" else _clean(r[name]) for name in columns)
            for r in records
        ]
        await conn.copy_records_to_table("recordings", records=rows, columns=columns)
    elif kind == "audit":
        columns = list(AUDIT_FIELDS)
        rows = [
            tuple(dumps(r[name]) if name == "details" else r[name] for name in columns)
            for r in records
        ]
        await conn.copy_records_to_table("audit", records=rows, columns=columns)
    elif kind == "pass":
        columns = [("listing_window" if name == "window" else name) for name in PASS_FIELDS]
        rows = [
            tuple(_jsonb(r[name]) if name == "extra" else _clean(r[name]) for name in PASS_FIELDS)
            for r in records
        ]
        await conn.copy_records_to_table("passes", records=rows, columns=columns)
    elif kind == "meta":
        await conn.executemany(
            "INSERT INTO meta (key, value) VALUES ($1, $2)",
            [(_clean(r["key"]), _clean(r["value"])) for r in records],
        )
    else:
        raise LedgerError(f"import: unknown record type {kind!r}")
