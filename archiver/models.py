"""The data that flows through archiver: recordings from the API, stored objects, ledger rows."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from archiver.sources import COMPOSITIONS, RECORDINGS

# Fields of a listing entry that are short-lived or secret and never stored durably.
_EPHEMERAL_FIELDS = frozenset({"download_url"})


class State(enum.StrEnum):
    """A ledger row's state. Rows move only through the ledger's named transitions
    (``archiver.ledger.core`` holds the rules):

    pending ──claim──▶ in_progress ──complete──▶ archived ──reopen (repair)──▶ pending
       ▲                   │
       └──release / lease──┤──fail──▶ failed ──(budget left)──▶ claim again
                                        │ for good ──retry (operator)──▶ pending
    pending | failed ──give_up (operator)──▶ given_up
    archived ──expire (retention.delete_after_days passed, copy deleted)──▶ expired

    A recording is *owed* from its first sighting until it is archived or given up; an expired
    one was archived and its copy deleted when its retention ended: never fetched again.
    """

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    ARCHIVED = "archived"
    FAILED = "failed"
    GIVEN_UP = "given_up"
    EXPIRED = "expired"


class MalformedEntry(ValueError):
    """A listing entry that cannot be read as a recording at all (no usable id)."""


# Bounds of one listing entry (a page of 250 is ~150 KB): beyond them it is reported as malformed,
# never stored.
_MAX_ID_CHARS = 128
_MAX_URL_BYTES = 8 * 1024  # as archiver.netguard allows
_MAX_STRING_CHARS = 8 * 1024
_MAX_ENTRY_BYTES = 64 * 1024


def _oversize(entry: Mapping[str, Any]) -> str | None:
    """Why an entry is too big to keep (any string over 8 KiB, or over about 64 KiB as JSON in
    all), or None. Names the field, never quotes it."""
    # The usual entry is flat and small: one look at each value decides it.
    total = 0
    for key, value in entry.items():
        if isinstance(value, str):
            total += len(value) + len(str(key)) + 6
        elif value is None or isinstance(value, bool | int | float):
            total += len(str(key)) + 24
        else:
            return _oversize_nested(entry)
    if total <= _MAX_STRING_CHARS:
        return None
    return _oversize_nested(entry)


def _oversize_nested(entry: Mapping[str, Any]) -> str | None:
    """``_oversize`` the thorough way: walks without recursion and stops as soon as the budget
    is spent."""
    total = 0
    stack: list[tuple[str, Any]] = [("", entry)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if len(value) > _MAX_STRING_CHARS:
                return (
                    f"field {path[:80]!r} is {len(value)} characters long "
                    f"(more than {_MAX_STRING_CHARS})"
                )
            total += len(value) + 2
        elif isinstance(value, Mapping):
            for key, item in value.items():
                name = str(key)
                if len(name) > _MAX_STRING_CHARS:
                    return f"a field name is {len(name)} characters long"
                stack.append((f"{path}.{name}" if path else name, item))
                total += len(name) + 4
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
            total += len(value) + 2
        else:
            total += len(repr(value))
        if total > _MAX_ENTRY_BYTES:
            return f"entry is more than {_MAX_ENTRY_BYTES} bytes as JSON"
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 with or without ``Z``; anything else is treated as absent."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Recording:
    """One item of a source (a room recording, or a room composition: ``source``) as the API
    describes it. No field but ``id`` is guaranteed."""

    id: str
    status: str | None = None
    download_url: str | None = field(default=None, repr=False)
    room_id: str | None = None
    session_id: str | None = None
    participant_id: str | None = None
    type: str | None = None
    codec: str | None = None
    duration_secs: int | None = None
    size_mb: float | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    completed_at: datetime | None = None
    # The entry as received, minus ephemeral fields: what the sidecar and the ledger keep.
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # When download_url was obtained (time.monotonic()), to know when it is too old to trust.
    url_obtained_at: float = field(default_factory=time.monotonic, repr=False, compare=False)
    # The collection it was listed from (``archiver.sources``).
    source: str = RECORDINGS

    @classmethod
    def from_api(cls, entry: Any, source: str = RECORDINGS) -> Recording:
        """Read one ``data`` entry. Raises MalformedEntry when it has no usable id or is too big
        to keep (an id over 128 characters, a download_url over 8 KiB, any string over 8 KiB,
        over 64 KiB in all); the message never quotes an oversized value in full."""
        if not isinstance(entry, Mapping):
            raise MalformedEntry(f"entry is a {type(entry).__name__}, not an object")
        rec_id = entry.get("id")
        if not isinstance(rec_id, str) or not rec_id:
            raise MalformedEntry(f"entry has no string id (id={rec_id!r:.80})")
        if len(rec_id) > _MAX_ID_CHARS:
            raise MalformedEntry(
                f"id {rec_id[:16]!r}... is {len(rec_id)} characters long "
                f"(more than {_MAX_ID_CHARS})"
            )
        url = entry.get("download_url")
        if isinstance(url, str) and len(url.encode("utf-8", "surrogatepass")) > _MAX_URL_BYTES:
            raise MalformedEntry(f"download_url is more than {_MAX_URL_BYTES} bytes long")
        too_big = _oversize(entry)
        if too_big:
            raise MalformedEntry(too_big)
        return cls(
            id=rec_id,
            status=_text(entry.get("status")),
            download_url=_text(entry.get("download_url")),
            room_id=_text(entry.get("room_id")),
            session_id=_text(entry.get("session_id")),
            participant_id=_text(entry.get("participant_id")),
            # A composition is video (an mp4) and says so only by its format.
            type=_text(entry.get("type")) or ("video" if source == COMPOSITIONS else None),
            codec=_text(entry.get("codec")),
            duration_secs=_int(entry.get("duration_secs")),
            size_mb=_float(entry.get("size_mb")),
            created_at=parse_timestamp(entry.get("created_at")),
            started_at=parse_timestamp(entry.get("started_at")),
            ended_at=parse_timestamp(entry.get("ended_at")),
            completed_at=parse_timestamp(entry.get("completed_at")),
            metadata={k: v for k, v in entry.items() if k not in _EPHEMERAL_FIELDS},
            source=source,
        )

    @classmethod
    def from_row(cls, row: LedgerRow) -> Recording:
        """A recording the ledger knows, as its last listing described it; never with a
        download URL (those are not kept), so its transfer asks the API for a fresh one."""
        try:
            return cls.from_api({**row.metadata, "id": row.id}, source=row.source)
        except MalformedEntry:
            return cls(id=row.id, status=row.source_status, source=row.source)

    @property
    def is_completed(self) -> bool:
        return self.status == "completed"

    def url_age(self) -> float:
        return time.monotonic() - self.url_obtained_at


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What a storage backend holds after a successful, verified write."""

    key: str
    size: int
    sha256: str
    version_id: str | None = None
    retain_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One recording's entry in the ledger."""

    id: str
    state: State
    attempts: int = 0
    last_error: str | None = None
    storage_key: str | None = None
    size: int | None = None
    sha256: str | None = None
    source_status: str | None = None
    room_id: str | None = None
    session_id: str | None = None
    participant_id: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    first_seen_at: datetime | None = None
    updated_at: datetime | None = None
    archived_at: datetime | None = None
    retain_until: datetime | None = None
    version_id: str | None = None
    deleted_at_source: datetime | None = None
    # Failed for good: no attempt is left, or retrying cannot help; an operator decides next.
    permanent: bool = False
    # Claims taken, and claims cut short by our own process stopping (uses no attempt).
    claims: int = 0
    interruptions: int = 0
    # A listing entry refused for what it said (not for its id): judged again when listed again.
    rejected: bool = False
    # The transfer that archived it (a retried ``complete`` recognises its own commit).
    completed_by: str | None = None
    # A storage upload in progress that the next claimer may continue (an S3 multipart upload:
    # key, upload id, parts done), as the storage backend described it; empty when none.
    upload: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Copies stored but found wanting that could not be removed (Object Lock): each with its
    # key, version id, reason and time. Reported by status and verify; never forgotten.
    quarantined: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Under a legal hold (``archiver hold``): its copy is never expired while it is on.
    legal_hold: bool = False
    # When its copy was deleted because its retention ended (state expired).
    expired_at: datetime | None = None
    # The collection it belongs to (``archiver.sources``).
    source: str = RECORDINGS


def utcnow() -> datetime:
    return datetime.now(UTC)
