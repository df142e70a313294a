"""What a listing is limited to (``Filters``): the recordings API's filters, the query each is
sent as in the current spec's form, the ones applied only to what comes back, and the problems
a set of values can have. Pure: no HTTP here (``archiver.telnyx`` sends them; ``archiver.scope``
tests entries and ledger rows against them)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from archiver.config import FilterSettings
from archiver.sources import COMPOSITIONS, RECORDINGS

# The values the API's RoomRecording schema allows for ``status`` and ``type``.
RECORDING_STATUSES = ("completed", "processing")
RECORDING_TYPES = ("audio", "video")
# The textual form of a UUID (the spec's ``format: uuid`` for ids).
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")

# Each filter the API can express, and the query key the current spec defines for it
# (``ListRoomRecordings``: the deepObject ``filter`` parameter, exploded).
_QUERY_KEYS = {
    "date_ended_at_eq": "filter[date_ended_at][eq]",
    "date_ended_at_gte": "filter[date_ended_at][gte]",
    "date_ended_at_lte": "filter[date_ended_at][lte]",
    "date_started_at_eq": "filter[date_started_at][eq]",
    "date_started_at_gte": "filter[date_started_at][gte]",
    "date_started_at_lte": "filter[date_started_at][lte]",
    "room_id": "filter[room_id]",
    "participant_id": "filter[participant_id]",
    "session_id": "filter[session_id]",
    "status": "filter[status]",
    "type": "filter[type]",
    # The spec's only duration filter: "duration_secs greater or equal".
    "duration_secs_gte": "filter[duration_secs]",
}
# Filters the API has no form for: applied to the returned entries only.
LOCAL_ONLY = ("duration_secs_eq", "duration_secs_lte")
_UUID_FIELDS = ("room_id", "participant_id", "session_id")


@dataclass(frozen=True, slots=True)
class Filters:
    """What a listing is limited to. Dates are whole UTC days, bounds inclusive.

    Every filter is applied twice: sent in the form the current API spec defines
    (``to_query``), and checked again on every entry the API returns
    (``archiver.scope.admits``), so an API that ignores a filter never widens what is archived
    or deleted. The API has one duration filter, a minimum (``filter[duration_secs]``): an exact
    or a maximum duration is applied to the returned entries only.
    """

    date_ended_at_eq: date | None = None
    date_ended_at_gte: date | None = None
    date_ended_at_lte: date | None = None
    date_started_at_eq: date | None = None
    date_started_at_gte: date | None = None
    date_started_at_lte: date | None = None
    room_id: str | None = None
    participant_id: str | None = None
    session_id: str | None = None
    status: str | None = None
    type: str | None = None
    duration_secs_eq: int | None = None
    duration_secs_lte: int | None = None
    duration_secs_gte: int | None = None

    def to_query(self, source: str = RECORDINGS) -> dict[str, str]:
        """The query keys the current spec defines for ``source``'s list, e.g.
        ``filter[date_ended_at][gte]``. Compositions are listed by creation day: a composition
        is created once its session has ended, so the first end day asked for bounds its
        creation from below; the rest of the days, and what that list has no filter for, are
        checked on each entry only."""
        query: dict[str, str] = {}
        if source == COMPOSITIONS:
            since = self.date_ended_at_eq or self.date_ended_at_gte
            if since is not None:
                query["filter[date_created_at][gte]"] = since.isoformat()
            for name in ("session_id", "status"):
                value = getattr(self, name)
                if value is not None:
                    query[f"filter[{name}]"] = str(value)
            return query
        for name, key in _QUERY_KEYS.items():
            value = getattr(self, name)
            if value is not None:
                query[key] = value.isoformat() if isinstance(value, date) else str(value)
        return query

    def label(self) -> str:
        """Every filter in one line: the query sent, then what is checked locally only."""
        parts = [f"{k}={v}" for k, v in sorted(self.to_query().items())]
        for name in LOCAL_ONLY:
            value = getattr(self, name)
            if value is not None:
                op = name.rpartition("_")[2]
                parts.append(f"duration_secs[{op}]={value}(local)")
        return " ".join(parts) or "all"

    def problems(self, names: Mapping[str, str] | None = None) -> list[str]:
        """Every reason these filters cannot be right, each naming the field as ``names`` says
        (a flag, a config key; the field's own name by default). Empty when they are usable."""
        names = names or {}

        def name(field_name: str) -> str:
            return names.get(field_name, field_name)

        found: list[str] = []
        for field_name in _UUID_FIELDS:
            value = getattr(self, field_name)
            if value is not None and not _UUID_RE.fullmatch(value):
                found.append(f"{name(field_name)}: {value!r:.80} is not a UUID")
        for field_name, allowed in (("status", RECORDING_STATUSES), ("type", RECORDING_TYPES)):
            value = getattr(self, field_name)
            if value is not None and value not in allowed:
                found.append(
                    f"{name(field_name)}: {value!r:.80} is not a recording {field_name} "
                    f"({' or '.join(allowed)})"
                )
        for op in ("eq", "gte", "lte"):
            value = getattr(self, f"duration_secs_{op}")
            if value is not None and value < 0:
                found.append(f"{name(f'duration_secs_{op}')}: {value} is negative")
        for base in ("date_ended_at", "date_started_at", "duration_secs"):
            found += _range_problems(self, base, name)
        # A recording ends when or after it starts: it cannot start after the last end day.
        started = [
            f for f in ("date_started_at_eq", "date_started_at_gte") if getattr(self, f) is not None
        ]
        ended = [
            f for f in ("date_ended_at_eq", "date_ended_at_lte") if getattr(self, f) is not None
        ]
        for s in started:
            for e in ended:
                if getattr(self, s) > getattr(self, e):
                    found.append(
                        f"{name(s)} ({getattr(self, s)}) is after {name(e)} ({getattr(self, e)}): "
                        "no recording ends before it starts"
                    )
        return found

    @classmethod
    def standing(cls, settings: FilterSettings, **overrides: Any) -> Filters:
        """The config's standing filters, with command-line values taking precedence."""
        base: dict[str, Any] = {
            "room_id": settings.room_id,
            "session_id": settings.session_id,
            "participant_id": settings.participant_id,
            "type": settings.type,
            "duration_secs_gte": settings.duration_secs_gte,
            "duration_secs_lte": settings.duration_secs_lte,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def _range_problems(filters: Filters, base: str, name: Callable[[str], str]) -> list[str]:
    """Bounds of one field that no value can meet at once: gte after lte, eq outside them."""
    eq, gte, lte = (getattr(filters, f"{base}_{op}") for op in ("eq", "gte", "lte"))
    found: list[str] = []
    if gte is not None and lte is not None and gte > lte:
        found.append(f"{name(f'{base}_gte')} ({gte}) is after {name(f'{base}_lte')} ({lte})")
    if eq is not None and gte is not None and eq < gte:
        found.append(f"{name(f'{base}_eq')} ({eq}) is before {name(f'{base}_gte')} ({gte})")
    if eq is not None and lte is not None and eq > lte:
        found.append(f"{name(f'{base}_eq')} ({eq}) is after {name(f'{base}_lte')} ({lte})")
    return found
