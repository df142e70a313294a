"""Lost and damaged copies are found, fetched again, or reported lost; a damaged copy never
lets its source be deleted. The real CLI, on local disk and on a real S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Simulator, make_recordings
from tests.conftest import write_config
from tests.fixtures_s3 import S3Server
from tests.test_cli import cli
from tests.test_identity import s3_config


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def damage(config: Path, storage: str, server: S3Server | None, prefix: str, ids: list[str]):
    """Delete the first copy, flip one byte in the second (same size): what a bad disk, a
    careless operator or a bit flip does."""
    async with open_ledger(path=config.parent / "ledger.db") as ledger:
        keys = []
        for rid in ids:
            row = await ledger.get(rid)
            assert row is not None and row.storage_key
            keys.append(row.storage_key)
    if storage == "local":
        root = config.parent / "archive"
        (root / keys[0]).unlink()
        flip_byte(root / keys[1], 1000)
        return
    assert server is not None
    client = server.client()
    client.delete_object(Bucket=server.bucket, Key=prefix + keys[0])
    body = bytearray(client.get_object(Bucket=server.bucket, Key=prefix + keys[1])["Body"].read())
    body[1000] ^= 0xFF
    client.put_object(Bucket=server.bucket, Key=prefix + keys[1], Body=bytes(body))


@pytest.mark.parametrize("storage", ["local", "s3"])
async def test_deleted_and_flipped_copies_are_repaired(
    sim_factory: Any, tmp_path: Path, storage: str, request: pytest.FixtureRequest
):
    recs = make_recordings(8, seed=101, size=(30_000, 80_000))
    sim: Simulator = await sim_factory(recs)
    server: S3Server | None = None
    prefix = ""
    if storage == "s3":
        server = request.getfixturevalue("s3_server")
        prefix = request.getfixturevalue("s3_prefix")
        config = s3_config(sim, tmp_path, server, prefix, sidecar=True)
    else:
        config = write_config(sim, tmp_path)
    conf = str(config)
    code, _, err = await cli("--config", conf, "backfill")
    assert code == 0, err
    gone, flipped = recs[0].id, recs[1].id
    await damage(config, storage, server, prefix, [gone, flipped])

    code, out, _ = await cli("--config", conf, "verify")
    assert code == 1 and f"PROBLEM {gone}" in out and flipped not in out, out
    code, out, _ = await cli("--config", conf, "verify", "--deep")
    assert code == 1, out
    assert "missing from the archive" in out and "SHA-256 does not match" in out, out
    code, out, _ = await cli("--config", conf, "reconcile")
    assert code == 1 and gone in out and "missing from the archive" in out, out

    fetched = dict(sim.download_completions)
    code, out, err = await cli("--config", conf, "verify", "--deep", "--repair")
    assert code == 0, out + err
    assert "repair: 2 of 2 copies fetched again and verified" in out, out
    assert sim.download_completions[gone] == fetched[gone] + 1
    assert sim.download_completions[flipped] == fetched[flipped] + 1
    assert all(sim.download_completions[r.id] == fetched[r.id] for r in recs[2:])
    code, out, _ = await cli("--config", conf, "verify", "--deep")
    assert code == 0 and "8 recordings checked" in out and "0 problem" in out, out
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        actions = [(e.action, e.recording_id) async for e in ledger.iter_audit()]
    for rid in (gone, flipped):
        at = actions.index(("reopened", rid))
        assert ("archived", rid) in actions[at:]
    code, out, _ = await cli("--config", conf, "audit", "verify")
    assert code == 0, out


async def test_a_copy_gone_at_the_source_too_is_reported_lost(sim_factory: Any, tmp_path: Path):
    recs = make_recordings(3, seed=102)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        row = await ledger.get(recs[0].id)
        assert row is not None and row.storage_key
    (tmp_path / "archive" / row.storage_key).unlink()
    del sim.recordings[recs[0].id]  # the source no longer has it either
    code, out, err = await cli("--config", str(config), "verify", "--repair")
    assert code == 1, out + err
    assert f"LOST {recs[0].id}" in out, out
    code, out, _ = await cli("--config", str(config), "status")
    assert "failed for good" in out and recs[0].id in out, out
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        row = await ledger.get(recs[0].id)
        assert row is not None and row.state is State.FAILED and row.permanent


async def test_purge_refuses_a_same_size_corrupted_copy(sim_factory: Any, tmp_path: Path):
    recs = make_recordings(4, seed=103, size=(30_000, 60_000))
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        row = await ledger.get(recs[0].id)
        assert row is not None and row.storage_key
    flip_byte(tmp_path / "archive" / row.storage_key, 5000)
    config.write_text(config.read_text() + "\n[source]\ndelete_after_archive = true\n")
    code, out, _ = await cli("--config", str(config), "purge")
    assert code == 1, out
    assert "3 deleted at source, 1 kept" in out, out
    assert f"kept at source {recs[0].id}" in out and "SHA-256" in out, out
    assert sorted(sim.deleted_ids) == sorted(r.id for r in recs[1:])
