"""The archive knows its ledger: a lost or truncated ledger is refused, and rebuilt from the
archive (archiver.identity), on local disk and on a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archiver.identity import IDENTITY_KEY, LEDGER_ID
from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Simulator, make_recordings
from tests.conftest import write_config
from tests.fixtures_s3 import S3Server
from tests.test_cli import cli


def s3_config(sim: Simulator, root: Path, server: S3Server, prefix: str, sidecar: bool) -> Path:
    """The CLI's config with the archive in the test S3 server (credentials: the environment)."""
    path = write_config(sim, root)
    text = path.read_text()
    start, end = text.index("[storage]"), text.index("[ledger]")
    storage = (
        f'[storage]\nbackend = "s3"\nsidecar = {str(sidecar).lower()}\n[storage.s3]\n'
        f'bucket = "{server.bucket}"\nprefix = "{prefix}"\n'
        f'endpoint_url = "{server.endpoint_url}"\nregion = "{server.region}"\n\n'
    )
    path.write_text(text[:start] + storage + text[end:])
    return path


def truncate(root: Path, pattern: str) -> None:
    for path in root.glob(pattern):
        path.write_bytes(b"")


async def test_a_truncated_ledger_is_refused_then_rebuilt(sim_factory: Any, tmp_path: Path):
    recs = make_recordings(12, seed=91)
    sim: Simulator = await sim_factory(recs)
    config = str(write_config(sim, tmp_path))
    code, out, err = await cli("--config", config, "backfill")
    assert code == 0, err
    record = json.loads((tmp_path / "archive" / IDENTITY_KEY).read_text())
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        assert await ledger.get_meta(LEDGER_ID) == record["ledger_id"]

    # The ledger cut to nothing (a disk error, a wrong restore): a new-looking SQLite file.
    truncate(tmp_path, "ledger.db*")
    fetched = len(sim.download_requests)
    for command in (["status"], ["verify"], ["audit", "verify"], ["manifest"], ["backfill"]):
        code, out, err = await cli("--config", config, *command)
        assert code == 2, (command, out, err)
        assert "ledger is new or empty" in err and "archiver ledger rebuild" in err, err
        assert "Traceback" not in err
    assert len(sim.download_requests) == fetched  # nothing was fetched again

    code, out, err = await cli("--config", config, "ledger", "rebuild")
    assert code == 0, err
    assert "12 recordings rebuilt from the archive" in out and "0 objects skipped" in out
    code, out, err = await cli("--config", config, "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["counts"]["archived"] == 12 and doc["owed"] == 0
    code, out, err = await cli("--config", config, "verify", "--deep")
    assert code == 0 and "12 recordings checked" in out and "0 problem" in out, out + err
    code, out, err = await cli("--config", config, "audit", "verify")
    assert code == 0, out + err
    code, out, err = await cli("--config", config, "backfill")
    assert code == 0, err
    assert len(sim.download_requests) == fetched  # the rebuilt ledger knows every copy
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        assert await ledger.get_meta(LEDGER_ID) == record["ledger_id"]
        actions = [e.action async for e in ledger.iter_audit()]
        assert actions[0] == "ledger_rebuilt"
        for rec in recs:
            row = await ledger.get(rec.id)
            assert row is not None and row.state is State.ARCHIVED
            assert row.sha256 == sim.expected_sha256(rec.id)
            assert row.metadata["room_id"] == rec.room_id  # from the sidecar


async def test_another_ledger_is_refused_and_an_old_archive_adopted(
    sim_factory: Any, tmp_path: Path
):
    sim: Simulator = await sim_factory(make_recordings(5, seed=92))
    config = write_config(sim, tmp_path)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    record_path = tmp_path / "archive" / IDENTITY_KEY

    # A second ledger with recordings of its own, pointed at the same archive.
    other = tmp_path / "other"
    other.mkdir()
    other_config = write_config(sim, other)
    code, _, err = await cli("--config", str(other_config), "backfill")
    assert code == 0, err
    text = other_config.read_text().replace(str(other / "archive"), str(tmp_path / "archive"))
    other_config.write_text(text)
    code, _, err = await cli("--config", str(other_config), "status")
    assert code == 2 and "belongs to ledger" in err, err

    # An archive written before identity records existed: an empty ledger over it is refused,
    # its own ledger's first writer adopts it.
    record_path.unlink()
    moved = tmp_path / "ledger.db.kept"
    (tmp_path / "ledger.db").rename(moved)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 2 and "already holds recordings" in err, err
    assert not record_path.exists()
    (tmp_path / "ledger.db").unlink()
    moved.rename(tmp_path / "ledger.db")
    code, _, err = await cli("--config", str(config), "status")
    assert code == 0, err
    assert not record_path.exists()  # a read-only command writes nothing into the archive
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    assert json.loads(record_path.read_text())["ledger_id"]


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecars", "no-sidecars"])
async def test_rebuild_from_s3(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str, sidecar: bool
):
    recs = make_recordings(6, seed=93, size=(20_000, 60_000))
    sim: Simulator = await sim_factory(recs)
    config = s3_config(sim, tmp_path, s3_server, s3_prefix, sidecar)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    (tmp_path / "ledger.db").unlink()
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 2 and "ledger is new or empty" in err, err
    code, out, err = await cli("--config", str(config), "ledger", "rebuild")
    assert code == 0, err
    assert "6 recordings rebuilt" in out, out
    code, out, err = await cli("--config", str(config), "verify", "--deep")
    assert code == 0 and "6 recordings checked" in out, out + err
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        for rec in recs:
            row = await ledger.get(rec.id)
            assert row is not None and row.sha256 == sim.expected_sha256(rec.id)
            assert (row.room_id == rec.room_id) is sidecar
