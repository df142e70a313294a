"""The ledger in one SQLite file: the default for a single archiver instance.

The rules are ``archiver.ledger.core``'s; this module carries them out in SQLite. Every call runs
on one dedicated thread that alone owns the connection, so the event loop never blocks on disk
and sqlite3 is never shared between threads. Each transition is one ``BEGIN IMMEDIATE``
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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from archiver import audit
from archiver.errors import LedgerError, LedgerUnavailable
from archiver.ledger import core
from archiver.ledger.base import AuditEntry, Budget, PassRecord, Summary
from archiver.ledger.portable import BRIEF_FIELDS, FIELDS, RECORDING_FIELDS, V1_MAX_ATTEMPTS
from archiver.ledger.rows import decode_audit, decode_pass, decode_row, dumps, json_object
from archiver.ledger.shared import SharedLedger
from archiver.models import LedgerRow, State, utcnow

_P = ParamSpec("_P")
_T = TypeVar("_T")

FILE_MODE = 0o600
# A time after every lease: what a reader uses as "now" when no writer can be running.
_NO_LIVE_LEASE = datetime.max.replace(tzinfo=UTC)

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
]

SCHEMA_VERSION = len(MIGRATIONS)

_BATCH = 1000  # rows per read in the streaming iterators
_IN_CHUNK = 500  # ids per ``IN (...)``, far below SQLite's variable limit


@dataclass(slots=True)
class _Grouped:
    """A transition waiting for the next group transaction (see ``SqliteLedger._grouped``)."""

    apply: Callable[[sqlite3.Connection], Any]
    durable: bool
    waiter: asyncio.Future[Any]


_TRANSIENT_MESSAGES = ("locked", "busy", "disk i/o error", "database or disk is full")


def _ts(value: datetime) -> str:
    """Fixed-width ISO 8601 in UTC, so that text order is time order."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _ts_or_none(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _now() -> tuple[datetime, str]:
    """The current time both as stored text and as the datetime that text reads back as."""
    text = _ts(utcnow())
    parsed = _dt(text)
    assert parsed is not None
    return parsed, text


def _enable_wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switch a new file to WAL. Several processes opening it at once race for that switch, and
    SQLite answers "locked" at once rather than through the busy handler: wait and try again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _statements(script: str) -> Iterator[str]:
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


def _translate(exc: sqlite3.Error, path: Path) -> LedgerError | LedgerUnavailable:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(
        m in message.lower() for m in _TRANSIENT_MESSAGES
    ):
        return LedgerUnavailable(f"the ledger {path} is unavailable right now: {message}")
    return LedgerError(f"the ledger {path} is unusable: {message}")


_ROW_COLUMNS = ", ".join(RECORDING_FIELDS)
_BRIEF_COLUMNS = ", ".join(BRIEF_FIELDS)


def _encode(name: str, value: Any) -> Any:
    """A column value as SQLite stores it (the kinds of ``portable.RECORDING_FIELDS``)."""
    if value is None:
        return None
    kind = RECORDING_FIELDS[name]
    if kind.startswith("ts"):
        return _ts(value)
    if kind == "object":
        return dumps(value)
    if kind == "bool":
        return int(value)
    if isinstance(value, State):
        return value.value
    return value


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


