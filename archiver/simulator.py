"""In-process simulator of the Telnyx Video Room Recordings and Room Compositions API.

It answers as the current Telnyx OpenAPI spec (``team-telnyx/openapi``, ``ListRoomRecordings``,
``ViewRoomRecording``, ``DeleteRoomRecording``) defines, or, with ``dialect="legacy"``, as the
older reference page did:

* **current** (the default): the list takes ``filter[date_ended_at][eq|gte|lte]``,
  ``filter[date_started_at][eq|gte|lte]`` (dates), ``filter[room_id]``,
  ``filter[participant_id]``, ``filter[session_id]`` (UUIDs), ``filter[status]``,
  ``filter[type]`` (strings) and ``filter[duration_secs]`` (an integer, a minimum), with
  ``page[size]`` (1-250) and ``page[number]`` (1-); any other key, a bad value or a key given
  twice is answered 422. Error bodies take the shape the spec declares for the answer: a list's
  4XX is ``{"message": ..., "success": false}``, a retrieve's or delete's 404 a bare error
  object (``{"code", "title", "detail"}``), anything else ``{"errors": [...]}``. An entry leaves
  out a field it has no value for (the spec makes none nullable).
* **legacy**: the duration filters are ``filter[duration_secs][eq|gte|lte]``; a ``filter[...]``
  key it does not know is ignored (recorded in ``Simulator.ignored_params``), a bad value is
  answered 400; every error body is ``{"errors": [...]}``; an entry's unknown fields are null.

Room compositions (``ListRoomCompositions``, ``ViewRoomComposition``, ``DeleteRoomComposition``;
``SimComposition``, ``make_compositions``, ``Simulator(compositions=...)``) are served by the
same code as recordings, so every fault, scripted answer (routes ``list``, ``retrieve`` and
``delete`` match both resources), record of requests and download behaviour applies to them
too. Their list takes ``filter[date_created_at][eq|gte|lte]`` (whole UTC days of
``created_at``), ``filter[session_id]`` (a UUID) and ``filter[status]`` (``completed``,
``processing`` or ``enqueued``), newest ``created_at`` first, with the same paging, validation
and error shapes as the recordings list in each dialect. A composition has a ``download_url``
(``/compositions/<id>.mp4`` on the download host, signed as a recording's) only once completed;
``Simulator.advance_compositions`` moves every enqueued one to processing and every processing
one to completed. Its content is ``video/mp4`` (an ISO-BMFF ``ftyp`` box, then ``mdat``).

Two aiohttp servers on loopback ephemeral ports:

* the API host: ``GET /v2/room_recordings`` (list), ``GET``/``DELETE
  /v2/room_recordings/{id}``, the same for ``/v2/room_compositions``;
  ``DELETE /v2/room_recordings`` (bulk) is refused
  with 405 and recorded, because the archiver must never bulk-delete. ``GET /echo``
  answers the request's own headers as ``application/octet-stream``: what a naive
  client would archive if a ``download_url`` pointed at the API host
  (``Simulator.point_download_url`` does that; ``Simulator.echo_url`` is its address).
* a separate download host serving recording bytes through signed, expiring
  URLs (S3-like), so clients cannot get away with sending API credentials there
  or with caching URLs forever.

Recording content is synthesised on the fly (deterministic per id, any size,
any byte range) so gigabyte files cost no memory. It starts with a plausible
container header for its ``content_type`` (``container_header``: an Ogg page with
``OpusHead``, an EBML header with DocType ``webm``/``matroska``, an ISO-BMFF ``ftyp``
box then ``mdat``, ``RIFF....WAVE``, ID3 + an MPEG frame header; nothing for
unknown types), then pseudo-random bytes. ``SimRecording.body`` (bytes or a Path,
e.g. real media made by ffmpeg) replaces the synthesised content: size, hash and
ranges then come from it.

Faults (5xx, 429, malformed pages, truncated downloads, expired URLs, page shifts,
a list redirected to another origin, ...) are injected from a seeded RNG through
the mutable ``Simulator.faults``. A listing can also ignore every filter (``ignore_filters``:
validated, then not applied), leave ``meta`` out (``omit_meta``), answer every page number with
the first page (``repeat_page``) or claim any ``meta.total_pages`` (``total_pages_override``).
``Simulator.script`` queues exact error answers (a status and headers, such as ``Retry-After``,
``retry-after-ms`` or ``x-should-retry``) for the next API calls.

Bad answers of a hostile download host (``DownloadFault``) are chosen per recording
(``SimRecording.download_fault``) or for a share of downloads
(``Faults.download_fault_rate``/``download_fault_kinds``):

* ``half_no_length``: 200, chunked, no Content-Length, the first half of the
  content, then a clean end.
* ``html``: 200 ``text/html``, an 81-byte captive-portal page.
* ``empty``: 200 with the recording's content type and ``Content-Length: 0``.
* ``redirect_elsewhere``: 302 to ``/elsewhere`` on the download host, which answers
  200 ``text/plain`` ``hello from somewhere else``.
* ``wrong_type_binary``: 200 ``application/octet-stream``, as many pseudo-random
  bytes as the recording has, starting like no container.
* ``gzip``: ``Content-Encoding: gzip`` over the gzip-compressed content (with its
  compressed Content-Length), whatever the client's ``Accept-Encoding``.
* ``drip``: the real content one byte every ``Faults.drip_interval`` seconds, with
  a correct Content-Length.
* ``endless``: 200, chunked, no Content-Length: the real content, then more
  pseudo-random bytes until the client goes away.
* ``oversize``: the real content followed by ``max(size, Faults.oversize_extra)``
  more bytes, with a Content-Length of all of it.

Range requests: ``wrong_type_binary``, ``drip`` and ``oversize`` act as a static
object would (its own bytes; ``oversize`` reports its larger total in
Content-Range); the others ignore ``Range`` and answer as above. A HEAD request gets
the same status and headers without a body. Each bad answer given is counted in
``Simulator.injected`` as ``download:<name>``; only answers that delivered exactly
the content (``drip`` included) count in ``download_completions``.

Run standalone: ``python -m archiver.simulator --port 8080 --count 1000`` (``--compositions N``
adds N completed compositions); add
``--fault NAME=VALUE`` for any ``Faults`` field, ``--download-fault NAME`` to give
the next newest recording that bad answer, ``--point-download-url URL|echo`` to
point the next one's ``download_url`` elsewhere.

For benchmarks, ``content_cache`` (``--content-cache DIR``) writes each recording's content to
a file once and serves it with ``sendfile``: generating bytes costs the simulator a core at about
500 MB/s, which would make a download benchmark measure the simulator instead of the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import hmac
import math
import os
import re
import secrets
import signal
import struct
import sys
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from random import Random
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, MultiDict, MultiMapping

__all__ = [
    "ApiRequest",
    "Dialect",
    "DownloadFault",
    "DownloadRequest",
    "Faults",
    "ScriptedAnswer",
    "SimComposition",
    "SimMedia",
    "SimRecording",
    "Simulator",
    "add_hostile_entries",
    "container_header",
    "content_bytes",
    "content_sha256",
    "iter_content",
    "make_compositions",
    "make_recordings",
    "run_forever",
]

BLOCK_SIZE = 65536
DEFAULT_START = datetime(2025, 1, 1, tzinfo=UTC)
MAX_PAGE_SIZE = 250
DEFAULT_PAGE_SIZE = 20
# Part of every content cache file name: bump it when synthesised content changes, so a cache
# directory kept from an older version is never served as the new content.
_CONTENT_VERSION = 2

_EXTENSIONS = {
    "audio/ogg": ".ogg",
    "audio/opus": ".opus",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "audio/mp4": ".m4a",
    "audio/webm": ".weba",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
}


class DownloadFault(StrEnum):
    """Bad answers the download host can give (see the module docstring for each)."""

    HALF_NO_LENGTH = "half_no_length"
    HTML = "html"
    EMPTY = "empty"
    REDIRECT_ELSEWHERE = "redirect_elsewhere"
    WRONG_TYPE_BINARY = "wrong_type_binary"
    GZIP = "gzip"
    DRIP = "drip"
    ENDLESS = "endless"
    OVERSIZE = "oversize"


class Dialect(StrEnum):
    """Which API the simulator speaks (see the module docstring)."""

    CURRENT = "current"
    LEGACY = "legacy"


# --------------------------------------------------------------------------- data


class _SizedByBody:
    """Assigning ``body`` (not None) sets ``size`` to its length."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "body" and value is not None:
            size = len(value) if isinstance(value, bytes) else value.stat().st_size
            object.__setattr__(self, "size", size)


@dataclass
class SimRecording(_SizedByBody):
    """One recording as the simulator stores it (the API view is derived from it)."""

    id: str
    room_id: str | None
    session_id: str | None
    participant_id: str | None
    status: str
    type: str
    codec: str
    duration_secs: int
    size: int
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    completed_at: datetime | None
    content_type: str
    # While status == "processing": list calls (that return this entry) until it
    # turns "completed". <= 0 means it stays processing forever.
    processing_lists_left: int = 0
    # If set, the API returns exactly this object for the entry (list and retrieve).
    raw_override: dict[str, Any] | None = None
    # If set, called with the normally built entry (fresh download_url included);
    # whatever it returns (any JSON value, even None or a str) is served instead.
    entry_hook: Callable[[dict[str, Any]], Any] | None = field(
        default=None, repr=False, compare=False
    )
    # If set, the content served instead of the synthesised one (a Path is read when
    # served). Assigning it, here or later, sets ``size`` to its length.
    body: bytes | Path | None = field(default=None, repr=False)
    # If set (a DownloadFault name), every download of this recording gets that bad answer.
    download_fault: str | None = None
    # If set, the entry's download_url (list and retrieve), instead of a signed one.
    download_url_override: str | None = None


