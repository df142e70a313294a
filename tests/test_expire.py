"""Retention that ends: ``archiver expire`` deletes exactly the copies past
``retention.delete_after_days``, never a held or locked one, and says so in the ledger, the
audit chain, ``status``, the manifest and ``reconcile``; ``archiver hold`` sets and releases
legal holds. Local disk through the real command; S3 on SeaweedFS, with COMPLIANCE."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from archiver.audit import verify_chain
from archiver.errors import ConfigError
from archiver.expire import Expirer, daily_sweep
from archiver.identity import IDENTITY_KEY
from archiver.ledger import open_ledger
from archiver.models import State, utcnow
from archiver.service import make_storage
from archiver.simulator import SimRecording, Simulator, make_recordings
from archiver.storage.s3 import S3Storage
from tests.conftest import make_settings, write_config
from tests.fixtures_s3 import S3Server
from tests.test_backfill import run
from tests.test_cli import cli

DAYS = 30


def due(recs: list[SimRecording], now: datetime) -> set[str]:
    return {r.id for r in recs if r.ended_at and r.ended_at <= now - timedelta(days=DAYS)}


async def states(ledger_path: Path) -> dict[str, State]:
    async with open_ledger(path=ledger_path) as ledger:
        return {row.id: row.state async for row in ledger.iter_archived(include_expired=True)}


async def test_expire_deletes_exactly_the_copies_past_their_end_and_never_a_held_one(
    sim_factory: Any, tmp_path: Path
) -> None:
    now = utcnow()
    recs = make_recordings(10, seed=151, start=now - timedelta(days=60), days=55)
    sim: Simulator = await sim_factory(recs)
    old = due(recs, now)
    assert 3 <= len(old) <= 8
    config = write_config(sim, tmp_path, f"\n[retention]\ndelete_after_days = {DAYS}\n")
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    archive = tmp_path / "archive"
    files = {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        key_of = {r.id: (await ledger.get(r.id)).storage_key for r in recs}  # type: ignore[union-attr]
    assert all(k in files and f"{k}.json" in files for k in key_of.values())

    held = sorted(old)[0]
    code, out, err = await cli("--config", str(config), "hold", "--id", held, "--reason", "case 7")
    assert code == 0 and f"held {held}" in out, out + err

    # A dry run names what would go and deletes nothing.
    code, out, err = await cli("--config", str(config), "expire", "--dry-run")
    assert code == 0, err
    would = set(re.findall(r"^would delete the copy of (\S+): its retention has ended$", out, re.M))
    assert would == old - {held}, out
    assert f"kept {held}: under a legal hold" in out
    assert all((archive / k).exists() for k in key_of.values())

    code, out, err = await cli("--config", str(config), "expire")
    assert code == 0, out + err
    assert f"expire: {len(old)} archived copies past" in out and f"{len(old) - 1} deleted" in out
    for rid, key in key_of.items():
        gone = rid in old and rid != held
        assert (archive / key).exists() is not gone, rid
        assert (archive / f"{key}.json").exists() is not gone, rid
    assert await states(tmp_path / "ledger.db") == {
        r.id: State.EXPIRED if r.id in old - {held} else State.ARCHIVED for r in recs
    }

    code, out, _ = await cli("--config", str(config), "status")
    assert code == 0 and f"{len(old) - 1} expired" in out and f"held {held}" in out, out
    code, out, _ = await cli("--config", str(config), "audit", "verify")
    assert code == 0 and "0 problem(s)" in out, out
    code, out, _ = await cli("--config", str(config), "audit", "export")
    entries = [json.loads(line) for line in out.splitlines()]
    expired = [e for e in entries if e["action"] == "expired"]
    assert {e["recording_id"] for e in expired} == old - {held}
    assert all(len(e["details"]["removed"]) == 2 for e in expired)  # media and sidecar
    assert [e["recording_id"] for e in entries if e["action"] == "legal_hold"] == [held]

    # The manifest leaves expired rows out unless asked; then it says what they are.
    code, out, _ = await cli("--config", str(config), "manifest", "--format", "csv")
    assert {row["id"] for row in csv.DictReader(io.StringIO(out))} == {r.id for r in recs} - (
        old - {held}
    )
    code, out, _ = await cli("--config", str(config), "manifest", "--include-expired")
    records = {d["id"]: d for d in map(json.loads, out.splitlines())}
    assert set(records) == {r.id for r in recs}
    for rid in old - {held}:
        assert records[rid]["state"] == "expired" and records[rid]["expired_at"]
        assert records[rid]["location"] is None and records[rid]["sha256"]

    # The source still lists them: a backfill does not fetch them again, reconcile knows them.
    downloads = len(sim.download_requests)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0 and len(sim.download_requests) == downloads, err
    code, out, _ = await cli("--config", str(config), "reconcile", "--json")
    report = json.loads(out)
    assert report["ok"] and set(report["expired"]) == old - {held} and not report["missing"]

    # Released, the held copy goes at the next sweep; the chain still verifies.
    code, out, _ = await cli(
        "--config", str(config), "hold", "--id", held, "--release", "--reason", "case closed"
    )
    assert code == 0 and f"released {held}" in out, out
    code, out, _ = await cli("--config", str(config), "expire")
    assert code == 0 and "1 deleted" in out, out
    assert not (archive / key_of[held]).exists()
    code, out, _ = await cli("--config", str(config), "audit", "verify")
    assert code == 0 and "0 problem(s)" in out, out


async def test_expire_without_the_key_and_hold_of_an_unknown_id_exit_2(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim: Simulator = await sim_factory(make_recordings(2, seed=152))
    config = write_config(sim, tmp_path)
    assert (await cli("--config", str(config), "backfill"))[0] == 0
    code, _, err = await cli("--config", str(config), "expire")
    assert code == 2 and "retention.delete_after_days is not set" in err, err
    code, _, err = await cli("--config", str(config), "hold", "--id", "abc", "--reason", "x")
    assert code == 2 and "no recording 'abc'" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"retention__delete_after_days": 0}, "retention.delete_after_days: must be at least 1"),
        (
            {
                "storage__backend": "s3",
                "storage__s3__bucket": "b",
                "storage__s3__object_lock_mode": "COMPLIANCE",
                "storage__s3__retention_days": 90,
                "retention__delete_after_days": 30,
            },
            "is shorter than storage.s3.retention_days (90)",
        ),
    ],
)
def test_retention_settings_that_cannot_be_kept_are_refused(
    tmp_path: Path, extra: dict[str, Any], problem: str
) -> None:
    sim = SimpleNamespace(api_base_url="http://127.0.0.1:9/v2")  # only its URL is read
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        make_settings(sim, tmp_path, **extra)  # type: ignore[arg-type]


async def test_the_daemon_sweeps_once_a_day_across_instances(
    sim_factory: Any, tmp_path: Path
) -> None:
    now = utcnow()
    recs = make_recordings(6, seed=153, start=now - timedelta(days=45), days=40)
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path, retention__delete_after_days=DAYS)
    assert (await run(settings)).all_archived
    old = due(recs, now)
    assert old
    clock = [now]
    async with open_ledger(path=settings.ledger.path) as ledger, make_storage(settings) as storage:
        first = await daily_sweep(ledger, storage, days=DAYS, clock=lambda: clock[0])
        assert first is not None and set(first.expired) == old
        # The same day, another instance (or an hour later, this one): nothing to do.
        clock[0] = now + timedelta(hours=23)
        assert await daily_sweep(ledger, storage, days=DAYS, clock=lambda: clock[0]) is None
        # Ten days on, the recordings that have passed their end since go too.
        clock[0] = now + timedelta(days=10)
        newly = due(recs, clock[0]) - old
        assert newly
        later = await daily_sweep(ledger, storage, days=DAYS, clock=lambda: clock[0])
        assert later is not None and set(later.expired) == newly


async def test_two_sweeps_at_once_expire_each_copy_once(sim_factory: Any, tmp_path: Path) -> None:
    now = utcnow()
    recs = make_recordings(12, seed=155, start=now - timedelta(days=70), days=60)
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path, retention__delete_after_days=DAYS)
    assert (await run(settings)).all_archived
    old = due(recs, now)
    async with open_ledger(path=settings.ledger.path) as ledger, make_storage(settings) as storage:
        one, two = await asyncio.gather(
            Expirer(ledger, storage, days=DAYS).sweep(), Expirer(ledger, storage, days=DAYS).sweep()
        )
        assert not set(one.expired) & set(two.expired)
        assert set(one.expired) | set(two.expired) == old
        entries = [e async for e in ledger.iter_audit() if e.action == "expired"]
    assert sorted(e.recording_id or "" for e in entries) == sorted(old)


# -- S3 ------------------------------------------------------------------------------------------
def s3_settings(sim: Simulator, tmp_path: Path, server: S3Server, prefix: str, locked: bool) -> Any:
    lock = (
        {"storage__s3__object_lock_mode": "COMPLIANCE", "storage__s3__retention_days": 1}
        if locked
        else {}
    )
    return make_settings(
        sim,
        tmp_path,
        storage__backend="s3",
        storage__s3__bucket=server.locked_bucket if locked else server.bucket,
        storage__s3__prefix=prefix,
        storage__s3__endpoint_url=server.endpoint_url,
        storage__s3__region=server.region,
        retention__delete_after_days=DAYS,
        **lock,
    )


def versions(server: S3Server, bucket: str, prefix: str) -> set[str]:
    listing = server.client().list_object_versions(Bucket=bucket, Prefix=prefix)
    found = listing.get("Versions", []) + listing.get("DeleteMarkers", [])
    return {v["Key"][len(prefix) :] for v in found}


async def test_on_s3_every_version_goes_and_a_locked_or_held_copy_stays(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str
) -> None:
    now = utcnow()
    recs = make_recordings(6, seed=154, start=now - timedelta(days=50), days=10, size=4_000)
    sim: Simulator = await sim_factory(recs)

    # A versioned bucket without Object Lock: every version of media and sidecar is deleted.
    plain = s3_settings(sim, tmp_path / "plain", s3_server, s3_prefix + "plain/", locked=False)
    assert (await run(plain)).all_archived
    async with open_ledger(path=plain.ledger.path) as ledger, S3Storage(plain.storage.s3) as st:
        held = recs[0].id
        assert await ledger.hold(held, on=True, reason="case 9")
        assert await st.set_legal_hold(["x.mp4"], True) == 0  # no Object Lock: the ledger's flag
        report = await Expirer(ledger, st, days=DAYS).sweep()
        assert set(report.expired) == {r.id for r in recs} - {held}
        assert report.kept == {held: "under a legal hold"}
        row = await ledger.get(held)
        assert row is not None and row.storage_key is not None
        left = versions(s3_server, s3_server.bucket, s3_prefix + "plain/")
        assert left == {row.storage_key, row.storage_key + ".json", IDENTITY_KEY}
        assert (await verify_chain(ledger.iter_audit())).ok

    # COMPLIANCE for one more day: due by the rule, kept by the lock, nothing deleted.
    locked = s3_settings(sim, tmp_path / "locked", s3_server, s3_prefix + "locked/", locked=True)
    assert (await run(locked)).all_archived
    before = versions(s3_server, s3_server.locked_bucket, s3_prefix + "locked/")
    async with (
        open_ledger(path=locked.ledger.path) as ledger,
        S3Storage(locked.storage.s3) as st,
    ):
        report = await Expirer(ledger, st, days=DAYS).sweep()
        assert report.expired == [] and set(report.kept) == {r.id for r in recs}
        assert all("Object Lock retention until" in why for why in report.kept.values())
        # The storage refuses too, on its own, when asked past the ledger's check: all or nothing.
        row = await ledger.get(recs[1].id)
        assert row is not None and row.storage_key is not None
        removal = await st.remove_copy([row.storage_key, row.storage_key + ".json"], now)
        assert removal.refused is not None and "Object Lock retention" in removal.refused
        assert removal.removed == ()
        # A legal hold on the locked bucket is the object's own, on every version.
        assert await st.set_legal_hold([row.storage_key, row.storage_key + ".json"], True) == 2
        head = s3_server.client().head_object(
            Bucket=s3_server.locked_bucket, Key=s3_prefix + "locked/" + row.storage_key
        )
        assert head["ObjectLockLegalHoldStatus"] == "ON"
        later = now + timedelta(days=3)  # past the lock: the legal hold alone keeps it
        removal = await st.remove_copy([row.storage_key], later)
        assert removal.refused is not None and "legal hold" in removal.refused
        assert await st.set_legal_hold([row.storage_key, row.storage_key + ".json"], False) == 2
        assert await ledger.summary()
    assert versions(s3_server, s3_server.locked_bucket, s3_prefix + "locked/") == before


async def test_repair_does_not_fetch_again_a_copy_whose_retention_has_ended(
    sim_factory: Any, tmp_path: Path
) -> None:
    now = utcnow()
    recs = make_recordings(6, seed=156, start=now - timedelta(days=60), days=55)
    sim: Simulator = await sim_factory(recs)
    old, recent = sorted(due(recs, now)), [r.id for r in recs if r.id not in due(recs, now)]
    assert old and recent
    config = write_config(sim, tmp_path, f"\n[retention]\ndelete_after_days = {DAYS}\n")
    assert (await cli("--config", str(config), "backfill"))[0] == 0
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        keys = {rid: (await ledger.get(rid)).storage_key for rid in (old[0], recent[0])}  # type: ignore[union-attr]
    for key in keys.values():
        (tmp_path / "archive" / str(key)).unlink()
    before = dict(sim.download_completions)
    code, out, err = await cli("--config", str(config), "verify", "--repair")
    # The recent copy is fetched again; the one past its end is left for expire: still a
    # problem until then (exit 1), and never downloaded again.
    assert code == 1, out + err
    assert f"not repaired {old[0]}: its retention has ended" in out, out
    assert sim.download_completions[recent[0]] == before[recent[0]] + 1
    assert sim.download_completions[old[0]] == before[old[0]]
