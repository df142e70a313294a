"""Compliance features end to end, in-process, against the simulator: verify, manifest, the audit
chain, reconcile, and delete at source (only after a verified copy, by id, exactly once)."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from archiver.cli import main
from archiver.config import Settings, load_settings
from archiver.filters import Filters
from archiver.ledger import open_ledger
from archiver.manifest import COLUMNS
from archiver.models import LedgerRow, Recording, StoredObject
from archiver.purge import SourceDeleter
from archiver.service import BackfillResult as RunReport
from archiver.service import backfill, make_engine, open_services
from archiver.simulator import Faults, Simulator, add_hostile_entries, make_recordings
from archiver.sources import RECORDINGS
from archiver.storage.base import Capabilities, ObjectInfo
from archiver.telnyx import TelnyxClient
from tests.conftest import API_KEY, KEY_ENV, make_settings, write_config

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(capsys, monkeypatch) -> Iterator[Cli]:
    """``archiver.cli.main`` in a thread (it calls ``asyncio.run``): (exit code, stdout, stderr)."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    monkeypatch.delenv("ARCHIVER_CONFIG", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    async def run_cli(config: Path, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        argv = ["--config", str(config), "--log-level", "error", *args]
        code = await asyncio.to_thread(main, argv)
        out, err = capsys.readouterr()
        return code, out, err

    yield run_cli
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


async def archive(settings: Settings) -> RunReport:
    async with open_services(settings) as services:
        return await backfill(services, Filters(), make_engine(services))


async def ledger_rows(settings: Settings) -> dict[str, LedgerRow]:
    async with open_ledger(path=settings.ledger.path) as ledger:
        return {row.id: row async for row in ledger.iter_archived()}


async def audit_actions(settings: Settings) -> list[tuple[int, str, str | None]]:
    async with open_ledger(path=settings.ledger.path) as ledger:
        return [(e.seq, e.action, e.recording_id) async for e in ledger.iter_audit()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"x")


# -- verify -----------------------------------------------------------------------------------


async def test_verify_quick_and_deep(sim_factory, tmp_path, cli):
    recs = make_recordings(6, seed=41, size=(20_000, 60_000))
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)
    config = write_config(sim, tmp_path)
    assert (await archive(settings)).archived == 6

    code, out, _ = await cli(config, "verify")
    assert code == 0 and "6 recordings checked" in out and "0 problem(s)" in out

    rows = await ledger_rows(settings)
    missing, resized, altered = (rows[r.id] for r in recs[:3])
    archive_root = tmp_path / "archive"
    (archive_root / str(missing.storage_key)).unlink()
    grow(archive_root / str(resized.storage_key))
    path = archive_root / str(altered.storage_key)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))

    code, out, _ = await cli(config, "verify")
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert code == 1
    assert len(problems) == 2, out
    assert any(missing.id in p and "missing from the archive" in p for p in problems)
    assert any(resized.id in p and "size is" in p for p in problems)

    code, out, _ = await cli(config, "verify", "--deep")
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert code == 1 and len(problems) == 3, out
    assert any(altered.id in p and "content changed" in p for p in problems)
    assert "verify (deep): 6 recordings checked" in out

    # Each run is in the audit log.
    assert [a for _, a, _ in await audit_actions(settings)].count("verified") == 3


# -- manifest ---------------------------------------------------------------------------------


