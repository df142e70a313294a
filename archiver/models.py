"""The data that flows through archiver: recordings from the API, stored objects, ledger rows."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Fields of a listing entry that are short-lived or secret and never stored durably.
_EPHEMERAL_FIELDS = frozenset({"download_url"})


class State(enum.StrEnum):
    """A ledger row's state. Rows move only through the ledger's named transitions:

    pending ──claim──▶ in_progress ──complete──▶ archived
       ▲                   │
       └──release / lease──┤──fail──▶ failed ──(later pass, attempts < max)──▶ claim again
    """

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    ARCHIVED = "archived"
    FAILED = "failed"


class MalformedEntry(ValueError):
    """A listing entry that cannot be read as a recording at all (no usable id)."""


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
    """One room recording as the API describes it. No field but ``id`` is guaranteed."""

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

    @classmethod
    def from_api(cls, entry: Any) -> Recording:
        """Read one ``data`` entry. Raises MalformedEntry when it has no usable id."""
        if not isinstance(entry, Mapping):
            raise MalformedEntry(f"entry is a {type(entry).__name__}, not an object")
        rec_id = entry.get("id")
        if not isinstance(rec_id, str) or not rec_id:
            raise MalformedEntry(f"entry has no string id (id={rec_id!r:.80})")
        return cls(
            id=rec_id,
            status=_text(entry.get("status")),
            download_url=_text(entry.get("download_url")),
            room_id=_text(entry.get("room_id")),
            session_id=_text(entry.get("session_id")),
            participant_id=_text(entry.get("participant_id")),
            type=_text(entry.get("type")),
            codec=_text(entry.get("codec")),
            duration_secs=_int(entry.get("duration_secs")),
            size_mb=_float(entry.get("size_mb")),
            created_at=parse_timestamp(entry.get("created_at")),
            started_at=parse_timestamp(entry.get("started_at")),
            ended_at=parse_timestamp(entry.get("ended_at")),
            completed_at=parse_timestamp(entry.get("completed_at")),
            metadata={k: v for k, v in entry.items() if k not in _EPHEMERAL_FIELDS},
        )

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


def utcnow() -> datetime:
    return datetime.now(UTC)
