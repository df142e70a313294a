"""asyncpg at the PostgreSQL ledger's edge, mapped once: which of its errors are transient, how
values go in (text and jsonb cleaned of what PostgreSQL refuses) and come back (times in UTC),
the SQL that writes rows, and where a URL points, fit for messages (never its password)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger.portable import RECORDING_FIELDS
from archiver.ledger.rows import dumps
from archiver.models import State
from archiver.redact import redact


def clean(value: Any) -> Any:
    """What PostgreSQL text and jsonb can hold: no NUL, no lone surrogates (SQLite takes both)."""
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:
            return value
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, Mapping):
        return {clean(str(k)): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def jsonb(value: Mapping[str, Any]) -> str:
    text = dumps(value)  # ASCII: whatever jsonb refuses shows as a \u escape
    if "\\u0000" in text or "\\ud" in text:
        return dumps(clean(value))
    return text


def utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise LedgerError(f"the ledger holds {type(value).__name__} where a time belongs")
    return value.astimezone(UTC)


def is_transient(exc: BaseException | None) -> bool:
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


DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def translate(exc: BaseException, where: str, what: str) -> LedgerError | LedgerUnavailable:
    """A driver's error as the exception tree's: transient (``LedgerUnavailable``) when the
    server or the connection failed, not the statement."""
    detail = redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
    if is_transient(exc):
        return LedgerUnavailable(f"the ledger {where} is unavailable right now ({what}): {detail}")
    return LedgerError(f"the ledger {where} refused {what}: {detail}")


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


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.password is not None or "password" in parse_qs(parts.query):
        # The URL ends up in process lists and config files: the password never goes there.
        raise ConfigError(
            "ledger.url: must not contain a password; set PGPASSWORD or ledger.password_file"
        )


# The array type ``unnest`` needs for each kind of column (``portable.RECORDING_FIELDS``).
_ARRAY_TYPES = {"text": "text[]", "int": "bigint[]", "bool": "boolean[]", "ts": "timestamptz[]"}


def pg_value(name: str, value: Any) -> Any:
    """A column value as asyncpg sends it: jsonb as text, text cleaned of what PostgreSQL
    refuses."""
    if isinstance(value, State):
        return value.value
    if RECORDING_FIELDS[name] == "object":
        return jsonb(value if value is not None else {})
    return clean(value)


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


INSERT = _insert_sql()


def update_sql(columns: Sequence[str]) -> str:
    unknown = set(columns) - set(RECORDING_FIELDS)
    if unknown:
        raise LedgerError(f"no such ledger column(s): {', '.join(sorted(unknown))}")
    sets = ", ".join(
        f"{c} = ${n}::jsonb" if RECORDING_FIELDS[c] == "object" else f"{c} = ${n}"
        for n, c in enumerate(columns, start=2)
    )
    return f"UPDATE recordings SET {sets} WHERE id = $1"