async def test_manifest_jsonl_csv_and_range(sim_factory, tmp_path, cli):
    recs = make_recordings(12, seed=42, days=6, size=(5_000, 20_000))
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)
    config = write_config(sim, tmp_path)
    await archive(settings)

    code, out, err = await cli(config, "manifest")
    assert code == 0 and "12 recordings" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [tuple(r) for r in records] == [COLUMNS] * 12
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {r.id for r in recs}
    for rec in recs:
        got = by_id[rec.id]
        assert got["sha256"] == sim.expected_sha256(rec.id)
        assert got["size"] == rec.size
        assert (tmp_path / "archive" / got["storage_key"]).is_file()
        assert (got["room_id"], got["session_id"], got["participant_id"]) == (
            rec.room_id,
            rec.session_id,
            rec.participant_id,
        )
        assert rec.ended_at is not None
        assert got["ended_at"] == rec.ended_at.astimezone(UTC).isoformat()
        assert got["archived_at"].endswith("+00:00") and got["started_at"].endswith("+00:00")
        assert got["retain_until"] is None and got["deleted_at_source"] is None
    # Ordered by end time.
    assert [r["ended_at"] for r in records] == sorted(r["ended_at"] for r in records)

    target = tmp_path / "out" / "manifest.csv"
    target.parent.mkdir()
    code, out, _ = await cli(config, "manifest", "--format", "csv", "--output", str(target))
    assert code == 0 and out == ""
    assert [p.name for p in target.parent.iterdir()] == ["manifest.csv"]  # no temp file left
    reader = csv.DictReader(io.StringIO(target.read_text()))
    assert tuple(reader.fieldnames or ()) == COLUMNS
    rows = list(reader)
    assert {row["id"]: row["sha256"] for row in rows} == {k: v["sha256"] for k, v in by_id.items()}
    assert all(row["retain_until"] == "" for row in rows)

    # --since/--until are whole UTC days, both inclusive.
    days = sorted({r.ended_at.astimezone(UTC).date() for r in recs if r.ended_at})
    day = days[len(days) // 2]
    code, out, _ = await cli(config, "manifest", "--since", str(day), "--until", str(day))
    expected = {r.id for r in recs if r.ended_at and r.ended_at.astimezone(UTC).date() == day}
    assert code == 0 and {json.loads(line)["id"] for line in out.splitlines()} == expected
    code, out, _ = await cli(config, "manifest", "--format", "csv", "--since", str(day))
    expected = {r.id for r in recs if r.ended_at and r.ended_at.astimezone(UTC).date() >= day}
    assert {row["id"] for row in csv.DictReader(io.StringIO(out))} == expected
    code, _, err = await cli(config, "manifest", "--since", str(days[-1]), "--until", str(days[0]))
    assert code == 2 and "--since is after --until" in err


# -- audit chain ------------------------------------------------------------------------------


async def test_audit_chain_verifies_and_detects_tampering(sim_factory, tmp_path, cli):
    recs = make_recordings(5, seed=43, size=(5_000, 20_000))
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)
    config = write_config(sim, tmp_path)
    await archive(settings)
    entries = await audit_actions(settings)
    archived_entries = [seq for seq, action, _ in entries if action == "archived"]
    assert len(archived_entries) == 5

    code, out, _ = await cli(config, "audit", "verify")
    async with open_ledger(path=settings.ledger.path) as ledger:
        head = [e async for e in ledger.iter_audit()][-1]
    assert code == 0, out
    assert f"{len(entries)} entries checked, 0 problem(s)" in out
    assert head.hash in out

    code, out, _ = await cli(config, "audit", "export")
    exported = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["seq"] for e in exported] == [seq for seq, _, _ in entries]
    assert exported[-1]["hash"] == head.hash

    db = tmp_path / "ledger.db"
    edited = archived_entries[1]
    with sqlite3.connect(db) as conn:
        (original,) = conn.execute("SELECT details FROM audit WHERE seq = ?", (edited,)).fetchone()
        details = json.loads(original)
        details["size"] += 1
        conn.execute("UPDATE audit SET details = ? WHERE seq = ?", (json.dumps(details), edited))
    conn.close()
    code, out, _ = await cli(config, "audit", "verify")
    assert code == 1
    assert f"PROBLEM entry {edited}: content does not match its hash (edited)" in out

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET details = ? WHERE seq = ?", (original, edited))
    conn.close()
    assert (await cli(config, "audit", "verify"))[0] == 0

    removed = archived_entries[2]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (removed,))
    conn.close()
    code, out, _ = await cli(config, "audit", "verify")
    assert code == 1
    assert f"PROBLEM entry {removed + 1}: expected sequence {removed} (entry missing)" in out
    assert f"PROBLEM entry {removed + 1}: does not chain to the entry before it" in out


