"""The core path end to end, in-process, against the simulator over real loopback HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from archiver.errors import NetworkError
from archiver.filters import Filters
from archiver.ledger import open_ledger
from archiver.models import State
from archiver.service import BackfillResult as RunReport
from archiver.service import backfill, make_engine, open_services
from archiver.simulator import Faults, Simulator, add_hostile_entries, make_recordings
from archiver.verify import verify_archive
from tests.conftest import API_KEY, make_settings


async def run(settings, filters: Filters | None = None) -> RunReport:  # type: ignore[no-untyped-def]
    async with open_services(settings) as services:
        engine = make_engine(services)
        return await backfill(services, filters or Filters(), engine)


def archived_files(root: Path) -> dict[str, Path]:
    """Recording files in the archive by id (sidecars and temp files excluded)."""
    out: dict[str, Path] = {}
    for path in (root / "archive").rglob("*"):
        if path.is_file() and not path.name.endswith((".json", ".partial")):
            out[path.stem] = path
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_backfill_under_faults_archives_everything_once(sim_factory, tmp_path):
    recs = make_recordings(150, seed=11, size=(10_000, 300_000))
    faults = Faults(
        list_error_rate=0.05,
        list_throttle_rate=0.05,
        throttle_reset_seconds=0.05,
        error_shapes_mixed=True,
        truncate_rate=0.1,
        expired_first_url_rate=0.2,
        page_malformed_rate=0.03,
    )
    sim: Simulator = await sim_factory(recs, faults)
    # Small pages: many list calls (60-90 over the passes), so the list faults show up.
    settings = make_settings(sim, tmp_path, telnyx__page_size=5)

    report = await run(settings)

    assert report.all_archived, report.failed
    assert report.archived == len(recs)
    files = archived_files(tmp_path)
    assert set(files) == {r.id for r in recs}
    for rec in recs:
        assert sha(files[rec.id]) == sim.expected_sha256(rec.id)
        # Downloaded to completion exactly once, whatever was truncated or expired on the way.
        assert sim.download_completions[rec.id] == 1, rec.id
    assert sim.injected["download:truncate"] > 0
    assert sim.injected["list:throttle"] + sim.injected["list:error"] > 0
    # Each file has its sidecar, without the presigned URL.
    sidecar = json.loads(files[recs[0].id].with_name(files[recs[0].id].name + ".json").read_text())
    assert sidecar["archive"]["sha256"] == sim.expected_sha256(recs[0].id)
    assert "download_url" not in sidecar["recording"]
    # The key never went to the download host.
    assert all("Authorization" not in r.headers for r in sim.download_requests)
    assert not any(API_KEY in r.raw_path for r in sim.download_requests)

    async with open_services(settings, api=False) as services:
        check = await verify_archive(services.ledger, services.storage, deep=True, sidecars=True)
    assert check.ok and check.checked == len(recs)

    # A second run downloads nothing.
    before = len(sim.download_requests)
    again = await run(settings)
    assert again.archived == 0 and again.all_archived
    assert len(sim.download_requests) == before


async def test_page_shift_loses_nothing(sim_factory, tmp_path):
    recs = make_recordings(60, seed=3)
    sim: Simulator = await sim_factory(recs, Faults(shift_on_page=2, shift_count=5))
    report = await run(make_settings(sim, tmp_path, telnyx__page_size=10))
    assert len(sim.shifted_ids) == 5
    assert report.all_archived
    assert set(archived_files(tmp_path)) == set(sim.recordings)
    assert report.passes >= 2


async def test_processing_recordings_are_archived_when_they_complete(sim_factory, tmp_path):
    recs = make_recordings(30, seed=5, processing=4)
    for rec in recs:
        if rec.status == "processing":
            rec.processing_lists_left = 2
    sim: Simulator = await sim_factory(recs)
    report = await run(make_settings(sim, tmp_path, telnyx__page_size=10))
    assert report.all_archived
    assert set(archived_files(tmp_path)) == {r.id for r in recs}


async def test_processing_forever_is_owed_not_failed(sim_factory, tmp_path):
    recs = make_recordings(10, seed=6, processing=2)
    for rec in recs:
        if rec.status == "processing":
            rec.processing_lists_left = 0  # never completes
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)
    report = await run(settings)
    # Still processing after the wait: not done, and not a failure either.
    processing = {r.id for r in recs if r.status == "processing"}
    assert report.archived == 8 and not report.all_archived and report.exit_code == 1
    assert set(report.tally.processing) == processing and not report.failed
    async with open_ledger(path=settings.ledger.path) as ledger:
        pending = [r.id for r in recs if r.status == "processing"]
        for rid in pending:
            row = await ledger.get(rid)
            assert row is not None and row.state is State.PENDING


async def test_server_ignoring_range_restarts_from_zero(sim_factory, tmp_path):
    recs = make_recordings(20, seed=8, size=(200_000, 400_000))
    sim: Simulator = await sim_factory(recs, Faults(truncate_rate=0.3, ignore_range=True))
    report = await run(make_settings(sim, tmp_path))
    assert report.all_archived
    files = archived_files(tmp_path)
    for rec in recs:
        assert sha(files[rec.id]) == sim.expected_sha256(rec.id)
        assert sim.download_completions[rec.id] == 1


async def test_hostile_entries_fail_alone_and_nothing_escapes(sim_factory, tmp_path):
    recs = make_recordings(20, seed=9)
    sim: Simulator = await sim_factory(recs)
    hostile = add_hostile_entries(sim)
    settings = make_settings(sim, tmp_path, workers__transfer_attempts=2, workers__max_attempts=2)
    outside_before = sorted(p.name for p in tmp_path.parent.iterdir())

    report = await run(settings)

    assert not report.all_archived
    files = archived_files(tmp_path)
    assert {r.id for r in recs} <= set(files)
    # Everything written is under the archive root or is the ledger.
    for path in tmp_path.rglob("*"):
        rel = path.relative_to(tmp_path)
        assert rel.parts[0] in (
            "archive",
            "ledger.db",
            "ledger.db-wal",
            "ledger.db-shm",
            "ledger.db.lock",
        ), rel
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside_before
    async with open_ledger(path=settings.ledger.path) as ledger:
        failures = {row.id: row.last_error or "" for row in await ledger.failures(limit=100)}
    for bad in ("../../etc/passwd", "a/b", "späce ünïcode 🎙 rec"):
        assert bad in failures and "unsafe id" in failures[bad]
    file_url_id = str(hostile[4])
    assert "scheme" in failures[file_url_id]
    unreachable_id = str(hostile[5])
    assert unreachable_id in failures
    malformed = [rid for rid in failures if rid.startswith("malformed-")]
    assert len(malformed) >= 4  # missing id, int id, a string entry, a null entry
    # A second run leaves good recordings alone and reports the same failures.
    before = sum(sim.download_completions.values())
    await run(settings)
    assert sum(sim.download_completions[r.id] for r in recs) == len(recs)
    assert sum(sim.download_completions.values()) >= before


async def test_every_filter_is_encoded(sim_factory, tmp_path):
    from datetime import date

    recs = make_recordings(5, seed=1)
    sim: Simulator = await sim_factory(recs)
    filters = Filters(
        date_ended_at_eq=date(2025, 1, 2),
        date_ended_at_gte=date(2025, 1, 1),
        date_ended_at_lte=date(2025, 1, 31),
        date_started_at_eq=date(2025, 1, 2),
        date_started_at_gte=date(2025, 1, 1),
        date_started_at_lte=date(2025, 1, 31),
        room_id=recs[0].room_id,
        participant_id=recs[0].participant_id,
        session_id=recs[0].session_id,
        status="completed",
        type="audio",
        duration_secs_eq=10,
        duration_secs_lte=100,
        duration_secs_gte=1,
    )
    await run(make_settings(sim, tmp_path), filters)
    query = sim.api_requests[0].query
    assert query["filter[date_ended_at][eq]"] == "2025-01-02"
    assert query["filter[date_ended_at][gte]"] == "2025-01-01"
    assert query["filter[date_ended_at][lte]"] == "2025-01-31"
    assert query["filter[date_started_at][eq]"] == "2025-01-02"
    assert query["filter[date_started_at][gte]"] == "2025-01-01"
    assert query["filter[date_started_at][lte]"] == "2025-01-31"
    assert query["filter[room_id]"] == recs[0].room_id
    assert query["filter[participant_id]"] == recs[0].participant_id
    assert query["filter[session_id]"] == recs[0].session_id
    assert query["filter[status]"] == "completed"
    assert query["filter[type]"] == "audio"
    # The current spec's one duration filter is a minimum; exact and maximum are local only.
    assert query["filter[duration_secs]"] == "1"
    assert not [k for k in query if k.startswith("filter[duration_secs][")]
    assert query["page[size]"] == "250" and query["page[number]"] == "1"
    assert "[" in sim.api_requests[0].raw_path or "%5B" in sim.api_requests[0].raw_path


async def test_filters_select_what_is_archived(sim_factory, tmp_path):
    recs = make_recordings(40, seed=12)
    sim: Simulator = await sim_factory(recs)
    room = recs[0].room_id
    report = await run(make_settings(sim, tmp_path), Filters(room_id=room, type="audio"))
    expected = {r.id for r in recs if r.room_id == room and r.type == "audio"}
    assert report.archived == len(expected) > 0
    assert set(archived_files(tmp_path)) == expected


async def test_key_revoked_mid_run_stops_without_failing_recordings(sim_factory, tmp_path):
    import pytest

    from archiver.errors import AuthError

    recs = make_recordings(6, seed=13)
    sim: Simulator = await sim_factory(recs, Faults(expired_first_url_rate=1.0))

    def revoke(entry: dict) -> dict:  # type: ignore[type-arg]
        sim.api_key = "rotated-key"  # the listing answered; every retrieve after it gets 401
        return entry

    recs[-1].entry_hook = revoke
    settings = make_settings(sim, tmp_path)
    with pytest.raises(BaseExceptionGroup) as stopped:
        await run(settings)
    assert stopped.group_contains(AuthError)
    async with open_ledger(path=settings.ledger.path) as ledger:
        summary = await ledger.summary()
    assert summary.counts[State.ARCHIVED] == 0
    assert summary.permanent_failures == 0


async def test_a_lost_lease_stops_the_transfer_and_stores_nothing(sim_factory, tmp_path):
    import asyncio
    import sqlite3

    recs = make_recordings(1, seed=17, size=2_000_000)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.05))
    settings = make_settings(sim, tmp_path, workers__lease_seconds=0.3)
    rid = recs[0].id

    async def steal() -> None:
        # Wait until the worker holds the row, then hand it to someone else, as an instance
        # whose lease expired during a partition would find it.
        while True:
            await asyncio.sleep(0.05)
            if not settings.ledger.path.exists():
                continue  # never create the ledger: the archiver does
            try:
                with sqlite3.connect(f"file:{settings.ledger.path}?mode=rw", uri=True) as db:
                    moved = db.execute(
                        "UPDATE recordings SET lease_owner = 'thief', "
                        "lease_expires = '2999-01-01T00:00:00.000000+00:00' "
                        "WHERE id = ? AND state = 'in_progress'",
                        (rid,),
                    ).rowcount
            except sqlite3.OperationalError:
                continue  # its schema is still being made, or the file is locked a moment
            if moved:
                return

    thief = asyncio.create_task(steal())
    report = await run(settings)
    await thief
    assert report.archived == 0 and report.counts.skipped >= 1
    # The thief holds it: owed, being archived elsewhere, not reported done.
    assert set(report.tally.in_progress) == {rid} and report.exit_code == 1
    assert sim.download_completions[rid] == 0  # stopped mid-body: not fetched to the end
    assert archived_files(tmp_path) == {}
    assert list((tmp_path / "archive").rglob("*.partial")) == []
    async with open_ledger(path=settings.ledger.path) as ledger:
        row = await ledger.get(rid)
    assert row is not None and row.state is State.IN_PROGRESS and row.lease_owner == "thief"


class _FlakyUpload:
    """A real upload whose second write fails after its chunk was hashed, as an S3 part upload
    cut off by the network does (the digest is fed before the part goes up)."""

    def __init__(self, upload, failures: list[str]) -> None:  # type: ignore[no-untyped-def]
        self._upload = upload
        self._failures = failures
        self._writes = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._upload, name)

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._upload.abort()

    async def write(self, chunk: bytes, *, digest=None) -> None:  # type: ignore[no-untyped-def]
        self._writes += 1
        if self._writes == 2 and self._upload.key not in self._failures:
            self._failures.append(self._upload.key)
            if digest is not None:
                digest.update(chunk)
            raise NetworkError(f"{self._upload.key}: connection reset while sending a part")
        await self._upload.write(chunk, digest=digest)


async def test_a_write_failing_after_its_chunk_was_hashed_records_the_true_hash(
    sim_factory, tmp_path
):
    recs = make_recordings(4, seed=29, size=3_500_000)
    sim: Simulator = await sim_factory(recs, Faults())
    settings = make_settings(sim, tmp_path)
    failures: list[str] = []
    async with open_services(settings) as services:
        real = services.storage

        class FlakyStorage:
            def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
                return getattr(real, name)

            async def begin(self, key: str, *, resume: bool = True):  # type: ignore[no-untyped-def]
                return _FlakyUpload(await real.begin(key, resume=resume), failures)

        flaky = dataclasses.replace(services, storage=FlakyStorage())
        report = await backfill(flaky, Filters(), make_engine(flaky))
    assert report.archived == len(recs) and not report.failed
    assert len(failures) == len(recs)  # every transfer went through the failure once
    files = archived_files(tmp_path)
    async with open_ledger(path=settings.ledger.path) as ledger:
        for rec in recs:
            row = await ledger.get(rec.id)
            assert row is not None and row.sha256 == sha(files[rec.id]), rec.id
    async with open_services(settings, api=False) as services:
        verified = await verify_archive(services.ledger, services.storage, deep=True, sidecars=True)
    assert verified.checked == len(recs) and verified.problems == []


async def test_concurrency_bounds_the_downloads_in_flight(sim_factory, tmp_path):
    # Twice as many workers as downloads: the extra ones claim and commit, never download.
    recs = make_recordings(12, seed=31, size=400_000)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.01, slow_rate=1.0))
    settings = make_settings(sim, tmp_path, workers__concurrency=3)
    report = await run(settings)
    assert report.archived == len(recs)
    assert sim.max_streaming == 3
