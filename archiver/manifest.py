"""The manifest: every archived recording, one line each, for an auditor.

Streamed from ``Ledger.iter_archived`` (ordered by ended_at), so memory stays flat however large
the archive. JSON lines or CSV with a header; every time is UTC ISO 8601. Written to a file, it
appears only complete (temp file, fsync, rename), never half-written.

Columns (public interface): id, room_id, session_id, participant_id, started_at, ended_at,
storage_key, size, sha256, archived_at, retain_until, version_id, deleted_at_source, and
location: where an auditor finds the object (an absolute path, or ``s3://bucket/prefix/key``:
``storage_key`` is relative to the archive root or the S3 prefix), state (archived, or with
``--include-expired`` also expired: the copy was deleted when its retention ended, and the row
keeps what it was), expired_at, and source (``room_recordings`` or ``room_compositions``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TextIO

from archiver.models import LedgerRow, State

FORMATS = ("jsonl", "csv")

COLUMNS = (
    "id",
    "room_id",
    "session_id",
    "participant_id",
    "started_at",
    "ended_at",
    "storage_key",
    "size",
    "sha256",
    "archived_at",
    "retain_until",
    "version_id",
    "deleted_at_source",
    "location",
    "state",
    "expired_at",
    "source",
)


def day_range(since: date | None, until: date | None) -> tuple[datetime | None, datetime | None]:
    """Whole UTC days, both inclusive, as the ledger's [since, until) bounds on ended_at."""
    start = None if since is None else datetime.combine(since, time.min, tzinfo=UTC)
    end = None if until is None else datetime.combine(until + timedelta(days=1), time.min, UTC)
    return start, end


def utc_iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def manifest_record(row: LedgerRow, locate: Callable[[str], str] | None = None) -> dict[str, Any]:
    return {
        "id": row.id,
        "room_id": row.room_id,
        "session_id": row.session_id,
        "participant_id": row.participant_id,
        "started_at": utc_iso(row.started_at),
        "ended_at": utc_iso(row.ended_at),
        "storage_key": row.storage_key,
        "size": row.size,
        "sha256": row.sha256,
        "archived_at": utc_iso(row.archived_at),
        "retain_until": utc_iso(row.retain_until),
        "version_id": row.version_id,
        "deleted_at_source": utc_iso(row.deleted_at_source),
        "location": (
            locate(row.storage_key)
            if locate and row.storage_key and row.state is not State.EXPIRED
            else None
        ),
        "state": row.state.value,
        "expired_at": utc_iso(row.expired_at),
        "source": row.source,
    }


@dataclass(slots=True)
class ManifestStats:
    recordings: int = 0
    bytes: int = 0


async def write_manifest(
    rows: AsyncIterator[LedgerRow],
    out: TextIO,
    fmt: str,
    locate: Callable[[str], str] | None = None,
) -> ManifestStats:
    if fmt not in FORMATS:
        raise ValueError(f"unknown manifest format {fmt!r}")
    stats = ManifestStats()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    async for row in rows:
        record = manifest_record(row, locate)
        if writer is not None:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
        else:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
        stats.recordings += 1
        stats.bytes += row.size or 0
    return stats


@contextlib.contextmanager
def open_output(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a file that only appears once everything was written (temp + rename)."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    directory = path.parent
    # mkstemp creates the file 0600 less the umask, and it keeps that mode through the rename:
    # a manifest or an export holds every recording's metadata.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