# -- reconcile --------------------------------------------------------------------------------


async def test_reconcile_reports_each_category(sim_factory, tmp_path, cli):
    recs = make_recordings(10, seed=44, days=3, size=(5_000, 20_000))
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)
    config = write_config(sim, tmp_path)
    await archive(settings)

    code, out, _ = await cli(config, "reconcile")
    assert code == 0 and "reconcile: ok" in out, out

    gone, resized, ours = recs[0], recs[1], recs[2]
    async with TelnyxClient(settings.telnyx) as api:
        await api.delete(gone.id)
        await api.delete(ours.id)
    async with open_ledger(path=settings.ledger.path) as ledger:
        await ledger.mark_deleted_at_source(ours.id)
    resized.entry_hook = lambda e: {**e, "size_mb": 50.0}
    new = make_recordings(1, seed=45, start=recs[3].ended_at, days=1)[0]
    sim.add([new])

    code, out, _ = await cli(config, "reconcile", "--json")
    doc = json.loads(out)
    assert code == 1
    assert [m["id"] for m in doc["missing"]] == [new.id]
    assert doc["missing"][0]["ledger_state"] is None
    assert [g["id"] for g in doc["gone"]] == [gone.id]
    assert [g["id"] for g in doc["deleted_by_us"]] == [ours.id]
    assert [(s["id"], s["telnyx_size_mb"]) for s in doc["size_mismatches"]] == [(resized.id, 50.0)]
    assert doc["listed"] == 9 and doc["archived"] == 10 and doc["ok"] is False

    code, out, _ = await cli(config, "reconcile")
    assert code == 1
    for title, rid in (
        ("in Telnyx, completed, not archived (1):", new.id),
        ("archived, no longer in Telnyx (1):", gone.id),
        ("size mismatch (Telnyx size_mb | archived bytes) (1):", resized.id),
    ):
        assert title in out and rid in out.split(title, 1)[1].splitlines()[1], out

    # A range: the listing asks for it and the ledger side is cut to the same days.
    assert new.ended_at is not None
    day = new.ended_at.astimezone(UTC).date()
    code, out, _ = await cli(
        config, "reconcile", "--json", "--since", str(day), "--until", str(day)
    )
    doc = json.loads(out)
    lists = [r for r in sim.api_requests if r.method == "GET" and r.path == "/v2/room_recordings"]
    query = lists[-1].query
    assert query["filter[date_ended_at][gte]"] == query["filter[date_ended_at][lte]"] == str(day)
    in_day = [r for r in recs if r.ended_at and r.ended_at.astimezone(UTC).date() == day]
    assert doc["archived"] == len(in_day)
    assert [m["id"] for m in doc["missing"]] == [new.id]


# -- delete at source -------------------------------------------------------------------------


class WatchingSimulator(Simulator):
    """Records, at the moment each DELETE arrives, what the ledger and the archive hold then."""

    ledger_path: Path
    archive_root: Path

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen_at_delete: dict[str, dict[str, Any]] = {}

    async def _handle_delete(self, request: web.Request, res: Any) -> web.StreamResponse:
        rid = request.match_info["id"]
        conn = sqlite3.connect(self.ledger_path, timeout=10)
        try:
            row = conn.execute(
                "SELECT state, storage_key, sha256 FROM recordings WHERE id = ?", (rid,)
            ).fetchone()
            audit = conn.execute(
                "SELECT count(*) FROM audit WHERE action = 'archived' AND recording_id = ?", (rid,)
            ).fetchone()[0]
        finally:
            conn.close()
        stored = self.archive_root / row[1] if row and row[1] else None
        self.seen_at_delete.setdefault(
            rid,
            {
                "state": row and row[0],
                "ledger_sha": row and row[2],
                "file_sha": sha(stored) if stored and stored.is_file() else None,
                "archived_audit": audit,
            },
        )
        return await super()._handle_delete(request, res)


