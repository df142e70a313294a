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
- The busy transitions (claim, heartbeat, complete, note_upload) share group transactions, as
  in the SQLite ledger (``postgres_group``); commits holding no completion do not wait for the
  disk (``synchronous_commit = off``), and the next durable one flushes them in order.
- Migrations run at start-up, each in a transaction holding an advisory lock, so instances that
  start together apply every version once (``postgres_schema``).
- Connection lost or refused, a server shutting down or starting up, too many connections,
  serialization failures and deadlocks are ``LedgerUnavailable`` (``postgres_driver``). Nothing
  here retries: ``open_ledger`` wraps this ledger in ``archiver.ledger.retrying``, which runs a
  call's whole transaction again, so an instance rides out a database restart. A retry after a
  commit whose answer was lost changes nothing twice: a transition's ``owner`` names one
  transfer, so its retry finds its own commit (``core``); an audit append, a pass or a
  compare-and-set keeps the token the wrapper hands every attempt of one call.
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
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
)
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import asyncpg

from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger import core, ops, postgres_portable, reads
from archiver.ledger.base import AuditEntry, Budget, Ledger, PassRecord, Summary
from archiver.ledger.grouping import Groups
from archiver.ledger.portable import BRIEF_FIELDS, RECORDING_FIELDS
from archiver.ledger.postgres_driver import (
    DRIVER_ERRORS,
    INSERT,
    check_url,
    clean,
    jsonb,
    pg_value,
    translate,
    update_sql,
    utc,
)
from archiver.ledger.postgres_driver import describe_url as describe_url
from archiver.ledger.postgres_group import carry_out_group
from archiver.ledger.postgres_schema import MIGRATIONS as MIGRATIONS
from archiver.ledger.postgres_schema import SCHEMA_VERSION as SCHEMA_VERSION
from archiver.ledger.postgres_schema import migrate_step
from archiver.ledger.rows import decode_audit, decode_pass, decode_row
from archiver.ledger.shared import SharedLedger
from archiver.models import LedgerRow, State
from archiver.redact import register_secret

_T = TypeVar("_T")

_BATCH = 1000  # rows per read in the streaming iterators

_BRIEF_COLUMNS = ", ".join(BRIEF_FIELDS)

_AppendAudit = tuple[str, str | None, Mapping[str, Any], str | None]


@dataclass(slots=True)
class _Grouped:
    """A transition waiting for the next group transaction (``postgres_group``)."""

    what: str
    make: Callable[[], ops.Program[Any]]
    durable: bool


async def _keep_session(conn: Any) -> None:
    """A connection's reset on its way back to the pool. The driver has already rolled back any
    transaction left open; the rest of its default reset (advisory locks, cursors, LISTEN,
    settings) is a round trip per call for what this ledger never leaves behind: its advisory
    lock is a transaction's, its settings ``SET LOCAL``."""


