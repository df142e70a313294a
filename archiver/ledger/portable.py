"""``archiver ledger export`` / ``import``: a whole ledger as JSON Lines, to move it between
backends (a SQLite file into PostgreSQL when one host is no longer enough) without losing history.

The file is one JSON object per line, each with a ``type``:

    header     {"format": "archiver-ledger", "format_version": 2, "backend", "exported_at", ...}
    recording  every column of a row, whatever its state: attempts, errors, leases, metadata
    audit      every entry of the audit chain in order, with its hashes unchanged
    pass       the pass history, oldest first
    meta       settings such as the daemon's high-water mark
    end        {"counts": {...}}: a file without it was cut short and is refused

Timestamps are ISO 8601 in UTC. Both directions stream: memory stays flat whatever the size. An
import runs in one transaction into an empty ledger (``replace`` empties it first, in the same
transaction), checks the audit chain as it goes and refuses a broken one, so ``audit verify``
passes on the target exactly as it did on the source.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from archiver import audit
from archiver.errors import ConfigError, LedgerError
from archiver.ledger.base import Ledger
from archiver.models import State

FORMAT = "archiver-ledger"
FORMAT_VERSION = 4
# Older files are read too: version 1 (before claims were told from attempts, ``_from_v1``),
# version 2 (before upload progress and quarantined copies: both empty) and version 3 (before
# legal holds, expiry and sources: no hold, never expired, room recordings).
READABLE_VERSIONS = (1, 2, 3, 4)
_V3_ADDED: dict[str, dict[str, Any]] = {"upload": {}, "quarantined": {}}
_V4_ADDED: dict[str, Any] = {"legal_hold": False, "expired_at": None, "source": "room_recordings"}
# What version 1 left out of a recording, and the attempts that made a v1 row failed for good
# (the default budget then, also applied by the ledgers' own schema upgrade).
_V1_ADDED = ("claims", "interruptions", "rejected", "completed_by")
V1_MAX_ATTEMPTS = 5

Kind = Literal["text", "text?", "int", "int?", "bool", "ts", "ts?", "object"]

# The fields of each record type and what they hold; every ledger exports and imports these.
RECORDING_FIELDS: Mapping[str, Kind] = {
    "id": "text",
    "state": "text",
    "attempts": "int",
    "permanent": "bool",
    "last_error": "text?",
    "storage_key": "text?",
    "size": "int?",
    "sha256": "text?",
    "version_id": "text?",
    "retain_until": "ts?",
    "source_status": "text?",
    "room_id": "text?",
    "session_id": "text?",
    "participant_id": "text?",
    "started_at": "ts?",
    "ended_at": "ts?",
    "metadata": "object",
    "lease_owner": "text?",
    "lease_expires": "ts?",
    "first_seen_at": "ts",
    "updated_at": "ts",
    "archived_at": "ts?",
    "deleted_at_source": "ts?",
    "claims": "int",
    "interruptions": "int",
    "rejected": "bool",
    "completed_by": "text?",
    "upload": "object",
    "quarantined": "object",
    "legal_hold": "bool",
    "expired_at": "ts?",
    "source": "text",
}
# Columns a row has beside its metadata (what a transition reads).
BRIEF_FIELDS = tuple(name for name in RECORDING_FIELDS if name != "metadata")
AUDIT_FIELDS: Mapping[str, Kind] = {
    "seq": "int",
    "at": "ts",
    "action": "text",
    "recording_id": "text?",
    "details": "object",
    "prev_hash": "text",
    "hash": "text",
}
PASS_FIELDS: Mapping[str, Kind] = {
    "started_at": "ts",
    "finished_at": "ts",
    "ok": "bool",
    "listed": "int",
    "enqueued": "int",
    "archived": "int",
    "failed": "int",
    "window": "text?",
    "error": "text?",
    "instance": "text?",
    "extra": "object",
}
META_FIELDS: Mapping[str, Kind] = {"key": "text", "value": "text"}

FIELDS: Mapping[str, Mapping[str, Kind]] = {
    "recording": RECORDING_FIELDS,
    "audit": AUDIT_FIELDS,
    "pass": PASS_FIELDS,
    "meta": META_FIELDS,
}
KINDS = tuple(FIELDS)


def iso(value: datetime) -> str:
    """Fixed-width ISO 8601 in UTC (the form the SQLite ledger stores)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(kind: str, record: Mapping[str, Any]) -> str:
    return json.dumps(
        {"type": kind, **record}, sort_keys=True, separators=(",", ":"), default=_json_default
    )


