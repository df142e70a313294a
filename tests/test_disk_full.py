"""A full disk stops the run cleanly: nothing partial, the ledger true, a rerun finishes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from archiver.filters import Filters
from archiver.ledger import open_ledger
from archiver.models import State
from archiver.service import backfill, make_engine, open_services
from archiver.simulator import Simulator, make_recordings
from archiver.verify import verify_archive
from tests.conftest import make_settings


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_stops_cleanly_and_rerun_completes(sim_factory, tmp_path):
    recs = make_recordings(16, seed=71, size=(250_000, 400_000))
    sim: Simulator = await sim_factory(recs)
    archive = tmp_path / "archive"
    mount_tmpfs(archive, "8m")
    try:
        # Leave about 1.5 MB free: room for a few recordings, not for all (~5 MB).
        filler = archive / "filler.bin"
        filler.write_bytes(b"\0" * (6 * 1024 * 1024 + 512 * 1024))
        settings = make_settings(sim, tmp_path, workers__concurrency=2)
        async with open_services(settings) as services:
            engine = make_engine(services)
            report = await backfill(services, Filters(), engine)
        assert report.storage_full and not report.all_archived
        assert 0 < report.archived < len(recs)
        assert list(archive.rglob("*.partial")) == []
        async with open_ledger(path=settings.ledger.path) as ledger:
            for rec in recs:
                row = await ledger.get(rec.id)
                assert row is not None
                if row.state is State.ARCHIVED:
                    assert row.storage_key is not None
                    data = (archive / row.storage_key).read_bytes()
                    assert hashlib.sha256(data).hexdigest() == sim.expected_sha256(rec.id)
                else:
                    assert row.state in (State.PENDING, State.FAILED)
                    if row.state is State.FAILED:
                        assert "disk full" in (row.last_error or "")
        fetched_before = sum(sim.download_completions.values())

        # Space freed: the rerun archives the rest and re-fetches nothing already archived.
        filler.unlink()
        async with open_services(settings) as services:
            engine = make_engine(services)
            again = await backfill(services, Filters(), engine)
            check = await verify_archive(
                services.ledger, services.storage, deep=True, sidecars=True
            )
        assert again.all_archived and not again.storage_full
        assert report.archived + again.archived == len(recs)
        assert check.ok and check.checked == len(recs)
        assert (
            sum(sim.download_completions.values()) - fetched_before <= len(recs) - report.archived
        )
    finally:
        umount(archive)