class SqliteLedger(SharedLedger):
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
        self.path = Path(path)
        self.exclusive = exclusive
        self.busy_timeout = busy_timeout
        self.budget = budget or Budget()
        self.must_exist = must_exist
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the executor's thread.
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Touched only on the event loop: transitions waiting for the next group transaction.
        self._pending: list[_Grouped] = []
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r}, exclusive={self.exclusive})"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._executor is not None:
            raise LedgerError(f"the ledger {self.path} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        try:
            await self._call(self._open_sync)
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

    async def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Queued behind any call still running, so the connection closes after it; the thread
        # exits once the queue is drained. Shielded: a cancelled exit still closes the file.
        closing = executor.submit(self._close_sync)
        executor.shutdown(wait=False)
        try:
            await asyncio.shield(asyncio.wrap_future(closing))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc

    def _open_sync(self) -> None:
        if self.must_exist and not self.path.is_file():
            raise LedgerError(f"there is no ledger at {self.path} (check ledger.path)")
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # Created here, not by sqlite3, to be private from the first byte on; SQLite gives
            # its WAL and shared-memory files the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        except OSError as exc:
            raise LedgerError(
                f"the ledger {self.path} cannot be opened: {exc.strerror or exc}"
            ) from exc
        if self.exclusive:
            self._lock_sync()
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=True
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            _enable_wal(conn, self.busy_timeout)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _lock_sync(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise LedgerError(
                f"the ledger's lock {self.lock_path} cannot be opened: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerError(
                f"another archiver instance is using the ledger {self.path} (lock held); "
                "stop it first or use a PostgreSQL ledger to run several"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        try:
            if conn is not None:
                conn.close()
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    async def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        executor = self._executor
        if executor is None:
            raise LedgerError(f"the ledger {self.path} is not open (use it with 'async with')")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"the ledger {self.path} is not open (use it with 'async with')")
        return self._conn

    @contextlib.contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so two writers queue instead of deadlocking.

        ``durable=False`` commits without an fsync (``synchronous=NORMAL`` in WAL mode): only for
        transitions that may be lost in a power cut. A process crash loses nothing either way, and
        the connection is back at ``FULL`` afterwards for everything else."""
        conn = self._db()
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    # -- carrying out the core's programs (``SharedLedger``'s primitives) -----------------------
    async def _carry_out(
        self,
        what: str,
        make: Callable[[], core.Program[_T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> _T:
        if grouped:

            def apply(conn: sqlite3.Connection) -> _T:
                return core.run_sync(make(), functools.partial(self._answer, conn))

            result: _T = await self._grouped(apply, durable=durable)
            return result
        return await self._call(self._carry_out_sync, make(), durable)

    def _carry_out_sync(self, program: core.Program[_T], durable: bool) -> _T:
        with self._write(durable=durable) as conn:
            return core.run_sync(program, functools.partial(self._answer, conn))

    async def _carry_out_dry(self, make: Callable[[], core.Program[_T]]) -> _T:
        return await self._call(self._carry_out_dry_sync, make())

    def _carry_out_dry_sync(self, program: core.Program[_T]) -> _T:
        answer = functools.partial(self._answer, self._db(), dry=True)
        return core.run_sync(program, answer)

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

    def _lock_held_elsewhere(self) -> bool:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            # No lock file: leases were taken without one (a test, a tool); cannot tell.
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also lets go of the shared lock
        return False

    def _answer(self, conn: sqlite3.Connection, op: core.Op, *, dry: bool = False) -> Any:
        """Carry out one request; ``dry`` reads as usual but writes nothing."""
        if dry and isinstance(op, core.Insert | core.Update | core.Audit):
            return len(op.rows) if isinstance(op, core.Insert) else None
        match op:
            case core.Clock():
                return self._lease_clock_sync() if dry else _now()[0]
            case core.Load(id=rid):
                found = conn.execute(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = ?", (rid,)
                ).fetchone()
                return None if found is None else decode_row(found, _dt)
            case core.LoadStates(ids=ids):
                return self._states_on(conn, list(ids))
            case core.LoadMany(ids=ids):
                return self._brief_rows_on(conn, list(ids))
            case core.LoadState(state=state):
                rows = conn.execute(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE state = ? ORDER BY id",
                    (state.value,),
                )
                return [decode_row(row, _dt) for row in rows]
            case core.Insert(rows=rows):
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
            case core.Update(changes=changes):
                for sql, params in _updates(changes):
                    conn.executemany(sql, params)
                return None
            case core.Audit(action=action, recording_id=rid, details=details):
                now_dt, now = _now()
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
                decoded = decode_row(row, _dt)
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

    # -- group commit ----------------------------------------------------------------------------
    async def _grouped(self, apply: Callable[[sqlite3.Connection], Any], *, durable: bool) -> Any:
        """Run ``apply`` in the next group transaction; return what it returns."""
        if self._executor is None:
            raise LedgerError(f"the ledger {self.path} is not open (use it with 'async with')")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Grouped(apply, durable, waiter))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups())
        return await waiter

    async def _write_groups(self) -> None:
        """One group at a time on the ledger thread; what arrives meanwhile forms the next."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                durable = any(item.durable for item in batch)
                results: list[Any]
                try:
                    results = await self._call(
                        self._apply_group_sync, [item.apply for item in batch], durable
                    )
                except asyncio.CancelledError:
                    for item in batch + self._pending:
                        item.waiter.cancel()
                    self._pending = []
                    raise
                except Exception as exc:
                    results = [exc] * len(batch)
                for item, result in zip(batch, results, strict=True):
                    if item.waiter.done():  # its caller was cancelled; the change stands
                        continue
                    if isinstance(result, Exception):
                        item.waiter.set_exception(result)
                    else:
                        item.waiter.set_result(result)
        finally:
            self._writer = None

    def _apply_group_sync(
        self, applies: list[Callable[[sqlite3.Connection], Any]], durable: bool
    ) -> list[Any]:
        """Several transitions in one transaction; a LedgerError in one undoes that one alone.
        A database error rolls the whole group back and is raised to all of them."""
        results: list[Any] = []
        with self._write(durable=durable) as conn:
            for apply in applies:
                conn.execute("SAVEPOINT one")
                try:
                    results.append(apply(conn))
                except LedgerError as exc:
                    conn.execute("ROLLBACK TO one")
                    results.append(exc)
                conn.execute("RELEASE one")
        return results

    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        return await self._call(self._get_sync, recording_id)

    def _get_sync(self, recording_id: str) -> LedgerRow | None:
        row = self._db().execute("SELECT * FROM recordings WHERE id = ?", (recording_id,))
        found = row.fetchone()
        return None if found is None else decode_row(found, _dt)

    async def summary(self) -> Summary:
        return await self._call(self._summary_sync)

    def _summary_sync(self) -> Summary:
        # ``core.needs_action``: failed for good, or out of attempts under today's budget.
        rows = self._db().execute(
            """SELECT state, state = 'failed' AND (permanent OR attempts >= ?) AS spent,
                      count(*), min(ended_at), coalesce(sum(size), 0)
               FROM recordings GROUP BY state, spent""",
            (self.budget.max_attempts,),
        )
        return core.fold_summary(
            core.SummaryGroup(state, bool(permanent), count, _dt(oldest), size)
            for state, permanent, count, oldest, size in rows
        )

    async def failures(self, limit: int = 100) -> list[LedgerRow]:
        return await self._call(self._failures_sync, limit)

    def _failures_sync(self, limit: int) -> list[LedgerRow]:
        rows = self._db().execute(
            """SELECT * FROM recordings WHERE state = 'failed'
               ORDER BY updated_at DESC, id LIMIT ?""",
            (limit,),
        )
        return [decode_row(row, _dt) for row in rows]

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
            self._dated_sync, states, _ts_or_none(since), _ts_or_none(until), after
        ):
            for row in batch:
                yield row
            last = batch[-1]
            assert last.ended_at is not None
            after = (_ts(last.ended_at), last.id)

    def _undated_sync(self, states: tuple[State, ...], after_id: str) -> list[LedgerRow]:
        marks = ", ".join("?" * len(states))
        rows = self._db().execute(
            f"""SELECT * FROM recordings
                WHERE state IN ({marks}) AND ended_at IS NULL AND id > ?
                ORDER BY id LIMIT ?""",
            (*(s.value for s in states), after_id, _BATCH),
        )
        return [decode_row(row, _dt) for row in rows]

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
        return [decode_row(row, _dt) for row in rows]

    # -- audit chain, passes, settings -------------------------------------------------------
    async def append_audit(
        self, action: str, recording_id: str | None, details: Mapping[str, Any]
    ) -> AuditEntry:
        return await self._call(self._append_audit_sync, action, recording_id, details)

    def _append_audit_sync(
        self, action: str, recording_id: str | None, details: Mapping[str, Any]
    ) -> AuditEntry:
        now_dt, now = _now()
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
        return [decode_audit(row, _dt) for row in rows]

    async def record_pass(self, record: PassRecord) -> None:
        await self._call(self._record_pass_sync, record)

    def _record_pass_sync(self, record: PassRecord) -> None:
        with self._write() as conn:
            conn.execute(
                """INSERT INTO passes (
                       started_at, finished_at, ok, listed, enqueued, archived, failed,
                       listing_window, error, instance, extra
                   ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    _ts(record.started_at),
                    _ts(record.finished_at),
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
        return [decode_pass(row, _dt) for row in rows]

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

    async def advance_meta(self, key: str, expected: str | None, new: str) -> bool:
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

    # -- export and import (``archiver.ledger.portable``) -------------------------------------
    async def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        # One read transaction across the batches: WAL gives it a snapshot of the whole file.
        await self._call(self._exec_sync, "BEGIN")
        try:
            for kind in _EXPORT_ORDER:
                after: Any = None
                while batch := await self._call(self._export_batch_sync, kind, after):
                    for record in batch[0]:
                        yield kind, record
                    after = batch[1]
        finally:
            await self._call(self._exec_sync, "COMMIT")

    def _exec_sync(self, sql: str) -> None:
        self._db().execute(sql)

    def _export_batch_sync(self, kind: str, after: Any) -> tuple[list[dict[str, Any]], Any] | None:
        table, key = _EXPORT_TABLES[kind]
        where = "" if after is None else f"WHERE {key} > :after"
        rows = (
            self._db()
            .execute(
                f"SELECT * FROM {table} {where} ORDER BY {key} LIMIT :limit",
                {"after": after, "limit": _BATCH},
            )
            .fetchall()
        )
        if not rows:
            return None
        return [_export_record(kind, row) for row in rows], rows[-1][key]

    async def import_records(
        self, records: AsyncIterable[tuple[str, Mapping[str, Any]]], *, replace: bool = False
    ) -> None:
        await self._call(self._import_begin_sync, replace)
        try:
            batch: list[Mapping[str, Any]] = []
            batch_kind = ""
            async for kind, record in records:
                if batch and (kind != batch_kind or len(batch) >= _BATCH):
                    await self._call(self._import_batch_sync, batch_kind, batch)
                    batch = []
                batch_kind = kind
                batch.append(record)
            if batch:
                await self._call(self._import_batch_sync, batch_kind, batch)
        except BaseException:
            # The error that stopped the import is the one to report, not a failed rollback.
            with contextlib.suppress(LedgerError, LedgerUnavailable):
                await asyncio.shield(self._call(self._exec_sync, "ROLLBACK"))
            raise
        await self._call(self._exec_sync, "COMMIT")

    def _import_begin_sync(self, replace: bool) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = ("recordings", "audit", "passes", "meta")
            filled = [t for t in tables if conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()]
            if filled and not replace:
                raise LedgerError(
                    f"the ledger {self.path} is not empty ({', '.join(filled)}); import only "
                    "into a new ledger, or replace its contents explicitly"
                )
            for table in tables:
                conn.execute(f"DELETE FROM {table}")
        except BaseException:
            conn.rollback()
            raise

    def _import_batch_sync(self, kind: str, records: list[Mapping[str, Any]]) -> None:
        conn = self._db()
        if kind == "recording":
            columns = list(RECORDING_FIELDS)
            rows = [tuple(_import_value(name, r[name]) for name in columns) for r in records]
            placeholders = ", ".join("?" * len(columns))
            conn.executemany(
                f"INSERT INTO recordings ({', '.join(columns)}) VALUES ({placeholders})", rows
            )
        elif kind == "audit":
            conn.executemany(
                """INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        r["seq"],
                        _ts(r["at"]),
                        r["action"],
                        r["recording_id"],
                        dumps(r["details"]),
                        r["prev_hash"],
                        r["hash"],
                    )
                    for r in records
                ],
            )
        elif kind == "pass":
            conn.executemany(
                """INSERT INTO passes (
                       started_at, finished_at, ok, listed, enqueued, archived, failed,
                       listing_window, error, instance, extra
                   ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        _ts(r["started_at"]),
                        _ts(r["finished_at"]),
                        int(r["ok"]),
                        r["listed"],
                        r["enqueued"],
                        r["archived"],
                        r["failed"],
                        r["window"],
                        r["error"],
                        r["instance"],
                        dumps(r["extra"]),
                    )
                    for r in records
                ],
            )
        elif kind == "meta":
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [(r["key"], r["value"]) for r in records],
            )
        else:
            raise LedgerError(f"import: unknown record type {kind!r}")


# Export order and keyset key of each record type.
_EXPORT_ORDER = ("recording", "audit", "pass", "meta")
_EXPORT_TABLES = {
    "recording": ("recordings", "id"),
    "audit": ("audit", "seq"),
    "pass": ("passes", "id"),
    "meta": ("meta", "key"),
}


def _import_value(name: str, value: Any) -> Any:
    kind = RECORDING_FIELDS[name]
    if value is None:
        return None
    if kind.startswith("ts"):
        return _ts(value)
    if kind == "object":
        return dumps(value)
    if kind == "bool":
        return int(value)
    return value


def _export_record(kind: str, row: sqlite3.Row) -> dict[str, Any]:
    if kind == "recording":
        record: dict[str, Any] = {}
        for name, field_kind in RECORDING_FIELDS.items():
            value = row[name]
            if field_kind.startswith("ts"):
                value = _dt(value)
            elif field_kind == "object":
                value = json_object(value, f"the {name} of {row['id']!r}")
            elif field_kind == "bool":
                value = bool(value)
            record[name] = value
        return record
    if kind in ("audit", "pass"):
        # The decoded entry has the exported fields as attributes, objects as read-only mappings.
        decoded = decode_audit(row, _dt) if kind == "audit" else decode_pass(row, _dt)
        return {
            name: dict(getattr(decoded, name)) if field_kind == "object" else getattr(decoded, name)
            for name, field_kind in FIELDS[kind].items()
        }
    return {"key": row["key"], "value": row["value"]}
