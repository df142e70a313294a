"""Where a recording goes: the storage key, its extension, and the checks that keep hostile
values (``../``, ``/``, odd characters) out of every path.

The default template ``{ended:%Y/%m/%d}/{room_id}/{id}.{ext}`` gives keys like
``2024/05/01/7b61621f-…/6b61621f-….mp4``. Every value placed in a key is validated, and the
rendered key is validated again as a whole: a template can only ever produce a relative path
of plain components.
"""

from __future__ import annotations

import mimetypes
import re
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from archiver.errors import UnsafeValue
from archiver.models import Recording
from archiver.storage import keys

# Telnyx ids are UUIDs: anything outside their alphabet is refused, not sanitised.
_UUID_ALPHABET = re.compile(r"[0-9A-Fa-f-]{1,64}")
_WORD = re.compile(r"[a-z0-9_]{1,32}")
_EXT = re.compile(r"[a-z0-9]{1,5}")

UNKNOWN = "unknown"
SIDECAR_SUFFIX = ".json"

_CONTENT_TYPES = {
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/webm": "webm",
    "video/webm": "webm",
    "video/mp4": "mp4",
    "audio/mp4": "m4a",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "video/x-matroska": "mkv",
    "video/quicktime": "mov",
}
_CODECS = {"opus": "ogg", "aac": "m4a", "mp3": "mp3", "pcm": "wav", "h264": "mp4", "vp8": "webm"}


def check_id(value: str, what: str = "id") -> str:
    """Refuse (never repair) an id that is not made of a UUID's characters."""
    if not _UUID_ALPHABET.fullmatch(value):
        raise UnsafeValue(f"unsafe {what} {value[:80]!r}: only 0-9, a-f and '-' are allowed")
    return value


def check_download_url(url: str) -> str:
    """The static shape of a download URL (``archiver.netguard.check_download_url``)."""
    from archiver import netguard  # here: it brings aiohttp, which most users of layout lack

    return netguard.check_download_url(url)


def extension(content_type: str | None, url: str | None, rec: Recording) -> str:
    """From Content-Type, else the URL path's suffix, else the recording's type and codec."""
    if content_type:
        mime = content_type.split(";", 1)[0].strip().lower()
        ext = _CONTENT_TYPES.get(mime) or (mimetypes.guess_extension(mime) or "").lstrip(".")
        if ext and _EXT.fullmatch(ext) and mime != "application/octet-stream":
            return ext
    if url:
        suffix = PurePosixPath(urlsplit(url).path).suffix.lstrip(".").lower()
        if _EXT.fullmatch(suffix):
            return suffix
    if rec.codec and rec.codec.lower() in _CODECS:
        return _CODECS[rec.codec.lower()]
    if rec.type == "video":
        return "mp4"
    return "bin"


class _When:
    """A timestamp in a template: ``{ended:%Y/%m/%d}``; bare ``{ended}`` is compact ISO."""

    def __init__(self, value: datetime | None) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        if self.value is None:
            return "undated"
        return self.value.strftime(spec or "%Y%m%dT%H%M%SZ")


def render_key(template: str, rec: Recording, ext: str) -> str:
    """The storage key for ``rec``. Raises UnsafeValue for a hostile value or result."""
    values: dict[str, Any] = {
        "id": check_id(rec.id),
        "room_id": _optional_id(rec.room_id, "room_id"),
        "session_id": _optional_id(rec.session_id, "session_id"),
        "participant_id": _optional_id(rec.participant_id, "participant_id"),
        "type": _word(rec.type, "type"),
        "codec": _word(rec.codec, "codec"),
        "ext": ext if _EXT.fullmatch(ext) else "bin",
        "ended": _When(rec.ended_at or rec.completed_at or rec.created_at),
        "started": _When(rec.started_at),
        "created": _When(rec.created_at),
        "completed": _When(rec.completed_at),
    }
    key = template.format_map(values)
    return check_key(key)


def check_key(key: str) -> str:
    """A rendered key, refused unless it is a relative path of plain components (the storage
    key validator, ``archiver.storage.keys``, in its strict form)."""
    keys.check_key(key, plain=True)
    return key


def sidecar_key(key: str) -> str:
    return key + SIDECAR_SUFFIX


def _optional_id(value: str | None, what: str) -> str:
    return check_id(value, what) if value else UNKNOWN


def _word(value: str | None, what: str) -> str:
    if not value:
        return UNKNOWN
    lowered = value.lower()
    if not _WORD.fullmatch(lowered):
        raise UnsafeValue(f"unsafe {what} {value[:40]!r}")
    return lowered