@dataclass
class SimComposition(_SizedByBody):
    """One room composition (``RoomComposition``): the room's session composed into one MP4.

    ``started_at``/``ended_at`` are the span of the session composed, ``created_at`` when the
    composition was asked for, ``completed_at`` when it was ready (None until then). Its status
    goes enqueued, processing, completed (``Simulator.advance_compositions``); only a completed
    one has a ``download_url``. The knobs after ``webhook_timeout_secs`` are SimRecording's."""

    id: str
    room_id: str
    session_id: str
    user_id: str
    status: str  # enqueued | processing | completed
    size: int
    duration_secs: int
    created_at: datetime
    started_at: datetime
    ended_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    resolution: str = "1280x720"
    # Region name -> VideoRegion (height, width, x_pos, y_pos, z_pos, video_sources, ...).
    video_layout: dict[str, Any] = field(default_factory=dict)
    format: str = "mp4"
    webhook_event_url: str | None = None
    webhook_event_failover_url: str | None = None
    webhook_timeout_secs: int | None = None
    content_type: str = "video/mp4"
    raw_override: dict[str, Any] | None = None
    entry_hook: Callable[[dict[str, Any]], Any] | None = field(
        default=None, repr=False, compare=False
    )
    body: bytes | Path | None = field(default=None, repr=False)
    download_fault: str | None = None
    download_url_override: str | None = None


# What the download host serves: a recording's or a composition's content.
SimMedia = SimRecording | SimComposition


@dataclass
class Faults:
    """Fault injection knobs; mutate ``sim.faults`` at any time."""

    list_error_rate: float = 0.0  # 500/502/503
    list_throttle_rate: float = 0.0  # 429
    page_malformed_rate: float = 0.0  # 200 with non-JSON / data not a list
    list_redirect_to: str | None = None  # list calls answer 302 Location: this
    retrieve_error_rate: float = 0.0
    retrieve_throttle_rate: float = 0.0
    delete_error_rate: float = 0.0
    throttle_reset_seconds: float = 1.0  # value of x-ratelimit-reset / Retry-After
    error_shapes_mixed: bool = False  # also use bare-object and {"message"} bodies
    truncate_rate: float = 0.0  # downloads cut short after a random prefix
    expired_first_url_rate: float = 0.0  # share of recordings with expired list URLs
    ignore_range: bool = False  # answer 200 full content even when Range is asked
    slow_chunk_delay: float = 0.0  # sleep between 64 KiB chunks...
    slow_rate: float = 1.0  # ...for this share of downloads
    shift_on_page: int | None = None  # one-shot: on first request of page N...
    shift_count: int = 3  # ...insert this many newest recordings first
    download_fault_rate: float = 0.0  # share of downloads given a bad answer...
    download_fault_kinds: str = ""  # ...among these (comma-separated DownloadFault names; "": all)
    drip_interval: float = 2.0  # seconds between bytes of a "drip" answer
    oversize_extra: int = 5_000_000  # an "oversize" answer adds max(size, this) bytes
    ignore_filters: bool = False  # list filters are validated, then not applied
    omit_meta: bool = False  # list answers carry no "meta"
    repeat_page: bool = False  # every page number answers the first page
    total_pages_override: int | None = None  # meta.total_pages says this

    def download_fault_choices(self) -> tuple[DownloadFault, ...]:
        """The kinds ``download_fault_rate`` picks from; ValueError names an unknown one."""
        names = [n.strip() for n in self.download_fault_kinds.split(",") if n.strip()]
        return tuple(DownloadFault(n) for n in names) if names else tuple(DownloadFault)


@dataclass(frozen=True)
class ApiRequest:
    """An API request as received (for assertions on encodings and headers)."""

    method: str
    path: str  # decoded path
    raw_path: str  # path + query exactly as sent (percent-encoding preserved)
    query: MultiDict[str]  # decoded query
    headers: CIMultiDict[str]
    at: float = 0.0  # time.monotonic() when it arrived


@dataclass(frozen=True)
class ScriptedAnswer:
    """One error answer ``Simulator.script`` gives the next API call of ``route`` (``list``,
    ``retrieve``, ``delete`` or ``any``; of recordings or of compositions), after
    authentication: ``status`` with ``headers``, its body in the shape that answer has."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    route: str = "any"


@dataclass(frozen=True)
class DownloadRequest:
    """A request received by the download host."""

    id: str  # recording id the URL resolved to (raw path name if unresolvable)
    method: str
    range: str | None
    raw_path: str
    headers: CIMultiDict[str]


# ------------------------------------------------------------------------ content


def _base_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _ogg_crc(data: bytes) -> int:
    # Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, initial value 0.
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def _ogg_opus_header() -> bytes:
    # The first page of an Ogg Opus stream (RFC 7845): a 27-byte page header, a one-entry
    # segment table, then the 19-byte OpusHead packet (mono, 48 kHz, 312 samples pre-skip).
    packet = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48000, 0, 0)
    page = struct.pack("<4sBBqIIIB", b"OggS", 0, 0x02, 0, 0x53494D31, 0, 0, 1)
    page += bytes([len(packet)])
    crc = struct.pack("<I", _ogg_crc(page + packet))
    return page[:22] + crc + page[26:] + packet


def _ebml(element_id: bytes, payload: bytes) -> bytes:
    return element_id + bytes([0x80 | len(payload)]) + payload  # one-byte size: payload < 127


def _ebml_header(doctype: bytes) -> bytes:
    fields = [
        (b"\x42\x86", b"\x01"),  # EBMLVersion
        (b"\x42\xf7", b"\x01"),  # EBMLReadVersion
        (b"\x42\xf2", b"\x04"),  # EBMLMaxIDLength
        (b"\x42\xf3", b"\x08"),  # EBMLMaxSizeLength
        (b"\x42\x82", doctype),  # DocType
        (b"\x42\x87", b"\x04"),  # DocTypeVersion
        (b"\x42\x85", b"\x02"),  # DocTypeReadVersion
    ]
    header = _ebml(b"\x1a\x45\xdf\xa3", b"".join(_ebml(i, v) for i, v in fields))
    # Then a Segment of unknown size, as a live recorder writes it.
    return header + b"\x18\x53\x80\x67\x01" + b"\xff" * 7


def _mp4_header(brand: bytes, minor: int, compatible: bytes, size: int) -> bytes:
    payload = brand + struct.pack(">I", minor) + compatible
    ftyp = struct.pack(">I4s", 8 + len(payload), b"ftyp") + payload
    rest = size - len(ftyp)  # an mdat box holding everything after ftyp
    if rest < 2**32:
        return ftyp + struct.pack(">I4s", max(rest, 8), b"mdat")
    return ftyp + struct.pack(">I4sQ", 1, b"mdat", rest)


def _wav_header(size: int) -> bytes:
    data = min(max(size - 44, 0), 0xFFFFFFFF - 36)
    fmt = struct.pack("<HHIIHH", 1, 1, 48000, 96000, 2, 16)  # PCM, mono, 48 kHz, 16 bit
    return (
        struct.pack("<4sI4s", b"RIFF", 36 + data, b"WAVE")
        + struct.pack("<4sI", b"fmt ", len(fmt))
        + fmt
        + struct.pack("<4sI", b"data", data)
    )


_OGG_OPUS = _ogg_opus_header()
_HEADERS: dict[str, Callable[[int], bytes]] = {
    "audio/ogg": lambda size: _OGG_OPUS,
    "audio/opus": lambda size: _OGG_OPUS,
    "audio/webm": lambda size: _ebml_header(b"webm"),
    "video/webm": lambda size: _ebml_header(b"webm"),
    "video/x-matroska": lambda size: _ebml_header(b"matroska"),
    "video/mp4": lambda size: _mp4_header(b"isom", 0x200, b"isomiso2avc1mp41", size),
    "audio/mp4": lambda size: _mp4_header(b"M4A ", 0, b"M4A mp42isom", size),
    "audio/wav": _wav_header,
    "audio/x-wav": _wav_header,
    # An empty ID3v2.4 tag, then an MPEG-1 Layer III frame header (128 kbit/s, 44.1 kHz).
    "audio/mpeg": lambda size: b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64",
}


@lru_cache(maxsize=1024)
def container_header(content_type: str, size: int) -> bytes:
    """The header synthesised content of this type and size starts with (b"" if unknown).

    Content shorter than the header holds its first ``size`` bytes.
    """
    make = _HEADERS.get(_base_type(content_type))
    return b"" if make is None else make(size)


@lru_cache(maxsize=512)
def _base_block(rec_id: str) -> int:
    # Per-recording random 64 KiB, kept as an int so each block is one big XOR.
    return int.from_bytes(Random(rec_id).randbytes(BLOCK_SIZE), "little")


def _block(rec_id: str, index: int) -> bytes:
    # XOR a per-block-index mask over the base block so repeated blocks differ
    # (a client writing a block at the wrong offset changes the hash).
    seed = f"{rec_id}\x00{index}".encode("utf-8", "surrogatepass")
    mask = hashlib.sha256(seed).digest() * (BLOCK_SIZE // 32)
    return (_base_block(rec_id) ^ int.from_bytes(mask, "little")).to_bytes(BLOCK_SIZE, "little")


def _iter_blocks(rec_id: str, start: int, stop: int | None, head: bytes = b"") -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of the endless stream of ``rec_id``'s blocks, ``head`` over its
    first bytes (``stop=None``: never ends)."""
    pos = start
    while stop is None or pos < stop:
        index, offset = divmod(pos, BLOCK_SIZE)
        take = BLOCK_SIZE - offset if stop is None else min(BLOCK_SIZE - offset, stop - pos)
        blk = _block(rec_id, index)
        if index == 0 and head:
            blk = head + blk[len(head) :]
        yield blk if take == BLOCK_SIZE else blk[offset : offset + take]
        pos += take