class PostgresLedger(SharedLedger):
    """The ``Ledger`` protocol over PostgreSQL. Use as ``async with PostgresLedger(url)``."""

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        instance: str | None = None,
        pool_size: int = 10,
        command_timeout: float = 60.0,
        budget: Budget | None = None,
    ) -> None:
        check_url(url)
        self._url = url
        self.where = describe_url(url)
        self.password_file = password_file
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.pool_size = pool_size
        self.command_timeout = command_timeout
        self.budget = budget or Budget()
        self._pool: Any = None
        # Transitions waiting for the next group transaction (touched only on the event loop).
        self._groups: Groups[_Grouped] = Groups(self._write_group)

    def __repr__(self) -> str:
        return f"PostgresLedger({self.where!r})"

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._pool is not None:
            raise LedgerError(f"the ledger {self.where} is already open")
        password = self._password()
        try:
            # min_size=0: nothing connects here; the first call does.
            self._pool = await asyncpg.create_pool(
                dsn=self._url,
                password=password,
                min_size=0,
                max_size=self.pool_size,
                command_timeout=self.command_timeout,
                reset=_keep_session,
                server_settings={"application_name": f"archiver {self.instance}"[:63]},
            )
        except (*DRIVER_ERRORS, ValueError) as exc:
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
        except DRIVER_ERRORS:
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
        return translate(exc, self.where, what)

    async def _run(
        self,
        what: str,
        fn: Callable[[Any], Awaitable[_T]],
        *,
        transaction: bool = True,
        durable: bool = True,
    ) -> _T:
        """``fn(connection)`` in one transaction, once: a database away raises
        ``LedgerUnavailable``, and the wrapper (``archiver.ledger.retrying``) decides.
        ``durable=False``: the commit does not wait for the disk; the next durable commit (its
        WAL is flushed in order) makes it durable too."""
        pool = self._pool
        if pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")
        try:
            async with pool.acquire() as conn:
                if not transaction:
                    return await fn(conn)
                async with conn.transaction():
                    if not durable:
                        await conn.execute("SET LOCAL synchronous_commit = off")
                    return await fn(conn)
        except DRIVER_ERRORS as exc:
            raise self._translate(exc, what) from exc

    # -- schema ------------------------------------------------------------------------------
    async def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; return the version the database is at."""
        while True:
            version, done = await self._run("migrate", lambda conn: migrate_step(conn, self.where))
            if done:
                return version

    # -- carrying out the core's programs (``SharedLedger``'s primitives) -----------------------
    async def _carry_out(
        self,
        what: str,
        make: Callable[[], ops.Program[_T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> _T:
        """One transaction (a retry of the call runs a new program); ``grouped``, the next
        group transaction (``postgres_group``)."""
        if grouped:
            result: _T = await self._grouped(what, make, durable)
            return result

        async def tx(conn: Any) -> _T:
            clock: list[datetime] = []
            return await ops.run_async(make(), functools.partial(self._answer, conn, clock))

        return await self._run(what, tx, durable=durable)

    async def _grouped(self, what: str, make: Callable[[], ops.Program[Any]], durable: bool) -> Any:
        if self._pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")
        return await self._groups.join(_Grouped(what, make, durable))

    async def _write_group(self, batch: list[_Grouped]) -> list[Any]:
        """Each transition's result or error, from one transaction."""
        try:
            return await self._run(
                batch[0].what if len(batch) == 1 else f"{len(batch)} transitions at once",
                functools.partial(
                    carry_out_group,
                    makes=[item.make for item in batch],
                    append_audits=self._append_audits_tx,
                ),
                durable=any(item.durable for item in batch),
            )
        except LedgerError as exc:
            if len(batch) == 1:
                return [exc]
            # The database refused a statement and the group rolled back: each alone, so that
            # the one it refuses fails and no other.
            return [result for item in batch for result in await self._write_group([item])]
        except Exception as exc:  # unavailable: each caller's retry runs its transition again
            return [exc] * len(batch)

    async def _carry_out_dry(self, make: Callable[[], ops.Program[_T]]) -> _T:
        async def read(conn: Any) -> _T:
            answer = functools.partial(self._answer, conn, [], dry=True)
            return await ops.run_async(make(), answer)

        return await self._run("dry run", read, transaction=False)

    async def _clock(self) -> datetime:
        async def read(conn: Any) -> datetime | None:
            return utc(await conn.fetchval("SELECT now()"))

        now = await self._run("clock", read, transaction=False)
        assert now is not None
        return now

    async def _answer(
        self, conn: Any, clock: list[datetime], op: ops.Op, *, dry: bool = False
    ) -> Any:
        """Carry out one request; ``dry`` reads without locking and writes nothing."""
        if dry and isinstance(op, ops.Insert | ops.Update | ops.Audit):
            return len(op.rows) if isinstance(op, ops.Insert) else None
        lock = "" if dry else "FOR UPDATE"
        match op:
            case ops.Clock():
                if not clock:  # one time per transaction: the database's
                    now = utc(await conn.fetchval("SELECT now()"))
                    assert now is not None
                    clock.append(now)
                return clock[0]
            case ops.Load(id=rid):
                row = await conn.fetchrow(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = $1 {lock}", rid
                )
                return None if row is None else decode_row(row, utc)
            case ops.LoadStates(ids=ids):
                return _states(
                    await conn.fetch(
                        "SELECT id, state FROM recordings WHERE id = ANY($1::text[])",
                        [clean(i) for i in ids],
                    )
                )
            case ops.LoadMany(ids=ids):
                rows = await conn.fetch(
                    f"""SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = ANY($1::text[])
                        ORDER BY id {lock}""",
                    [clean(i) for i in ids],
                )
                return {row["id"]: decode_row(row, utc) for row in rows}
            case ops.LoadState(state=state):
                rows = await conn.fetch(
                    f"""SELECT {_BRIEF_COLUMNS} FROM recordings WHERE state = $1
                        ORDER BY id {lock}""",
                    state.value,
                )
                return [decode_row(row, utc) for row in rows]
            case ops.Insert(rows=new):
                if not new:
                    return 0
                arrays = [[pg_value(c, row[c]) for row in new] for c in RECORDING_FIELDS]
                return len(await conn.fetch(INSERT, *arrays))
            case ops.Update(changes=changes):
                groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
                for rid, values in changes:
                    params = (clean(rid), *(pg_value(c, v) for c, v in values.items()))
                    groups.setdefault(tuple(values), []).append(params)
                for changed, params_list in groups.items():
                    await conn.executemany(update_sql(changed), params_list)
                return None
            case ops.Audit(action=action, recording_id=rid, details=details):
                return await self._append_audit_tx(conn, action, clean(rid), details)
        raise LedgerError(f"the PostgreSQL ledger cannot carry out {op!r}")

    # -- transitions (rules: ``archiver.ledger.core``) ------------------------------------------
    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        async def read(conn: Any) -> LedgerRow | None:
            row = await conn.fetchrow("SELECT * FROM recordings WHERE id = $1", recording_id)
            return None if row is None else decode_row(row, utc)

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
            return {row["id"]: decode_row(row, utc) for row in rows}

        return await self._run("states", read, transaction=False)

    async def summary(self) -> Summary:
        async def read(conn: Any) -> Summary:
            rows = await conn.fetch(reads.summary_query("$1"), self.budget.max_attempts)
            return reads.summary_of(rows, utc)

        return await self._run("summary", read, transaction=False)

    async def _rows_where(self, where: str, order: str, limit: int) -> list[LedgerRow]:
        async def read(conn: Any) -> list[LedgerRow]:
            sql = f"SELECT * FROM recordings WHERE {where} ORDER BY {order} LIMIT $1"
            return [decode_row(row, utc) for row in await conn.fetch(sql, limit)]

        return await self._run("rows", read, transaction=False)

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
            return [decode_row(row, utc) for row in await conn.fetch(query, *args)]

        return await self._run("read rows", read, transaction=False)

    # -- audit chain, passes, settings -------------------------------------------------------
    async def append_audit(
        self,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
        *,
        token: str | None = None,
    ) -> AuditEntry:
        token = token or secrets.token_hex(8)

        async def tx(conn: Any) -> AuditEntry:
            mine = await conn.fetchrow("SELECT * FROM audit WHERE token = $1", token)
            if mine is not None:  # this very call, retried after its answer was lost
                return decode_audit(mine, utc)
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
        entries = await PostgresLedger._append_audits_tx(
            conn, [(action, recording_id, details, token)]
        )
        return entries[0]

    @staticmethod
    async def _append_audits_tx(conn: Any, appends: list[_AppendAudit]) -> list[AuditEntry]:
        """Chain these entries, in order, inside the caller's transaction, holding the chain
        head until commit: two round trips however many."""
        # The clock is read after the lock is granted, so times follow the chain's order.
        head = await conn.fetchrow(
            """WITH head AS (SELECT seq, hash FROM audit_head FOR UPDATE)
               SELECT seq, hash, clock_timestamp() AS at FROM head"""
        )
        if head is None:
            raise LedgerError("the ledger has no audit chain head (a damaged schema)")
        at = utc(head["at"])
        assert at is not None
        seq, prev = int(head["seq"]), str(head["hash"])
        entries: list[AuditEntry] = []
        texts: list[str] = []
        for action, recording_id, details, _ in appends:
            entry, details_text = core.chain_entry(seq, prev, at, action, recording_id, details)
            entries.append(entry)
            texts.append(details_text)
            seq, prev = entry.seq, entry.hash
        await conn.execute(
            """WITH entry AS (
                   INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash,
                                      token)
                   SELECT u.seq, $2, u.action, u.recording_id, u.details, u.prev_hash, u.hash,
                          u.token
                   FROM unnest($1::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                               $7::text[], $8::text[])
                        AS u(seq, action, recording_id, details, prev_hash, hash, token)
               )
               UPDATE audit_head SET seq = $9, hash = $10""",
            [e.seq for e in entries],
            at,
            [e.action for e in entries],
            [e.recording_id for e in entries],
            texts,
            [e.prev_hash for e in entries],
            [e.hash for e in entries],
            [token for *_, token in appends],
            seq,
            prev,
        )
        return entries

    async def iter_audit(self) -> AsyncIterator[AuditEntry]:
        after = 0
        while True:

            async def read(conn: Any, after: int = after) -> list[AuditEntry]:
                rows = await conn.fetch(
                    "SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2", after, _BATCH
                )
                return [decode_audit(row, utc) for row in rows]

            batch = await self._run("iter_audit", read, transaction=False)
            if not batch:
                return
            for entry in batch:
                yield entry
            after = batch[-1].seq

    async def record_pass(self, record: PassRecord, *, token: str | None = None) -> None:
        token = token or secrets.token_hex(8)

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
                clean(record.window),
                clean(record.error),
                clean(record.instance),
                jsonb(record.extra),
                token,
            )

        await self._run("record_pass", tx, transaction=False)

    async def last_passes(self, limit: int = 10) -> list[PassRecord]:
        async def read(conn: Any) -> list[PassRecord]:
            rows = await conn.fetch(
                "SELECT * FROM passes ORDER BY finished_at DESC, id DESC LIMIT $1", limit
            )
            return [decode_pass(row, utc) for row in rows]

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

    async def advance_meta(
        self, key: str, expected: str | None, new: str, *, token: str | None = None
    ) -> bool:
        token = token or secrets.token_hex(8)

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

    # -- export and import (``archiver.ledger.portable``, ``postgres_portable``) --------------
    async def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        pool = self._pool
        if pool is None:
            raise LedgerError(f"the ledger {self.where} is not open (use it with 'async with')")
        try:
            # One snapshot of every table, however long writing it out takes; instances keep
            # working meanwhile.
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                async for kind, record in postgres_portable.export_from(conn):
                    yield kind, record
        except DRIVER_ERRORS as exc:
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
                await postgres_portable.import_into(conn, self.where, records, replace)
        except DRIVER_ERRORS as exc:
            raise self._translate(exc, "import") from exc


def _states(rows: list[Any]) -> dict[str, State]:
    try:
        return {row["id"]: State(row["state"]) for row in rows}
    except ValueError as exc:
        raise LedgerError(f"the ledger holds a row in an unknown state: {exc}") from exc


if TYPE_CHECKING:  # the protocol, checked (restic: ``var _ backend.Backend = &Backend{}``)
    _: Ledger = PostgresLedger("postgresql://localhost/archiver")
