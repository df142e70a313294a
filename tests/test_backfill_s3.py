"""Backfill end to end into real S3 (SeaweedFS) with Object Lock, in-process, from the simulator."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from archiver.identity import IDENTITY_KEY
from archiver.ledger import open_ledger
from archiver.models import State, utcnow
from archiver.simulator import Faults, Simulator, make_recordings
from archiver.storage.s3 import S3Storage
from tests.conftest import make_settings
from tests.fixtures_s3 import S3Server
from tests.test_backfill import run

MiB = 1 << 20
RETENTION = timedelta(days=30)


def s3_overrides(server: S3Server, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "storage__backend": "s3",
        "storage__s3__bucket": server.locked_bucket,
        "storage__s3__prefix": prefix,
        "storage__s3__endpoint_url": server.endpoint_url,
        "storage__s3__region": server.region,
        "storage__s3__object_lock_mode": "COMPLIANCE",
        "storage__s3__retention_days": 30,
        **extra,
    }


def versions_by_key(server: S3Server, prefix: str) -> Counter[str]:
    listing = server.client().list_object_versions(Bucket=server.locked_bucket, Prefix=prefix)
    assert not listing.get("DeleteMarkers")
    return Counter(v["Key"][len(prefix) :] for v in listing.get("Versions", []))


def within(moment: datetime | None, low: datetime, high: datetime) -> bool:
    return moment is not None and low - timedelta(seconds=1) <= moment <= high + timedelta(
        seconds=2
    )


async def check_archive(
    sim: Simulator, settings: Any, server: S3Server, prefix: str, started: datetime
) -> dict[str, str]:
    """Every recording once, with the right bytes, hash and retention; returns id → key."""
    finished = utcnow()
    keys: dict[str, str] = {}
    async with (
        open_ledger(path=settings.ledger.path) as ledger,
        S3Storage(settings.storage.s3) as storage,
    ):
        for rec_id, rec in sim.recordings.items():
            row = await ledger.get(rec_id)
            assert row is not None and row.state is State.ARCHIVED, rec_id
            assert row.sha256 == sim.expected_sha256(rec_id)
            assert row.claims == 1  # one claim: one upload, continued across every retry
            assert row.storage_key is not None
            keys[rec_id] = row.storage_key
            info = await storage.stat(row.storage_key)
            assert info is not None and info.sha256 == row.sha256 and info.size == rec.size
            assert info.version_id == row.version_id
            # Retained 30 days from the end of the recording, or from the archiving if later.
            assert rec.ended_at is not None
            low = max(rec.ended_at, started) + RETENTION
            high = max(rec.ended_at, finished) + RETENTION
            assert within(info.retain_until, low, high), (info.retain_until, low, high)
            assert within(row.retain_until, low, high)
            digest = hashlib.sha256()
            async for chunk in storage.read(row.storage_key):
                digest.update(chunk)
            assert digest.hexdigest() == sim.expected_sha256(rec_id)
            sidecar = await storage.stat(row.storage_key + ".json")
            assert sidecar is not None and within(sidecar.retain_until, low, high)
            # The sidecar says where the copy is: bucket and the full key, prefix included.
            doc = json.loads(b"".join([c async for c in storage.read(row.storage_key + ".json")]))
            where = f"s3://{server.locked_bucket}/{prefix}{row.storage_key}"
            assert (doc["archive"]["key"], doc["archive"]["location"]) == (row.storage_key, where)
    counts = versions_by_key(server, prefix)
    # Recordings, their sidecars, and the archive's identity record (archiver.identity).
    assert set(counts) == set(keys.values()) | {k + ".json" for k in keys.values()} | {IDENTITY_KEY}
    assert set(counts.values()) == {1}  # each stored once
    uploads = server.client().list_multipart_uploads(Bucket=server.locked_bucket, Prefix=prefix)
    assert not uploads.get("Uploads")
    return keys


async def test_backfill_into_object_lock_bucket(
    sim_factory: Any, tmp_path: Any, s3_server: S3Server, s3_prefix: str
) -> None:
    now = utcnow()
    # Some ended a day ago (retained from the archiving), some "end" in the next days.
    recs = make_recordings(
        12, seed=21, size=(10_000, 300_000), start=now - timedelta(days=1), days=3
    )
    sim: Simulator = await sim_factory(recs)
    settings = make_settings(sim, tmp_path, **s3_overrides(s3_server, s3_prefix))

    started = utcnow()
    report = await run(settings)

    assert report.all_archived and report.archived == len(recs)
    keys = await check_archive(sim, settings, s3_server, s3_prefix, started)
    head = s3_server.client().head_object(
        Bucket=s3_server.locked_bucket, Key=s3_prefix + keys[recs[0].id]
    )
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["Metadata"]["sha256"] == sim.expected_sha256(recs[0].id)
    assert head["Metadata"]["recording-id"] == recs[0].id

    # A second run finds everything in the ledger and writes nothing.
    before = len(sim.download_requests)
    again = await run(settings)
    assert again.archived == 0 and len(sim.download_requests) == before


@pytest.mark.parametrize("url_max_age", [240.0, 0.001], ids=["listed-urls", "fresh-url-per-try"])
async def test_multipart_transfers_continue_across_faults(
    sim_factory: Any, tmp_path: Any, s3_server: S3Server, s3_prefix: str, url_max_age: float
) -> None:
    recs = make_recordings(4, seed=22, size=(11_000_000, 13_000_000))
    sim: Simulator = await sim_factory(
        # Seed 7 (with one worker) cuts off several downloads and expires two listed URLs.
        recs,
        Faults(truncate_rate=0.2, expired_first_url_rate=0.3),
        seed=7,
    )
    overrides = s3_overrides(
        s3_server,
        s3_prefix,
        storage__s3__multipart_threshold=5 * MiB,
        storage__s3__part_size=5 * MiB,
        # A tiny limit makes every retry ask the API for a fresh URL before its Range request.
        workers__url_max_age=url_max_age,
        # One at a time: the simulator's seeded faults then fall on the same requests every run.
        workers__concurrency=1,
    )
    settings = make_settings(sim, tmp_path, **overrides)

    started = utcnow()
    report = await run(settings)

    assert report.all_archived, report.failed
    keys = await check_archive(sim, settings, s3_server, s3_prefix, started)
    assert sim.injected["download:truncate"] > 0
    resumed = {r.id for r in sim.download_requests if r.range and r.range != "bytes=0-"}
    assert resumed, "no transfer was cut off and continued with a Range request"
    for rec in recs:
        # Downloaded to the end once: each cut-off transfer went on from where it stopped.
        assert sim.download_completions[rec.id] == 1, rec.id
    client = s3_server.client()
    for rec_id in resumed:
        head = client.head_object(
            Bucket=s3_server.locked_bucket, Key=s3_prefix + keys[rec_id], ChecksumMode="ENABLED"
        )
        parts = -(-sim.recordings[rec_id].size // (5 * MiB))
        assert head["ChecksumSHA256"].endswith(f"-{parts}")  # one multipart upload, all its parts
    if url_max_age < 1:
        retrieves = Counter(
            r.path.rsplit("/", 1)[-1] for r in sim.api_requests if "/room_recordings/" in r.path
        )
        assert all(retrieves[rec_id] >= 2 for rec_id in resumed), retrieves
