"""The ledger: the single source of truth about what is archived (contract in ``base``).

``open_ledger`` picks the implementation: a SQLite file for one instance, PostgreSQL for several,
the latter retried by the one policy (``archiver.ledger.retrying``): a shared server may restart.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from archiver.errors import ConfigError
from archiver.ledger.base import (
    AuditEntry,
    Budget,
    Ledger,
    PassRecord,
    RecordsLedger,
    Summary,
    Tally,
    WorkLedger,
)
from archiver.ledger.retrying import RetryingLedger
from archiver.ledger.sqlite import SqliteLedger
from archiver.retry import RetryPolicy

__all__ = [
    "AuditEntry",
    "Budget",
    "Ledger",
    "PassRecord",
    "RecordsLedger",
    "RetryingLedger",
    "SqliteLedger",
    "Summary",
    "Tally",
    "WorkLedger",
    "open_ledger",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")

# How a PostgreSQL ledger is retried: long enough to ride out a restart of the server.
POSTGRES_RETRY = RetryPolicy(attempts=30, total_seconds=120.0, initial_backoff=0.1, max_backoff=5.0)


def open_ledger(
    *,
    path: Path | None = None,
    url: str | None = None,
    exclusive: bool = False,
    password_file: Path | None = None,
    budget: Budget | None = None,
    must_exist: bool = False,
) -> Ledger:
    """The ledger at ``url`` (``postgresql://``) if given, else the SQLite file at ``path``; not
    yet opened: use the result with ``async with``. ``exclusive`` and ``must_exist`` (refuse to
    create a file) only apply to a SQLite file; ``password_file`` only to PostgreSQL (without it,
    ``PGPASSWORD`` is used); several instances may share a PostgreSQL ledger. ``budget`` is the
    attempt budget the ledger applies (``workers.max_attempts``)."""
    if url is None:
        if path is None:
            raise ConfigError("ledger: set ledger.path (SQLite) or ledger.url (PostgreSQL)")
        return SqliteLedger(path, exclusive=exclusive, budget=budget, must_exist=must_exist)
    if not url.startswith(_POSTGRES_SCHEMES):
        # Only the scheme is echoed: the rest of a URL may hold a password.
        scheme = f"{url.split('://', 1)[0]}://" if "://" in url else "no scheme"
        raise ConfigError(
            f"ledger.url: unsupported scheme ({scheme}); expected postgresql://, "
            "or set ledger.path for a SQLite file"
        )
    try:
        # Imported on demand: only a PostgreSQL ledger needs its driver.
        postgres = importlib.import_module("archiver.ledger.postgres")
    except ImportError as exc:
        raise ConfigError("ledger.url: PostgreSQL ledger is not available") from exc
    inner: Ledger = postgres.PostgresLedger(url, password_file=password_file, budget=budget)
    return RetryingLedger(inner, POSTGRES_RETRY)
