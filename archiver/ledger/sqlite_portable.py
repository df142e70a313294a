"""``ledger export`` / ``import`` in the SQLite file (``archiver.ledger.portable``): the SQL of
each step; what the records hold and how they map to tables is ``archiver.ledger.tables``'s. Each
function runs on the ledger's thread, inside the transaction the ledger holds for it."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from archiver.ledger import tables
from archiver.ledger.portable import Kind
from archiver.ledger.sqlite_schema import dt, encode


def export_batch(
    conn: sqlite3.Connection, kind: str, after: Any, size: int
) -> tuple[list[dict[str, Any]], Any] | None:
    """The next ``size`` records of ``kind`` after the export key ``after`` (None: the first),
    and the key to continue from; None when there are no more."""
    key = tables.EXPORT_KEYS[kind]
    where = "" if after is None else f"WHERE {key} > :after"
    rows = conn.execute(
        f"""SELECT {key} AS export_key, {tables.select_list(kind)} FROM {tables.TABLES[kind]}
            {where} ORDER BY {key} LIMIT :limit""",
        {"after": after, "limit": size},
    ).fetchall()
    if not rows:
        return None
    return [tables.record_of(kind, row, dt) for row in rows], rows[-1]["export_key"]


def import_begin(conn: sqlite3.Connection, where: str, replace: bool) -> None:
    """Open the import's transaction on an empty ledger (``replace``: emptied first, in it)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        filled = [
            t for t in tables.HISTORY if conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()
        ]
        if not replace:
            tables.refuse_filled(where, filled)
        for table in tables.HISTORY:
            conn.execute(f"DELETE FROM {table}")
    except BaseException:
        conn.rollback()
        raise


def import_batch(conn: sqlite3.Connection, kind: str, records: Sequence[Mapping[str, Any]]) -> None:
    names = tables.columns(kind)
    conn.executemany(
        f"INSERT INTO {tables.TABLES[kind]} ({', '.join(names)}) "
        f"VALUES ({', '.join('?' * len(names))})",
        tables.rows_of(kind, records, _encode),
    )


def _encode(kind: str, field_kind: Kind, value: Any) -> Any:
    return encode(field_kind, value)
