"""The ledger in one SQLite file: the default for a single archiver instance.

The rules are ``archiver.ledger.core``'s; this module carries them out in SQLite, in the file and
on the one thread ``archiver.ledger.sqlite_file`` keeps (its schema: ``sqlite_schema``; export
and import: ``sqlite_portable``). Each transition is one ``BEGIN IMMEDIATE``
transaction that also appends its audit entry. WAL with ``synchronous=FULL``: once ``complete``
returns, the archived row survives a power cut. The busy transitions (``claim``, ``heartbeat``,
``complete``) that arrive while the thread is busy share its next transaction (group commit), so
N workers finishing together cost one thread hop and one fsync. Transitions whose loss in a power
cut is harmless (a sighting, a claim, a heartbeat) commit without waiting for the disk when no
completion shares their transaction; the next durable commit makes them durable too, in order.

``exclusive=True`` (backfill, run) takes an ``flock`` on ``<path>.lock`` so that two instances
never share a file ledger; readers (status, verify) open without it, and ``must_exist`` readers
refuse a path where no ledger is instead of creating one. The file, its lock and its WAL are
created 0600 (they hold every recording's metadata).

Nothing here retries: a busy file waits ``busy_timeout`` inside SQLite, then raises
``LedgerUnavailable``. A commit and its answer cannot part in one process, so the tokens of
``append_audit``, ``record_pass`` and ``advance_meta`` (``archiver.ledger.retrying``) are not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from archiver import audit
from archiver.errors import LedgerError, LedgerUnavailable
from archiver.ledger import core, ops, reads, sqlite_portable, tables
from archiver.ledger.base import AuditEntry, Budget, PassRecord, Summary
from archiver.ledger.portable import BRIEF_FIELDS, RECORDING_FIELDS
from archiver.ledger.rows import decode_audit, decode_pass, decode_row, dumps
from archiver.ledger.shared import SharedLedger
from archiver.ledger.sqlite_file import SqliteFile
from archiver.ledger.sqlite_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    dt,
    encode,
    stamp,
    ts,
    ts_or_none,
)
from archiver.ledger.sqlite_schema import statements as _statements
from archiver.models import LedgerRow, State, utcnow

_P = ParamSpec("_P")
_T = TypeVar("_T")

# A time after every lease: what a reader uses as "now" when no writer can be running.
_NO_LIVE_LEASE = datetime.max.replace(tzinfo=UTC)

_BATCH = 1000  # rows per read in the streaming iterators
_IN_CHUNK = 500  # ids per ``IN (...)``, far below SQLite's variable limit


_ROW_COLUMNS = ", ".join(RECORDING_FIELDS)
_BRIEF_COLUMNS = ", ".join(BRIEF_FIELDS)


def _encode(name: str, value: Any) -> Any:
    """A column value as SQLite stores it (the kinds of ``portable.RECORDING_FIELDS``)."""
    return encode(RECORDING_FIELDS[name], value)


def _updates(
    changes: Sequence[tuple[str, Mapping[str, Any]]],
) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """One ``UPDATE`` (with its parameter rows) per set of columns changed."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for rid, values in changes:
        columns = tuple(values)
        unknown = set(columns) - set(RECORDING_FIELDS)
        if unknown:
            raise LedgerError(f"no such ledger column(s): {', '.join(sorted(unknown))}")
        groups.setdefault(columns, []).append((*(_encode(c, values[c]) for c in columns), rid))
    for columns, params in groups.items():
        sets = ", ".join(f"{c} = ?" for c in columns)
        yield f"UPDATE recordings SET {sets} WHERE id = ?", params


