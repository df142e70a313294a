"""Tests for the in-process Telnyx API simulator, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from archiver.simulator import (
    BLOCK_SIZE,
    Faults,
    SimRecording,
    Simulator,
    add_hostile_entries,
    content_bytes,
    content_sha256,
    iter_content,
    make_recordings,
)

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


async def list_page(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> tuple[int, Any]:
    async with http.get(f"{sim.api_base_url}/room_recordings", params=params, headers=AUTH) as r:
        return r.status, await r.json()


async def list_all(http: aiohttp.ClientSession, sim: Simulator, **params: str) -> list[str]:
    ids: list[str] = []
    number = 1
    while True:
        status, body = await list_page(http, sim, **params, **{"page[number]": str(number)})
        assert status == 200
        ids += [e["id"] for e in body["data"]]
        if number >= body["meta"]["total_pages"]:
            return ids
        number += 1


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
    ("filter[duration_secs][eq]", lambda r: r.duration_secs, "eq"),
    ("filter[duration_secs][gte]", lambda r: r.duration_secs, "gte"),
    ("filter[duration_secs][lte]", lambda r: r.duration_secs, "lte"),
]
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "gte": lambda a, b: a >= b,
    "lte": lambda a, b: a <= b,
}


@pytest.mark.parametrize(("key", "getter", "op"), FILTERS, ids=[f[0] for f in FILTERS])
async def test_filters(
    sim: Simulator,
    http: aiohttp.ClientSession,
    key: str,
    getter: Callable[[SimRecording], Any],
    op: str,
) -> None:
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
    recs[0].status, recs[0].completed_at, recs[0].processing_lists_left = "processing", None, 2
    async with Simulator(recs) as sim:
        _, body = await list_page(http, sim, **{"filter[status]": "processing"})
        assert [e["id"] for e in body["data"]] == [recs[0].id]
        assert body["data"][0]["download_url"] is None
        assert body["data"][0]["completed_at"] is None
        # A list that does not show it does not advance it.
        await list_page(http, sim, **{"filter[status]": "completed"})
        assert recs[0].processing_lists_left == 1
        _, body = await list_page(http, sim)
        entry = next(e for e in body["data"] if e["id"] == recs[0].id)
        assert entry["status"] == "processing"  # shown as it was, then it completes
        _, body = await list_page(http, sim, **{"filter[status]": "completed"})
        entry = next(e for e in body["data"] if e["id"] == recs[0].id)
        assert entry["download_url"] and entry["completed_at"].endswith("Z")


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"page[size]": "0"}, "page[size]"),
        ({"page[size]": "251"}, "page[size]"),
        ({"page[size]": "ten"}, "page[size]"),
        ({"page[number]": "0"}, "page[number]"),
        ({"filter[date_ended_at][gte]": "2025-13-01"}, "filter[date_ended_at][gte]"),
        ({"filter[date_started_at][eq]": "2025-01-01T00:00:00Z"}, "filter[date_started_at][eq]"),
        ({"filter[duration_secs][lte]": "1.5"}, "filter[duration_secs][lte]"),
        ({"filter[colour]": "red"}, "filter[colour]"),
        ({"filter[date_ended_at][gt]": "2025-01-01"}, "filter[date_ended_at][gt]"),
    ],
)
async def test_bad_request(
    sim: Simulator, http: aiohttp.ClientSession, params: dict[str, str], parameter: str
) -> None:
    status, body = await list_page(http, sim, **params)
    assert status == 400
    err = body["errors"][0]
    assert err["code"] == "10015" and err["title"] == "Bad Request"
    assert parameter in err["detail"]


async def test_page_size_bounds_accepted(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for size in ("1", "250"):
        status, _ = await list_page(http, sim, **{"page[size]": size})
        assert status == 200


async def test_auth(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.api_base_url}/room_recordings"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        async with http.get(url, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["errors"][0]["code"] == "10009"
    rec_id = next(iter(sim.recordings))
    async with http.delete(f"{url}/{rec_id}") as r:
        assert r.status == 401
    assert rec_id in sim.recordings
    assert len(sim.api_requests) == 4
    assert "Authorization" not in sim.api_requests[0].headers
    assert sim.api_requests[1].headers["authorization"] == "Bearer nope"


async def test_requests_recorded_with_encoding(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await list_page(http, sim, **{"filter[room_id]": "x y", "page[size]": "5"})
    req = sim.api_requests[-1]
    assert req.method == "GET" and req.path == "/v2/room_recordings"
    assert req.query["filter[room_id]"] == "x y"
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
            assert (await r.json())["errors"][0]["code"] == "10005"
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
            assert (await r.json())["errors"][0]["code"] == "10011"
            retry_after.append(r.headers.get("Retry-After"))
    assert "0" in retry_after and None in retry_after
    sim.faults.throttle_reset_seconds = 1
    async with http.get(f"{sim.api_base_url}/room_recordings", headers=AUTH) as r:
        assert r.headers["x-ratelimit-reset"] == "1"
    # Validation still comes first: a bad request is never throttled.
    status, _ = await list_page(http, sim, **{"page[size]": "0"})
    assert status == 400


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