async def test_delete_at_source_only_after_a_verified_copy(tmp_path):
    recs = make_recordings(30, seed=46, size=(20_000, 150_000))
    async with WatchingSimulator(recs, api_key=API_KEY, faults=Faults(truncate_rate=0.3)) as sim:
        sim.ledger_path, sim.archive_root = tmp_path / "ledger.db", tmp_path / "archive"
        hostile = add_hostile_entries(sim)
        settings = make_settings(
            sim,
            tmp_path,
            source__delete_after_archive=True,
            workers__max_attempts=1,
            workers__transfer_attempts=1,
            telnyx__page_size=10,
        )
        report = await archive(settings)
        rows = await ledger_rows(settings)
        async with open_ledger(path=settings.ledger.path) as ledger:
            failed = {row.id for row in await ledger.failures(limit=1000)}

        good = {r.id for r in recs}
        assert report.failed and failed & good, "truncations should fail some copies"
        assert set(rows) == good - failed
        assert len(sim.deleted_ids) == len(set(sim.deleted_ids)) == len(rows)
        assert set(sim.deleted_ids) == set(rows)
        assert not failed & set(sim.deleted_ids)
        assert str(hostile[5]) in failed and str(hostile[5]) not in sim.deleted_ids
        assert str(hostile[4]) not in sim.deleted_ids
        assert sim.bulk_delete_calls == []
        deletes = [r for r in sim.api_requests if r.method == "DELETE"]
        assert {r.path for r in deletes} == {f"/v2/room_recordings/{rid}" for rid in rows}

        # When each DELETE arrived, the copy was archived, audited and whole.
        for rid in rows:
            seen = sim.seen_at_delete[rid]
            assert seen["state"] == "archived" and seen["archived_audit"] == 1, rid
            assert seen["file_sha"] == seen["ledger_sha"] == sim.expected_sha256(rid), rid
            assert rows[rid].deleted_at_source is not None
        entries = await audit_actions(settings)
        archived_at = {rid: seq for seq, action, rid in entries if action == "archived"}
        deleted_at = {rid: seq for seq, action, rid in entries if action == "deleted_at_source"}
        assert set(deleted_at) == set(rows)
        assert all(archived_at[rid] < deleted_at[rid] for rid in rows)

        # Another run deletes nothing more: failed copies stay at the source.
        await archive(settings)
        assert len(sim.deleted_ids) == len(rows) and sim.bulk_delete_calls == []