class SqliteLedger(SqliteFile, SharedLedger):
    """The ``Ledger`` protocol over one SQLite file. Use as ``async with SqliteLedger(path)``."""

    def __init__(
        self,
        path: Path,
        *,
        exclusive: bool = False,
        busy_timeout: float = 10.0,
        budget: Budget | None = None,
        must_exist: bool = False,
    ) -> None:
        super().__init__(
            path, exclusive=exclusive, busy_timeout=busy_timeout, must_exist=must_exist
        )
        self.budget = budget or Budget()

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r}, exclusive={self.exclusive})"

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._open()
        try:
            await self.migrate()
            if self.exclusive:
                await self._carry_out("recover", lambda: core.recover_orphans(self.budget))
        except BaseException:
            # The error that stopped the opening is the one to report, not a failed close.
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

    # -- carrying out the core's programs (``SharedLedger``'s primitives) -----------------------
    async def _carry_out(
        self,
        what: str,
        make: Callable[[], ops.Program[_T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> _T:
        if grouped:

            def apply(conn: sqlite3.Connection) -> _T:
                return ops.run_sync(make(), functools.partial(self._answer, conn))

            result: _T = await self._grouped(apply, durable=durable)
            return result
        return await self._call(self._carry_out_sync, make(), durable)

    def _carry_out_sync(self, program: ops.Program[_T], durable: bool) -> _T:
        with self._write(durable=durable) as conn:
            return ops.run_sync(program, functools.partial(self._answer, conn))

    async def _carry_out_dry(self, make: Callable[[], ops.Program[_T]]) -> _T:
        return await self._call(self._carry_out_dry_sync, make())

    def _carry_out_dry_sync(self, program: ops.Program[_T]) -> _T:
        answer = functools.partial(self._answer, self._db(), dry=True)
        return ops.run_sync(program, answer)

    async def _brief_rows(self, ids: list[str]) -> dict[str, LedgerRow]:
        return await self._call(self._brief_rows_on, self._db(), ids)

    async def _states_of(self, ids: list[str]) -> dict[str, State]:
        return await self._call(self._states_on, self._db(), ids)

    @staticmethod
    def _states_on(conn: sqlite3.Connection, ids: list[str]) -> dict[str, State]:
        found: dict[str, State] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            query = f"SELECT id, state FROM recordings WHERE id IN ({placeholders})"
            for rid, state in conn.execute(query, chunk):
                try:
                    found[rid] = State(state)
                except ValueError as exc:
                    raise LedgerError(
                        f"the ledger row {rid!r} has unknown state {state!r}"
                    ) from exc
        return found

    async def _clock(self) -> datetime:
        return await self._call(self._lease_clock_sync)

    def _lease_clock_sync(self) -> datetime:
        """Now, to tell a live lease from a dead one. A reader on a ledger whose lock file is
        there but held by nobody knows that no writer is running: every lease is dead (what the
        next writer does with them, ``recover_orphans``, a dry run and ``status`` see now)."""
        if self.exclusive or self._lock_held_elsewhere():
            return utcnow()
        return _NO_LIVE_LEASE

    def _answer(self, conn: sqlite3.Connection, op: ops.Op, *, dry: bool = False) -> Any:
        """Carry out one request; ``dry`` reads as usual but writes nothing."""
        if dry and isinstance(op, ops.Insert | ops.Update | ops.Audit):
            return len(op.rows) if isinstance(op, ops.Insert) else None
        match op:
            case ops.Clock():
                return self._lease_clock_sync() if dry else stamp()[0]
            case ops.Load(id=rid):
                found = conn.execute(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = ?", (rid,)
                ).fetchone()
                return None if found is None else decode_row(found, dt)
            case ops.LoadStates(ids=ids):
                return self._states_on(conn, list(ids))
            case ops.LoadMany(ids=ids):
                return self._brief_rows_on(conn, list(ids))
            case ops.LoadState(state=state):
                rows = conn.execute(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE state = ? ORDER BY id",
                    (state.value,),
                )
                return [decode_row(row, dt) for row in rows]
            case ops.Insert(rows=rows):
                if not rows:
                    return 0
                columns = list(RECORDING_FIELDS)
                before = conn.total_changes
                conn.executemany(
                    f"INSERT INTO recordings ({_ROW_COLUMNS}) VALUES "
                    f"({', '.join('?' * len(columns))}) ON CONFLICT (id) DO NOTHING",
                    [tuple(_encode(c, row[c]) for c in columns) for row in rows],
                )
                return conn.total_changes - before
            case ops.Update(changes=changes):
                for sql, params in _updates(changes):
                    conn.executemany(sql, params)
                return None
            case ops.Audit(action=action, recording_id=rid, details=details):
                now_dt, now = stamp()
                return self._append_audit_tx(conn, now_dt, now, action, rid, details)
        raise LedgerError(f"the SQLite ledger cannot carry out {op!r}")

    @staticmethod
    def _brief_rows_on(conn: sqlite3.Connection, ids: list[str]) -> dict[str, LedgerRow]:
        found: dict[str, LedgerRow] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id IN ({placeholders})", chunk
            )
            for row in rows:
                decoded = decode_row(row, dt)
                found[decoded.id] = decoded
        return found

    # -- schema ------------------------------------------------------------------------------
    async def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; return the version the file is at."""
        return await self._call(self._migrate_sync)

    def _migrate_sync(self) -> int:
        conn = self._db()
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        while True:
            # The version is read inside the write lock: a second process opening the same
            # file at the same moment waits, then finds the migration already applied.
            with self._write():
                current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
                current = current or 0
                if current > SCHEMA_VERSION:
                    raise LedgerError(
                        f"the ledger {self.path} has schema version {current}, newer than the "
                        f"{SCHEMA_VERSION} this archiver knows; upgrade archiver to use it"
                    )
                if current == SCHEMA_VERSION:
                    return current
                for statement in _statements(MIGRATIONS[current]):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))

    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        return await self._call(self._get_sync, recording_id)

    def _get_sync(self, recording_id: str) -> LedgerRow | None:
        row = self._db().execute("SELECT * FROM recordings WHERE id = ?", (recording_id,))
        found = row.fetchone()
        return None if found is None else decode_row(found, dt)

    async def summary(self) -> Summary:
        return await self._call(self._summary_sync)

    def _summary_sync(self) -> Summary:
        rows = self._db().execute(reads.summary_query("?"), (self.budget.max_attempts,))
        return reads.summary_of(rows, dt)

    async def _rows_where(self, where: str, order: str, limit: int) -> list[LedgerRow]:
        return await self._call(self._rows_where_sync, where, order, limit)

    def _rows_where_sync(self, where: str, order: str, limit: int) -> list[LedgerRow]:
        sql = f"SELECT * FROM recordings WHERE {where} ORDER BY {order} LIMIT ?"
        return [decode_row(row, dt) for row in self._db().execute(sql, (limit,))]

    async def _iter_rows(
        self, states: tuple[State, ...], since: datetime | None, until: datetime | None
    ) -> AsyncIterator[LedgerRow]:
        """Rows in ``states`` by (ended_at, id), in keyset pages; without bounds, rows with no
        known end first (NULL sorts first; a bound excludes them)."""
        if since is None and until is None:
            after_id = ""
            while batch := await self._call(self._undated_sync, states, after_id):
                for row in batch:
                    yield row
                after_id = batch[-1].id
        after: tuple[str, str] | None = None
        while batch := await self._call(
            self._dated_sync, states, ts_or_none(since), ts_or_none(until), after
        ):
            for row in batch:
                yield row
            last = batch[-1]
            assert last.ended_at is not None
            after = (ts(last.ended_at), last.id)

    def _undated_sync(self, states: tuple[State, ...], after_id: str) -> list[LedgerRow]:
        marks = ", ".join("?" * len(states))
        rows = self._db().execute(
            f"""SELECT * FROM recordings
                WHERE state IN ({marks}) AND ended_at IS NULL AND id > ?
                ORDER BY id LIMIT ?""",
            (*(s.value for s in states), after_id, _BATCH),
        )
        return [decode_row(row, dt) for row in rows]

    def _dated_sync(
        self,
        states: tuple[State, ...],
        since: str | None,
        until: str | None,
        after: tuple[str, str] | None,
    ) -> list[LedgerRow]:
        params: dict[str, Any] = {"limit": _BATCH}
        params.update({f"s{n}": s.value for n, s in enumerate(states)})
        marks = ", ".join(f":s{n}" for n in range(len(states)))
        where = [f"state IN ({marks})", "ended_at IS NOT NULL"]
        if since is not None:
            where.append("ended_at >= :since")
            params["since"] = since
        if until is not None:
            where.append("ended_at < :until")
            params["until"] = until
        if after is not None:
            where.append("(ended_at, id) > (:after_ended, :after_id)")
            params.update(after_ended=after[0], after_id=after[1])
        rows = self._db().execute(
            f"""SELECT * FROM recordings WHERE {" AND ".join(where)}
                ORDER BY ended_at, id LIMIT :limit""",
            params,
        )
        return [decode_row(row, dt) for row in rows]

    # -- audit chain, passes, settings -------------------------------------------------------
    async def append_audit(
        self,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
        *,
        token: str | None = None,
    ) -> AuditEntry:
        return await self._call(self._append_audit_sync, action, recording_id, details)

    def _append_audit_sync(
        self, action: str, recording_id: str | None, details: Mapping[str, Any]
    ) -> AuditEntry:
        now_dt, now = stamp()
        with self._write() as conn:
            return self._append_audit_tx(conn, now_dt, now, action, recording_id, details)

    @staticmethod
    def _append_audit_tx(
        conn: sqlite3.Connection,
        at: datetime,
        at_text: str,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
    ) -> AuditEntry:
        """Chain one entry inside the caller's write transaction."""
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev_seq, prev_hash = (0, audit.GENESIS) if last is None else (last[0], last[1])
        entry, details_text = core.chain_entry(
            prev_seq, prev_hash, at, action, recording_id, details
        )
        conn.execute(
            """INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (entry.seq, at_text, action, recording_id, details_text, prev_hash, entry.hash),
        )
        return entry

    async def iter_audit(self) -> AsyncIterator[AuditEntry]:
        after = 0
        while batch := await self._call(self._audit_batch_sync, after):
            for entry in batch:
                yield entry
            after = batch[-1].seq

    def _audit_batch_sync(self, after: int) -> list[AuditEntry]:
        rows = self._db().execute(
            "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, _BATCH)
        )
        return [decode_audit(row, dt) for row in rows]

    async def record_pass(self, record: PassRecord, *, token: str | None = None) -> None:
        await self._call(self._record_pass_sync, record)

    def _record_pass_sync(self, record: PassRecord) -> None:
        with self._write() as conn:
            conn.execute(
                """INSERT INTO passes (
                       started_at, finished_at, ok, listed, enqueued, archived, failed,
                       listing_window, error, instance, extra
                   ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    ts(record.started_at),
                    ts(record.finished_at),
                    int(record.ok),
                    record.listed,
                    record.enqueued,
                    record.archived,
                    record.failed,
                    record.window,
                    record.error,
                    record.instance,
                    dumps(record.extra),
                ),
            )

    async def last_passes(self, limit: int = 10) -> list[PassRecord]:
        return await self._call(self._last_passes_sync, limit)

    def _last_passes_sync(self, limit: int) -> list[PassRecord]:
        rows = self._db().execute(
            "SELECT * FROM passes ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,)
        )
        return [decode_pass(row, dt) for row in rows]

    async def get_meta(self, key: str) -> str | None:
        return await self._call(self._get_meta_sync, key)

    def _get_meta_sync(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self._call(self._set_meta_sync, key, value)

    def _set_meta_sync(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(
                """INSERT INTO meta (key, value) VALUES (?, ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (key, value),
            )

    async def advance_meta(
        self, key: str, expected: str | None, new: str, *, token: str | None = None
    ) -> bool:
        return await self._call(self._advance_meta_sync, key, expected, new)

    def _advance_meta_sync(self, key: str, expected: str | None, new: str) -> bool:
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if (None if row is None else str(row[0])) != expected:
                return False
            conn.execute(
                """INSERT INTO meta (key, value) VALUES (?, ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (key, new),
            )
            return True

    # -- export and import (``archiver.ledger.portable``, ``sqlite_portable``) ------------------
    async def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        # One read transaction across the batches: WAL gives it a snapshot of the whole file.
        await self._call(self._exec_sync, "BEGIN")
        try:
            for kind in tables.EXPORT_ORDER:
                after: Any = None
                while batch := await self._call(
                    sqlite_portable.export_batch, self._db(), kind, after, _BATCH
                ):
                    for record in batch[0]:
                        yield kind, record
                    after = batch[1]
        finally:
            await self._call(self._exec_sync, "COMMIT")

    def _exec_sync(self, sql: str) -> None:
        self._db().execute(sql)

    async def import_records(
        self, records: AsyncIterable[tuple[str, Mapping[str, Any]]], *, replace: bool = False
    ) -> None:
        await self._call(sqlite_portable.import_begin, self._db(), str(self.path), replace)
        try:
            async for kind, batch in tables.batches(records, _BATCH):
                await self._call(sqlite_portable.import_batch, self._db(), kind, batch)
        except BaseException:
            # The error that stopped the import is the one to report, not a failed rollback.
            with contextlib.suppress(LedgerError, LedgerUnavailable):
                await asyncio.shield(self._call(self._exec_sync, "ROLLBACK"))
            raise
        await self._call(self._exec_sync, "COMMIT")
