"""Room compositions beside room recordings: the same engine, ledger, storage, verification and
audit chain, each row knowing its source. Against the simulator, through the real command on
local disk and in-process into SeaweedFS."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp

from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Simulator, make_compositions, make_recordings
from archiver.sources import COMPOSITIONS, RECORDINGS
from archiver.storage.s3 import S3Storage
from archiver.webhook import parse_event
from tests.conftest import API_KEY, make_settings, write_config
from tests.fixtures_s3 import S3Server
from tests.test_backfill import run
from tests.test_cli import cli

ON = "\n[sources]\nroom_compositions = true\n"
QUICK = "\n[backfill]\nmax_passes = 1\nprocessing_wait = 0.0\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def composition_lists(sim: Simulator) -> list[Any]:
    return [r for r in sim.api_requests if r.method == "GET" and r.path.endswith("_compositions")]


async def test_compositions_are_archived_verified_reported_and_deleted_beside_recordings(
    sim_factory: Any, tmp_path: Path
) -> None:
    recs = make_recordings(4, seed=161)
    comps = make_compositions(5, seed=161, enqueued=1, processing=1)
    sim: Simulator = await sim_factory(recs, compositions=comps)
    config = write_config(sim, tmp_path, ON + QUICK + "\n[source]\ndelete_after_archive = true\n")
    ready = [c for c in comps if c.status == "completed"]
    waiting = [c for c in comps if c.status != "completed"]

    # The enqueued and the processing one are owed, not failed: exit 1, saying why.
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 1, out + err
    assert "still enqueued at the source" in out and "still processing at the source" in out
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        for comp in waiting:
            row = await ledger.get(comp.id)
            assert row is not None and row.source == COMPOSITIONS and row.attempts == 0
            assert row.state is State.PENDING

    sim.advance_compositions()
    sim.advance_compositions()
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 0, out + err

    archive = tmp_path / "archive"
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        for item, source in [(r, RECORDINGS) for r in recs] + [(c, COMPOSITIONS) for c in comps]:
            row = await ledger.get(item.id)
            assert row is not None and row.state is State.ARCHIVED, item.id
            assert row.source == source and row.storage_key is not None
            assert sha256(archive / row.storage_key) == sim.expected_sha256(item.id)
            if source == COMPOSITIONS:
                created = item.created_at  # type: ignore[union-attr]
                assert row.storage_key == (
                    f"compositions/{created:%Y/%m/%d}/{item.session_id}/{item.id}.mp4"
                )
            assert row.deleted_at_source is not None
    # Each deleted at its own collection, by id, once.
    deletes = [r.path for r in sim.api_requests if r.method == "DELETE"]
    assert sorted(deletes) == sorted(
        [f"/v2/room_recordings/{r.id}" for r in recs]
        + [f"/v2/room_compositions/{c.id}" for c in comps]
    )
    assert ready  # some were ready at once, the others once the source finished them

    code, out, _ = await cli("--config", str(config), "status", "--json")
    by_source = json.loads(out)["by_source"]
    assert by_source[RECORDINGS]["counts"]["archived"] == len(recs)
    assert by_source[COMPOSITIONS]["counts"]["archived"] == len(comps)
    code, out, _ = await cli("--config", str(config), "status")
    assert f"room_compositions: {len(comps)} archived" in out, out
    code, out, _ = await cli("--config", str(config), "manifest")
    sources = {d["id"]: d["source"] for d in map(json.loads, out.splitlines())}
    assert sources == {r.id: RECORDINGS for r in recs} | {c.id: COMPOSITIONS for c in comps}
    code, out, _ = await cli("--config", str(config), "verify", "--deep")
    assert code == 0 and f"{len(recs) + len(comps)} recordings checked" in out, out
    assert f"checked: {len(comps)} {COMPOSITIONS}, {len(recs)} {RECORDINGS}" in out, out
    code, out, _ = await cli("--config", str(config), "audit", "verify")
    assert code == 0, out
    # Deleted at the source: reconcile expects them gone and says all is well.
    code, out, _ = await cli("--config", str(config), "reconcile", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and len(report["deleted_by_us"]) == len(recs) + len(comps)


async def test_compositions_are_opt_in(sim_factory: Any, tmp_path: Path) -> None:
    sim: Simulator = await sim_factory(
        make_recordings(3, seed=162), compositions=make_compositions(3, seed=162)
    )
    config = write_config(sim, tmp_path)
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 0, out + err
    assert composition_lists(sim) == [] and sim.download_completions  # recordings only
    assert not any(cid in sim.download_completions for cid in sim.compositions)


async def test_filters_reach_the_compositions_list_in_its_own_forms(
    sim_factory: Any, tmp_path: Path
) -> None:
    recs = make_recordings(20, seed=163)
    comps = make_compositions(12, seed=163)
    sim: Simulator = await sim_factory(recs, compositions=comps)
    session = comps[0].session_id
    config = write_config(sim, tmp_path, ON)
    code, out, err = await cli(
        "--config", str(config), "backfill", "--since", "2020-01-01", "--session-id", session
    )
    assert code == 0, out + err
    [listed] = {r.raw_path.split("&page")[0] for r in composition_lists(sim)}
    assert "filter%5Bsession_id%5D=" + session in listed
    assert "filter%5Bdate_created_at%5D%5Bgte%5D=2020-01-01" in listed
    assert "date_ended_at" not in listed  # the compositions list has no such filter
    archived = {cid for cid, n in sim.download_completions.items() if n}
    assert archived == {c.id for c in comps if c.session_id == session} | {
        r.id for r in recs if r.session_id == session
    }

    # A participant is no composition's: asked for one, no composition is archived or listed
    # into the ledger.
    other = tmp_path / "participant"
    other.mkdir()
    config = write_config(sim, other, ON)
    code, out, err = await cli(
        "--config", str(config), "backfill", "--participant-id", recs[0].participant_id or ""
    )
    assert code == 0, out + err
    async with open_ledger(path=other / "ledger.db") as ledger:
        assert not await ledger.states([c.id for c in comps])


def test_the_webhook_takes_a_composition_only_when_compositions_are_archived() -> None:
    body = json.dumps(
        {
            "data": {
                "event_type": "video.room.composition.completed",
                "payload": {
                    "composition_id": "7103dc53-ee59-4b54-a58b-c77d99ceb037",
                    "room_id": "f981dbb3-228a-44e9-ac54-e87f0e2658b0",
                    "download_url": "https://example.com/secret",
                },
            }
        }
    ).encode()
    kind, rec = parse_event(body, (RECORDINGS, COMPOSITIONS))
    assert kind == "video.room.composition.completed" and rec is not None
    assert rec.id == "7103dc53-ee59-4b54-a58b-c77d99ceb037" and rec.source == COMPOSITIONS
    assert rec.download_url is None and "download_url" not in rec.metadata
    assert parse_event(body, (RECORDINGS,)) == ("video.room.composition.completed", None)


async def test_compositions_into_s3(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str
) -> None:
    recs = make_recordings(3, seed=164)
    comps = make_compositions(3, seed=164)
    sim: Simulator = await sim_factory(recs, compositions=comps)
    settings = make_settings(
        sim,
        tmp_path,
        storage__backend="s3",
        storage__s3__bucket=s3_server.bucket,
        storage__s3__prefix=s3_prefix,
        storage__s3__endpoint_url=s3_server.endpoint_url,
        storage__s3__region=s3_server.region,
        sources__room_compositions=True,
    )
    report = await run(settings)
    assert report.all_archived and report.archived == len(recs) + len(comps)
    async with (
        open_ledger(path=settings.ledger.path) as ledger,
        S3Storage(settings.storage.s3) as storage,
    ):
        for comp in comps:
            row = await ledger.get(comp.id)
            assert row is not None and row.source == COMPOSITIONS and row.storage_key
            assert row.storage_key.startswith("compositions/")
            digest = hashlib.sha256()
            async for chunk in storage.read(row.storage_key):
                digest.update(chunk)
            assert digest.hexdigest() == sim.expected_sha256(comp.id) == row.sha256


async def test_owed_compositions_stay_in_a_video_backfills_scope(
    sim_factory: Any, tmp_path: Path
) -> None:
    comps = make_compositions(3, seed=165, enqueued=1)
    sim: Simulator = await sim_factory(make_recordings(2, seed=165), compositions=comps)
    config = write_config(sim, tmp_path, ON + QUICK)
    code, out, _ = await cli("--config", str(config), "backfill")
    assert code == 1, out
    # Gone from the listing before it was ready: still owed, and a composition is video.
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http,
        http.delete(f"{sim.api_base_url}/room_compositions/{comps[0].id}") as resp,
    ):
        assert resp.status == 204
    code, out, _ = await cli("--config", str(config), "backfill", "--type", "video")
    assert code == 1 and comps[0].id in out, out


async def test_a_rebuilt_ledger_knows_each_copys_source(sim_factory: Any, tmp_path: Path) -> None:
    recs = make_recordings(3, seed=166)
    comps = make_compositions(3, seed=166)
    sim: Simulator = await sim_factory(recs, compositions=comps)
    config = write_config(sim, tmp_path, ON)
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 0, out + err
    (tmp_path / "ledger.db").unlink()
    code, out, err = await cli("--config", str(config), "ledger", "rebuild")
    assert code == 0, out + err
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        for items, source in ((recs, RECORDINGS), (comps, COMPOSITIONS)):
            for item in items:
                row = await ledger.get(item.id)
                assert row is not None and row.source == source, item.id


async def test_the_service_archives_compositions_once_they_are_completed(
    sim_factory: Any, tmp_path: Path
) -> None:
    comps = make_compositions(4, seed=167, enqueued=1)
    sim: Simulator = await sim_factory(make_recordings(3, seed=167), compositions=comps)
    # The whole history on the first start.
    config = write_config(sim, tmp_path, ON + '\n[daemon]\nfirst_start = "all"\n')
    code, out, err = await cli("--config", str(config), "run", "--once")
    assert code == 1, out + err  # the enqueued one is owed
    sim.advance_compositions()
    sim.advance_compositions()
    code, out, err = await cli("--config", str(config), "run", "--once")
    assert code == 0, out + err
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        tally = await ledger.tally(list(sim.compositions))
    assert tally.archived == len(comps)
