"""The record types of a ledger export (``archiver.ledger.portable``) as every ledger's tables.

Written once for every ledger: which table holds each record type, its column for each field,
the order an export reads it in, how a table row becomes an export record and a record a table
row, and how an import's stream is cut into batches. A ledger module adds only its dialect: how
it stores a time, an object, a boolean (an ``Encode``), and its SQL around these.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from archiver.errors import LedgerError
from archiver.ledger.portable import FIELDS, KINDS, Kind
from archiver.ledger.rows import json_object

TABLES: Mapping[str, str] = {
    "recording": "recordings",
    "audit": "audit",
    "pass": "passes",
    "meta": "meta",
}
# What an export reads each table in order of (unique, so also a keyset for paging).
EXPORT_KEYS: Mapping[str, str] = {"recording": "id", "audit": "seq", "pass": "id", "meta": "key"}
EXPORT_ORDER = KINDS
# Fields whose column has another name (``window`` is a reserved word in SQL).
_COLUMN_OF: Mapping[tuple[str, str], str] = {("pass", "window"): "listing_window"}
# The tables that hold a ledger's history (``audit_head`` and ``schema_version`` aside).
HISTORY = tuple(TABLES[kind] for kind in KINDS)

# How a dialect stores one field: (record type, the field's kind, value) → the column's value.
Encode = Callable[[str, Kind, Any], Any]
# How a dialect's time column reads back (SQLite: ISO text; PostgreSQL: timestamptz).
TimeReader = Callable[[Any], datetime | None]


def columns(kind: str) -> list[str]:
    """The columns of a record type's table, in the order of its fields."""
    return [_COLUMN_OF.get((kind, name), name) for name in FIELDS[kind]]


def select_list(kind: str) -> str:
    """What a ``SELECT`` of a record type's table lists, each column named as its field."""
    return ", ".join(
        column if column == name else f"{column} AS {name}"
        for name, column in zip(FIELDS[kind], columns(kind), strict=True)
    )


def export_query(kind: str) -> str:
    """Every row of a record type's table, in export order."""
    return f"SELECT {select_list(kind)} FROM {TABLES[kind]} ORDER BY {EXPORT_KEYS[kind]}"


def record_of(kind: str, row: Any, when: TimeReader) -> dict[str, Any]:
    """A row read with ``select_list`` as an export record: times as datetimes in UTC (``when``),
    objects decoded, booleans as booleans."""
    record: dict[str, Any] = {}
    for name, field_kind in FIELDS[kind].items():
        value = row[name]
        if value is not None:
            base = field_kind.rstrip("?")
            if base == "ts":
                value = when(value)
            elif base == "object":
                value = json_object(value, f"the {name} of {kind} {_key_of(kind, row)}")
            elif base == "bool":
                value = bool(value)
        record[name] = value
    return record


def _key_of(kind: str, row: Any) -> str:
    try:
        return repr(row[EXPORT_KEYS[kind]])
    except (KeyError, IndexError):
        return "(a row)"


def rows_of(
    kind: str, records: Sequence[Mapping[str, Any]], encode: Encode
) -> list[tuple[Any, ...]]:
    """Records of one type as rows of its table (``columns``), each value as ``encode`` says."""
    fields = FIELDS[kind].items()
    return [tuple(encode(kind, fkind, rec[name]) for name, fkind in fields) for rec in records]


def refuse_filled(where: str, filled: Sequence[str]) -> None:
    """An import into a ledger that holds anything is refused unless it replaces it."""
    if filled:
        raise LedgerError(
            f"the ledger {where} is not empty ({', '.join(filled)}); import only into a new "
            "ledger, or replace its contents explicitly"
        )


async def batches(
    records: AsyncIterable[tuple[str, Mapping[str, Any]]], size: int
) -> AsyncIterator[tuple[str, list[Mapping[str, Any]]]]:
    """An import's stream as (type, records) batches of one type, at most ``size`` each."""
    batch: list[Mapping[str, Any]] = []
    batch_kind = ""
    async for kind, record in records:
        if kind not in TABLES:
            raise LedgerError(f"import: unknown record type {kind!r}")
        if batch and (kind != batch_kind or len(batch) >= size):
            yield batch_kind, batch
            batch = []
        batch_kind = kind
        batch.append(record)
    if batch:
        yield batch_kind, batch