async def test_failed_delete_is_retried_on_the_next_run(sim_factory, tmp_path, cli):
    recs = make_recordings(5, seed=47, size=(5_000, 20_000))
    sim: Simulator = await sim_factory(recs, Faults(delete_error_rate=1.0))
    settings = make_settings(
        sim, tmp_path, source__delete_after_archive=True, telnyx__max_attempts=2
    )
    report = await archive(settings)
    assert report.archived == 5 and sim.deleted_ids == []
    assert all(row.deleted_at_source is None for row in (await ledger_rows(settings)).values())

    sim.faults.delete_error_rate = 0.0
    await archive(settings)
    assert sorted(sim.deleted_ids) == sorted(r.id for r in recs)
    assert sim.bulk_delete_calls == []

    config = write_config(sim, tmp_path)
    code, out, _ = await cli(config, "reconcile", "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["deleted_by_us"]) == 5 and doc["gone"] == []


async def test_purge_and_dry_runs_keep_what_is_not_verified(sim_factory, tmp_path, cli):
    recs = make_recordings(8, seed=48, size=(5_000, 20_000))
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path)  # archived before delete_after_archive was on
    await archive(settings)
    rows = await ledger_rows(settings)
    missing, resized = rows[recs[0].id], rows[recs[1].id]
    (tmp_path / "archive" / str(missing.storage_key)).unlink()
    grow(tmp_path / "archive" / str(resized.storage_key))
    intact = {r.id for r in recs[2:]}

    off = write_config(sim, tmp_path)
    code, _, err = await cli(off, "purge")
    assert code == 2 and "delete_after_archive is false" in err
    on = write_config(sim, tmp_path, "\n[source]\ndelete_after_archive = true\n")

    for args in (("backfill", "--dry-run"), ("purge", "--dry-run")):
        code, out, _ = await cli(on, *args)
        would = {line.split()[4] for line in out.splitlines() if line.startswith("would delete")}
        assert code == 0 and would == intact, out
        assert f"would keep at source {missing.id}: missing from the archive" in out
        assert f"would keep at source {resized.id}: size is" in out
    assert sim.deleted_ids == [] and not [r for r in sim.api_requests if r.method == "DELETE"]

    code, out, _ = await cli(on, "purge")
    assert code == 1 and "6 deleted at source, 2 kept" in out, out
    assert set(sim.deleted_ids) == intact
    code, out, _ = await cli(on, "purge")
    assert code == 1 and "0 deleted at source, 2 kept" in out
    assert len(sim.deleted_ids) == 6 and sim.bulk_delete_calls == []
    after = await ledger_rows(settings)
    assert {rid for rid, row in after.items() if row.deleted_at_source} == intact
    deleted_entries = [
        rid for _, a, rid in await audit_actions(settings) if a == "deleted_at_source"
    ]
    assert sorted(deleted_entries) == sorted(intact)


class LockedStorage:
    """Answers ``stat`` and ``read`` as a bucket with Object Lock would: all the deleter asks of
    storage (the lock's own rules are proven on a real SeaweedFS in test_s3.py)."""

    capabilities = Capabilities(name="locked", object_lock=True)

    def __init__(self) -> None:
        self.objects: dict[str, ObjectInfo] = {}
        self.data: dict[str, bytes] = {}

    async def stat(self, key: str) -> ObjectInfo | None:
        return self.objects.get(key)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        yield self.data[key]


class RecordedDeletes:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def delete(self, recording_id: str, source: str = RECORDINGS) -> None:
        self.ids.append(recording_id)


async def test_no_delete_at_source_without_object_lock_retention(tmp_path):
    settings = load_settings(
        env={}, overrides={"source.delete_after_archive": True}, read_files=False
    )
    until = datetime(2032, 1, 1, tzinfo=UTC)
    storage, api = LockedStorage(), RecordedDeletes()
    # (id, retention the commit reported, retention the object reports now)
    cases = [("locked", until, until), ("never-locked", None, None), ("lock-gone", until, None)]
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        await ledger.observe([Recording(id=rid) for rid, _, _ in cases])
        for rid, committed, now in cases:
            data = b"OggS" + rid.encode().ljust(60, b"\0")  # shaped like a recording
            digest = hashlib.sha256(data).hexdigest()
            await ledger.claim(rid, owner="t", lease_seconds=30)
            stored = StoredObject(key=rid, size=len(data), sha256=digest, retain_until=committed)
            assert await ledger.complete(rid, owner="t", stored=stored)
            storage.data[rid] = data
            storage.objects[rid] = ObjectInfo(
                key=rid, size=len(data), sha256=digest, retain_until=now
            )
        deleter = SourceDeleter(api=api, ledger=ledger, storage=storage, settings=settings)
        report = await deleter.sweep()
        marked = {rid for rid, _, _ in cases if (await ledger.get(rid)).deleted_at_source}
    assert api.ids == report.deleted == ["locked"] and marked == {"locked"}
    assert "not applied" in report.kept["never-locked"]
    assert "reports no Object Lock retention" in report.kept["lock-gone"]
