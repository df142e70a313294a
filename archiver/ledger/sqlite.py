"""The ledger in one SQLite file: the default for a single archiver instance.

Every call runs on one dedicated thread that alone owns the connection, so the event loop never
blocks on disk and sqlite3 is never shared between threads. Each transition is one
``BEGIN IMMEDIATE`` transaction that also appends its audit entry. WAL with ``synchronous=FULL``:
once ``complete`` returns, the archived row survives a power cut. The busy transitions (``claim``,
``heartbeat``, ``complete``) that arrive while the thread is busy share its next transaction
(group commit), so N workers finishing together cost one thread hop and one fsync. Transitions
whose loss in a power cut is harmless (a sighting, a claim, a heartbeat) commit without waiting
for the disk when no completion shares their transaction; the next durable commit makes them
durable too, in order.

``exclusive=True`` (backfill, run) takes an ``flock`` on ``<path>.lock`` so that two instances
never share a file ledger; readers (status, verify) open without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from archiver import audit
from archiver.errors import LedgerError, LedgerUnavailable
from archiver.ledger.base import AuditEntry, PassRecord, Summary
from archiver.ledger.portable import FIELDS, RECORDING_FIELDS
from archiver.ledger.rows import decode_audit, decode_pass, decode_row, dumps, json_object
from archiver.models import LedgerRow, Recording, State, StoredObject, utcnow

_P = ParamSpec("_P")
_T = TypeVar("_T")

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
]

SCHEMA_VERSION = len(MIGRATIONS)

_BATCH = 1000  # rows per read in the streaming iterators
_IN_CHUNK = 500  # ids per ``IN (...)``, far below SQLite's variable limit

# A row some instance may take now. Parameters :max_attempts and :now. The unary ``+`` keeps
# the planner on the id lookup: given a long ``id IN (...)`` it would otherwise scan every
# pending row through the state index (100x slower at 100,000 rows).
_CLAIMABLE = """(
    +state = 'pending'
    OR (+state = 'failed' AND permanent = 0 AND attempts < :max_attempts)
    OR (+state = 'in_progress' AND lease_expires < :now AND attempts < :max_attempts)
)"""

# A sighting refreshes what the API says but is no transition: updated_at stays the time of the
# row's last transition, so failures() lists the newest failures, not the latest seen.
_OBSERVE = """
INSERT INTO recordings (
    id, state, source_status, room_id, session_id, participant_id,
    started_at, ended_at, metadata, first_seen_at, updated_at
) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    source_status  = excluded.source_status,
    room_id        = coalesce(excluded.room_id, room_id),
    session_id     = coalesce(excluded.session_id, session_id),
    participant_id = coalesce(excluded.participant_id, participant_id),
    started_at     = coalesce(excluded.started_at, started_at),
    ended_at       = coalesce(excluded.ended_at, ended_at),
    metadata       = excluded.metadata
