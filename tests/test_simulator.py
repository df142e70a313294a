"""Tests for the in-process Telnyx API simulator, over real loopback HTTP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from archiver import media
from archiver.simulator import (
    BLOCK_SIZE,
    Dialect,
    DownloadFault,
    Faults,
    ScriptedAnswer,
    SimComposition,
    SimRecording,
    Simulator,
    _ogg_crc,
    _parse_fault,
    add_hostile_entries,
    container_header,
    content_bytes,
    content_sha256,
    iter_content,
    make_compositions,
    make_recordings,
)
from tests import spec_room_recordings as spec

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    recs = make_recordings(45, seed=7, size=(1_000, 150_000), days=10)
    async with Simulator(recs, api_key=KEY, seed=1) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows the wire as it is: no decompression."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def one(
    rec_id: str, content_type: str = "audio/ogg", size: int = 3 * BLOCK_SIZE, **kw: Any
) -> SimRecording:
    return SimRecording(
        id=rec_id,
        room_id=None,
        session_id=None,
        participant_id=None,
        status="completed",
        type="video" if content_type.startswith("video/") else "audio",
        codec="opus",
        duration_secs=1,
        size=size,
        created_at=None,
        started_at=None,
        ended_at=None,
        completed_at=None,
        content_type=content_type,
        **kw,
    )


def starts_like_a_container(data: bytes) -> bool:
    return (
        data[:4] in (b"OggS", b"\x1a\x45\xdf\xa3")
        or data[4:8] == b"ftyp"
        or (data[:4] == b"RIFF" and data[8:12] == b"WAVE")
        or data[:3] == b"ID3"
    )


async def list_page(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> tuple[int, Any]:
    async with http.get(f"{sim.api_base_url}/room_recordings", params=params, headers=AUTH) as r:
        return r.status, await r.json()


async def all_ids(
    page: Callable[..., Awaitable[tuple[int, Any]]],
    http: aiohttp.ClientSession,
    sim: Simulator,
    **params: str,
) -> list[str]:
    """Every id of a listing, page after page through ``page``."""
    ids: list[str] = []
    number = 1
    while True:
        status, body = await page(http, sim, **params, **{"page[number]": str(number)})
        assert status == 200
        ids += [e["id"] for e in body["data"]]
        if number >= body["meta"]["total_pages"]:
            return ids
        number += 1


async def list_all(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> list[str]:
    return await all_ids(list_page, http, sim, **params)


def newest_first(recs: list[SimRecording]) -> list[str]:
    return [r.id for r in sorted(recs, key=lambda r: (r.ended_at, r.id), reverse=True)]


# ------------------------------------------------------------------ content


def test_content_deterministic_unique_and_ranged() -> None:
    a, b = make_recordings(2, seed=3, size=3 * BLOCK_SIZE + 123)
    assert make_recordings(2, seed=3, size=3 * BLOCK_SIZE + 123) == [a, b]
    full = content_bytes(a)
    assert len(full) == a.size
    assert full != content_bytes(b)
    # Repeated blocks differ, so misplaced blocks change the hash.
    assert full[:BLOCK_SIZE] != full[BLOCK_SIZE : 2 * BLOCK_SIZE]
    assert content_bytes(a, 70_000, 140_001) == full[70_000:140_001]
    assert b"".join(iter_content(a, 5, 5)) == b""
    assert content_sha256(a) == hashlib.sha256(full).hexdigest()
    with pytest.raises(ValueError):
        next(iter_content(a, 0, a.size + 1))


def test_make_recordings_shape() -> None:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    recs = make_recordings(60, seed=1, start=start, days=5, processing=4, video_ratio=0.5)
    assert len({r.id for r in recs}) == 60
    assert 1 < len({r.room_id for r in recs}) < 10
    assert all(start <= r.ended_at <= start.replace(day=6) for r in recs if r.ended_at)
    assert sum(r.status == "processing" for r in recs) == 4
    assert {r.type for r in recs} == {"audio", "video"}
    assert all(r.content_type == "video/mp4" for r in recs if r.type == "video")


def _ogg_opus(d: bytes) -> None:
    assert d[:4] == b"OggS" and d[4] == 0 and d[5] & 0x02  # version 0, first page of a stream
    assert d[26:28] == bytes([1, 19])  # one segment: the 19-byte OpusHead packet
    assert d[28:36] == b"OpusHead"
    crc = struct.unpack("<I", d[22:26])[0]
    assert crc == _ogg_crc(d[:22] + bytes(4) + d[26:47])


def _ebml(doctype: bytes) -> Callable[[bytes], None]:
    def check(d: bytes) -> None:
        assert d[:4] == b"\x1a\x45\xdf\xa3"
        assert b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype in d[: 5 + (d[4] & 0x7F)]

    return check


def _iso_bmff(brand: bytes) -> Callable[[bytes], None]:
    def check(d: bytes) -> None:
        assert d[4:8] == b"ftyp" and d[8:12] == brand
        ftyp = struct.unpack(">I", d[:4])[0]
        assert d[ftyp + 4 : ftyp + 8] == b"mdat"
        assert ftyp + struct.unpack(">I", d[ftyp : ftyp + 4])[0] == len(d)  # mdat: the rest

    return check


def _wav(d: bytes) -> None:
    assert d[:4] == b"RIFF" and d[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", d[4:8])[0] == len(d) - 8


def _mp3(d: bytes) -> None:
    assert d[:3] == b"ID3" and d[10:12] == b"\xff\xfb"  # an ID3 tag, then an MPEG frame


MAGIC: dict[str, Callable[[bytes], None]] = {
    "audio/ogg": _ogg_opus,
    "audio/opus": _ogg_opus,
    "audio/webm": _ebml(b"webm"),
    "video/webm": _ebml(b"webm"),
    "video/x-matroska": _ebml(b"matroska"),
    "video/mp4": _iso_bmff(b"isom"),
    "audio/mp4": _iso_bmff(b"M4A "),
    "audio/wav": _wav,
    "audio/mpeg": _mp3,
}


@pytest.mark.parametrize("content_type", list(MAGIC))
async def test_content_starts_like_its_container(
    http: aiohttp.ClientSession, content_type: str
) -> None:
    a, b = one("rec-a", content_type, 70_000), one("rec-b", content_type, 70_000)
    a.content_type = b.content_type = f"{content_type}; codecs=whatever"  # parameters ignored
    for rec in (a, b):
        MAGIC[content_type](content_bytes(rec))
    # After the header: the pseudo-random bytes of each id, as before.
    head = len(container_header(a.content_type, a.size))
    assert 0 < head < 64
    assert content_bytes(a, head) != content_bytes(b, head)
    async with Simulator([a]) as sim, http.get(sim.download_url(a.id)) as r:
        MAGIC[content_type](await r.read())


def test_short_content_has_a_truncated_header_and_unknown_types_none() -> None:
    head = container_header("audio/ogg", 5)
    for size in (0, 1, 4, 30):
        assert content_bytes(one("tiny", "audio/ogg", size)) == head[:size]
    assert content_bytes(one("tiny", "audio/ogg", 4)) == b"OggS"
    assert container_header("application/x-unknown", 100) == b""
    assert not starts_like_a_container(content_bytes(one("x", "application/x-unknown", 100)))


async def test_cache_sendfile_ranges_and_hash_agree(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    recs = [
        one("ogg", "audio/ogg", 3 * BLOCK_SIZE + 77),
        one("mp4", "video/mp4", BLOCK_SIZE + 1),
        one("webm", "video/webm", 40),
    ]
    ranges = ["bytes=0-99", "bytes=20-65540", "bytes=-30", "bytes=7-"]
    seen: dict[tuple[bool, str, str | None], bytes] = {}
    for cached in (False, True):
        cache = tmp_path / "cache" if cached else None
        async with Simulator(recs, content_cache=cache) as sim:
            for rec in recs:
                url = sim.download_url(rec.id)
                async with http.get(url) as r:
                    full = await r.read()
                assert len(full) == rec.size
                assert hashlib.sha256(full).hexdigest() == content_sha256(rec)
                assert full == content_bytes(rec)
                for header in ranges:
                    async with http.get(url, headers={"Range": header}) as r:
                        assert r.status == 206
                        first, last = map(
                            int, r.headers["Content-Range"][6:].split("/")[0].split("-")
                        )
                        body = await r.read()
                    assert body == full[first : last + 1] == content_bytes(rec, first, last + 1)
                    seen[cached, rec.id, header] = body
                if cached:
                    assert sim.cached_content(rec).read_bytes() == full
    assert len(seen) == 2 * len(recs) * len(ranges)
    assert all(seen[True, i, h] == seen[False, i, h] for _, i, h in seen)


async def test_cache_follows_a_changed_content_type(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rec = one("retyped", "audio/ogg", 2 * BLOCK_SIZE)
    async with Simulator([rec], content_cache=tmp_path) as sim:
        async with http.get(sim.download_url(rec.id)) as r:
            ogg = await r.read()
        assert ogg[:4] == b"OggS" and hashlib.sha256(ogg).hexdigest() == content_sha256(rec)
        ogg_file = sim.cached_content(rec)
        rec.content_type = "video/webm"
        async with http.get(sim.download_url(rec.id)) as r:
            body = await r.read()
        assert body[:4] == b"\x1a\x45\xdf\xa3"
        assert (
            hashlib.sha256(body).hexdigest() == content_sha256(rec) == sim.expected_sha256(rec.id)
        )
        assert sim.cached_content(rec) != ogg_file
        assert ogg_file.read_bytes()[:4] == b"OggS"


@pytest.mark.parametrize("kind", ["bytes", "bytes-cache", "path", "path-cut"])
async def test_body_override_served_byte_exact(
    http: aiohttp.ClientSession, tmp_path: Path, kind: str
) -> None:
    data = b"OggS" + Random(5).randbytes(2 * BLOCK_SIZE + 999)
    rec = one("given-body", "audio/ogg", size=1)
    if kind.startswith("path"):
        (tmp_path / "real.ogg").write_bytes(data)
        rec.body = tmp_path / "real.ogg"
    else:
        rec.body = data
    assert rec.size == len(data)  # assigning body sets size
    assert content_bytes(rec) == data and content_sha256(rec) == hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache" if kind == "bytes-cache" else None
    async with Simulator([rec], content_cache=cache) as sim:
        sim.faults.truncate_rate = 1.0 if kind == "path-cut" else 0.0
        if kind == "path-cut":  # the cut path reads the file itself, not through sendfile
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(sim.download_url(rec.id)) as r:
                    await r.read()
            sim.faults.truncate_rate = 0.0
        _, body = await list_page(http, sim)
        assert body["data"][0]["size_mb"] == round(len(data) / 1e6, 1)
        url = sim.download_url(rec.id)
        async with http.get(url) as r:
            assert r.headers["Content-Length"] == str(len(data))
            assert await r.read() == data
        async with http.get(url, headers={"Range": "bytes=65530-65600"}) as r:
            assert r.status == 206 and r.headers["Content-Range"].endswith(f"/{len(data)}")
            assert await r.read() == data[65530:65601]
        async with http.head(url) as r:
            assert r.headers["Content-Length"] == str(len(data))
        assert sim.expected_sha256(rec.id) == hashlib.sha256(data).hexdigest()
        if cache is not None:
            assert sim.cached_content(rec).read_bytes() == data


def ffmpeg_tone(path: Path) -> Path:
    """One second of Opus in Ogg, made by ffmpeg."""
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=1"]
    subprocess.run([*cmd, "-c:a", "libopus", "-b:a", "16k", str(path)], check=True, timeout=60)
    return path


def ffprobe_codec(path: Path) -> str:
    cmd = ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0"]
    probe = subprocess.run([*cmd, str(path)], check=True, capture_output=True, timeout=60)
    return probe.stdout.decode().strip()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
async def test_real_media_body(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    media = await asyncio.to_thread(ffmpeg_tone, tmp_path / "tone.ogg")
    data = media.read_bytes()
    # Our Ogg page CRC agrees with ffmpeg's on its first page (OpusHead, as ours).
    assert data[28:36] == b"OpusHead"
    assert _ogg_crc(data[:22] + bytes(4) + data[26:47]) == struct.unpack("<I", data[22:26])[0]
    rec = one("tone", "audio/ogg", body=media)
    async with Simulator([rec]) as sim, http.get(sim.download_url(rec.id)) as r:
        served = await r.read()
    assert served == data
    out = tmp_path / "served.ogg"
    out.write_bytes(served)
    assert await asyncio.to_thread(ffprobe_codec, out) == "opus"


# ----------------------------------------------------------------- listing


async def test_pagination_meta_and_order(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body = await list_page(http, sim, **{"page[size]": "20", "page[number]": "2"})
    assert status == 200
    assert body["meta"] == {
        "page_number": 2,
        "page_size": 20,
        "total_pages": 3,
        "total_results": 45,
    }
    assert len(body["data"]) == 20
    assert await list_all(http, sim, **{"page[size]": "20"}) == newest_first(
        list(sim.recordings.values())
    )
    status, body = await list_page(http, sim, **{"page[number]": "9"})
    assert status == 200 and body["data"] == []
    # Default page size is 20.
    _, body = await list_page(http, sim)
    assert body["meta"]["page_size"] == 20 and len(body["data"]) == 20


async def test_entry_fields(sim: Simulator, http: aiohttp.ClientSession) -> None:
    _, body = await list_page(http, sim, **{"page[size]": "1"})
    entry = body["data"][0]
    rec = sim.recordings[entry["id"]]
    assert entry["record_type"] == "room_recording"
    assert entry["size_mb"] == round(rec.size / 1e6, 1)
    assert entry["ended_at"].endswith("Z") and len(entry["ended_at"]) == 27
    assert datetime.fromisoformat(entry["ended_at"]) == rec.ended_at
    assert entry["download_url"].startswith(sim.download_base_url + "/recordings/")
    assert not entry["download_url"].startswith(sim.api_base_url)


def _ended(r: SimRecording) -> date:
    assert r.ended_at is not None
    return r.ended_at.astimezone(UTC).date()


def _started(r: SimRecording) -> date:
    assert r.started_at is not None
    return r.started_at.astimezone(UTC).date()


FILTERS: list[tuple[str, Callable[[SimRecording], Any], str]] = [
    ("filter[date_ended_at][eq]", _ended, "eq"),
    ("filter[date_ended_at][gte]", _ended, "gte"),
    ("filter[date_ended_at][lte]", _ended, "lte"),
    ("filter[date_started_at][eq]", _started, "eq"),
    ("filter[date_started_at][gte]", _started, "gte"),
    ("filter[date_started_at][lte]", _started, "lte"),
    ("filter[room_id]", lambda r: r.room_id, "eq"),
    ("filter[participant_id]", lambda r: r.participant_id, "eq"),
    ("filter[session_id]", lambda r: r.session_id, "eq"),
    ("filter[type]", lambda r: r.type, "eq"),
    ("filter[duration_secs]", lambda r: r.duration_secs, "gte"),  # the spec's one: a minimum
]
LEGACY_DURATIONS: list[tuple[str, Callable[[SimRecording], Any], str]] = [
    ("filter[duration_secs][eq]", lambda r: r.duration_secs, "eq"),
    ("filter[duration_secs][gte]", lambda r: r.duration_secs, "gte"),
    ("filter[duration_secs][lte]", lambda r: r.duration_secs, "lte"),
]
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "gte": lambda a, b: a >= b,
    "lte": lambda a, b: a <= b,
}


@pytest.mark.parametrize(
    ("dialect", "key", "getter", "op"),
    [(Dialect.CURRENT, *f) for f in FILTERS]
    + [(Dialect.LEGACY, *f) for f in FILTERS if f[0] != "filter[duration_secs]"]
    + [(Dialect.LEGACY, *f) for f in LEGACY_DURATIONS],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
async def test_filters(
    sim: Simulator,
    http: aiohttp.ClientSession,
    dialect: Dialect,
    key: str,
    getter: Callable[[SimRecording], Any],
    op: str,
) -> None:
    sim.dialect = dialect
    recs = list(sim.recordings.values())
    # Use the median value so gte/lte both select a proper, non-empty subset.
    value = sorted(getter(r) for r in recs)[len(recs) // 2]
    expected = [r for r in recs if OPS[op](getter(r), value)]
    assert 0 < len(expected) < len(recs)
    text = value.isoformat() if isinstance(value, date) else str(value)
    got = await list_all(http, sim, **{key: text, "page[size]": "7"})
    assert got == newest_first(expected)


async def test_status_filter_and_processing_completes(
    http: aiohttp.ClientSession,
) -> None:
    recs = make_recordings(6, seed=2)
    recs[0].status, recs[0].completed_at, recs[0].processing_lists_left = "processing", None, 3
    async with Simulator(recs) as sim:
        _, body = await list_page(http, sim, **{"filter[status]": "processing"})
        assert [e["id"] for e in body["data"]] == [recs[0].id]
        # No field of RoomRecording is nullable: one without a value is left out.
        assert "download_url" not in body["data"][0] and "completed_at" not in body["data"][0]
        sim.dialect = Dialect.LEGACY  # the reference page's answers carry nulls
        _, body = await list_page(http, sim, **{"filter[status]": "processing"})
        assert body["data"][0]["download_url"] is None and body["data"][0]["completed_at"] is None
        sim.dialect = Dialect.CURRENT
        # A list that does not show it does not advance it.
        await list_page(http, sim, **{"filter[status]": "completed"})
        assert recs[0].processing_lists_left == 1
        _, body = await list_page(http, sim)
        entry = next(e for e in body["data"] if e["id"] == recs[0].id)
        assert entry["status"] == "processing"  # shown as it was, then it completes
        _, body = await list_page(http, sim, **{"filter[status]": "completed"})
        entry = next(e for e in body["data"] if e["id"] == recs[0].id)
        assert entry["download_url"] and entry["completed_at"].endswith("Z")


BAD_PARAMS = [
    ({"page[size]": "0"}, "page[size]"),
    ({"page[size]": "251"}, "page[size]"),
    ({"page[size]": "ten"}, "page[size]"),
    ({"page[number]": "0"}, "page[number]"),
    ({"filter[date_ended_at][gte]": "2025-13-01"}, "filter[date_ended_at][gte]"),
    ({"filter[date_started_at][eq]": "2025-01-01T00:00:00Z"}, "filter[date_started_at][eq]"),
    ({"filter[room_id]": "not-a-uuid"}, "filter[room_id]"),
    ({"filter[session_id]": ""}, "filter[session_id]"),
]


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        *BAD_PARAMS,
        ({"filter[duration_secs]": "1.5"}, "filter[duration_secs]"),
        # Keys the current spec does not define: the legacy forms among them.
        ({"filter[duration_secs][lte]": "60"}, "filter[duration_secs][lte]"),
        ({"filter[colour]": "red"}, "filter[colour]"),
        ({"filter[date_ended_at][gt]": "2025-01-01"}, "filter[date_ended_at][gt]"),
        ({"page[offset]": "3"}, "page[offset]"),
    ],
)
async def test_invalid_parameters_are_422_in_the_lists_error_shape(
    sim: Simulator, http: aiohttp.ClientSession, params: dict[str, str], parameter: str
) -> None:
    status, body = await list_page(http, sim, **params)
    assert status == 422
    assert set(body) == {"message", "success"} and body["success"] is False
    assert parameter in body["message"]


@pytest.mark.parametrize(
    ("params", "parameter"),
    [*BAD_PARAMS, ({"filter[duration_secs][lte]": "1.5"}, "filter[duration_secs][lte]")],
)
async def test_legacy_bad_values_are_400(
    sim: Simulator, http: aiohttp.ClientSession, params: dict[str, str], parameter: str
) -> None:
    sim.dialect = Dialect.LEGACY
    status, body = await list_page(http, sim, **params)
    assert status == 400
    err = body["errors"][0]
    assert err["code"] == "10015" and err["title"] == "Bad Request"
    assert parameter in err["detail"]


async def test_legacy_ignores_filters_it_does_not_know(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.dialect = Dialect.LEGACY
    everything = await list_all(http, sim, **{"page[size]": "250"})
    got = await list_all(http, sim, **{"filter[duration_secs]": "99999", "page[size]": "250"})
    assert got == everything and len(got) == len(sim.recordings)
    assert sim.ignored_params == ["filter[duration_secs]"]
    status, _ = await list_page(http, sim, **{"page[offset]": "1"})
    assert status == 400  # only filter[...] keys are ignored


async def test_page_size_bounds_accepted(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for size in ("1", "250"):
        status, _ = await list_page(http, sim, **{"page[size]": size})
        assert status == 200


async def test_auth(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.api_base_url}/room_recordings"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        async with http.get(url, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["message"].startswith("Authentication failed")  # a list 4XX
    rec_id = next(iter(sim.recordings))
    async with http.delete(f"{url}/{rec_id}") as r:
        assert r.status == 401
        assert (await r.json())["errors"][0]["code"] == "10009"
    assert rec_id in sim.recordings
    assert len(sim.api_requests) == 4
    assert "Authorization" not in sim.api_requests[0].headers
    assert sim.api_requests[1].headers["authorization"] == "Bearer nope"


async def test_requests_recorded_with_encoding(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await list_page(http, sim, **{"filter[status]": "x y", "page[size]": "5"})
    req = sim.api_requests[-1]
    assert req.method == "GET" and req.path == "/v2/room_recordings"
    assert req.query["filter[status]"] == "x y"
    assert "page" in req.raw_path


# ---------------------------------------------------------- retrieve/delete


async def test_retrieve_fresh_url_delete_and_404(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.faults.expired_first_url_rate = 1.0
    rec_id = next(iter(sim.recordings))
    url = f"{sim.api_base_url}/room_recordings/{rec_id}"
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200
        entry = (await r.json())["data"]
    assert entry["id"] == rec_id
    expires = int(entry["download_url"].split("Expires=")[1].split("&")[0])
    assert expires > time.time() + 500
    async with http.get(entry["download_url"]) as r:
        assert r.status == 200
        assert hashlib.sha256(await r.read()).hexdigest() == sim.expected_sha256(rec_id)

    async with http.delete(url, headers=AUTH) as r:
        assert r.status == 204
    assert sim.deleted_ids == [rec_id] and rec_id not in sim.recordings
    for method in ("GET", "DELETE"):
        async with http.request(method, url, headers=AUTH) as r:
            assert r.status == 404
            assert (await r.json())["code"] == "10005"  # video_ResourceNotFound: a bare error
    # The URL of a recording deleted at source now answers 404.
    async with http.get(entry["download_url"]) as r:
        assert r.status == 404
    # It is still known for hashing.
    assert sim.expected_sha256(rec_id) == content_sha256(sim._known[rec_id])


async def test_bulk_delete_refused(sim: Simulator, http: aiohttp.ClientSession) -> None:
    n = len(sim.recordings)
    async with http.delete(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
        assert r.status == 405
    assert len(sim.bulk_delete_calls) == 1 and len(sim.recordings) == n
    # Requests no route matches are recorded too.
    async with http.post(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
        assert r.status == 405
    assert [q.method for q in sim.api_requests] == ["DELETE", "POST"]


async def test_hostile_ids_round_trip(sim: Simulator, http: aiohttp.ClientSession) -> None:
    ids = add_hostile_entries(sim)
    assert "../../etc/passwd" in ids and 12345 in ids
    _, body = await list_page(http, sim, **{"page[size]": "250"})
    data = body["data"]
    assert None in data and "not-an-object" in data
    dicts = [e for e in data if isinstance(e, dict)]
    assert any("id" not in e for e in dicts)
    assert any(e.get("download_url") == "file:///etc/passwd" for e in dicts)
    assert any(e.get("status") == "completed" and "download_url" not in e for e in dicts)
    spaced = next(i for i in ids if isinstance(i, str) and " " in i)
    assert isinstance(spaced, str)
    for rec_id in ("../../etc/passwd", "a/b", spaced):
        url = f"{sim.api_base_url}/room_recordings/{quote(rec_id, safe='')}"
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 200
            dl = (await r.json())["data"]["download_url"]
        async with http.get(dl) as r:
            assert r.status == 200
            assert hashlib.sha256(await r.read()).hexdigest() == sim.expected_sha256(rec_id)


# --------------------------------------------------------------- download


async def test_expired_and_bad_signature_403(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.expired_first_url_rate = 1.0
    _, body = await list_page(http, sim, **{"page[size]": "2"})
    async with http.get(body["data"][0]["download_url"]) as r:
        assert r.status == 403
        text = await r.text()
    assert "<Code>AccessDenied</Code>" in text and "Request has expired" in text

    good = sim.download_url(body["data"][1]["id"])
    async with http.get(good[:-4] + "0000") as r:
        assert r.status == 403
    async with http.get(good.split("?")[0]) as r:
        assert r.status == 403
    expired = sim.download_url(body["data"][1]["id"], expires=int(time.time()) - 1)
    async with http.get(expired) as r:
        assert r.status == 403
    assert sum(sim.download_completions.values()) == 0


async def test_ranges(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec = max(sim.recordings.values(), key=lambda r: r.size)
    full = content_bytes(rec)
    url = sim.download_url(rec.id)
    async with http.get(url) as r:
        assert r.status == 200
        assert r.headers["Accept-Ranges"] == "bytes"
        assert r.headers["Content-Type"] == rec.content_type
        assert int(r.headers["Content-Length"]) == rec.size
        assert r.headers["ETag"]
        assert await r.read() == full
    async with http.get(url, headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{rec.size - 1}/{rec.size}"
        assert await r.read() == full[1000:]
    async with http.get(url, headers={"Range": "bytes=10-99"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-99/{rec.size}"
        assert await r.read() == full[10:100]
    async with http.get(url, headers={"Range": "bytes=-50"}) as r:
        assert r.status == 206 and await r.read() == full[-50:]
    async with http.get(url, headers={"Range": f"bytes={rec.size}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{rec.size}"
    sim.faults.ignore_range = True
    async with http.get(url, headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 200 and await r.read() == full
    # Full 200s and the range reaching the end count; the 10-99 one does not.
    assert sim.download_completions[rec.id] == 4
    assert [d.range for d in sim.download_requests][:3] == [None, "bytes=1000-", "bytes=10-99"]
    assert all("Authorization" not in d.headers for d in sim.download_requests)


async def test_truncation_is_a_client_payload_error(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.faults.truncate_rate = 1.0
    rec = max(sim.recordings.values(), key=lambda r: r.size)
    for _ in range(3):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(sim.download_url(rec.id)) as r:
                assert r.status == 200
                await asyncio.wait_for(r.read(), timeout=5)
    assert sim.download_truncations[rec.id] == 3
    assert sim.download_completions[rec.id] == 0
    sim.faults.truncate_rate = 0.0
    async with http.get(sim.download_url(rec.id)) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == sim.expected_sha256(rec.id)
    assert sim.download_completions[rec.id] == 1


async def test_slow_downloads(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec = SimRecording(
        id="slow-one",
        room_id=None,
        session_id=None,
        participant_id=None,
        status="completed",
        type="audio",
        codec="opus",
        duration_secs=1,
        size=3 * BLOCK_SIZE,
        created_at=None,
        started_at=None,
        ended_at=None,
        completed_at=None,
        content_type="audio/ogg",
    )
    sim.add([rec])
    sim.faults.slow_chunk_delay = 0.05
    t0 = time.monotonic()
    async with http.get(sim.download_url(rec.id)) as r:
        assert len(await r.read()) == rec.size
    assert time.monotonic() - t0 >= 0.1
    assert sim.injected["download:slow"] == 1


async def test_stop_cuts_inflight_download(http: aiohttp.ClientSession) -> None:
    recs = make_recordings(1, size=20_000_000)
    async with Simulator(recs, faults=Faults(slow_chunk_delay=0.01)) as sim:
        resp = await http.get(sim.download_url(recs[0].id))
        await resp.content.readexactly(1000)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp.release()
    assert sim.download_truncations[recs[0].id] == 1


# ---------------------------------------------------------- bad download answers


async def read(r: aiohttp.ClientResponse) -> bytes:
    """The whole body, or a test failure rather than a hang if a bad answer never ends."""
    return await asyncio.wait_for(r.read(), timeout=10)


async def faulty(sim: Simulator, fault: str, size: int = 100_001, **kw: Any) -> SimRecording:
    rec = one(f"faulty-{fault}-{size}", "audio/ogg", size, download_fault=fault, **kw)
    sim.add([rec])
    return rec


async def test_half_no_length_ends_cleanly(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, DownloadFault.HALF_NO_LENGTH)
    for headers in ({}, {"Range": "bytes=10-"}):
        async with raw.get(sim.download_url(rec.id), headers=headers) as r:
            assert r.status == 200
            assert "Content-Length" not in r.headers
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert await read(r) == content_bytes(rec, 0, 50_000)  # no payload error
    assert sim.injected["download:half_no_length"] == 2
    assert sim.download_completions[rec.id] == 0


async def test_html_captive_portal(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, "html")  # the plain name works as well as the enum
    async with raw.get(sim.download_url(rec.id), headers={"Range": "bytes=0-9"}) as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert r.headers["Content-Length"] == "81"
        page = await read(r)
    assert len(page) == 81 and page.startswith(b"<html>") and page.endswith(b"</html>\n")
    assert sim.injected["download:html"] == 1


async def test_empty_body(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, DownloadFault.EMPTY)
    async with raw.get(sim.download_url(rec.id)) as r:
        assert r.status == 200 and r.content_type == rec.content_type
        assert r.headers["Content-Length"] == "0"
        assert await read(r) == b""
    assert sim.injected["download:empty"] == 1


async def test_redirect_elsewhere(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, DownloadFault.REDIRECT_ELSEWHERE)
    url = sim.download_url(rec.id)
    async with raw.get(url, allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"{sim.download_base_url}/elsewhere"
    async with raw.get(url) as r:  # followed
        assert [h.status for h in r.history] == [302]
        assert r.status == 200 and r.content_type == "text/plain"
        assert (await read(r)).decode() == "hello from somewhere else\n"
    assert [d.raw_path for d in sim.download_requests][-1] == "/elsewhere"
    assert sim.injected["download:redirect_elsewhere"] == 2


async def test_wrong_type_binary(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, DownloadFault.WRONG_TYPE_BINARY)
    url = sim.download_url(rec.id)
    async with raw.get(url) as r:
        assert r.status == 200 and r.content_type == "application/octet-stream"
        assert r.headers["Content-Length"] == str(rec.size)
        body = await read(r)
    assert len(body) == rec.size and not starts_like_a_container(body)
    assert body[100:200] != content_bytes(rec, 100, 200)
    assert len(set(body[8:])) == 256  # noise, not a pattern
    async with raw.get(url, headers={"Range": "bytes=5-20"}) as r:  # a static object's ranges
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes 5-20/{rec.size}"
        assert await read(r) == body[5:21]


async def test_gzip_despite_identity(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = await faulty(sim, DownloadFault.GZIP)
    headers = {"Accept-Encoding": "identity", "Range": "bytes=10-"}
    async with raw.get(sim.download_url(rec.id), headers=headers) as r:
        assert r.status == 200 and r.content_type == rec.content_type
        assert r.headers["Content-Encoding"] == "gzip"
        body = await read(r)
    assert r.headers["Content-Length"] == str(len(body))
    assert body[:2] == b"\x1f\x8b" and body[:4] != b"OggS"
    assert gzip.decompress(body) == content_bytes(rec)
    assert sim.injected["download:gzip"] == 1


async def test_drip_one_byte_at_a_time(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    interval = sim.faults.drip_interval = 0.04
    rec = await faulty(sim, DownloadFault.DRIP, size=8)
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    async with raw.get(sim.download_url(rec.id)) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "8"
        while chunk := await asyncio.wait_for(r.content.readany(), timeout=10):
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(c for _, c in arrivals) == content_bytes(rec) == b"OggS\x00\x02\x00\x00"
    # Loosely: the last byte came no sooner than 7 intervals in, and not all in one read.
    assert arrivals[-1][0] - t0 >= 7 * interval * 0.9
    assert len(arrivals) >= 3
    assert sim.download_completions[rec.id] == 1
    async with raw.get(sim.download_url(rec.id), headers={"Range": "bytes=4-5"}) as r:
        assert r.status == 206 and await read(r) == b"\x00\x02"
    assert sim.injected["download:drip"] == 2


async def test_endless_until_the_client_leaves(raw: aiohttp.ClientSession) -> None:
    rec = one("endless", "video/webm", 100_000, download_fault=DownloadFault.ENDLESS)
    async with Simulator([rec]) as sim:
        r = await raw.get(sim.download_url(rec.id))
        assert r.status == 200 and r.content_type == "video/webm"
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"
        got = bytearray()
        async for chunk in r.content.iter_chunked(BLOCK_SIZE):
            got += chunk
            if len(got) >= 5_000_000:
                break
        assert got[: rec.size] == content_bytes(rec)  # starts as the real container
        assert len(set(got[rec.size : rec.size + 4096])) > 200  # and goes on with noise
        assert not r.content.at_eof()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 0.5  # stop() cut it
    r.release()
    assert sim.injected["download:endless"] == 1


async def test_oversize(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    sim.faults.oversize_extra = 50_000
    small = await faulty(sim, DownloadFault.OVERSIZE, size=30_000)
    big = await faulty(sim, DownloadFault.OVERSIZE, size=70_000)
    for rec, total in ((small, 80_000), (big, 140_000)):  # + max(size, oversize_extra)
        url = sim.download_url(rec.id)
        async with raw.get(url) as r:
            assert r.status == 200 and r.headers["Content-Length"] == str(total)
            body = await read(r)
        assert len(body) == total and body[: rec.size] == content_bytes(rec)
        assert body[rec.size :] != bytes(total - rec.size)
        async with raw.get(url, headers={"Range": "bytes=-10"}) as r:
            assert r.headers["Content-Range"] == f"bytes {total - 10}-{total - 1}/{total}"
            assert await read(r) == body[-10:]
    _, page = await list_page(raw, sim, **{"page[size]": "250"})
    entry = next(e for e in page["data"] if e["id"] == big.id)
    assert entry["size_mb"] == 0.1  # the listing announces the real size
    assert sim.injected["download:oversize"] == 4


@pytest.mark.parametrize("fault", list(DownloadFault))
async def test_head_answers_like_get(
    sim: Simulator, raw: aiohttp.ClientSession, fault: DownloadFault
) -> None:
    sim.faults.drip_interval = 0.0
    rec = await faulty(sim, fault, size=1000)
    url = sim.download_url(rec.id)
    async with raw.get(url, allow_redirects=False) as r:
        got = r.status, r.headers.get("Content-Type"), r.headers.get("Content-Length")
        encoding = r.headers.get("Content-Encoding")
    async with raw.head(url, allow_redirects=False) as r:
        assert (r.status, r.headers.get("Content-Type"), r.headers.get("Content-Length")) == got
        assert r.headers.get("Content-Encoding") == encoding
        assert await asyncio.wait_for(r.read(), timeout=5) == b""


async def test_download_fault_rate_and_kinds(sim: Simulator, raw: aiohttp.ClientSession) -> None:
    rec = max(sim.recordings.values(), key=lambda r: r.size)
    sim.faults.download_fault_rate = 1.0
    sim.faults.download_fault_kinds = "html, empty"
    types = []
    for _ in range(12):
        async with raw.get(sim.download_url(rec.id)) as r:
            types.append((r.content_type, len(await read(r))))
    assert set(types) == {("text/html", 81), (rec.content_type, 0)}
    assert sim.injected["download:html"] + sim.injected["download:empty"] == 12
    sim.faults.download_fault_rate = 0.0
    async with raw.get(sim.download_url(rec.id)) as r:
        assert hashlib.sha256(await read(r)).hexdigest() == sim.expected_sha256(rec.id)
    assert Faults().download_fault_choices() == tuple(DownloadFault)
    with pytest.raises(ValueError, match="nope"):
        Faults(download_fault_kinds="html,nope").download_fault_choices()


# ------------------------------------------------------------- API host


async def test_echo_shows_the_request_headers(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for url in (sim.echo_url, f"{sim.echo_url}/rec.ogg?Expires=1"):
        async with http.get(url, headers={"X-Probe": "yes", **AUTH}) as r:
            assert r.status == 200 and r.content_type == "application/octet-stream"
            body = await r.read()
        assert b"X-Probe: yes\r\n" in body and f"Authorization: Bearer {KEY}".encode() in body
    assert [q.path for q in sim.api_requests] == ["/echo", "/echo/rec.ogg"]


async def test_point_download_url(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec_id, other = list(sim.recordings)[:2]
    sim.point_download_url(rec_id, sim.echo_url)
    _, page = await list_page(http, sim, **{"page[size]": "250"})
    urls = {e["id"]: e["download_url"] for e in page["data"]}
    assert urls[rec_id] == sim.echo_url
    assert urls[other].startswith(sim.download_base_url)
    async with http.get(f"{sim.api_base_url}/room_recordings/{rec_id}", headers=AUTH) as r:
        assert (await r.json())["data"]["download_url"] == sim.echo_url
    async with http.get(urls[rec_id]) as r:
        assert r.content_type == "application/octet-stream"
    assert sim.api_requests[-1].path == "/echo"
    sim.point_download_url(rec_id, None)
    _, page = await list_page(http, sim, **{"page[size]": "250"})
    entry = next(e for e in page["data"] if e["id"] == rec_id)
    assert entry["download_url"].startswith(sim.download_base_url + "/recordings/")


async def test_list_redirect_to(sim: Simulator, http: aiohttp.ClientSession) -> None:
    target = "https://elsewhere.example/v2/room_recordings?page=1"
    sim.faults.list_redirect_to = target
    for headers in (AUTH, {}):  # before authentication, as a front proxy would
        async with http.get(
            f"{sim.api_base_url}/room_recordings", headers=headers, allow_redirects=False
        ) as r:
            assert r.status == 302 and r.headers["Location"] == target
    rec_id = next(iter(sim.recordings))
    async with http.get(f"{sim.api_base_url}/room_recordings/{rec_id}", headers=AUTH) as r:
        assert r.status == 200  # only lists are redirected
    assert sim.injected["list:redirect"] == 2
    sim.faults.list_redirect_to = None
    status, _ = await list_page(http, sim)
    assert status == 200


# ----------------------------------------------------------------- faults


async def test_expired_first_url_rate_is_per_recording(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.faults.expired_first_url_rate = 0.5

    async def expired_ids() -> set[str]:
        _, body = await list_page(http, sim, **{"page[size]": "250"})
        now = time.time()
        return {
            e["id"]
            for e in body["data"]
            if int(e["download_url"].split("Expires=")[1].split("&")[0]) < now
        }

    first = await expired_ids()
    assert 0 < len(first) < len(sim.recordings)
    assert await expired_ids() == first


async def test_throttle_headers(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.list_throttle_rate = 1.0
    sim.faults.throttle_reset_seconds = 0
    retry_after = []
    for _ in range(12):
        async with http.get(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
            assert r.status == 429
            assert r.headers["x-ratelimit-reset"] == "0"
            assert (await r.json())["message"].startswith("Too many requests")
            retry_after.append(r.headers.get("Retry-After"))
    assert "0" in retry_after and None in retry_after
    sim.faults.throttle_reset_seconds = 1
    async with http.get(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
        assert r.headers["x-ratelimit-reset"] == "1"
    # Validation still comes first: a bad request is never throttled.
    status, _ = await list_page(http, sim, **{"page[size]": "0"})
    assert status == 422


async def test_server_errors_and_shapes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.list_error_rate = 1.0
    sim.faults.error_shapes_mixed = True
    statuses, shapes = set(), set()
    for _ in range(30):
        async with http.get(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
            statuses.add(r.status)
            body = await r.json()
            shapes.add(next(k for k in ("errors", "code", "message") if k in body))
    assert statuses == {500, 502, 503}
    assert shapes == {"errors", "code", "message"}
    sim.faults.list_error_rate = 0.0
    sim.faults.retrieve_error_rate = 1.0
    rec_id = next(iter(sim.recordings))
    async with http.get(f"{sim.api_base_url}/room_recordings/{rec_id}", headers=AUTH) as r:
        assert r.status >= 500
    assert sim.injected["list:error"] == 30 and sim.injected["retrieve:error"] == 1


async def test_malformed_pages(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.page_malformed_rate = 1.0
    for _ in range(15):
        async with http.get(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
            assert r.status == 200
            text = await r.text()
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        assert not isinstance(doc.get("data"), list)


async def test_fault_rates_are_seeded(http: aiohttp.ClientSession) -> None:
    async def run() -> list[int]:
        faults = Faults(list_error_rate=0.3, list_throttle_rate=0.2, throttle_reset_seconds=0)
        async with Simulator(make_recordings(3), faults=faults, seed=5) as s:
            out = []
            for _ in range(20):
                async with http.get(f"{s.api_base_url}/room_recordings", headers=AUTH) as r:
                    out.append(r.status)
            return out

    first = await run()
    assert first == await run()
    assert 200 in first and 429 in first and any(s >= 500 for s in first)


async def test_shift_on_page(sim: Simulator, http: aiohttp.ClientSession) -> None:
    before = newest_first(list(sim.recordings.values()))
    sim.faults.shift_on_page = 2
    sim.faults.shift_count = 3
    seen = await list_all(http, sim, **{"page[size]": "10"})
    assert len(sim.shifted_ids) == 3 and sim.faults.shift_on_page is None
    # Page 2 repeats the last 3 of page 1; the new ones (on page 1) were missed.
    assert seen[10:13] == before[7:10]
    assert not set(sim.shifted_ids) & set(seen)
    assert set(before) <= set(seen)
    # A later pass sees them, newest first.
    again = await list_all(http, sim, **{"page[size]": "10"})
    assert again[:3] == sim.shifted_ids[::-1]


async def test_shift_respects_filters(sim: Simulator, http: aiohttp.ClientSession) -> None:
    room = next(iter(sim.recordings.values())).room_id
    assert room is not None
    sim.faults.shift_on_page = 1
    await list_page(http, sim, **{"filter[room_id]": room})
    shifted = [sim.recordings[i] for i in sim.shifted_ids]
    assert shifted and all(r.room_id == room and r.status == "completed" for r in shifted)


async def test_shifted_copies_drop_faults(sim: Simulator, http: aiohttp.ClientSession) -> None:
    newest = sim.recordings[newest_first(list(sim.recordings.values()))[0]]
    newest.download_fault = DownloadFault.HTML
    sim.point_download_url(newest.id, sim.echo_url)
    sim.faults.shift_on_page = 1
    await list_page(http, sim)
    shifted = [sim.recordings[i] for i in sim.shifted_ids]
    assert shifted and all(r.size == newest.size for r in shifted)  # copies of the newest
    assert all(r.download_fault is None and r.download_url_override is None for r in shifted)


async def test_a_shift_where_nothing_matches_inserts_items_newest_by_a_millisecond(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.faults.shift_on_page = 1
    sim.faults.shift_count = 3
    before = datetime.now(UTC)
    status, _ = await list_page(http, sim, **{"filter[room_id]": str(uuid.UUID(int=7))})
    assert status == 200
    shifted = [sim.recordings[i] for i in sim.shifted_ids]
    assert len(shifted) == 3 and all(r.ended_at is not None for r in shifted)
    # Made afresh (no match to copy), each ended a millisecond after the one before, from now.
    ends = [r.ended_at for r in shifted]
    assert before < ends[0] <= datetime.now(UTC) + timedelta(milliseconds=1)
    assert [(b - a) for a, b in itertools.pairwise(ends)] == [timedelta(milliseconds=1)] * 2


# ------------------------------------------------------------- standalone


def test_standalone_cli() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver.simulator", "--count", "3", "--api-key", "k"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("API base URL:") and "http://127.0.0.1:" in first
        assert proc.stdout.readline().split() == ["API", "key:", "k"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_parse_fault_by_field_type() -> None:
    assert _parse_fault("list_redirect_to=http://x.example/") == (
        "list_redirect_to",
        "http://x.example/",
    )
    assert _parse_fault("list_redirect_to=none") == ("list_redirect_to", None)
    assert _parse_fault("download_fault_kinds=html,gzip") == ("download_fault_kinds", "html,gzip")
    assert _parse_fault("drip_interval=0.05") == ("drip_interval", 0.05)
    assert _parse_fault("oversize_extra=10") == ("oversize_extra", 10)
    assert _parse_fault("shift_on_page=") == ("shift_on_page", None)
    assert _parse_fault("shift_on_page=2") == ("shift_on_page", 2)
    assert _parse_fault("ignore_range=yes") == ("ignore_range", True)
    for bad in ("oversize_extra=lots", "nope=1", "drip_interval"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_fault(bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["--download-fault", "nope"],
        ["--fault", "download_fault_kinds=html,nope"],
        ["--count", "1", "--download-fault", "html", "--point-download-url", "echo"],
    ],
)
def test_standalone_cli_refuses(argv: list[str]) -> None:
    # A subprocess with a timeout: a CLI that wrongly accepts these serves forever.
    done = subprocess.run(
        [sys.executable, "-m", "archiver.simulator", *argv],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 2
    assert "usage:" in done.stderr


async def test_standalone_cli_bad_answers(raw: aiohttp.ClientSession) -> None:
    argv = ["--count", "4", "--api-key", KEY, "--download-fault", "html"]
    argv += ["--download-fault", "drip", "--fault", "drip_interval=0.01"]
    argv += ["--point-download-url", "echo", "--fault", "list_redirect_to=http://moved.example/"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "archiver.simulator", *argv, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        lines = [(await proc.stdout.readline()).decode() for _ in range(7)]
        api = lines[0].split()[-1]
        faults = [line.split()[-2:] for line in lines[4:6]]
        assert [f for f, _ in faults] == ["html", "drip"]
        assert lines[6].startswith("Download URL:")
        echo, pointed = lines[6].split()[-2:]
        assert echo == api.removesuffix("/v2") + "/echo"

        async with raw.get(f"{api}/room_recordings", headers=AUTH, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "http://moved.example/"

        async def download_url(rec_id: str) -> str:
            async with raw.get(f"{api}/room_recordings/{rec_id}", headers=AUTH) as r:
                url: str = (await r.json())["data"]["download_url"]
                return url

        async with raw.get(await download_url(faults[0][1])) as r:
            assert r.content_type == "text/html" and len(await r.read()) == 81
        async with raw.get(await download_url(faults[1][1]), headers={"Range": "bytes=0-3"}) as r:
            assert await r.read() == b"OggS"
        assert await download_url(pointed) == echo
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ------------------------------------------------------- the spec's answers


async def checked(
    http: aiohttp.ClientSession, sim: Simulator, method: str, path: str, **params: str
) -> tuple[int, Any]:
    """One call, its answer held to the spec (``tests.spec_room_recordings``)."""
    url = f"{sim.api_base_url}{path}"
    async with http.request(method, url, params=params, headers=AUTH) as r:
        body = await r.read()
        problems = spec.answer_problems(method, path, r.status, r.headers, body)
        assert problems == [], problems
        return r.status, json.loads(body) if body else None


async def test_answers_follow_the_spec(http: aiohttp.ClientSession) -> None:
    recs = make_recordings(30, seed=8, processing=3)
    async with Simulator(recs, api_key=KEY) as sim:
        status, page = await checked(http, sim, "GET", "/room_recordings", **{"page[size]": "250"})
        assert status == 200 and len(page["data"]) == 30
        assert any(e["status"] == "processing" for e in page["data"])  # fields left out, no nulls
        for entry in page["data"][:5]:
            assert (await checked(http, sim, "GET", f"/room_recordings/{entry['id']}"))[0] == 200
        assert (await checked(http, sim, "DELETE", f"/room_recordings/{recs[0].id}"))[0] == 204
        status, body = await checked(http, sim, "DELETE", f"/room_recordings/{recs[0].id}")
        assert status == 404 and set(body) >= {"code", "title"}  # the bare error object
        status, body = await checked(http, sim, "GET", "/room_recordings", **{"filter[x]": "1"})
        assert status == 422 and body["success"] is False  # video_GenericErrorResponse
        sim.faults.list_error_rate = 1.0
        status, body = await checked(http, sim, "GET", "/room_recordings")
        assert status >= 500 and body["errors"][0]["code"] == "10007"  # video_Errors
    # The checker itself fails an answer that is not the spec's: a null, an unknown field.
    bad = json.dumps({"data": [{"id": recs[1].id, "download_url": None, "colour": "red"}]})
    problems = spec.answer_problems(
        "GET", "/room_recordings", 200, {"Content-Type": "application/json"}, bad.encode()
    )
    assert len(problems) == 2 and "null" in problems[0] + problems[1]


async def test_legacy_answers_keep_nulls(http: aiohttp.ClientSession) -> None:
    recs = make_recordings(3, seed=8, processing=1)
    async with Simulator(recs, api_key=KEY, dialect="legacy") as sim:
        _, page = await list_page(http, sim)
        processing = next(e for e in page["data"] if e["status"] == "processing")
        assert processing["download_url"] is None
        _, body = await list_page(http, sim, **{"page[size]": "0"})
        assert body["errors"][0]["code"] == "10015"


async def test_listing_faults_for_paging(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.omit_meta = True
    _, body = await list_page(http, sim, **{"page[size]": "10", "page[number]": "2"})
    assert set(body) == {"data"} and len(body["data"]) == 10
    sim.faults.omit_meta = False
    sim.faults.repeat_page = True
    sim.faults.total_pages_override = 10**9
    _, first = await list_page(http, sim, **{"page[size]": "10", "page[number]": "1"})
    _, later = await list_page(http, sim, **{"page[size]": "10", "page[number]": "7"})
    assert [e["id"] for e in later["data"]] == [e["id"] for e in first["data"]]
    assert later["meta"]["total_pages"] == 10**9 and later["meta"]["page_number"] == 7


async def test_ignore_filters_validates_then_ignores(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    room = next(iter(sim.recordings.values())).room_id
    assert room is not None
    sim.faults.ignore_filters = True
    got = await list_all(http, sim, **{"filter[room_id]": room, "page[size]": "250"})
    assert len(got) == len(sim.recordings)
    status, _ = await list_page(http, sim, **{"filter[room_id]": "nope"})
    assert status == 422


async def test_scripted_answers(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec_id = next(iter(sim.recordings))
    sim.script(
        ScriptedAnswer(409, {"x-should-retry": "true"}, route="retrieve"),
        ScriptedAnswer(503, {"retry-after-ms": "250"}),
    )
    url = f"{sim.api_base_url}/room_recordings"
    async with http.get(url, headers=AUTH) as r:  # the first answer is the retrieve's
        assert r.status == 503 and r.headers["retry-after-ms"] == "250"
        assert (await r.json())["errors"][0]["title"] == "Service Unavailable"
    async with http.get(f"{url}/{rec_id}", headers=AUTH) as r:
        assert r.status == 409 and r.headers["x-should-retry"] == "true"
    async with http.get(f"{url}/{rec_id}", headers=AUTH) as r:
        assert r.status == 200
    assert sim.injected["list:scripted"] == sim.injected["retrieve:scripted"] == 1
    assert sim.api_requests[-1].at >= sim.api_requests[0].at > 0


def test_standalone_cli_takes_a_dialect() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "archiver.simulator", "--dialect", "older"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 2 and "--dialect" in done.stderr


# ------------------------------------------------------------------ room compositions

COMPOSITIONS = "/room_compositions"


@pytest.fixture
async def csim() -> AsyncIterator[Simulator]:
    """Recordings and compositions of the same rooms: 3 enqueued, 4 processing, 38 completed."""
    comps = make_compositions(45, seed=7, size=(1_000, 150_000), days=10, enqueued=3, processing=4)
    recs = make_recordings(5, seed=7, size=(1_000, 5_000), days=10)
    async with Simulator(recs, api_key=KEY, seed=1, compositions=comps) as s:
        yield s


async def comp_page(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> tuple[int, Any]:
    """One call of ListRoomCompositions, its answer held to the spec."""
    return await checked(http, sim, "GET", COMPOSITIONS, **params)


async def comp_all(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> list[str]:
    return await all_ids(comp_page, http, sim, **params)


def newest_created_first(comps: list[SimComposition]) -> list[str]:
    return [c.id for c in sorted(comps, key=lambda c: (c.created_at, c.id), reverse=True)]


def _created(c: SimComposition) -> date:
    return c.created_at.astimezone(UTC).date()


def test_make_compositions_shape() -> None:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    comps = make_compositions(60, seed=1, start=start, days=5, enqueued=2, processing=3)
    assert make_compositions(60, seed=1, start=start, days=5, enqueued=2, processing=3) == comps
    assert [c.status for c in comps[:6]] == ["enqueued"] * 2 + ["processing"] * 3 + ["completed"]
    assert len({c.id for c in comps}) == 60 and len({c.user_id for c in comps}) == 1
    for c in comps:
        assert start <= c.ended_at < start + timedelta(days=5)
        assert c.started_at == c.ended_at - timedelta(seconds=c.duration_secs)
        assert timedelta(minutes=1) <= c.created_at - c.ended_at <= timedelta(minutes=11)
        if c.status == "completed":
            assert c.completed_at is not None and c.completed_at > c.created_at
            assert c.updated_at == c.completed_at
        else:
            assert c.completed_at is None and c.updated_at >= c.created_at
        assert c.content_type == "video/mp4" and c.format == "mp4"
        assert c.resolution == "1280x720" and set(c.video_layout) == {"first"}
    # The rooms and sessions of the recordings made with the same seed, never their ids.
    recs = make_recordings(300, seed=1, start=start, days=5)
    assert {c.session_id for c in comps} <= {r.session_id for r in recs}
    assert {c.room_id for c in comps} <= {r.room_id for r in recs}
    assert 1 < len({c.session_id for c in comps}) < 10
    assert not {c.id for c in comps} & {r.id for r in recs}


async def test_composition_answers_follow_the_spec(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, page = await comp_page(http, csim, **{"page[size]": "250"})
    assert status == 200 and len(page["data"]) == 45
    assert {e["status"] for e in page["data"]} == {"enqueued", "processing", "completed"}
    for entry in page["data"][:5]:
        assert (await checked(http, csim, "GET", f"{COMPOSITIONS}/{entry['id']}"))[0] == 200
    gone = next(iter(csim.compositions))
    assert (await checked(http, csim, "DELETE", f"{COMPOSITIONS}/{gone}")) == (204, None)
    status, body = await checked(http, csim, "DELETE", f"{COMPOSITIONS}/{gone}")
    assert status == 404 and set(body) >= {"code", "title"}  # video_ResourceNotFound
    status, body = await checked(http, csim, "GET", f"{COMPOSITIONS}/{gone}")
    assert status == 404 and body["code"] == "10005"
    status, body = await comp_page(http, csim, **{"filter[type]": "video"})
    assert status == 422 and body["success"] is False  # video_GenericErrorResponse
    csim.faults.list_error_rate = 1.0
    status, body = await comp_page(http, csim)
    assert status >= 500 and body["errors"][0]["code"] == "10007"  # video_Errors
    # The checker holds an answer to RoomComposition, not to RoomRecording.
    entry = page["data"][-1]

    def problems(**changes: Any) -> list[str]:
        doc = json.dumps({"data": {**entry, **changes}}).encode()
        path = f"{COMPOSITIONS}/{entry['id']}"
        return spec.answer_problems("GET", path, 200, {"Content-Type": "application/json"}, doc)

    assert problems() == []
    assert "'codec' is not a property" in problems(codec="h264")[0]
    assert "not one of" in problems(format="webm")[0]
    assert "not one of" in problems(status="failed")[0]
    assert "null" in problems(completed_at=None)[0]
    assert "not a UUID" in problems(user_id="someone")[0]
    assert "below 16" in problems(video_layout={"a": {"width": 8}})[0]
    assert "not an object" in problems(video_layout={"a": [1]})[0]
    assert "not an absolute URI" in problems(webhook_event_url="example.com/hook")[0]
    assert "above 30" in problems(webhook_timeout_secs=31)[0]


async def test_composition_entry_fields(csim: Simulator, http: aiohttp.ClientSession) -> None:
    comp = next(c for c in csim.compositions.values() if c.webhook_event_url is not None)
    _, body = await checked(http, csim, "GET", f"{COMPOSITIONS}/{comp.id}")
    entry = body["data"]
    assert entry["record_type"] == "room_composition" and entry["format"] == "mp4"
    assert entry["size_mb"] == round(comp.size / 1e6, 1)
    for name in ("room_id", "session_id", "user_id", "status", "resolution", "video_layout"):
        assert entry[name] == getattr(comp, name), name
    assert entry["duration_secs"] == comp.duration_secs
    assert entry["webhook_event_url"] == comp.webhook_event_url
    assert entry["webhook_timeout_secs"] == comp.webhook_timeout_secs
    for name in ("created_at", "started_at", "ended_at", "updated_at"):
        assert entry[name].endswith("Z") and len(entry[name]) == 27
        assert datetime.fromisoformat(entry[name]) == getattr(comp, name), name
    assert "webhook_event_failover_url" not in entry  # no value: left out, not null
    quiet = next(c for c in csim.compositions.values() if c.webhook_event_url is None)
    _, body = await checked(http, csim, "GET", f"{COMPOSITIONS}/{quiet.id}")
    assert "webhook_event_url" not in body["data"] and "webhook_timeout_secs" not in body["data"]


async def test_composition_paging_meta_and_order(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, body = await comp_page(http, csim, **{"page[size]": "20", "page[number]": "2"})
    assert status == 200 and len(body["data"]) == 20
    assert body["meta"] == {
        "page_number": 2,
        "page_size": 20,
        "total_pages": 3,
        "total_results": 45,
    }
    every = list(csim.compositions.values())
    assert await comp_all(http, csim, **{"page[size]": "20"}) == newest_created_first(every)
    _, body = await comp_page(http, csim, **{"page[number]": "9"})
    assert body["data"] == [] and body["meta"]["total_results"] == 45
    _, body = await comp_page(http, csim)
    assert body["meta"]["page_size"] == 20 and len(body["data"]) == 20
    for size in ("1", "250"):
        assert (await comp_page(http, csim, **{"page[size]": size}))[0] == 200
    # The recordings list is its own: five recordings, none of the compositions.
    _, recs = await list_page(http, csim, **{"page[size]": "250"})
    assert {e["id"] for e in recs["data"]} == set(csim.recordings)
    assert recs["meta"]["total_results"] == 5


COMPOSITION_FILTERS: list[tuple[str, Callable[[SimComposition], Any], str]] = [
    ("filter[date_created_at][eq]", _created, "eq"),
    ("filter[date_created_at][gte]", _created, "gte"),
    ("filter[date_created_at][lte]", _created, "lte"),
    ("filter[session_id]", lambda c: c.session_id, "eq"),
    ("filter[status]", lambda c: c.status, "eq"),
]


@pytest.mark.parametrize(
    ("key", "getter", "op"), COMPOSITION_FILTERS, ids=[f[0] for f in COMPOSITION_FILTERS]
)
async def test_composition_filters(
    csim: Simulator,
    http: aiohttp.ClientSession,
    key: str,
    getter: Callable[[SimComposition], Any],
    op: str,
) -> None:
    comps = list(csim.compositions.values())
    value = sorted(getter(c) for c in comps)[len(comps) // 2]
    expected = [c for c in comps if OPS[op](getter(c), value)]
    assert 0 < len(expected) < len(comps)
    text = value.isoformat() if isinstance(value, date) else str(value)
    assert await comp_all(http, csim, **{key: text, "page[size]": "7"}) == newest_created_first(
        expected
    )


async def test_composition_filters_combined_and_on_created_at(
    http: aiohttp.ClientSession,
) -> None:
    comps = make_compositions(80, seed=9, days=6, enqueued=10, processing=10)
    # Its session ended before midnight, the composition was created after: created_at counts.
    late, early = comps[-1], comps[-2]
    late.ended_at = datetime(2025, 1, 3, 23, 58, tzinfo=UTC)
    late.created_at = datetime(2025, 1, 4, 0, 3, tzinfo=UTC)
    # Ended after it, created before it: the list is newest created_at first.
    early.ended_at = datetime(2025, 1, 4, 0, 1, tzinfo=UTC)
    early.created_at = datetime(2025, 1, 4, 0, 2, tzinfo=UTC)
    async with Simulator(api_key=KEY, compositions=comps) as sim:
        _, body = await comp_page(
            http, sim, **{"filter[date_created_at][eq]": "2025-01-04", "page[size]": "250"}
        )
        ids = [e["id"] for e in body["data"]]
        assert ids.index(late.id) == ids.index(early.id) - 1
        _, body = await comp_page(http, sim, **{"filter[date_created_at][eq]": "2025-01-03"})
        assert late.id not in {e["id"] for e in body["data"]}
        session = comps[40].session_id
        params = {
            "filter[session_id]": session,
            "filter[status]": "completed",
            "filter[date_created_at][gte]": "2025-01-02",
            "filter[date_created_at][lte]": "2025-01-05",
        }
        expected = [
            c
            for c in comps
            if c.session_id == session
            and c.status == "completed"
            and date(2025, 1, 2) <= _created(c) <= date(2025, 1, 5)
        ]
        assert 0 < len(expected) < sum(c.session_id == session for c in comps)
        got = await comp_all(http, sim, **params, **{"page[size]": "3"})
        assert got == newest_created_first(expected)


BAD_COMPOSITION_PARAMS = [
    ({"filter[status]": "done"}, "filter[status]"),
    ({"filter[status]": ""}, "filter[status]"),
    ({"filter[session_id]": "not-a-uuid"}, "filter[session_id]"),
    ({"filter[date_created_at][gte]": "2025-13-01"}, "filter[date_created_at][gte]"),
    ({"filter[date_created_at][eq]": "2025-01-01T00:00:00Z"}, "filter[date_created_at][eq]"),
    ({"page[size]": "0"}, "page[size]"),
    ({"page[size]": "251"}, "page[size]"),
    ({"page[number]": "0"}, "page[number]"),
]
# The recordings list's keys, and others, that ListRoomCompositions does not define.
UNKNOWN_COMPOSITION_KEYS = [
    ({"filter[room_id]": "f981dbb3-228a-44e9-ac54-e87f0e2658b0"}, "filter[room_id]"),
    ({"filter[date_ended_at][gte]": "2025-01-01"}, "filter[date_ended_at][gte]"),
    ({"filter[duration_secs]": "5"}, "filter[duration_secs]"),
    ({"filter[type]": "video"}, "filter[type]"),
    ({"filter[date_created_at][gt]": "2025-01-01"}, "filter[date_created_at][gt]"),
]


@pytest.mark.parametrize(
    ("params", "parameter"),
    BAD_COMPOSITION_PARAMS + UNKNOWN_COMPOSITION_KEYS,
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
async def test_composition_invalid_parameters_are_422_in_the_lists_error_shape(
    csim: Simulator, http: aiohttp.ClientSession, params: dict[str, str], parameter: str
) -> None:
    status, body = await comp_page(http, csim, **params)
    assert status == 422
    assert set(body) == {"message", "success"} and body["success"] is False
    assert parameter in body["message"]
    # The spec's facts refuse the same request.
    assert spec.request_problems("GET", COMPOSITIONS, params, AUTH)


async def test_composition_list_refuses_a_key_given_twice(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    url = f"{csim.api_base_url}{COMPOSITIONS}?filter[status]=completed&filter[status]=enqueued"
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 422 and "more than once" in (await r.json())["message"]


async def test_legacy_composition_list(csim: Simulator, http: aiohttp.ClientSession) -> None:
    csim.dialect = Dialect.LEGACY
    status, body = await list_page_at(http, csim, COMPOSITIONS, **{"filter[status]": "done"})
    assert status == 400 and body["errors"][0]["code"] == "10015"
    everything = await list_page_at(http, csim, COMPOSITIONS, **{"page[size]": "250"})
    ignored = await list_page_at(
        http, csim, COMPOSITIONS, **{"filter[type]": "video", "page[size]": "250"}
    )
    assert ignored[1]["data"] == everything[1]["data"] and len(ignored[1]["data"]) == 45
    assert csim.ignored_params == ["filter[type]"]
    enqueued = next(e for e in everything[1]["data"] if e["status"] == "enqueued")
    assert enqueued["download_url"] is None and enqueued["completed_at"] is None


async def list_page_at(
    http: aiohttp.ClientSession, sim: Simulator, path: str, **params: str
) -> tuple[int, Any]:
    async with http.get(f"{sim.api_base_url}{path}", params=params, headers=AUTH) as r:
        return r.status, await r.json()


async def test_compositions_advance_to_completed(http: aiohttp.ClientSession) -> None:
    comps = make_compositions(3, seed=4, enqueued=1, processing=1)
    queued, working, done = comps
    async with Simulator(api_key=KEY, compositions=comps) as sim:

        async def entry(comp: SimComposition) -> Any:
            status, body = await checked(http, sim, "GET", f"{COMPOSITIONS}/{comp.id}")
            assert status == 200
            return body["data"]

        for comp in (queued, working):
            seen = await entry(comp)
            assert "download_url" not in seen and "completed_at" not in seen
        assert (await entry(done))["download_url"].startswith(sim.download_base_url)
        before = datetime.now(UTC)
        assert sim.advance_compositions() == [working.id]
        assert [c.status for c in comps] == ["processing", "completed", "completed"]
        assert working.completed_at is not None and working.completed_at >= before
        assert working.updated_at == working.completed_at and queued.updated_at >= before
        seen = await entry(working)
        assert seen["status"] == "completed" and seen["download_url"]
        assert datetime.fromisoformat(seen["completed_at"]) == working.completed_at
        assert "download_url" not in await entry(queued)
        _, body = await comp_page(http, sim, **{"filter[status]": "processing"})
        assert [e["id"] for e in body["data"]] == [queued.id]
        assert sim.advance_compositions() == [queued.id]
        assert sim.advance_compositions() == []
        _, body = await comp_page(http, sim, **{"filter[status]": "completed"})
        assert len(body["data"]) == 3 and all(e["download_url"] for e in body["data"])


async def test_composition_retrieve_delete_and_404(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    comp = next(c for c in csim.compositions.values() if c.status == "completed")
    url = f"{csim.api_base_url}{COMPOSITIONS}/{comp.id}"
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200
        entry = (await r.json())["data"]
    assert entry["id"] == comp.id
    async with http.delete(url, headers=AUTH) as r:
        assert r.status == 204 and await r.read() == b""
    assert csim.deleted_ids == [comp.id] and comp.id not in csim.compositions
    for method in ("GET", "DELETE"):
        async with http.request(method, url, headers=AUTH) as r:
            assert r.status == 404
            assert (await r.json())["code"] == "10005"  # a bare error
    assert comp.id not in await comp_all(http, csim, **{"page[size]": "250"})
    _, body = await comp_page(http, csim)
    assert body["meta"]["total_results"] == 44
    async with http.get(entry["download_url"]) as r:  # deleted at source
        assert r.status == 404
    assert csim.expected_sha256(comp.id) == content_sha256(comp)  # still known
    # Each resource has its own ids: neither route finds the other's.
    rec_id = next(iter(csim.recordings))
    other = next(iter(csim.compositions))
    for path in (f"{COMPOSITIONS}/{rec_id}", f"/room_recordings/{other}"):
        assert (await checked(http, csim, "GET", path))[0] == 404
    # Ids are unique across both (a download URL names one item).
    with pytest.raises(ValueError, match="duplicate"):
        csim.add([csim.compositions[other]])
    with pytest.raises(ValueError, match="duplicate"):
        csim.add([dataclasses.replace(comp, id=rec_id)])


async def test_composition_download_is_an_mp4_archiver_accepts(
    csim: Simulator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    comp = max(
        (c for c in csim.compositions.values() if c.status == "completed"), key=lambda c: c.size
    )
    _, body = await checked(http, csim, "GET", f"{COMPOSITIONS}/{comp.id}")
    url = body["data"]["download_url"]
    assert url.startswith(f"{csim.download_base_url}/compositions/{comp.id}.mp4?Expires=")
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
        assert int(r.headers["Content-Length"]) == comp.size and r.headers["ETag"]
        media.check_headers(r.headers.get("Content-Type"), r.headers.get("Content-Encoding"))
        data = await r.read()
    assert hashlib.sha256(data).hexdigest() == csim.expected_sha256(comp.id)
    assert data == content_bytes(comp) and len(data) == comp.size
    _iso_bmff(b"isom")(data)  # an ftyp box, then an mdat box holding the rest
    head = data[: media.HEAD_BYTES]
    assert media.check_head(head, content_type="video/mp4", size=comp.size) is media.Container.MP4
    media.check_size(len(data), body["data"]["size_mb"])
    assert media.check_copy(head, len(data), size_mb=body["data"]["size_mb"]) is None
    assert csim.download_requests[-1].id == comp.id
    async with http.get(url, headers={"Range": "bytes=100-"}) as r:
        assert r.status == 206 and await r.read() == data[100:]
    assert csim.download_completions[comp.id] >= 1  # the second may still be ending
    # Signed as a recording's URL is: tampered or expired is refused; not a recording's path.
    async with http.get(url[:-4] + "0000") as r:
        assert r.status == 403
    async with http.get(csim.download_url(comp.id, expires=int(time.time()) - 1)) as r:
        assert r.status == 403 and "Request has expired" in await r.text()
    async with http.get(url.replace("/compositions/", "/recordings/")) as r:
        assert r.status == 404
    # And from the content cache (sendfile), the same bytes.
    cached = make_compositions(2, seed=12, size=3 * BLOCK_SIZE + 5)
    async with Simulator(compositions=cached, content_cache=tmp_path) as sim:
        sim.warm_content_cache()
        names = await asyncio.to_thread(lambda: sorted(p.suffix for p in tmp_path.iterdir()))
        assert names == [".mp4", ".mp4"]
        async with http.get(sim.download_url(cached[1].id)) as r:
            assert hashlib.sha256(await r.read()).hexdigest() == content_sha256(cached[1])


async def test_composition_requests_are_recorded(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    await comp_page(http, csim, **{"filter[status]": "enqueued", "page[size]": "5"})
    comp_id = next(iter(csim.compositions))
    async with http.delete(f"{csim.api_base_url}{COMPOSITIONS}/{comp_id}", headers=AUTH) as r:
        assert r.status == 204
    listed, deleted = csim.api_requests
    assert listed.method == "GET" and listed.path == "/v2/room_compositions"
    assert listed.query["filter[status]"] == "enqueued" and "page%5Bsize%5D" in listed.raw_path
    assert listed.headers["Authorization"] == f"Bearer {KEY}"
    assert (deleted.method, deleted.path) == ("DELETE", f"/v2/room_compositions/{comp_id}")
    # Authentication first, as for recordings.
    async with http.get(f"{csim.api_base_url}{COMPOSITIONS}") as r:
        assert r.status == 401 and (await r.json())["message"].startswith("Authentication")
    async with http.delete(f"{csim.api_base_url}{COMPOSITIONS}/{comp_id}") as r:
        assert r.status == 401 and (await r.json())["errors"][0]["code"] == "10009"


async def test_api_faults_apply_to_compositions(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    url = f"{csim.api_base_url}{COMPOSITIONS}"
    comp_id = next(iter(csim.compositions))
    csim.faults.list_throttle_rate = 1.0
    csim.faults.throttle_reset_seconds = 0
    status, body = await comp_page(http, csim)
    assert status == 429 and body["message"].startswith("Too many requests")
    assert csim.injected["list:throttle"] == 1
    status, _ = await comp_page(http, csim, **{"page[size]": "0"})
    assert status == 422  # validation first
    csim.faults.list_throttle_rate = 0.0
    csim.faults.list_error_rate = 1.0
    assert (await comp_page(http, csim))[0] in (500, 502, 503)
    csim.faults.list_error_rate = 0.0
    csim.faults.page_malformed_rate = 1.0
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200
        text = await r.text()
    with contextlib.suppress(ValueError):
        assert not isinstance(json.loads(text).get("data"), list)
    assert csim.injected["list:malformed"] == 1
    csim.faults.page_malformed_rate = 0.0
    csim.faults.list_redirect_to = "https://elsewhere.example/v2/room_compositions"
    async with http.get(url, headers=AUTH, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == csim.faults.list_redirect_to
    csim.faults.list_redirect_to = None
    csim.faults.retrieve_throttle_rate = 1.0
    assert (await checked(http, csim, "GET", f"{COMPOSITIONS}/{comp_id}"))[0] == 429
    csim.faults.retrieve_throttle_rate = 0.0
    csim.faults.delete_error_rate = 1.0
    assert (await checked(http, csim, "DELETE", f"{COMPOSITIONS}/{comp_id}"))[0] >= 500
    assert comp_id in csim.compositions
    csim.faults.delete_error_rate = 0.0
    # Scripted answers: the routes name both resources.
    csim.script(
        ScriptedAnswer(409, route="retrieve"),
        ScriptedAnswer(503, {"retry-after-ms": "250"}, route="list"),
        ScriptedAnswer(500, route="delete"),
    )
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 503 and r.headers["retry-after-ms"] == "250"
    assert (await checked(http, csim, "GET", f"{COMPOSITIONS}/{comp_id}"))[0] == 409
    assert (await checked(http, csim, "DELETE", f"{COMPOSITIONS}/{comp_id}"))[0] == 500
    assert csim.injected["list:scripted"] == csim.injected["retrieve:scripted"] == 1
    assert (await checked(http, csim, "DELETE", f"{COMPOSITIONS}/{comp_id}"))[0] == 204


async def test_listing_faults_apply_to_compositions(
    csim: Simulator, http: aiohttp.ClientSession
) -> None:
    csim.faults.omit_meta = True
    _, body = await comp_page(http, csim, **{"page[size]": "10", "page[number]": "2"})
    assert set(body) == {"data"} and len(body["data"]) == 10
    csim.faults.omit_meta = False
    csim.faults.repeat_page = True
    csim.faults.total_pages_override = 10**9
    _, first = await comp_page(http, csim, **{"page[size]": "10", "page[number]": "1"})
    _, later = await comp_page(http, csim, **{"page[size]": "10", "page[number]": "4"})
    assert [e["id"] for e in later["data"]] == [e["id"] for e in first["data"]]
    assert later["meta"]["total_pages"] == 10**9
    csim.faults.repeat_page = False
    csim.faults.total_pages_override = None
    session = next(iter(csim.compositions.values())).session_id
    csim.faults.ignore_filters = True
    got = await comp_all(http, csim, **{"filter[session_id]": session, "page[size]": "250"})
    assert len(got) == 45
    assert (await comp_page(http, csim, **{"filter[session_id]": "nope"}))[0] == 422
    csim.faults.ignore_filters = False
    # Expired list URLs; a retrieve gives a fresh one.
    csim.faults.expired_first_url_rate = 1.0
    _, body = await comp_page(http, csim, **{"filter[status]": "completed", "page[size]": "1"})
    listed = body["data"][0]
    async with http.get(listed["download_url"]) as r:
        assert r.status == 403
    _, one = await checked(http, csim, "GET", f"{COMPOSITIONS}/{listed['id']}")
    async with http.get(one["data"]["download_url"]) as r:
        assert r.status == 200
    csim.faults.expired_first_url_rate = 0.0
    # A page shift inserts compositions newer than the newest match, of the same session.
    before = newest_created_first(list(csim.compositions.values()))
    csim.faults.shift_on_page = 2
    seen = await comp_all(http, csim, **{"page[size]": "10"})
    assert len(csim.shifted_ids) == 3 and seen[10:13] == before[7:10]
    shifted = [csim.compositions[i] for i in csim.shifted_ids]
    assert all(c.status == "completed" and c.session_id == shifted[0].session_id for c in shifted)
    again = await comp_all(http, csim, **{"page[size]": "10"})
    assert again[:3] == csim.shifted_ids[::-1]


async def test_download_faults_apply_to_compositions(
    csim: Simulator, http: aiohttp.ClientSession, raw: aiohttp.ClientSession
) -> None:
    comp = max(
        (c for c in csim.compositions.values() if c.status == "completed"), key=lambda c: c.size
    )
    csim.faults.truncate_rate = 1.0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(csim.download_url(comp.id)) as r:
            await asyncio.wait_for(r.read(), timeout=5)
    assert csim.download_truncations[comp.id] == 1 and csim.download_completions[comp.id] == 0
    csim.faults.truncate_rate = 0.0
    csim.faults.ignore_range = True
    async with http.get(csim.download_url(comp.id), headers={"Range": "bytes=10-"}) as r:
        assert r.status == 200 and len(await r.read()) == comp.size
    csim.faults.ignore_range = False
    comp.download_fault = DownloadFault.HTML
    async with raw.get(csim.download_url(comp.id)) as r:
        assert r.content_type == "text/html" and len(await read(r)) == 81
    assert csim.injected["download:html"] == 1
    comp.download_fault = DownloadFault.GZIP
    async with raw.get(csim.download_url(comp.id)) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await read(r)) == content_bytes(comp)
    comp.download_fault = None
    csim.point_download_url(comp.id, csim.echo_url)
    _, body = await checked(http, csim, "GET", f"{COMPOSITIONS}/{comp.id}")
    assert body["data"]["download_url"] == csim.echo_url
    csim.point_download_url(comp.id, None)
    assert csim.download_completions[comp.id] == 1  # the whole 200 of ignore_range
    csim.faults.slow_chunk_delay = 0.02
    async with http.get(csim.download_url(comp.id)) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == csim.expected_sha256(comp.id)
    assert csim.injected["download:slow"] == 1


def test_standalone_cli_serves_compositions() -> None:
    argv = ["--count", "2", "--compositions", "3", "--api-key", KEY]
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver.simulator", *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[3].split() == ["Recordings:", "2"]
        assert lines[4].split() == ["Compositions:", "3"]
        api = lines[0].split()[-1]

        async def listed() -> Any:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{api}{COMPOSITIONS}", headers=AUTH) as r,
            ):
                return await r.json()

        body = asyncio.run(listed())
        assert body["meta"]["total_results"] == 3
        assert {e["status"] for e in body["data"]} == {"completed"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
