"""The archive knows its ledger: an identity record at the archive's root, and a rebuild.

The record, ``.archiver-id.json`` at the archive root (or under the S3 prefix), names the ledger
that writes the archive; the ledger keeps the same id in its settings (``ledger.id``). Checked
whenever a command opens both:

- a new, empty or truncated ledger over an archive that holds recordings is refused (a 0-byte
  SQLite file opens as a brand-new database, and would otherwise report "nothing archived",
  fetch everything again and start a new audit chain); so is a ledger with another id;
- a first writer on an empty archive writes the record; an archive written before records
  existed gets one from the first writer whose ledger has rows (an upgrade), never from an empty
  ledger.

``archiver ledger rebuild`` makes a ledger from what the archive holds: the sidecar beside each
recording (its API metadata, size and SHA-256), the object itself (size, and on S3 the stored
hash, version and retention), and the record's ledger id; it appends an audit entry saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from archiver import layout
from archiver.errors import ConfigError, LedgerError, StorageError, UnsafeValue
from archiver.ledger import core
from archiver.ledger.base import Ledger
from archiver.models import State, parse_timestamp, utcnow
from archiver.sources import COMPOSITIONS, RECORDINGS, SOURCES
from archiver.storage.base import StorageBackend

log = logging.getLogger(__name__)

IDENTITY_KEY = ".archiver-id.json"
LEDGER_ID = "ledger.id"
FORMAT = "archiver-archive"
# A sidecar is a recording's key with this suffix (``layout.sidecar_key``).
_SIDECAR = layout.SIDECAR_SUFFIX
_MAX_SIDECAR = 1 << 20

Ignore = Callable[[str], bool]


def _never(key: str) -> bool:
    return False


async def read_identity(storage: StorageBackend) -> dict[str, Any] | None:
    if await storage.stat(IDENTITY_KEY) is None:
        return None
    data = b"".join([chunk async for chunk in storage.read(IDENTITY_KEY)])
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not doc.get("ledger_id"):
        raise ConfigError(
            f"the archive's identity record {IDENTITY_KEY} is unreadable; restore it from a "
            "backup, or remove it only if you know which ledger this archive belongs to"
        )
    return doc


async def holds_recordings(storage: StorageBackend, ignore: Ignore = _never) -> bool:
    """Whether anything in the archive looks like a recording archiver stored: a file named
    by a recording id (its sidecar too). Other files (a mount's own, a user's notes) are not."""
    async for key in storage.iter_keys():
        if key == IDENTITY_KEY or ignore(key):
            continue
        try:
            layout.check_id(key.rsplit("/", 1)[-1].split(".", 1)[0])
        except UnsafeValue:
            continue
        return True
    return False


async def _ledger_is_empty(ledger: Ledger) -> bool:
    summary = await ledger.summary()
    return sum(summary.counts.values()) == 0


async def check(
    ledger: Ledger, storage: StorageBackend, *, writable: bool, ignore: Ignore = _never
) -> None:
    """Refuse (ConfigError) a ledger that is not the archive's; with ``writable``, write the
    record where there is none yet."""
    record = await read_identity(storage)
    ledger_id = await ledger.get_meta(LEDGER_ID)
    if record is not None:
        if ledger_id == record["ledger_id"]:
            return
        if ledger_id is None and await _ledger_is_empty(ledger):
            raise ConfigError(
                f"the ledger is new or empty, but the archive already holds recordings "
                f"archived with ledger {record['ledger_id']}: point ledger.path (or ledger.url) "
                "at that ledger, or make one from the archive with `archiver ledger rebuild`"
            )
        raise ConfigError(
            f"the archive belongs to ledger {record['ledger_id']}, not to this one "
            f"({ledger_id or 'which has no id'}): check ledger.path / ledger.url and storage"
        )
    empty_ledger = ledger_id is None and await _ledger_is_empty(ledger)
    if empty_ledger and await holds_recordings(storage, ignore):
        raise ConfigError(
            "the ledger is new or empty, but the archive already holds recordings: point "
            "ledger.path (or ledger.url) at the ledger that archived them, or make one from "
            "the archive with `archiver ledger rebuild`"
        )
    if writable:
        await write_identity(ledger, storage, ledger_id)


async def write_identity(ledger: Ledger, storage: StorageBackend, ledger_id: str | None) -> str:
    if ledger_id is None:
        # Two first writers at once must agree: the one whose id the ledger takes wins, and
        # both write the record with that id.
        proposed = str(uuid.uuid4())
        if await ledger.advance_meta(LEDGER_ID, None, proposed):
            ledger_id = proposed
        else:
            ledger_id = await ledger.get_meta(LEDGER_ID)
            assert ledger_id is not None
    doc = {
        "format": FORMAT,
        "format_version": 1,
        "ledger_id": ledger_id,
        "created_at": utcnow().isoformat(),
        "note": "written by archiver: the ledger that records this archive",
    }
    body = json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"
    await storage.put_bytes(IDENTITY_KEY, body, content_type="application/json")
    await ledger.append_audit("archive_identity", None, {"ledger_id": ledger_id})
    return ledger_id


# -- rebuild ------------------------------------------------------------------------------------
@dataclass(slots=True)
class RebuildReport:
    recordings: int = 0
    hashed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    ledger_id: str = ""

    def line(self) -> str:
        return (
            f"{self.recordings} recordings rebuilt from the archive ({self.hashed} re-hashed "
            f"for want of a sidecar or stored hash), {len(self.skipped)} objects skipped"
        )


async def rebuild(
    ledger: Ledger, storage: StorageBackend, *, deep: bool = False, ignore: Ignore = _never
) -> RebuildReport:
    """Make the (empty) ledger from the archive: one archived row per recording found."""
    if not await _ledger_is_empty(ledger):
        raise LedgerError(
            "ledger rebuild writes into an empty ledger only; this one holds recordings "
            "(point ledger.path at a new file)"
        )
    report = RebuildReport()
    record = await read_identity(storage)
    keys = {k async for k in storage.iter_keys() if k != IDENTITY_KEY and not ignore(k)}
    rows: dict[str, dict[str, Any]] = {}
    now = utcnow()
    for key in sorted(keys):
        if key.endswith(_SIDECAR) and key[: -len(_SIDECAR)] in keys:
            continue  # read with its recording
        try:
            row = await _row_of(storage, key, key + _SIDECAR in keys, now, deep=deep)
        except (StorageError, UnsafeValue, ValueError) as exc:
            report.skipped[key] = str(exc)
            continue
        if row.pop("_hashed"):
            report.hashed += 1
        known = rows.get(row["id"])
        if known is not None:
            # Two copies claim one recording: keep the newer, say so.
            older, row = sorted((known, row), key=lambda r: r["archived_at"] or now)
            report.skipped[older["storage_key"]] = f"another copy of {row['id']} is newer"
        rows[row["id"]] = row
    report.recordings = len(rows)
    ledger_id = record["ledger_id"] if record is not None else str(uuid.uuid4())
    report.ledger_id = ledger_id

    async def records() -> AsyncIterator[tuple[str, dict[str, Any]]]:
        for row in rows.values():
            yield "recording", row
        yield "meta", {"key": LEDGER_ID, "value": ledger_id}

    await ledger.import_records(records(), replace=True)
    await ledger.append_audit(
        "ledger_rebuilt",
        None,
        {
            "recordings": report.recordings,
            "skipped": len(report.skipped),
            "rehashed": report.hashed,
            "ledger_id": ledger_id,
        },
    )
    if record is None:
        await write_identity(ledger, storage, ledger_id)
    return report


async def _row_of(
    storage: StorageBackend, key: str, has_sidecar: bool, now: datetime, *, deep: bool
) -> dict[str, Any]:
    info = await storage.stat(key)
    if info is None:
        raise StorageError("vanished while the archive was read")
    recording: dict[str, Any] = {}
    archive: dict[str, Any] = {}
    if has_sidecar:
        data = b"".join([c async for c in storage.read(key + _SIDECAR)])[:_MAX_SIDECAR]
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("its sidecar is not a JSON object")
        found_recording, found_archive = doc.get("recording"), doc.get("archive")
        recording = found_recording if isinstance(found_recording, dict) else {}
        archive = found_archive if isinstance(found_archive, dict) else {}
        if archive.get("size") not in (None, info.size):
            raise ValueError(f"its sidecar says {archive.get('size')} bytes, it holds {info.size}")
    rid = recording.get("id")
    if not isinstance(rid, str) or not rid:
        # No sidecar to say: the key's file name is the id under every template archiver knows.
        rid = key.rsplit("/", 1)[-1].split(".", 1)[0]
    layout.check_id(rid)
    sha256 = info.sha256 or archive.get("sha256")
    hashed = False
    if deep or not isinstance(sha256, str):
        hasher = hashlib.sha256()
        async for chunk in storage.read(key):
            hasher.update(chunk)
        if isinstance(sha256, str) and sha256 != hasher.hexdigest():
            raise ValueError("its bytes do not hash to the SHA-256 its sidecar records")
        sha256, hashed = hasher.hexdigest(), True
    retain = info.retain_until or parse_timestamp(archive.get("retain_until"))
    row = core.new_row(
        rid,
        now,
        state=State.ARCHIVED.value,
        storage_key=key,
        size=info.size,
        sha256=sha256,
        version_id=info.version_id,
        retain_until=retain,
        source_status=_text(recording.get("status")),
        room_id=_text(recording.get("room_id")),
        session_id=_text(recording.get("session_id")),
        participant_id=_text(recording.get("participant_id")),
        started_at=parse_timestamp(recording.get("started_at")),
        ended_at=parse_timestamp(recording.get("ended_at")),
        metadata=recording,
        archived_at=parse_timestamp(archive.get("archived_at")) or now,
        claims=1,
        completed_by="ledger rebuild",
        source=_source(archive, recording, key),
    )
    row["_hashed"] = hashed
    return row


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def ledger_files(ledger_path: Path, archive_root: Path) -> Ignore:
    """Keys of the archive that are the SQLite ledger's own files, when it lives inside the
    archive root (the demo keeps it there): never counted as recordings."""
    try:
        rel = ledger_path.resolve().relative_to(archive_root.resolve()).as_posix()
    except (ValueError, OSError):
        return _never

    def ignore(key: str) -> bool:
        return key == rel or key.startswith((rel + "-", rel + "."))

    return ignore


def _source(archive: dict[str, Any], recording: dict[str, Any], key: str) -> str:
    """The source a copy was archived from: what its sidecar says, else what its entry's
    ``record_type`` or its key under the default composition template tell."""
    said = archive.get("source")
    if said in SOURCES:
        return str(said)
    if recording.get("record_type") in ("room_composition", "composition"):
        return COMPOSITIONS
    return COMPOSITIONS if key.startswith("compositions/") and not recording else RECORDINGS
