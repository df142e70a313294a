"""The ledger in PostgreSQL, shared by several archiver instances (contract in ``base``).

The rules are ``archiver.ledger.core``'s; this module carries them out in PostgreSQL. What
sharing adds:

- Leases run on the database's clock (``now()``), so hosts whose clocks disagree still agree on
  when a lease expires. A transition locks the rows it reads (``FOR UPDATE``, in id order), so
  concurrent claimers of a row queue on its lock and the loser finds it taken. Nothing is
  recovered at start-up: other instances may be alive, so a dead one's rows come back when its
  leases expire (``core.claimable``).
- The audit chain stays one linear chain with many writers: an append locks the chain head (the
  single row of ``audit_head``) inside the transition's own transaction.
- Migrations run at start-up, each in a transaction holding an advisory lock, so instances that
  start together apply every version once.
- Connection lost or refused, a server shutting down or starting up, too many connections,
  serialization failures and deadlocks are ``LedgerUnavailable``; every call then retries its whole
  transaction (``archiver.retry``), so an instance rides out a database restart. Retrying is safe
  after a commit whose answer was lost: a transition's ``owner`` names one transfer, so its retry
  finds its own commit (``core``); an audit append, a pass or a compare-and-set carries a token.
- The password comes from ``password_file`` or ``PGPASSWORD`` and is registered with
  ``archiver.redact``; messages name host, port and database, never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from archiver import audit
from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger import core
from archiver.ledger.base import AuditEntry, Budget, PassRecord, Summary
from archiver.ledger.portable import (
    AUDIT_FIELDS,
    BRIEF_FIELDS,
    PASS_FIELDS,
    RECORDING_FIELDS,
    V1_MAX_ATTEMPTS,
)
from archiver.ledger.rows import decode_audit, decode_pass, decode_row, dumps, json_object
from archiver.ledger.shared import SharedLedger
from archiver.models import LedgerRow, State
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
]

SCHEMA_VERSION = len(MIGRATIONS)

# Held (per database) while migrating: the bytes of "ARCHIVER" as a bigint.
_MIGRATION_LOCK = int.from_bytes(b"ARCHIVER", "big")

_BATCH = 1000  # rows per read in the streaming iterators and per import batch

DEFAULT_RETRY = RetryPolicy(attempts=30, total_seconds=120.0, initial_backoff=0.1, max_backoff=5.0)

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


_BRIEF_COLUMNS = ", ".join(BRIEF_FIELDS)
# The array type ``unnest`` needs for each kind of column (``portable.RECORDING_FIELDS``).
_ARRAY_TYPES = {"text": "text[]", "int": "bigint[]", "bool": "boolean[]", "ts": "timestamptz[]"}


def _pg_value(name: str, value: Any) -> Any:
    """A column value as asyncpg sends it: jsonb as text, text cleaned of what PostgreSQL
    refuses."""
    if isinstance(value, State):
        return value.value
    if RECORDING_FIELDS[name] == "object":
        return _jsonb(value if value is not None else {})
    return _clean(value)


def _insert_sql() -> str:
    columns = list(RECORDING_FIELDS)
    arrays = ", ".join(
        f"${n}::{_ARRAY_TYPES.get(RECORDING_FIELDS[c].rstrip('?'), 'text[]')}"
        for n, c in enumerate(columns, start=1)
    )
    select = ", ".join(
        f"u.{c}::jsonb" if RECORDING_FIELDS[c] == "object" else f"u.{c}" for c in columns
    )
    return (
        f"INSERT INTO recordings ({', '.join(columns)}) "
        f"SELECT {select} FROM unnest({arrays}) AS u({', '.join(columns)}) "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


_INSERT = _insert_sql()


def _update_sql(columns: Sequence[str]) -> str:
    unknown = set(columns) - set(RECORDING_FIELDS)
    if unknown:
        raise LedgerError(f"no such ledger column(s): {', '.join(sorted(unknown))}")
    sets = ", ".join(
        f"{c} = ${n}::jsonb" if RECORDING_FIELDS[c] == "object" else f"{c} = ${n}"
        for n, c in enumerate(columns, start=2)
    )
    return f"UPDATE recordings SET {sets} WHERE id = $1"


class PostgresLedger(SharedLedger):
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
        budget: Budget | None = None,
    ) -> None:
        _check_url(url)
        self._url = url
        self.where = describe_url(url)
        self.password_file = password_file
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.pool_size = pool_size
        self.retry_policy = retry
        self.command_timeout = command_timeout
        self.budget = budget or Budget()
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

        return await call_with_retry(self.retry_policy, f"ledger {what}", once)

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

    # -- carrying out the core's programs (``SharedLedger``'s primitives) -----------------------
    async def _carry_out(
        self,
        what: str,
        make: Callable[[], core.Program[_T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> _T:
        """One transaction, retried whole (with a new program each time) while the database is
        away. Every commit here is durable; there is no group commit to join."""

        async def tx(conn: Any) -> _T:
            clock: list[datetime] = []
            return await core.run_async(make(), functools.partial(self._answer, conn, clock))

        return await self._run(what, tx)

    async def _carry_out_dry(self, make: Callable[[], core.Program[_T]]) -> _T:
        async def read(conn: Any) -> _T:
            answer = functools.partial(self._answer, conn, [], dry=True)
            return await core.run_async(make(), answer)

        return await self._run("dry run", read, transaction=False)

    async def _clock(self) -> datetime:
        async def read(conn: Any) -> datetime | None:
            return _utc(await conn.fetchval("SELECT now()"))

        now = await self._run("clock", read, transaction=False)
        assert now is not None
        return now

    async def _answer(
        self, conn: Any, clock: list[datetime], op: core.Op, *, dry: bool = False
    ) -> Any:
        """Carry out one request; ``dry`` reads without locking and writes nothing."""
        if dry and isinstance(op, core.Insert | core.Update | core.Audit):
            return len(op.rows) if isinstance(op, core.Insert) else None
        lock = "" if dry else "FOR UPDATE"
        match op:
            case core.Clock():
                if not clock:  # one time per transaction: the database's
                    now = _utc(await conn.fetchval("SELECT now()"))
                    assert now is not None
                    clock.append(now)
                return clock[0]
            case core.Load(id=rid):
                row = await conn.fetchrow(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = $1 {lock}", rid
                )
                return None if row is None else decode_row(row, _utc)
            case core.LoadStates(ids=ids):
                return _states(
                    await conn.fetch(
                        "SELECT id, state FROM recordings WHERE id = ANY($1::text[])",
                        [_clean(i) for i in ids],
                    )
                )
            case core.LoadMany(ids=ids):
                rows = await conn.fetch(
                    f"""SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = ANY($1::text[])
                        ORDER BY id {lock}""",
                    [_clean(i) for i in ids],
                )
                return {row["id"]: decode_row(row, _utc) for row in rows}
            case core.LoadState(state=state):
                rows = await conn.fetch(
                    f"""SELECT {_BRIEF_COLUMNS} FROM recordings WHERE state = $1
                        ORDER BY id {lock}""",
                    state.value,
                )
                return [decode_row(row, _utc) for row in rows]
            case core.Insert(rows=new):
                if not new:
                    return 0
                arrays = [[_pg_value(c, row[c]) for row in new] for c in RECORDING_FIELDS]
                return len(await conn.fetch(_INSERT, *arrays))
            case core.Update(changes=changes):
                groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
                for rid, values in changes:
                    params = (_clean(rid), *(_pg_value(c, v) for c, v in values.items()))
                    groups.setdefault(tuple(values), []).append(params)
                for changed, params_list in groups.items():
                    await conn.executemany(_update_sql(changed), params_list)
                return None
            case core.Audit(action=action, recording_id=rid, details=details):
                return await self._append_audit_tx(conn, action, _clean(rid), details)
        raise LedgerError(f"the PostgreSQL ledger cannot carry out {op!r}")

    # -- transitions (rules: ``archiver.ledger.core``) ------------------------------------------
    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        async def read(conn: Any) -> LedgerRow | None:
            row = await conn.fetchrow("SELECT * FROM recordings WHERE id = $1", recording_id)
            return None if row is None else decode_row(row, _utc)

        return await self._run("get", read, transaction=False)

    async def _states_of(self, ids: list[str]) -> dict[str, State]:
        async def read(conn: Any) -> dict[str, State]:
            return _states(
                await conn.fetch("SELECT id, state FROM recordings WHERE id = ANY($1::text[])", ids)
            )

        return await self._run("states", read, transaction=False)

    async def _brief_rows(self, ids: list[str]) -> dict[str, LedgerRow]:
        async def read(conn: Any) -> dict[str, LedgerRow]:
            rows = await conn.fetch(
                f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = ANY($1::text[])",
                ids,
            )
            return {row["id"]: decode_row(row, _utc) for row in rows}

        return await self._run("states", read, transaction=False)

    async def summary(self) -> Summary:
        async def read(conn: Any) -> list[Any]:
            # ``core.needs_action``: failed for good, or out of attempts under today's budget.
            rows: list[Any] = await conn.fetch(
                """SELECT state, state = 'failed' AND (permanent OR attempts >= $1) AS spent,
                          count(*) AS n, min(ended_at) AS oldest,
                          coalesce(sum(size), 0) AS bytes
                   FROM recordings GROUP BY state, spent""",
                self.budget.max_attempts,
            )
            return rows

        groups = await self._run("summary", read, transaction=False)
        return core.fold_summary(
            core.SummaryGroup(
                row["state"],
                bool(row["spent"]),
                int(row["n"]),
                _utc(row["oldest"]),
                int(row["bytes"]),
            )
            for row in groups
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

    async def _iter_rows(
        self, states: tuple[State, ...], since: datetime | None, until: datetime | None
    ) -> AsyncIterator[LedgerRow]:
        """Rows in ``states`` by (ended_at, id), in keyset pages; without bounds, rows with no
        known end first (as in every ledger); a bound excludes them."""
        names = [s.value for s in states]
        if since is None and until is None:
            after_id = ""
            while batch := await self._rows_batch(
                """SELECT * FROM recordings
                   WHERE state = ANY($1::text[]) AND ended_at IS NULL AND id > $2
                   ORDER BY id LIMIT $3""",
                names,
                after_id,
                _BATCH,
            ):
                for row in batch:
                    yield row
                after_id = batch[-1].id
        where = ["state = ANY($1::text[])", "ended_at IS NOT NULL"]
        params: list[Any] = [names]
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
        batch = await self._rows_batch(first, *params, _BATCH)
        while batch:
            for row in batch:
                yield row
            last = batch[-1]
            batch = await self._rows_batch(more, *params, last.ended_at, last.id, _BATCH)

    async def _rows_batch(self, query: str, *args: Any) -> list[LedgerRow]:
        async def read(conn: Any) -> list[LedgerRow]:
            return [decode_row(row, _utc) for row in await conn.fetch(query, *args)]

        return await self._run("read rows", read, transaction=False)

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
        at = _utc(head["at"])
        assert at is not None
        entry, details_text = core.chain_entry(
            int(head["seq"]), str(head["hash"]), at, action, recording_id, details
        )
        await conn.execute(
            """WITH entry AS (
                   INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash,
                                      token)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               )
               UPDATE audit_head SET seq = $1, hash = $7""",
            entry.seq,
            at,
            action,
            recording_id,
            details_text,
            entry.prev_hash,
            entry.hash,
            token,
        )
        return entry

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


def _states(rows: list[Any]) -> dict[str, State]:
    try:
        return {row["id"]: State(row["state"]) for row in rows}
    except ValueError as exc:
        raise LedgerError(f"the ledger holds a row in an unknown state: {exc}") from exc


def _export_record(kind: str, row: Any) -> dict[str, Any]:
    record = dict(row.items())
    if kind == "recording":
        for name, field_kind in RECORDING_FIELDS.items():
            if field_kind == "object":
                record[name] = json_object(record[name], f"the {name} of {row['id']!r}")
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
            tuple(
                _jsonb(r[name]) if RECORDING_FIELDS[name] == "object" else _clean(r[name])
                for name in columns
            )
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