def _check_value(kind: Kind, value: Any, where: str) -> Any:
    if value is None:
        if kind.endswith("?"):
            return None
        raise LedgerError(f"{where}: missing")
    base = kind.rstrip("?")
    if base == "text" and isinstance(value, str):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "object" and isinstance(value, dict):
        return value
    if base == "ts" and isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise LedgerError(f"{where}: {value[:40]!r} is not an ISO 8601 time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise LedgerError(f"{where}: expected {base}, got {type(value).__name__}")


def _from_v1(doc: dict[str, Any]) -> None:
    """A version 1 recording, as a version 2 one: every claim counted as an attempt then."""
    if any(name in doc for name in _V1_ADDED):
        return
    attempts = doc.get("attempts")
    doc["claims"] = attempts if isinstance(attempts, int) else 0
    doc["interruptions"] = 0
    doc["rejected"] = False
    doc["completed_by"] = None
    if doc.get("state") == "failed" and isinstance(attempts, int):
        doc["permanent"] = bool(doc.get("permanent")) or attempts >= V1_MAX_ATTEMPTS


def decode(line: str, lineno: int, version: int = FORMAT_VERSION) -> tuple[str, dict[str, Any]]:
    """One line of an export as (type, record) with typed values (datetimes for times)."""
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise LedgerError(f"line {lineno}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise LedgerError(f"line {lineno}: not an object with a type")
    kind = doc.pop("type")
    if kind in ("header", "end"):
        return kind, doc
    fields = FIELDS.get(kind)
    if fields is None:
        raise LedgerError(f"line {lineno}: unknown record type {kind!r}")
    if kind == "recording" and version == 1:
        _from_v1(doc)
    if kind == "recording" and version < 3:
        for name, empty in _V3_ADDED.items():
            doc.setdefault(name, dict(empty))
    if kind == "recording" and version < 4:
        for name, value in _V4_ADDED.items():
            doc.setdefault(name, value)
    unknown = set(doc) - set(fields)
    if unknown:
        raise LedgerError(f"line {lineno}: unknown {kind} field(s) {', '.join(sorted(unknown))}")
    record = {
        name: _check_value(fkind, doc.get(name), f"line {lineno}: {kind}.{name}")
        for name, fkind in fields.items()
    }
    if kind == "recording" and record["state"] not in {s.value for s in State}:
        raise LedgerError(f"line {lineno}: unknown state {record['state']!r}")
    return kind, record


@dataclass(slots=True)
class ChainCheck:
    """Checks the audit entries of an import one by one, as ``audit.verify_chain`` would."""

    # Looked up late: this module loads while ``archiver.audit`` may still be loading.
    prev_hash: str = field(default_factory=lambda: audit.GENESIS)
    next_seq: int = 1

    def check(self, entry: Mapping[str, Any], lineno: int) -> None:
        seq = entry["seq"]
        if seq != self.next_seq:
            raise LedgerError(f"line {lineno}: audit entry {seq} follows entry {self.next_seq - 1}")
        if entry["prev_hash"] != self.prev_hash:
            raise LedgerError(f"line {lineno}: audit entry {seq} does not chain to the one before")
        digest = audit.entry_hash(
            entry["prev_hash"],
            seq,
            entry["at"],
            entry["action"],
            entry["recording_id"],
            entry["details"],
        )
        if digest != entry["hash"]:
            raise LedgerError(f"line {lineno}: audit entry {seq} does not match its hash (edited)")
        self.prev_hash = entry["hash"]
        self.next_seq = seq + 1


@dataclass(slots=True)
class TransferReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def line(self) -> str:
        c = self.counts
        return (
            f"{c['recording']} recordings, {c['audit']} audit entries, {c['pass']} passes, "
            f"{c['meta']} settings"
        )


# -- export ------------------------------------------------------------------------------------
async def export_ledger(ledger: Ledger, out: IO[str], *, backend: str) -> TransferReport:
    """Write the whole ledger to ``out`` as JSON Lines (one consistent snapshot)."""
    report = TransferReport()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "schema_version": await ledger.migrate(),
        "exported_at": iso(datetime.now(UTC)),
    }
    out.write(encode("header", header) + "\n")
    async with contextlib.aclosing(ledger.export_records()) as records:
        async for kind, record in records:
            out.write(encode(kind, record) + "\n")
            report.counts[kind] += 1
    out.write(encode("end", {"counts": report.counts}) + "\n")
    return report


# -- import ------------------------------------------------------------------------------------
def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield lineno, line


async def import_ledger(ledger: Ledger, path: Path, *, replace: bool = False) -> TransferReport:
    """Load an export into ``ledger`` in one transaction; refuse a truncated or tampered file."""
    report = TransferReport()
    lines = _read_lines(path)
    first = next(lines, None)
    if first is None:
        raise LedgerError(f"{path} is empty, not a ledger export")
    kind, header = decode(first[1], first[0])
    if kind != "header" or header.get("format") != FORMAT:
        raise LedgerError(f"{path} is not an archiver ledger export (no header line)")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise LedgerError(
            f"{path} has export format {version!r}; this archiver reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    chain = ChainCheck()
    order = {name: n for n, name in enumerate(KINDS)}

    async def records() -> AsyncIterator[tuple[str, dict[str, Any]]]:
        last_rank = 0
        for lineno, line in lines:
            kind, record = decode(line, lineno, version)
            if kind == "end":
                counts = record.get("counts")
                if counts != report.counts:
                    raise LedgerError(
                        f"line {lineno}: the file announces {counts}, but holds {report.counts}"
                    )
                if next(lines, None) is not None:
                    raise LedgerError(f"{path}: lines after the end line")
                return
            if kind == "header":
                raise LedgerError(f"line {lineno}: a second header")
            rank = order[kind]
            if rank < last_rank:
                raise LedgerError(f"line {lineno}: {kind} after {KINDS[last_rank]} records")
            last_rank = rank
            if kind == "audit":
                chain.check(record, lineno)
            report.counts[kind] += 1
            yield kind, record
        raise LedgerError(f"{path} ends without its end line: the export was cut short")

    await ledger.import_records(records(), replace=replace)
    return report