def _iter_body(body: bytes | Path, start: int, stop: int) -> Iterator[bytes]:
    if isinstance(body, bytes):
        for pos in range(start, stop, BLOCK_SIZE):
            yield body[pos : min(pos + BLOCK_SIZE, stop)]
        return
    with body.open("rb") as f:
        f.seek(start)
        pos = start
        while pos < stop:
            chunk = f.read(min(BLOCK_SIZE, stop - pos))
            if not chunk:
                raise ValueError(f"{body} is shorter than {stop} bytes")
            yield chunk
            pos += len(chunk)


def iter_content(rec: SimMedia, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Yield the bytes ``[start, end)`` of the recording's content (end defaults to size)."""
    stop = rec.size if end is None else end
    if not 0 <= start <= stop <= rec.size:
        raise ValueError(f"bad range [{start}, {stop}) for size {rec.size}")
    if rec.body is not None:
        yield from _iter_body(rec.body, start, stop)
    else:
        yield from _iter_blocks(rec.id, start, stop, container_header(rec.content_type, rec.size))


def content_bytes(rec: SimMedia, start: int = 0, end: int | None = None) -> bytes:
    """The content range ``[start, end)`` as one bytes object (for small checks)."""
    return b"".join(iter_content(rec, start, end))


_SHA_CACHE: dict[tuple[str, int, str], str] = {}


def content_sha256(rec: SimMedia) -> str:
    """Hex SHA-256 of the full content (streamed; synthesised content cached per id, size, type)."""
    if isinstance(rec.body, bytes):
        return hashlib.sha256(rec.body).hexdigest()
    key = (rec.id, rec.size, rec.content_type)
    cached = None if rec.body is not None else _SHA_CACHE.get(key)
    if cached is None:
        h = hashlib.sha256()
        for chunk in iter_content(rec):
            h.update(chunk)
        cached = h.hexdigest()
        if rec.body is None:
            _SHA_CACHE[key] = cached
    return cached


def _iter_oversized(rec: SimMedia, start: int, stop: int | None) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of the content followed by more pseudo-random bytes."""
    if start < rec.size:
        yield from iter_content(rec, start, rec.size if stop is None else min(stop, rec.size))
        start = rec.size
    yield from _iter_blocks(f"{rec.id}\x00tail", start, stop)


def _iter_wrong(rec: SimMedia, start: int, stop: int) -> Iterator[bytes]:
    # Other pseudo-random bytes, eight zero bytes first: no container starts like that.
    return _iter_blocks(f"{rec.id}\x00wrong", start, stop, bytes(8))


def _gzipped(rec: SimMedia) -> bytes:
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip wrapper, mtime 0
    return b"".join([*(z.compress(chunk) for chunk in iter_content(rec)), z.flush()])


# A captive portal's page (81 bytes), answered for whatever was asked.
_PORTAL_PAGE = b"<html><head><title>Sign in</title></head><body>Log in to continue.</body></html>\n"
_ELSEWHERE_TEXT = "hello from somewhere else\n"


# --------------------------------------------------------------------- fake data


def _uuid(rng: Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_Room = tuple[str, list[str], list[str]]  # room id, its session ids, its participant ids


def _rooms(rng: Random) -> list[_Room]:
    """A few rooms, each with a few sessions and participants (the id filters' values)."""
    rooms = []
    for _ in range(3):
        room = _uuid(rng)
        sessions = [_uuid(rng) for _ in range(3)]
        participants = [_uuid(rng) for _ in range(4)]
        rooms.append((room, sessions, participants))
    return rooms


def _duration(rng: Random) -> int:
    # Mostly short calls, some long ones.
    band = rng.choices([(5, 60), (60, 900), (900, 7200)], weights=[4, 4, 2])[0]
    return rng.randint(*band)


def make_recordings(
    n: int,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = (20_000, 200_000),
    start: datetime = DEFAULT_START,
    days: int = 30,
    processing: int = 0,
    video_ratio: float = 0.3,
) -> list[SimRecording]:
    """Deterministic fake recordings, ended_at spread over ``days`` days from ``start``.

    A few rooms (each with a few sessions and participants) make the id filters
    meaningful. The ``processing`` newest recordings are still processing and
    complete after 1-3 list calls each.
    """
    rng = Random(seed)
    rooms = _rooms(rng)
    span = max(1, days * 86400)
    recs: list[SimRecording] = []
    for _ in range(n):
        room, sessions, participants = rng.choice(rooms)
        ended = start + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(10**6))
        duration = _duration(rng)
        started = ended - timedelta(seconds=duration)
        is_video = rng.random() < video_ratio
        nbytes = size if isinstance(size, int) else rng.randint(*size)
        recs.append(
            SimRecording(
                id=_uuid(rng),
                room_id=room,
                session_id=rng.choice(sessions),
                participant_id=rng.choice(participants),
                status="completed",
                type="video" if is_video else "audio",
                codec="h264" if is_video else "opus",
                duration_secs=duration,
                size=nbytes,
                created_at=started,
                started_at=started,
                ended_at=ended,
                completed_at=ended + timedelta(seconds=rng.randint(5, 120)),
                content_type="video/mp4" if is_video else "audio/ogg",
            )
        )
    newest = sorted(recs, key=lambda r: (r.ended_at, r.id), reverse=True)
    for rec in newest[:processing]:
        rec.status = "processing"
        rec.completed_at = None
        rec.processing_lists_left = rng.randint(1, 3)
    return recs


COMPOSITION_WEBHOOK_URL = "https://webhooks.example.com/telnyx/video"


def make_compositions(
    n: int,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = (20_000, 200_000),
    start: datetime = DEFAULT_START,
    days: int = 30,
    enqueued: int = 0,
    processing: int = 0,
) -> list[SimComposition]:
    """Deterministic fake room compositions, ended_at spread over ``days`` days from ``start``.

    Their rooms and sessions are those of ``make_recordings`` with the same ``seed`` (so the
    session filter selects a proper subset, and a composition is of a session that has
    recordings); their ids come from another stream, so they never collide with those
    recordings' ids. Each was created 1-10 minutes after its session ended and, completed,
    finished 30 s to 15 min later. The first ``enqueued`` are enqueued, the next ``processing``
    processing (neither has a completed_at), the rest completed.
    """
    rooms = _rooms(Random(seed))
    rng = Random(f"compositions:{seed}")
    user = _uuid(rng)  # one account
    span = max(1, days * 86400)
    out: list[SimComposition] = []
    for i in range(n):
        room, sessions, _ = rng.choice(rooms)
        ended = start + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(10**6))
        duration = _duration(rng)
        created = ended + timedelta(seconds=rng.randint(60, 600), microseconds=rng.randrange(10**6))
        completed: datetime | None = None
        if i < enqueued:
            status, updated = "enqueued", created
        elif i < enqueued + processing:
            status, updated = "processing", created + timedelta(seconds=rng.randint(1, 30))
        else:
            completed = created + timedelta(seconds=rng.randint(30, 900))
            status, updated = "completed", completed
        sources = [_uuid(rng) for _ in range(rng.randint(1, 4))]  # the session's video recordings
        webhook = rng.random() < 0.5
        out.append(
            SimComposition(
                id=_uuid(rng),
                room_id=room,
                session_id=rng.choice(sessions),
                user_id=user,
                status=status,
                size=size if isinstance(size, int) else rng.randint(*size),
                duration_secs=duration,
                created_at=created,
                started_at=ended - timedelta(seconds=duration),
                ended_at=ended,
                updated_at=updated,
                completed_at=completed,
                video_layout={
                    "first": {
                        "height": 720,
                        "width": 1280,
                        "x_pos": 0,
                        "y_pos": 0,
                        "z_pos": 0,
                        "video_sources": sources,
                    }
                },
                webhook_event_url=COMPOSITION_WEBHOOK_URL if webhook else None,
                webhook_timeout_secs=25 if webhook else None,
            )
        )
    return out


# ----------------------------------------------------------------------- helpers


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_date(dt: datetime | None) -> date | None:
    return None if dt is None else dt.astimezone(UTC).date()


def _extension(content_type: str) -> str:
    return _EXTENSIONS.get(content_type.split(";")[0].strip().lower(), ".bin")


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _error_obj(code: str, title: str, detail: str, parameter: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"code": code, "title": title, "detail": detail}
    if parameter is not None:
        obj["source"] = {"parameter": parameter}
    return obj


