"""``ledger export`` / ``import`` in PostgreSQL (``archiver.ledger.portable``): the SQL of each
step; what the records hold and how they map to tables is ``archiver.ledger.tables``'s."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from archiver import audit
from archiver.ledger import tables
from archiver.ledger.portable import Kind
from archiver.ledger.postgres_driver import clean, jsonb, utc
from archiver.ledger.rows import dumps

BATCH = 1000  # rows per cursor read and per import batch


async def export_from(conn: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Every record, in export order, inside the caller's (snapshot) transaction on ``conn``."""
    for kind in tables.EXPORT_ORDER:
        async for row in conn.cursor(tables.export_query(kind), prefetch=BATCH):
            yield kind, tables.record_of(kind, row, utc)


async def import_into(
    conn: Any, where: str, records: AsyncIterable[tuple[str, Mapping[str, Any]]], replace: bool
) -> None:
    """Load an export inside the caller's transaction on ``conn``, holding every table."""
    # Nobody writes while the history is replaced underneath them.
    await conn.execute(f"LOCK TABLE {', '.join(tables.HISTORY)}, audit_head IN EXCLUSIVE MODE")
    filled = [t for t in tables.HISTORY if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {t})")]
    if not replace:
        tables.refuse_filled(where, filled)
    await conn.execute(f"TRUNCATE {', '.join(tables.HISTORY)} RESTART IDENTITY")
    await conn.execute(f"UPDATE audit_head SET seq = 0, hash = '{audit.GENESIS}'")
    last_audit: Mapping[str, Any] | None = None
    async for kind, batch in tables.batches(records, BATCH):
        await conn.copy_records_to_table(
            tables.TABLES[kind],
            records=tables.rows_of(kind, batch, _encode),
            columns=tables.columns(kind),
        )
        if kind == "audit":
            last_audit = batch[-1]
    if last_audit is not None:
        await conn.execute(
            "UPDATE audit_head SET seq = $1, hash = $2", last_audit["seq"], last_audit["hash"]
        )


def _encode(kind: str, field_kind: Kind, value: Any) -> Any:
    if kind == "audit":
        # Exactly the text that was hashed: the entry must verify as it did in its ledger.
        return dumps(value) if field_kind == "object" else value
    if field_kind == "object":
        return jsonb(value if value is not None else {})
    return clean(value)
