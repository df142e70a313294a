"""One SQLite file and the one thread that owns its connection: opening it private (0600) and,
for the only writer, locked; WAL; the write transaction; group commit. No SQL of the ledger's:
``archiver.ledger.sqlite`` holds that.

Every call runs on one dedicated thread that alone owns the connection, so the event loop never
blocks on disk and sqlite3 is never shared between threads. Transitions that arrive while the
thread is busy share its next transaction (``_grouped``), each in a savepoint of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from archiver.errors import LedgerError, LedgerUnavailable
from archiver.ledger.grouping import Groups
from archiver.threads import Lane

_P = ParamSpec("_P")
_T = TypeVar("_T")

FILE_MODE = 0o600


@dataclass(slots=True)
class _Grouped:
    """A transition waiting for the next group transaction (see ``SqliteFile._grouped``)."""

    apply: Callable[[sqlite3.Connection], Any]
    durable: bool


_TRANSIENT_MESSAGES = ("locked", "busy", "disk i/o error", "database or disk is full")


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


def _translate(exc: sqlite3.Error, path: Path) -> LedgerError | LedgerUnavailable:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(
        m in message.lower() for m in _TRANSIENT_MESSAGES
    ):
        return LedgerUnavailable(f"the ledger {path} is unavailable right now: {message}")
    return LedgerError(f"the ledger {path} is unusable: {message}")


class SqliteFile:
    """The file a ``SqliteLedger`` is kept in (see the module's docstring)."""

    def __init__(
        self, path: Path, *, exclusive: bool, busy_timeout: float, must_exist: bool
    ) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self.busy_timeout = busy_timeout
        self.must_exist = must_exist
        self._lane: Lane | None = None
        # Touched only on the lane's one thread.
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Touched only on the event loop: transitions waiting for the next group transaction.
        self._groups: Groups[_Grouped] = Groups(self._write_group)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    async def _open(self) -> None:
        if self._lane is not None:
            raise LedgerError(f"the ledger {self.path} is already open")
        self._lane = Lane(1, "ledger-sqlite")
        try:
            await self._call(self._open_sync)
        except BaseException:
            with contextlib.suppress(LedgerError, LedgerUnavailable):
                await self._shutdown()
            raise

    async def _shutdown(self) -> None:
        lane, self._lane = self._lane, None
        if lane is None:
            return
        # Queued behind any call still running, so the connection closes after it; the thread
        # exits once the queue is drained. Shielded: a cancelled exit still closes the file.
        closing = lane.submit(self._close_sync)
        lane.close()
        try:
            await asyncio.shield(closing)
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
        lane = self._lane
        if lane is None:
            raise LedgerError(f"the ledger {self.path} is not open (use it with 'async with')")
        try:
            return await lane.run(fn, *args, **kwargs)
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

    # -- group commit ----------------------------------------------------------------------------
    async def _grouped(self, apply: Callable[[sqlite3.Connection], Any], *, durable: bool) -> Any:
        """Run ``apply`` in the next group transaction; return what it returns."""
        if self._lane is None:
            raise LedgerError(f"the ledger {self.path} is not open (use it with 'async with')")
        return await self._groups.join(_Grouped(apply, durable))

    async def _write_group(self, batch: list[_Grouped]) -> list[Any]:
        """One group on the ledger thread."""
        durable = any(item.durable for item in batch)
        results: list[Any] = await self._call(
            self._apply_group_sync, [item.apply for item in batch], durable
        )
        return results

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