def _api_error(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    parameter: str | None = None,
    shape: str = "errors",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An API error in one of the spec's three body shapes: ``errors`` (``video_Errors``),
    ``bare`` (one ``video_Error``) or ``message`` (``video_GenericErrorResponse``)."""
    body: dict[str, Any]
    if shape == "bare":
        body = _error_obj(code, title, detail, parameter)
    elif shape == "message":
        body = {"message": f"{title}: {detail}", "success": False}
    else:
        body = {"errors": [_error_obj(code, title, detail, parameter)]}
    return web.json_response(body, status=status, headers=headers)


def _s3_error(status: int, code: str, message: str) -> web.Response:
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return web.Response(status=status, text=text, content_type="application/xml")


def _unsatisfiable(size: int) -> web.Response:
    resp = _s3_error(416, "InvalidRange", "The requested range is not satisfiable")
    resp.headers["Content-Range"] = f"bytes */{size}"
    return resp


def _etag(rec: SimMedia, salt: str = "") -> str:
    if isinstance(rec.body, bytes):
        basis = hashlib.sha256(rec.body).hexdigest()
    elif isinstance(rec.body, Path):
        st = rec.body.stat()
        basis = f"{rec.body}:{st.st_size}:{st.st_mtime_ns}"
    else:
        basis = f"{rec.id}:{rec.size}:{rec.content_type}"
    digest = hashlib.sha256(f"{basis}:{salt}".encode("utf-8", "surrogatepass"))
    return f'"{digest.hexdigest()[:32]}"'


class _BadParam(Exception):
    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(detail)
        self.parameter = parameter
        self.detail = detail


class _Unsatisfiable(Exception):
    pass


_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_INT_RE = re.compile(r"-?\d{1,18}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")

_Pred = Callable[[SimMedia], bool]
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "gte": lambda a, b: a >= b,
    "lte": lambda a, b: a <= b,
}


def _date_pred(attr: str, op: str, value: date) -> _Pred:
    def pred(rec: SimMedia) -> bool:
        d = _utc_date(getattr(rec, attr))
        return d is not None and _CMP[op](d, value)

    return pred


def _attr_pred(attr: str, cmp: Callable[[Any, Any], bool], value: object) -> _Pred:
    def pred(rec: SimMedia) -> bool:
        v = getattr(rec, attr)
        return v is not None and cmp(v, value)

    return pred


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
# The duration filters of each dialect: query key -> comparison.
_DURATION_KEYS = {
    Dialect.CURRENT: {"filter[duration_secs]": "gte"},
    Dialect.LEGACY: {f"filter[duration_secs][{op}]": op for op in ("eq", "gte", "lte")},
}


@dataclass(frozen=True)
class _Resource:
    """What differs between the API's two resources; every route and fault is shared."""

    name: str  # "recordings" | "compositions": also the download host's directory
    path: str  # below /v2
    # The list's filters: date filter name -> attribute (whole UTC days, eq/gte/lte), filters
    # matched exactly (UUIDs; non-empty strings; one of an enum), and the duration minimum.
    date_filters: dict[str, str]
    id_filters: tuple[str, ...]
    str_filters: tuple[str, ...] = ()
    enum_filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    duration_filter: bool = False
    sort_attr: str = "ended_at"  # newest first by this, then id

    def sort_key(self, item: SimMedia) -> tuple[datetime, str]:
        moment: datetime | None = getattr(item, self.sort_attr)
        return (moment or datetime.min.replace(tzinfo=UTC), item.id)


# ListRoomRecordings, ViewRoomRecording, DeleteRoomRecording (and the refused bulk delete).
_RECORDINGS = _Resource(
    "recordings",
    "room_recordings",
    date_filters={"date_ended_at": "ended_at", "date_started_at": "started_at"},
    id_filters=("room_id", "participant_id", "session_id"),
    str_filters=("status", "type"),  # the spec gives them no enum
    duration_filter=True,
)
# ListRoomCompositions, ViewRoomComposition, DeleteRoomComposition.
COMPOSITION_STATUSES = ("completed", "processing", "enqueued")
_COMPOSITIONS = _Resource(
    "compositions",
    "room_compositions",
    date_filters={"date_created_at": "created_at"},
    id_filters=("session_id",),
    enum_filters={"status": COMPOSITION_STATUSES},
    sort_attr="created_at",
)
_RESOURCES = (_RECORDINGS, _COMPOSITIONS)


def _filter_pred(
    key: str, value: str, dialect: Dialect, res: _Resource = _RECORDINGS
) -> _Pred | None:
    """Turn one ``filter[...]`` query parameter of ``res``'s list into a predicate (or raise
    _BadParam); None for a key the legacy dialect ignores."""
    for name, attr in res.date_filters.items():
        for op in _CMP:
            if key == f"filter[{name}][{op}]":
                if not _DATE_RE.fullmatch(value):
                    raise _BadParam(key, f"{key} must be a date formatted as YYYY-MM-DD")
                try:
                    day = date.fromisoformat(value)
                except ValueError:
                    raise _BadParam(key, f"{key} is not a valid date") from None
                return _date_pred(attr, op, day)
    compare = _DURATION_KEYS[dialect].get(key) if res.duration_filter else None
    if compare is not None:
        if not _INT_RE.fullmatch(value):
            raise _BadParam(key, f"{key} must be an integer")
        return _attr_pred("duration_secs", _CMP[compare], int(value))
    for attr in (*res.id_filters, *res.str_filters, *res.enum_filters):
        if key == f"filter[{attr}]":
            if not value:
                raise _BadParam(key, f"{key} must not be empty")
            if attr in res.id_filters and not _UUID_RE.fullmatch(value):
                raise _BadParam(key, f"{key} must be a UUID")
            allowed = res.enum_filters.get(attr)
            if allowed is not None and value not in allowed:
                raise _BadParam(key, f"{key} must be one of {', '.join(allowed)}")
            return _attr_pred(attr, _CMP["eq"], value)
    if dialect is Dialect.LEGACY and key.startswith("filter["):
        return None
    raise _BadParam(key, f"Unknown query parameter {key}")


def _page_param(query: MultiMapping[str], key: str, default: int, hi: int | None) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not _INT_RE.fullmatch(raw):
        raise _BadParam(key, f"{key} must be an integer")
    value = int(raw)
    if value < 1 or (hi is not None and value > hi):
        limit = f"between 1 and {hi}" if hi is not None else "at least 1"
        raise _BadParam(key, f"{key} must be {limit}")
    return value


def _parse_list_query(
    query: MultiMapping[str], dialect: Dialect = Dialect.CURRENT, res: _Resource = _RECORDINGS
) -> tuple[int, int, list[_Pred], list[str]]:
    """Page size, page number, the filters' predicates, and the keys ignored."""
    preds: list[_Pred] = []
    ignored: list[str] = []
    for key in query:
        if len(query.getall(key)) > 1:
            raise _BadParam(key, f"{key} given more than once")
        if key not in ("page[size]", "page[number]"):
            pred = _filter_pred(key, query[key], dialect, res)
            if pred is None:
                ignored.append(key)
            else:
                preds.append(pred)
    size = _page_param(query, "page[size]", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    number = _page_param(query, "page[number]", 1, None)
    return size, number, preds, ignored


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single-range header, None to serve it all (RFC 9110:
    unparseable ranges are ignored); raises _Unsatisfiable for 416."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    end = size if not last else min(int(last) + 1, size)
    return start, end


def _sort_key(rec: SimRecording) -> tuple[datetime, str]:
    return _RECORDINGS.sort_key(rec)


# --------------------------------------------------------------------- simulator


def _recording_fields(rec: SimRecording, url: str | None) -> dict[str, Any]:
    """A recording's entry (``RoomRecording``), None where it has no value."""
    return {
        "id": rec.id,
        "room_id": rec.room_id,
        "session_id": rec.session_id,
        "participant_id": rec.participant_id,
        "status": rec.status,
        "download_url": url,
        "type": rec.type,
        "duration_secs": rec.duration_secs,
        "size_mb": round(rec.size / 1e6, 1),
        "codec": rec.codec,
        "created_at": _iso(rec.created_at),
        "updated_at": _iso(rec.completed_at or rec.ended_at or rec.created_at),
        "started_at": _iso(rec.started_at),
        "ended_at": _iso(rec.ended_at),
        "completed_at": _iso(rec.completed_at),
        "record_type": "room_recording",
    }


def _composition_fields(comp: SimComposition, url: str | None) -> dict[str, Any]:
    """A composition's entry (``RoomComposition``), None where it has no value."""
    return {
        "id": comp.id,
        "room_id": comp.room_id,
        "session_id": comp.session_id,
        "user_id": comp.user_id,
        "status": comp.status,
        "download_url": url,
        "format": comp.format,
        "resolution": comp.resolution,
        "video_layout": copy.deepcopy(comp.video_layout),
        "duration_secs": comp.duration_secs,
        "size_mb": round(comp.size / 1e6, 1),
        "created_at": _iso(comp.created_at),
        "updated_at": _iso(comp.updated_at),
        "started_at": _iso(comp.started_at),
        "ended_at": _iso(comp.ended_at),
        "completed_at": _iso(comp.completed_at),
        "webhook_event_url": comp.webhook_event_url,
        "webhook_event_failover_url": comp.webhook_event_failover_url,
        "webhook_timeout_secs": comp.webhook_timeout_secs,
        "record_type": "room_composition",
    }


class Simulator:
    """The fake Telnyx API + download host. Use as ``async with Simulator(...) as sim``."""

    def __init__(
        self,
        recordings: list[SimRecording] | None = None,
        *,
        api_key: str = "test-key",
        faults: Faults | None = None,
        url_ttl: float = 600,
        seed: int = 0,
        url_extension: bool = True,
        host: str = "127.0.0.1",
        api_port: int = 0,
        download_port: int = 0,
        content_cache: Path | None = None,
        dialect: Dialect | str = Dialect.CURRENT,
        compositions: Sequence[SimComposition] = (),
    ) -> None:
        self.api_key = api_key
        self.dialect = Dialect(dialect)
        self.faults = faults if faults is not None else Faults()
        self.url_ttl = url_ttl
        self.url_extension = url_extension
        self.host = host
        self._ports = (api_port, download_port)
        self.content_cache = content_cache
        # Content files known to be written, by (id, size, content type).
        self._cached: dict[tuple[str, int, str], Path] = {}
        self._seed = seed
        self._rng = Random(seed)
        self._secret = secrets.token_bytes(32)

        self.recordings: dict[str, SimRecording] = {}
        self.compositions: dict[str, SimComposition] = {}
        self._known: dict[str, SimMedia] = {}  # both resources, deleted ones included
        self._orders: dict[str, list[SimMedia]] = {}  # by resource name: newest first, cached

        self.api_requests: list[ApiRequest] = []
        self.download_requests: list[DownloadRequest] = []
        self.download_completions: Counter[str] = Counter()
        self.download_truncations: Counter[str] = Counter()
        self.deleted_ids: list[str] = []
        self.bulk_delete_calls: list[ApiRequest] = []
        self.shifted_ids: list[str] = []  # recordings inserted by shift_on_page
        self.injected: Counter[str] = Counter()  # e.g. "list:throttle", "download:truncate"
        self.ignored_params: list[str] = []  # filter keys the legacy dialect did not know
        self._scripted: deque[ScriptedAnswer] = deque()

        self._api_runner: web.AppRunner | None = None
        self._dl_runner: web.AppRunner | None = None
        self._api_port: int | None = None
        self._dl_port: int | None = None
        self._streaming: set[asyncio.Transport] = set()  # downloads mid-body
        # The most download bodies ever in flight at once (the client's concurrency, seen here).
        self.max_streaming = 0
        if recordings:
            self.add(recordings)
        if compositions:
            self.add(compositions)

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        api = web.Application(middlewares=[self._record_middleware])
        for res in _RESOURCES:
            base = f"/v2/{res.path}"
            api.router.add_get(base, self._bind(self._handle_list, res), allow_head=False)
            one = f"{base}/{{id}}"
            api.router.add_get(one, self._bind(self._handle_retrieve, res), allow_head=False)
            api.router.add_delete(one, self._bind(self._handle_delete, res))
        api.router.add_delete("/v2/room_recordings", self._handle_bulk_delete)
        api.router.add_get("/echo", self._handle_echo)
        api.router.add_get("/echo/{tail:.*}", self._handle_echo)
        dl = web.Application()
        for res in _RESOURCES:
            dl.router.add_get(f"/{res.name}/{{name}}", self._bind(self._handle_download, res))
        dl.router.add_get("/elsewhere", self._handle_elsewhere)
        try:
            self._api_runner, self._api_port = await self._serve(api, self._ports[0])
            self._dl_runner, self._dl_port = await self._serve(dl, self._ports[1])
        except BaseException:
            await self.stop()
            raise

    @staticmethod
    def _bind(
        method: Callable[[web.Request, _Resource], Awaitable[web.StreamResponse]], res: _Resource
    ) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await method(request, res)

        return handle

    async def _serve(self, app: web.Application, port: int) -> tuple[web.AppRunner, int]:
        # Short shutdown timeout: tests must not wait for abandoned slow downloads.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, port).start()
            # Port 0 means ephemeral: read the real one back from the socket.
            return runner, int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise

    async def stop(self) -> None:
        # Cut in-flight downloads now rather than letting aiohttp wait for them.
        for transport in list(self._streaming):
            transport.abort()
        runners = [r for r in (self._api_runner, self._dl_runner) if r is not None]
        self._api_runner = self._dl_runner = None
        await asyncio.gather(*(r.cleanup() for r in runners))

    @property
    def api_base_url(self) -> str:
        if self._api_port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self.host}:{self._api_port}/v2"

    @property
    def download_base_url(self) -> str:
        if self._dl_port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self.host}:{self._dl_port}"

    @property
    def echo_url(self) -> str:
        """The API host's ``/echo``: it answers with the request's headers as a body."""
        if self._api_port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self.host}:{self._api_port}/echo"

    # --------------------------------------------------------------------- data

    def add(self, recs: Iterable[SimMedia]) -> None:
        """Add recordings and compositions (ids must be new to both)."""
        for rec in recs:
            if rec.id in self.recordings or rec.id in self.compositions:
                raise ValueError(f"duplicate id {rec.id!r}")
            if isinstance(rec, SimComposition):
                self.compositions[rec.id] = rec
            else:
                self.recordings[rec.id] = rec
            self._known[rec.id] = rec
        self._orders.clear()

    def advance_compositions(self) -> list[str]:
        """One step of the compositions' work: every enqueued one starts processing, every one
        processing completes (its completed_at and updated_at now). The ids completed."""
        now = datetime.now(UTC)
        done: list[str] = []
        for comp in self.compositions.values():
            if comp.status == "processing":
                comp.status, comp.completed_at, comp.updated_at = "completed", now, now
                done.append(comp.id)
            elif comp.status == "enqueued":
                comp.status, comp.updated_at = "processing", now
        return done

    def _live(self, res: _Resource) -> Mapping[str, SimMedia]:
        return self.compositions if res is _COMPOSITIONS else self.recordings

    def _remove(self, res: _Resource, id: str) -> bool:
        """Delete ``id`` from ``res`` (False if it has no such item)."""
        live: dict[str, SimRecording] | dict[str, SimComposition]
        live = self.compositions if res is _COMPOSITIONS else self.recordings
        if live.pop(id, None) is None:
            return False
        self._orders.pop(res.name, None)
        return True

    def point_download_url(self, id: str, url: str | None) -> None:
        """Make the entry of ``id`` (list and retrieve) carry ``url`` as its download_url;
        None restores the signed one."""
        self._known[id].download_url_override = url

    def cached_content(self, rec: SimMedia) -> Path:
        """The file holding ``rec``'s content in ``content_cache``, written on first use
        (a ``body`` given as a Path is its own file)."""
        if isinstance(rec.body, Path):
            return rec.body
        assert self.content_cache is not None
        if rec.body is not None:
            name = f"body-{hashlib.sha256(rec.body).hexdigest()[:32]}.bin"
        else:
            digest = hashlib.sha256(rec.id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
            ext = _extension(rec.content_type)
            name = f"{digest}-{rec.size}-c{_CONTENT_VERSION}{ext}"
        path = self.content_cache / name
        if not path.exists():
            self.content_cache.mkdir(parents=True, exist_ok=True)
            temp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            with open(temp, "wb") as out:
                for chunk in iter_content(rec):
                    out.write(chunk)
            os.replace(temp, path)
        if rec.body is None:
            self._cached[rec.id, rec.size, rec.content_type] = path
        return path

    def warm_content_cache(self) -> None:
        """Write every recording's and composition's content file now, so no download waits
        for one."""
        every: list[SimMedia] = [*self.recordings.values(), *self.compositions.values()]
        for rec in every:
            if rec.body is None:  # a body is served from memory or its own file
                self.cached_content(rec)

    def expected_sha256(self, id: str) -> str:
        """SHA-256 of the content the download host serves for ``id`` (even if deleted)."""
        return content_sha256(self._known[id])

    def download_url(self, id: str, *, expires: int | None = None) -> str:
        """A signed download URL for the recording or composition ``id`` (default expiry:
        now + url_ttl)."""
        rec = self._known[id]
        ext = _extension(rec.content_type) if self.url_extension else ""
        if expires is None:
            expires = int(time.time() + self.url_ttl)
        sig = self._sign(rec.id, ext, expires)
        where = (_COMPOSITIONS if isinstance(rec, SimComposition) else _RECORDINGS).name
        return (
            f"{self.download_base_url}/{where}/{quote(rec.id, safe='')}{ext}"
            f"?Expires={expires}&Signature={sig}"
        )

    def _sign(self, rec_id: str, ext: str, expires: int) -> str:
        msg = f"{rec_id}\n{ext}\n{expires}".encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def _ordered(self, res: _Resource) -> list[SimMedia]:
        order = self._orders.get(res.name)
        if order is None:
            order = sorted(self._live(res).values(), key=res.sort_key, reverse=True)
            self._orders[res.name] = order
        return order

    def _matching(self, preds: list[_Pred], res: _Resource) -> list[SimMedia]:
        ordered = self._ordered(res)
        # Unfiltered, the cached order itself (only read): no copy of 100,000 entries per page.
        return [r for r in ordered if all(p(r) for p in preds)] if preds else ordered

    def _expired_in_lists(self, rec: SimMedia) -> bool:
        # Stable per recording (not per call): hash of seed + id.
        rate = self.faults.expired_first_url_rate
        if rate <= 0:
            return False
        digest = hashlib.sha256(f"{self._seed}:{rec.id}".encode("utf-8", "surrogatepass"))
        return int.from_bytes(digest.digest()[:8], "big") / 2**64 < rate

    def _entry(self, rec: SimMedia, *, listing: bool) -> Any:
        if rec.raw_override is not None:
            return copy.deepcopy(rec.raw_override)
        url: str | None = rec.download_url_override
        # A recording has its URL once it is no longer processing, a composition once completed.
        if isinstance(rec, SimComposition):
            ready = rec.status == "completed"
        else:
            ready = rec.status != "processing"
        if url is None and ready:
            expires = None
            if listing and self._expired_in_lists(rec):
                self.injected["list:expired_url"] += 1
                expires = int(time.time()) - 60
            url = self.download_url(rec.id, expires=expires)
        entry = (
            _composition_fields(rec, url)
            if isinstance(rec, SimComposition)
            else _recording_fields(rec, url)
        )
        if self.dialect is Dialect.CURRENT:  # no field of either schema is nullable
            entry = {k: v for k, v in entry.items() if v is not None}
        return rec.entry_hook(entry) if rec.entry_hook is not None else entry

    def _shift(self, matching: list[SimMedia], res: _Resource) -> None:
        """Insert ``shift_count`` items newer than everything matching the current filters,
        copying the newest match so they pass the same filters."""
        template = matching[0] if matching else None
        now = datetime.now(UTC)
        newest = getattr(template, res.sort_attr) if template is not None else None
        base = newest or now
        new: list[SimMedia] = []
        for k in range(self.faults.shift_count):
            moment = base + timedelta(milliseconds=k + 1)
            rec: SimMedia
            if template is not None:
                # Completed now, at ``moment`` by the listing's order, with no fault of its own.
                fresh: dict[str, Any] = {
                    "id": _uuid(self._rng),
                    "status": "completed",
                    res.sort_attr: moment,
                    "completed_at": now,
                    "raw_override": None,
                    "entry_hook": None,
                    "download_fault": None,
                    "download_url_override": None,
                }
                if isinstance(template, SimComposition):
                    fresh["updated_at"] = now
                else:
                    fresh["processing_lists_left"] = 0
                rec = dataclasses.replace(template, **fresh)
            else:
                make = make_compositions if res is _COMPOSITIONS else make_recordings
                rec = make(1, seed=self._rng.getrandbits(32), start=now, days=1)[0]
                setattr(rec, res.sort_attr, moment)
            new.append(rec)
        self.add(new)
        self.shifted_ids.extend(r.id for r in new)

    # --------------------------------------------------------------------- API

    @web.middleware
    async def _record_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        # Record every API request, even ones no route matches (wrong path/method).
        self.api_requests.append(
            ApiRequest(
                method=request.method,
                path=request.path,
                raw_path=request.raw_path,
                query=MultiDict(request.query),
                headers=CIMultiDict(request.headers),
                at=time.monotonic(),
            )
        )
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.encode(), self.api_key.encode()
        )

    def _unauthorized(self, where: str) -> web.Response:
        return _api_error(
            401,
            "10009",
            "Authentication failed",
            "The API key is missing or invalid. Send 'Authorization: Bearer <api key>'.",
            shape=self._shape(where, 401),
        )

    def _roll(self, *rates: float) -> int | None:
        """Pick at most one fault: index into ``rates`` or None (one RNG draw)."""
        r = self._rng.random()
        for i, rate in enumerate(rates):
            if r < rate:
                return i
            r -= rate
        return None

    def _shape(self, where: str, status: int) -> str:
        """The error body's shape: the one the spec declares for this answer (see the module
        docstring), or any of the three with ``error_shapes_mixed``."""
        if self.faults.error_shapes_mixed:
            return self._rng.choice(["errors", "bare", "message"])
        if self.dialect is Dialect.LEGACY:
            return "errors"
        if where == "list" and 400 <= status < 500:
            return "message"  # ListRoomRecordings: 4XX is video_GenericErrorResponse
        if where in ("retrieve", "delete") and status == 404:
            return "bare"  # video_ResourceNotFound: one video_Error
        return "errors"

    def _server_error(self, where: str) -> web.Response:
        self.injected[f"{where}:error"] += 1
        status, title = self._rng.choice(
            [(500, "Internal Server Error"), (502, "Bad Gateway"), (503, "Service Unavailable")]
        )
        return _api_error(
            status, "10007", title, "Simulated transient failure.", shape=self._shape(where, status)
        )

    def script(self, *answers: ScriptedAnswer) -> None:
        """Give the next API calls these error answers, in order (see ``ScriptedAnswer``)."""
        self._scripted.extend(answers)

    def _scripted_answer(self, where: str) -> web.Response | None:
        for answer in self._scripted:
            if answer.route in ("any", where):
                self._scripted.remove(answer)
                self.injected[f"{where}:scripted"] += 1
                return _api_error(
                    answer.status,
                    "10007",
                    HTTPStatus(answer.status).phrase,
                    "Scripted answer.",
                    shape=self._shape(where, answer.status),
                    headers=answer.headers,
                )
        return None

    def _throttled(self, where: str) -> web.Response:
        self.injected[f"{where}:throttle"] += 1
        reset = self.faults.throttle_reset_seconds
        headers = {
            "x-ratelimit-limit": "100",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": _fmt_seconds(reset),
        }
        if self._rng.random() < 0.5:
            # Retry-After must be whole seconds; floor it so tiny test values stay 0.
            headers["Retry-After"] = str(int(reset))
        return _api_error(
            429,
            "10011",
            "Too many requests",
            "Simulated rate limit; retry after x-ratelimit-reset seconds.",
            shape=self._shape(where, 429),
            headers=headers,
        )

    def _malformed_page(self) -> web.Response:
        self.injected["list:malformed"] += 1
        variant = self._rng.randrange(5)
        if variant == 0:  # an HTML error page from a proxy, but status 200
            return web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if variant == 1:  # JSON cut short
            return web.Response(text='{"data": [{"id": "', content_type="application/json")
        meta = {"page_number": 1, "page_size": 20, "total_pages": 1, "total_results": 1}
        body: Any = [
            {"data": {"unexpected": "object"}, "meta": meta},
            {"data": None, "meta": meta},
            {"meta": meta},
        ][variant - 2]
        return web.json_response(body)

    async def _handle_list(self, request: web.Request, res: _Resource) -> web.StreamResponse:
        if self.faults.list_redirect_to is not None:  # the API moved (or a proxy in front of it)
            self.injected["list:redirect"] += 1
            return web.Response(status=302, headers={"Location": self.faults.list_redirect_to})
        if not self._authorized(request):
            return self._unauthorized("list")
        try:
            page_size, page_number, preds, ignored = _parse_list_query(
                request.query, self.dialect, res
            )
        except _BadParam as e:
            status = 422 if self.dialect is Dialect.CURRENT else 400
            title = "Unprocessable Entity" if status == 422 else "Bad Request"
            return _api_error(
                status,
                "10015",
                title,
                e.detail,
                parameter=e.parameter,
                shape=self._shape("list", status),
            )
        self.ignored_params.extend(ignored)
        scripted = self._scripted_answer("list")
        if scripted is not None:
            return scripted
        f = self.faults
        fault = self._roll(f.list_error_rate, f.list_throttle_rate, f.page_malformed_rate)
        if fault == 0:
            return self._server_error("list")
        if fault == 1:
            return self._throttled("list")
        if fault == 2:
            return self._malformed_page()
        if f.ignore_filters:
            preds = []

        matching = self._matching(preds, res)
        if f.shift_on_page is not None and page_number == f.shift_on_page:
            f.shift_on_page = None  # one-shot; set it again to re-arm
            self.injected["list:shift"] += 1
            self._shift(matching, res)
            matching = self._matching(preds, res)

        shown = 1 if f.repeat_page else page_number
        first = (shown - 1) * page_size
        page = matching[first : first + page_size]
        entries = [self._entry(rec, listing=True) for rec in page]
        # Processing recordings advance only when a list call actually shows them (compositions
        # with advance_compositions).
        now = datetime.now(UTC)
        for rec in page:
            if (
                isinstance(rec, SimRecording)
                and rec.status == "processing"
                and rec.processing_lists_left > 0
            ):
                rec.processing_lists_left -= 1
                if rec.processing_lists_left == 0:
                    rec.status = "completed"
                    rec.completed_at = now
        body: dict[str, Any] = {"data": entries}
        if not f.omit_meta:
            total_pages = math.ceil(len(matching) / page_size)
            body["meta"] = {
                "page_number": page_number,
                "page_size": page_size,
                "total_pages": total_pages
                if f.total_pages_override is None
                else f.total_pages_override,
                "total_results": len(matching),
            }
        return web.json_response(body)

    async def _handle_retrieve(self, request: web.Request, res: _Resource) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized("retrieve")
        scripted = self._scripted_answer("retrieve")
        if scripted is not None:
            return scripted
        f = self.faults
        fault = self._roll(f.retrieve_error_rate, f.retrieve_throttle_rate)
        if fault == 0:
            return self._server_error("retrieve")
        if fault == 1:
            return self._throttled("retrieve")
        rec = self._live(res).get(request.match_info["id"])
        if rec is None:
            return self._not_found("retrieve")
        return web.json_response({"data": self._entry(rec, listing=False)})

    async def _handle_delete(self, request: web.Request, res: _Resource) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized("delete")
        scripted = self._scripted_answer("delete")
        if scripted is not None:
            return scripted
        if self._roll(self.faults.delete_error_rate) is not None:
            return self._server_error("delete")
        rec_id = request.match_info["id"]
        if not self._remove(res, rec_id):
            return self._not_found("delete")
        self.deleted_ids.append(rec_id)
        return web.Response(status=204)

    async def _handle_bulk_delete(self, request: web.Request) -> web.StreamResponse:
        # The archiver must only ever delete what it verified, one id at a time.
        self.bulk_delete_calls.append(self.api_requests[-1])
        resp = _api_error(
            405, "10015", "Method Not Allowed", "Bulk delete is disabled in the simulator."
        )
        resp.headers["Allow"] = "GET"
        return resp

    async def _handle_echo(self, request: web.Request) -> web.StreamResponse:
        # What a client would store if it downloaded from the API host: its own headers
        # (credentials included). No auth, like any page an URL could point at.
        text = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        return web.Response(body=text.encode(), content_type="application/octet-stream")

    def _not_found(self, where: str) -> web.Response:
        return _api_error(
            404,
            "10005",
            "Resource not found",
            "The requested resource or URL could not be found.",
            shape=self._shape(where, 404),
        )

    # ---------------------------------------------------------------- download

    def _resolve(self, name: str, query: MultiMapping[str]) -> tuple[str, web.Response | None]:
        """Map the URL's file name to a recording id and check its signature.

        The id may itself contain dots, so both "name" and "name minus its last
        extension" are tried; the signature decides which one was issued.
        """
        candidates = [(name, "")]
        stem, dot, ext = name.rpartition(".")
        if dot and stem:
            candidates.insert(0, (stem, "." + ext))
        expires_raw, sig = query.get("Expires"), query.get("Signature")
        if not expires_raw or not sig or not expires_raw.isdigit():
            return name, _s3_error(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature and Expires parameters",
            )
        expires = int(expires_raw)
        for rec_id, ext in candidates:
            if hmac.compare_digest(sig, self._sign(rec_id, ext, expires)):
                if time.time() > expires:
                    return rec_id, _s3_error(403, "AccessDenied", "Request has expired")
                return rec_id, None
        return name, _s3_error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )

    def _record_download(self, request: web.Request, rec_id: str) -> None:
        self.download_requests.append(
            DownloadRequest(
                id=rec_id,
                method=request.method,
                range=request.headers.get("Range"),
                raw_path=request.raw_path,
                headers=CIMultiDict(request.headers),
            )
        )

    async def _handle_download(self, request: web.Request, res: _Resource) -> web.StreamResponse:
        rec_id, denied = self._resolve(request.match_info["name"], request.query)
        range_header = request.headers.get("Range")
        self._record_download(request, rec_id)
        if denied is not None:
            return denied
        rec = self._live(res).get(rec_id)
        if rec is None:  # deleted at source (or never existed, or of the other resource)
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        fault = self._download_fault(rec)
        if fault is not None:
            self.injected[f"download:{fault}"] += 1
            return await self._BAD_ANSWERS[fault](self, request, rec)

        f = self.faults
        try:
            byte_range = None if f.ignore_range else _parse_range(range_header, rec.size)
        except _Unsatisfiable:
            return _unsatisfiable(rec.size)
        start, end = byte_range if byte_range is not None else (0, rec.size)

        resp = web.StreamResponse(status=200 if byte_range is None else 206)
        resp.content_type = rec.content_type
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = _etag(rec)
        if byte_range is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{rec.size}"
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp

        # Truncation: promise the whole range, send a random prefix, then close.
        cut: int | None = None
        if end > start and self._rng.random() < f.truncate_rate:
            cut = start + self._rng.randrange(end - start)
            self.injected["download:truncate"] += 1
        slow = f.slow_chunk_delay > 0 and self._rng.random() < f.slow_rate
        if slow:
            self.injected["download:slow"] += 1

        pos = start
        transport = request.transport
        if transport is not None:
            self._streaming.add(transport)
            self.max_streaming = max(self.max_streaming, len(self._streaming))
        try:
            await resp.prepare(request)
            sent = cut is None and not slow and await self._send_cached(rec, transport, start, end)
            for chunk in () if sent else iter_content(rec, start, end):
                if cut is not None and pos + len(chunk) >= cut:
                    await resp.write(chunk[: cut - pos])
                    self.download_truncations[rec.id] += 1
                    if transport is not None:
                        # close() flushes what was written, then the client
                        # sees EOF before Content-Length: a payload error.
                        transport.close()
                    return resp
                await resp.write(chunk)
                pos += len(chunk)
                if slow:
                    await asyncio.sleep(f.slow_chunk_delay)
            await resp.write_eof()
        except ConnectionError:
            # Client went away mid-body; aiohttp will notice the dead transport.
            self.download_truncations[rec.id] += 1
            return resp
        except asyncio.CancelledError:  # server shutting down mid-body
            self.download_truncations[rec.id] += 1
            raise
        finally:
            if transport is not None:
                self._streaming.discard(transport)
        if end == rec.size:
            self.download_completions[rec.id] += 1
        return resp

    async def _send_cached(
        self, rec: SimMedia, transport: asyncio.Transport | None, start: int, end: int
    ) -> bool:
        """Send ``[start, end)`` by ``sendfile`` from the content cache (or a body's own file);
        False when there is no such file."""
        if transport is None or end <= start:
            return False
        if isinstance(rec.body, Path):
            fobj = rec.body.open("rb")
        elif rec.body is not None or self.content_cache is None:
            return False
        elif (known := self._cached.get((rec.id, rec.size, rec.content_type))) is not None:
            fobj = known.open("rb")  # opening a file that exists costs less than a thread hop
        else:
            fobj = await asyncio.to_thread(lambda: self.cached_content(rec).open("rb"))
        try:
            await asyncio.get_running_loop().sendfile(transport, fobj, start, end - start)
        finally:
            fobj.close()
        return True

    # ------------------------------------------------------- bad download answers

    def _download_fault(self, rec: SimMedia) -> DownloadFault | None:
        if rec.download_fault is not None:
            return DownloadFault(rec.download_fault)
        f = self.faults
        # No RNG draw unless the rate is on: other seeded faults stay where they were.
        if f.download_fault_rate > 0 and self._rng.random() < f.download_fault_rate:
            return self._rng.choice(f.download_fault_choices())
        return None

    async def _write_body(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        chunks: Iterable[bytes],
        *,
        drip: float | None = None,
    ) -> bool:
        """Write ``chunks`` and end the body (``drip``: one byte at a time, that many seconds
        apart); False if the client went away first."""
        transport = request.transport
        if transport is not None:  # so that stop() cuts it
            self._streaming.add(transport)
            self.max_streaming = max(self.max_streaming, len(self._streaming))
        try:
            first = True
            for chunk in chunks:
                if drip is None:
                    await resp.write(chunk)
                    continue
                for i in range(len(chunk)):
                    if not first:
                        await asyncio.sleep(drip)
                    first = False
                    await resp.write(chunk[i : i + 1])
            await resp.write_eof()
        except ConnectionError:
            return False
        finally:
            if transport is not None:
                self._streaming.discard(transport)
        return True

    async def _serve_object(
        self,
        request: web.Request,
        rec: SimMedia,
        *,
        kind: DownloadFault,
        size: int,
        content_type: str,
        chunks: Callable[[int, int], Iterable[bytes]],
        drip: float | None = None,
    ) -> web.StreamResponse:
        """Serve ``chunks`` as a static object of ``size`` bytes would be (Range, HEAD)."""
        try:
            byte_range = (
                None
                if self.faults.ignore_range
                else _parse_range(request.headers.get("Range"), size)
            )
        except _Unsatisfiable:
            return _unsatisfiable(size)
        start, end = byte_range if byte_range is not None else (0, size)
        resp = web.StreamResponse(status=200 if byte_range is None else 206)
        resp.content_type = content_type
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = _etag(rec, kind)
        if byte_range is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        done = await self._write_body(request, resp, chunks(start, end), drip=drip)
        if done and kind is DownloadFault.DRIP and end == rec.size:
            self.download_completions[rec.id] += 1
        return resp

    async def _serve_unsized(
        self, request: web.Request, rec: SimMedia, chunks: Iterable[bytes]
    ) -> web.StreamResponse:
        """200, chunked, no Content-Length: the client cannot tell where the body should end."""
        resp = web.StreamResponse()
        resp.content_type = rec.content_type
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method != "HEAD":
            await self._write_body(request, resp, chunks)
        return resp

    async def _answer_half_no_length(
        self, request: web.Request, rec: SimMedia
    ) -> web.StreamResponse:
        return await self._serve_unsized(request, rec, iter_content(rec, 0, rec.size // 2))

    async def _answer_html(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        return web.Response(body=_PORTAL_PAGE, content_type="text/html")

    async def _answer_empty(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        # Content-Length: 0 given explicitly, else aiohttp leaves it out of a HEAD answer.
        return web.Response(
            body=b"", content_type=rec.content_type, headers={"Content-Length": "0"}
        )

    async def _answer_redirect_elsewhere(
        self, request: web.Request, rec: SimMedia
    ) -> web.StreamResponse:
        location = f"{self.download_base_url}/elsewhere"
        return web.Response(status=302, headers={"Location": location, "Content-Length": "0"})

    async def _handle_elsewhere(self, request: web.Request) -> web.StreamResponse:
        self._record_download(request, "elsewhere")
        return web.Response(text=_ELSEWHERE_TEXT, content_type="text/plain")

    async def _answer_wrong_type_binary(
        self, request: web.Request, rec: SimMedia
    ) -> web.StreamResponse:
        return await self._serve_object(
            request,
            rec,
            kind=DownloadFault.WRONG_TYPE_BINARY,
            size=rec.size,
            content_type="application/octet-stream",
            chunks=lambda start, end: _iter_wrong(rec, start, end),
        )

    async def _answer_gzip(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        # As a server compressing on the fly whatever the client accepts; Range is ignored.
        body = await asyncio.to_thread(_gzipped, rec)  # for HEAD too: its Content-Length
        resp = web.Response(body=body, content_type=rec.content_type)
        resp.headers["Content-Encoding"] = "gzip"
        resp.headers["Vary"] = "Accept-Encoding"
        return resp

    async def _answer_drip(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        return await self._serve_object(
            request,
            rec,
            kind=DownloadFault.DRIP,
            size=rec.size,
            content_type=rec.content_type,
            chunks=lambda start, end: iter_content(rec, start, end),
            drip=max(self.faults.drip_interval, 0.0),
        )

    async def _answer_endless(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        return await self._serve_unsized(request, rec, _iter_oversized(rec, 0, None))

    async def _answer_oversize(self, request: web.Request, rec: SimMedia) -> web.StreamResponse:
        return await self._serve_object(
            request,
            rec,
            kind=DownloadFault.OVERSIZE,
            size=rec.size + max(rec.size, self.faults.oversize_extra),
            content_type=rec.content_type,
            chunks=lambda start, end: _iter_oversized(rec, start, end),
        )

    _BAD_ANSWERS: ClassVar[
        dict[
            DownloadFault,
            Callable[[Simulator, web.Request, SimMedia], Awaitable[web.StreamResponse]],
        ]
    ] = {
        DownloadFault.HALF_NO_LENGTH: _answer_half_no_length,
        DownloadFault.HTML: _answer_html,
        DownloadFault.EMPTY: _answer_empty,
        DownloadFault.REDIRECT_ELSEWHERE: _answer_redirect_elsewhere,
        DownloadFault.WRONG_TYPE_BINARY: _answer_wrong_type_binary,
        DownloadFault.GZIP: _answer_gzip,
        DownloadFault.DRIP: _answer_drip,
        DownloadFault.ENDLESS: _answer_endless,
        DownloadFault.OVERSIZE: _answer_oversize,
    }


# ------------------------------------------------------------------ hostile data


def add_hostile_entries(sim: Simulator) -> list[str | int]:
    """Add entries a robust client must survive (and never act unsafely on).

    Returns their ids where they have one (one id is an int). Entries: path
    traversal id, id with a slash, unicode/space id, missing id, non-string id,
    file:// download_url, unreachable download_url, completed without
    download_url, a bare string entry, and a null entry.
    """
    newest = max((r.ended_at for r in sim.recordings.values() if r.ended_at), default=None)
    start = (newest or datetime.now(UTC)) - timedelta(hours=1)
    base = make_recordings(10, seed=424242, start=start, days=1, size=(1000, 5000))

    def drop(key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda e: {k: v for k, v in e.items() if k != key}

    def set_(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda e: {**e, key: value}

    base[0].id = "../../etc/passwd"
    base[1].id = "a/b"
    base[2].id = "späce ünïcode 🎙 rec"
    base[3].id = "hostile-missing-id"
    base[3].entry_hook = drop("id")
    base[4].id = "hostile-int-id"
    base[4].entry_hook = set_("id", 12345)
    base[5].entry_hook = set_("download_url", "file:///etc/passwd")
    base[6].entry_hook = set_("download_url", "http://127.0.0.1:1/unreachable")
    base[7].entry_hook = drop("download_url")
    base[8].id = "hostile-string-entry"
    base[8].entry_hook = lambda e: "not-an-object"
    base[9].id = "hostile-null-entry"
    base[9].entry_hook = lambda e: None
    sim.add(base)
    return [base[0].id, base[1].id, base[2].id, 12345, base[5].id, base[6].id, base[7].id]


# -------------------------------------------------------------------- standalone


def _parse_fault(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    types = {f.name: str(f.type) for f in dataclasses.fields(Faults)}
    if not sep or name not in types:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME in {sorted(types)}")
    kind, optional = types[name].removesuffix(" | None"), types[name].endswith(" | None")
    if optional and raw.lower() in ("", "none"):
        return name, None
    try:
        if kind == "bool":
            return name, raw.lower() in ("1", "true", "yes", "on")
        if kind == "float":
            return name, float(raw)
        if kind == "int":
            return name, int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a {kind}, not {raw!r}") from None
    return name, raw


async def _serve_until_signal(
    sim: Simulator,
    faulty: Sequence[tuple[str, DownloadFault]] = (),
    pointed: Sequence[tuple[str, str]] = (),
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # e.g. Windows
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, _print_request_counts, sim)
    async with sim:
        print(f"API base URL:  {sim.api_base_url}", flush=True)
        print(f"API key:       {sim.api_key}", flush=True)
        print(f"Download host: {sim.download_base_url}", flush=True)
        print(f"Recordings:    {len(sim.recordings)}", flush=True)
        if sim.compositions:
            print(f"Compositions:  {len(sim.compositions)}", flush=True)
        for rec_id, fault in faulty:
            print(f"Download fault: {fault} {rec_id}", flush=True)
        for rec_id, target in pointed:
            url = sim.echo_url if target == "echo" else target
            sim.point_download_url(rec_id, url)
            print(f"Download URL:  {url} {rec_id}", flush=True)
        await stop.wait()


def _print_request_counts(sim: Simulator) -> None:
    """One line of counters on SIGUSR1: a benchmark counts API calls where they arrive."""
    bases = tuple(f"/v2/{res.path}" for res in _RESOURCES)
    gets = [r.path for r in sim.api_requests if r.method == "GET"]
    lists = sum(1 for path in gets if path in bases)
    retrieves = sum(1 for path in gets if path.startswith(tuple(b + "/" for b in bases)))
    others = len(sim.api_requests) - lists - retrieves
    print(
        f"Requests: list={lists} retrieve={retrieves} other={others}"
        f" download={len(sim.download_requests)}",
        flush=True,
    )


def run_forever(argv: Sequence[str] | None = None) -> int:
    """CLI: serve a simulator until SIGINT/SIGTERM (handy for benchmarks and demos)."""
    p = argparse.ArgumentParser(prog="python -m archiver.simulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="API port (0 = ephemeral)")
    p.add_argument("--dl-port", type=int, default=0, help="download port (0 = ephemeral)")
    p.add_argument("--count", type=int, default=100, help="number of recordings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--size-min", type=int, default=20_000)
    p.add_argument("--size-max", type=int, default=200_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--processing", type=int, default=0)
    p.add_argument(
        "--compositions",
        type=int,
        default=0,
        metavar="N",
        help="number of room compositions (completed, of the recordings' rooms and sessions)",
    )
    p.add_argument("--url-ttl", type=float, default=600)
    p.add_argument(
        "--dialect",
        type=Dialect,
        default=Dialect.CURRENT,
        choices=list(Dialect),
        help="the current API spec (default) or the legacy reference page's forms",
    )
    p.add_argument(
        "--content-cache",
        type=Path,
        help="serve content from files written here once (fast enough to benchmark clients)",
    )
    p.add_argument(
        "--fault",
        action="append",
        type=_parse_fault,
        default=[],
        metavar="NAME=VALUE",
        help="set a Faults field, e.g. --fault list_throttle_rate=0.1 (repeatable)",
    )
    p.add_argument(
        "--download-fault",
        action="append",
        type=DownloadFault,
        default=[],
        metavar="NAME",
        help=f"give the next newest recording this bad answer, one of {', '.join(DownloadFault)}"
        " (repeatable)",
    )
    p.add_argument(
        "--point-download-url",
        action="append",
        default=[],
        metavar="URL",
        help="point the next newest recording's download_url at URL ('echo': the API host's"
        " /echo) (repeatable)",
    )
    args = p.parse_args(argv)
    faults = Faults(**dict(args.fault))
    try:
        faults.download_fault_choices()
    except ValueError as e:
        p.error(f"download_fault_kinds: {e}")
    recs = make_recordings(
        args.count,
        seed=args.seed,
        size=(args.size_min, max(args.size_min, args.size_max)),
        days=args.days,
        processing=args.processing,
    )
    sim = Simulator(
        recs,
        api_key=args.api_key,
        faults=faults,
        url_ttl=args.url_ttl,
        seed=args.seed,
        host=args.host,
        api_port=args.port,
        download_port=args.dl_port,
        content_cache=args.content_cache,
        dialect=args.dialect,
        compositions=make_compositions(
            max(args.compositions, 0),
            seed=args.seed,
            size=(args.size_min, max(args.size_min, args.size_max)),
            days=args.days,
        ),
    )
    if sim.content_cache is not None:
        sim.warm_content_cache()
    newest = [r.id for r in sorted(recs, key=_sort_key, reverse=True)]
    wanted = len(args.download_fault) + len(args.point_download_url)
    if wanted > len(newest):
        p.error(f"{wanted} recordings to make faulty, only {len(newest)} (--count)")
    faulty = list(zip(newest, args.download_fault, strict=False))
    for rec_id, fault in faulty:
        sim.recordings[rec_id].download_fault = fault
    pointed = list(zip(newest[len(faulty) :], args.point_download_url, strict=False))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signal(sim, faulty, pointed))
    return 0


if __name__ == "__main__":
    sys.exit(run_forever())