WHERE state != 'archived'
"""


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


class SqliteLedger:
    """The ``Ledger`` protocol over one SQLite file. Use as ``async with SqliteLedger(path)``."""

    def __init__(self, path: Path, *, exclusive: bool = False, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self.busy_timeout = busy_timeout
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
                await self._call(self._recover_orphans_sync)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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

    # -- schema ------------------------------------------------------------------------------
    def _recover_orphans_sync(self) -> int:
        """With the exclusive lock held no other process can be transferring, so every
        in_progress row was left by a killed one: count it as a failed attempt now instead of
        waiting for its lease, so it is retried at once while attempts remain, and a recording
        that kills the process every time ends failed rather than being retried forever."""
        _, now = _now()
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE recordings
                   SET state = 'failed', permanent = 0, lease_owner = NULL, lease_expires = NULL,
                       updated_at = ?,
                       last_error = 'interrupted: the process stopped mid-transfer'
                   WHERE state = 'in_progress'""",
                (now,),
            )
            return cursor.rowcount

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

    # -- transitions -------------------------------------------------------------------------
    async def observe(self, recordings: Sequence[Recording], *, max_attempts: int) -> set[str]:
        if not recordings:
            return set()
        return await self._call(self._observe_sync, list(recordings), max_attempts)

    def _observe_sync(self, recordings: list[Recording], max_attempts: int) -> set[str]:
        _, now = _now()
        # A sighting never changes an archived row (the upsert skips them): leave those out, so a
        # pass over an archive that is up to date reads one index lookup per id and writes nothing.
        archived = self._archived_among(list(dict.fromkeys(rec.id for rec in recordings)))
        recordings = [rec for rec in recordings if rec.id not in archived]
        if not recordings:
            return set()
        rows = [
            (
                rec.id,
                rec.status,
                rec.room_id,
                rec.session_id,
                rec.participant_id,
                _ts_or_none(rec.started_at),
                _ts_or_none(rec.ended_at),
                dumps(rec.metadata),
                now,
                now,
            )
            for rec in recordings
        ]
        ids = list(dict.fromkeys(rec.id for rec in recordings))
        need_work: set[str] = set()
        with self._write(durable=False) as conn:
            conn.executemany(_OBSERVE, rows)
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                params: dict[str, Any] = {f"id{i}": rid for i, rid in enumerate(chunk)}
                params.update(max_attempts=max_attempts, now=now)
                placeholders = ", ".join(f":id{i}" for i in range(len(chunk)))
                query = f"SELECT id FROM recordings WHERE id IN ({placeholders}) AND {_CLAIMABLE}"
                need_work.update(row[0] for row in conn.execute(query, params))
        return need_work

    def _archived_among(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            query = (
                f"SELECT id FROM recordings WHERE id IN ({placeholders}) AND +state = 'archived'"
            )
            found.update(row[0] for row in self._db().execute(query, chunk))
        return found

    async def claim(
        self, recording_id: str, *, owner: str, lease_seconds: float, max_attempts: int
    ) -> int | None:
        apply = functools.partial(self._claim_tx, recording_id, owner, lease_seconds, max_attempts)
        result: int | None = await self._grouped(apply, durable=False)
        return result

    @staticmethod
    def _claim_tx(
        recording_id: str,
        owner: str,
        lease_seconds: float,
        max_attempts: int,
        conn: sqlite3.Connection,
    ) -> int | None:
        now_dt, now = _now()
        rows = conn.execute(
            f"""UPDATE recordings
                SET state = 'in_progress', attempts = attempts + 1, lease_owner = :owner,
                    lease_expires = :expires, updated_at = :now
                WHERE id = :id AND {_CLAIMABLE}
                RETURNING attempts""",
            {
                "id": recording_id,
                "owner": owner,
                "expires": _ts(now_dt + timedelta(seconds=lease_seconds)),
                "now": now,
                "max_attempts": max_attempts,
            },
        ).fetchall()
        return int(rows[0][0]) if rows else None

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool:
        apply = functools.partial(self._heartbeat_tx, recording_id, owner, lease_seconds)
        held: bool = await self._grouped(apply, durable=False)
        return held

    @staticmethod
    def _heartbeat_tx(
        recording_id: str, owner: str, lease_seconds: float, conn: sqlite3.Connection
    ) -> bool:
        now_dt, now = _now()
        cursor = conn.execute(
            """UPDATE recordings SET lease_expires = ?, updated_at = ?
               WHERE id = ? AND state = 'in_progress' AND lease_owner = ?""",
            (_ts(now_dt + timedelta(seconds=lease_seconds)), now, recording_id, owner),
        )
        return cursor.rowcount == 1

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool:
        apply = functools.partial(self._complete_tx, recording_id, owner, stored)
        done: bool = await self._grouped(apply, durable=True)
        return done

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

    def _complete_tx(
        self, recording_id: str, owner: str, stored: StoredObject, conn: sqlite3.Connection
    ) -> bool:
        now_dt, now = _now()
        row = conn.execute(
            "SELECT state, lease_owner, attempts FROM recordings WHERE id = ?",
            (recording_id,),
        ).fetchone()
        if row is None:
            raise LedgerError(f"complete: the ledger has no row for {recording_id!r}")
        if row["state"] == State.ARCHIVED:
            return False
        held = row["state"] == State.IN_PROGRESS and row["lease_owner"] == owner
        # A lost lease (another owner now, or released, or failed by them) is still
        # accepted: our bytes are stored and verified, and recording that is the truth;
        # the other worker's complete then returns False. Only a row nobody ever claimed
        # (attempts == 0; claims that count are never undone) is a caller's bug.
        if not held and row["attempts"] == 0:
            raise LedgerError(
                f"complete: {recording_id!r} was never claimed; claim it before completing"
            )
        retain_until = _ts_or_none(stored.retain_until)
        conn.execute(
            """UPDATE recordings
               SET state = 'archived', storage_key = ?, size = ?, sha256 = ?,
                   version_id = ?, retain_until = ?, permanent = 0, last_error = NULL,
                   lease_owner = NULL, lease_expires = NULL, archived_at = ?, updated_at = ?
               WHERE id = ?""",
            (
                stored.key,
                stored.size,
                stored.sha256,
                stored.version_id,
                retain_until,
                now,
                now,
                recording_id,
            ),
        )
        self._append_audit_tx(
            conn,
            now_dt,
            now,
            "archived",
            recording_id,
            {
                "key": stored.key,
                "size": stored.size,
                "sha256": stored.sha256,
                "version_id": stored.version_id,
                "retain_until": retain_until,
            },
        )
        return True

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None:
        await self._call(self._fail_sync, recording_id, owner, error, permanent)

    def _fail_sync(self, recording_id: str, owner: str, error: str, permanent: bool) -> None:
        now_dt, now = _now()
        with self._write() as conn:
            # A lost lease changes nothing: the row is someone else's (or archived) now.
            rows = conn.execute(
                """UPDATE recordings
                   SET state = 'failed', permanent = ?, last_error = ?, lease_owner = NULL,
                       lease_expires = NULL, updated_at = ?
                   WHERE id = ? AND state = 'in_progress' AND lease_owner = ?
                   RETURNING attempts""",
                (int(permanent), error, now, recording_id, owner),
            ).fetchall()
            if rows:
                details = {"error": error, "permanent": permanent, "attempt": rows[0][0]}
                self._append_audit_tx(conn, now_dt, now, "failed", recording_id, details)

    async def release(self, recording_id: str, *, owner: str) -> None:
        await self._call(self._release_sync, recording_id, owner)

    def _release_sync(self, recording_id: str, owner: str) -> None:
        _, now = _now()
        with self._write() as conn:
            conn.execute(
                """UPDATE recordings
                   SET state = 'pending', attempts = max(attempts - 1, 0), lease_owner = NULL,
                       lease_expires = NULL, updated_at = ?
                   WHERE id = ? AND state = 'in_progress' AND lease_owner = ?""",
                (now, recording_id, owner),
            )

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        await self._call(self._reject_sync, recording_id, reason, metadata)

    def _reject_sync(
        self, recording_id: str, reason: str, metadata: Mapping[str, Any] | None
    ) -> None:
        now_dt, now = _now()
        with self._write() as conn:
            # Rejecting the same entry again on every pass would only grow the audit chain.
            rows = conn.execute(
                """INSERT INTO recordings (
                       id, state, permanent, last_error, metadata, first_seen_at, updated_at
                   ) VALUES (:id, 'failed', 1, :reason, coalesce(:metadata, '{}'), :now, :now)
                   ON CONFLICT (id) DO UPDATE SET
                       state = 'failed', permanent = 1, last_error = excluded.last_error,
                       metadata = coalesce(:metadata, metadata),
                       lease_owner = NULL, lease_expires = NULL, updated_at = excluded.updated_at
                   WHERE state != 'archived'
                     AND NOT (state = 'failed' AND permanent = 1
                              AND last_error IS excluded.last_error)
                   RETURNING id""",
                {
                    "id": recording_id,
                    "reason": reason,
                    "metadata": None if metadata is None else dumps(metadata),
                    "now": now,
                },
            ).fetchall()
            if rows:
                details = {"reason": reason}
                self._append_audit_tx(conn, now_dt, now, "rejected", recording_id, details)

    async def mark_deleted_at_source(self, recording_id: str) -> None:
        await self._call(self._mark_deleted_sync, recording_id)

    def _mark_deleted_sync(self, recording_id: str) -> None:
        now_dt, now = _now()
        with self._write() as conn:
            row = conn.execute(
                "SELECT deleted_at_source FROM recordings WHERE id = ?", (recording_id,)
            ).fetchone()
            if row is None:
                raise LedgerError(
                    f"mark_deleted_at_source: the ledger has no row for {recording_id!r}"
                )
            if row[0] is not None:
                return
            conn.execute(
                "UPDATE recordings SET deleted_at_source = ?, updated_at = ? WHERE id = ?",
                (now, now, recording_id),
            )
            self._append_audit_tx(conn, now_dt, now, "deleted_at_source", recording_id, {})

    # -- reads -------------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        return await self._call(self._get_sync, recording_id)

    def _get_sync(self, recording_id: str) -> LedgerRow | None:
        row = self._db().execute("SELECT * FROM recordings WHERE id = ?", (recording_id,))
        found = row.fetchone()
        return None if found is None else decode_row(found, _dt)

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        if not recording_ids:
            return {}
        return await self._call(self._states_sync, list(dict.fromkeys(recording_ids)))

    def _states_sync(self, ids: list[str]) -> dict[str, State]:
        found: dict[str, State] = {}
        conn = self._db()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            query = f"SELECT id, state FROM recordings WHERE id IN ({placeholders})"
            for rec_id, state in conn.execute(query, chunk):
                try:
                    found[rec_id] = State(state)
                except ValueError as exc:
                    raise LedgerError(
                        f"the ledger row {rec_id!r} has unknown state {state!r}"
                    ) from exc
        return found

    async def summary(self) -> Summary:
        return await self._call(self._summary_sync)

    def _summary_sync(self) -> Summary:
        counts = dict.fromkeys(State, 0)
        permanent = retryable = archived_bytes = 0
        oldest: str | None = None
        rows = self._db().execute(
            """SELECT state, count(*), coalesce(sum(permanent), 0),
                      min(CASE WHEN permanent = 0 THEN ended_at END), coalesce(sum(size), 0)
               FROM recordings GROUP BY state"""
        )
        for state_text, count, permanent_count, min_ended, size_sum in rows:
            try:
                state = State(state_text)
            except ValueError as exc:
                raise LedgerError(f"the ledger holds rows in unknown state {state_text!r}") from exc
            counts[state] = count
            if state == State.FAILED:
                permanent, retryable = permanent_count, count - permanent_count
            if state == State.ARCHIVED:
                archived_bytes = size_sum
            elif min_ended is not None and (oldest is None or min_ended < oldest):
                oldest = min_ended
        return Summary(
            counts=counts,
            permanent_failures=permanent,
            retryable_failures=retryable,
            oldest_unarchived_ended_at=_dt(oldest),
            archived_bytes=archived_bytes,
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

    async def iter_archived(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        if since is None and until is None:
            # Rows with no known end come first, as NULL sorts first; a bound excludes them.
            after_id = ""
            while batch := await self._call(self._archived_undated_sync, after_id):
                for row in batch:
                    yield row
                after_id = batch[-1].id
        after: tuple[str, str] | None = None
        while batch := await self._call(
            self._archived_dated_sync, _ts_or_none(since), _ts_or_none(until), after
        ):
            for row in batch:
                yield row
            last = batch[-1]
            assert last.ended_at is not None
            after = (_ts(last.ended_at), last.id)

    def _archived_undated_sync(self, after_id: str) -> list[LedgerRow]:
        rows = self._db().execute(
            """SELECT * FROM recordings
               WHERE state = 'archived' AND ended_at IS NULL AND id > ?
               ORDER BY id LIMIT ?""",
            (after_id, _BATCH),
        )
        return [decode_row(row, _dt) for row in rows]

    def _archived_dated_sync(
        self, since: str | None, until: str | None, after: tuple[str, str] | None
    ) -> list[LedgerRow]:
        where = ["state = 'archived'", "ended_at IS NOT NULL"]
        params: dict[str, Any] = {"limit": _BATCH}
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
        seq, prev_hash = (1, audit.GENESIS) if last is None else (last[0] + 1, last[1])
        details_text = dumps(details)
        # Hash what will be read back, so the entry re-verifies whatever ``details`` held.
        stored_details = json.loads(details_text)
        digest = audit.entry_hash(prev_hash, seq, at, action, recording_id, stored_details)
        conn.execute(
            """INSERT INTO audit (seq, at, action, recording_id, details, prev_hash, hash)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (seq, at_text, action, recording_id, details_text, prev_hash, digest),
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
