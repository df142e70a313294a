"""The PostgreSQL ledger's group transaction: the busy transitions (claim, heartbeat, complete,
note_upload) that arrive while one group is being written share the next one, as in the SQLite
ledger, so N workers finishing together cost one commit, not N.

In a few round trips whatever the group's size: the rows the programs load are locked by one
statement, in id order (two instances' groups never wait on each other in a cycle); each
program then runs against them, its writes kept aside; a refused program's writes are dropped,
so it undoes nothing of the others (what a savepoint each gives the SQLite ledger, without a
round trip for it); the kept writes go out once at the end, one ``UPDATE`` per set of columns,
and the audit entries last, chained under one lock of the chain head. The head is the last lock
a group takes, as in every transition (rows first), so chain appends queue and never deadlock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from archiver.errors import LedgerError
from archiver.ledger import ops
from archiver.ledger.portable import BRIEF_FIELDS
from archiver.ledger.postgres_driver import clean, pg_value, update_sql, utc
from archiver.ledger.rows import decode_row
from archiver.models import LedgerRow

_BRIEF_COLUMNS = ", ".join(BRIEF_FIELDS)

# Audit appends: ``append(conn, [(action, recording_id, details, token)])`` chains them in order.
AppendAudits = Callable[[Any, list[tuple[str, str | None, Mapping[str, Any], str | None]]], Any]


@dataclass(slots=True)
class _Writes:
    """What one program wrote, kept aside until it has finished."""

    updates: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)
    audits: list[tuple[str, str | None, Mapping[str, Any], str | None]] = field(
        default_factory=list
    )


@dataclass(slots=True)
class _Group:
    conn: Any
    now: datetime | None = None
    rows: dict[str, LedgerRow | None] = field(default_factory=dict)
    # Per row, every column the kept programs set, the latest value of each (one UPDATE a row).
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    audits: list[tuple[str, str | None, Mapping[str, Any], str | None]] = field(
        default_factory=list
    )
    stale: set[str] = field(default_factory=set)  # rows in ``rows`` a kept program changed

    async def lock(self, ids: list[str]) -> None:
        if not ids:
            return
        found = await self.conn.fetch(
            f"""SELECT {_BRIEF_COLUMNS}, now() AS tx_now FROM recordings
                WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE""",
            ids,
        )
        self.rows.update(dict.fromkeys(ids))
        for row in found:
            self.rows[row["id"]] = decode_row(row, utc)
            self.now = utc(row["tx_now"])

    async def answer(self, op: ops.Op, writes: _Writes) -> Any:
        match op:
            case ops.Clock():
                if self.now is None:
                    self.now = utc(await self.conn.fetchval("SELECT now()"))
                return self.now
            case ops.Load(id=rid):
                if rid in self.rows and rid not in self.stale:
                    return self.rows[rid]
                # Not locked with the others, or changed by a program before this one: read it
                # as the transaction sees it once what was kept so far is written.
                await self.flush_updates()
                row = await self.conn.fetchrow(
                    f"SELECT {_BRIEF_COLUMNS} FROM recordings WHERE id = $1 FOR UPDATE", rid
                )
                self.rows[rid] = None if row is None else decode_row(row, utc)
                self.stale.discard(rid)
                return self.rows[rid]
            case ops.Update(changes=changes):
                for rid, values in changes:
                    update_sql(tuple(values))  # an unknown column is refused here, not at commit
                    writes.updates.append((clean(rid), values))
                return None
            case ops.Audit(action=action, recording_id=rid, details=details):
                writes.audits.append((action, clean(rid), details, None))
                return None  # chained at the end of the group (no program reads it)
        raise LedgerError(f"a grouped PostgreSQL transition cannot carry out {op!r}")

    def keep(self, writes: _Writes) -> None:
        for rid, values in writes.updates:
            self.updates.setdefault(rid, {}).update(values)
            self.stale.add(rid)
        self.audits.extend(writes.audits)

    async def flush_updates(self) -> None:
        by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for rid, values in self.updates.items():
            params = (rid, *(pg_value(c, v) for c, v in values.items()))
            by_columns.setdefault(tuple(values), []).append(params)
        self.updates = {}
        for columns, params_list in by_columns.items():
            await self.conn.executemany(update_sql(columns), params_list)


async def _run_one(group: _Group, program: ops.Program[Any], request: ops.Op) -> Any:
    writes = _Writes()
    try:
        while True:
            request = program.send(await group.answer(request, writes))
    except StopIteration as done:
        group.keep(writes)
        return done.value
    finally:
        program.close()


async def carry_out_group(
    conn: Any, makes: list[Callable[[], ops.Program[Any]]], append_audits: AppendAudits
) -> list[Any]:
    """Run each program in the caller's transaction; each one's result, or the ``LedgerError``
    that refused it (its writes dropped). A database error is raised: the group rolls back."""
    group = _Group(conn)
    results: list[Any] = [None] * len(makes)
    started: list[tuple[int, ops.Program[Any], ops.Op]] = []
    for n, make in enumerate(makes):
        program = make()
        try:
            started.append((n, program, next(program)))
        except StopIteration as done:
            results[n] = done.value
        except LedgerError as exc:
            results[n] = exc
    # Every row a program loads first, locked at once in id order.
    await group.lock(sorted({req.id for _, _, req in started if isinstance(req, ops.Load)}))
    for n, program, first in started:
        try:
            results[n] = await _run_one(group, program, first)
        except LedgerError as exc:
            results[n] = exc
    await group.flush_updates()
    if group.audits:
        await append_audits(conn, group.audits)
    return results
