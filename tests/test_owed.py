"""Completeness you can trust: nothing owed is ever reported done.

Every test drives the real ``archiver`` command in subprocesses against the simulator over
loopback; exit codes are the public interface (``archiver.service``): 0 only when the whole scope
is archived, 1 while anything in it is owed, 3 when a signal stopped the backfill before the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Faults, SimRecording, Simulator, make_recordings
from tests.conftest import API_KEY, ARCHIVER, cli_env, write_config

# A loopback port nothing listens on: every connection is refused.
REFUSED = "http://127.0.0.1:1/refused.ogg"
# Small budgets so that failing for good takes one backfill, not minutes.
BUDGET = "max_attempts = 2\ntransfer_attempts = 2\n"
QUICK = "[backfill]\nprocessing_wait = 0.0\n[daemon]\nshutdown_grace = 0.5\n"


async def cli(config: Path, *args: str, limit: float = 60) -> tuple[int, str]:
    """``archiver --config CONFIG ARGS...``: (exit code, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), limit)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def status_json(config: Path) -> dict:  # type: ignore[type-arg]
    code, out = await cli(config, "status", "--json")
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


async def audit(config: Path) -> list[dict]:  # type: ignore[type-arg]
    code, out = await cli(config, "audit", "export")
    assert code == 0, out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def until(condition: Callable[[], bool], *, limit: float = 30, what: str = "") -> None:
    """Poll ``condition`` until it holds (the sleep only paces the loop)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(0.005)


def archived_files(root: Path) -> dict[str, Path]:
    """Recording files in the archive by id (sidecars and temp files aside)."""
    return {
        p.stem: p
        for p in (root / "archive").rglob("*")
        if p.is_file() and not p.name.endswith((".json", ".partial"))
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(root: Path) -> list[Path]:
    return list(root.rglob("*.partial"))


async def ledger_rows(root: Path, ids: list[str]) -> dict[str, object]:
    async with open_ledger(path=root / "ledger.db") as ledger:
        return {rid: await ledger.get(rid) for rid in ids}


def day(rec: SimRecording) -> str:
    assert rec.ended_at is not None
    return rec.ended_at.date().isoformat()


# -- 1. failed for good stays owed until an operator acts ----------------------------------------
async def test_failed_for_good_stays_owed_across_reruns_until_retry_or_give_up(
    sim_factory, tmp_path
):
    recs = make_recordings(12, seed=101)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    by_id, by_all, given = recs[0].id, recs[1].id, recs[2].id
    bad = {by_id, by_all, given}
    for rid in bad:
        sim.point_download_url(rid, REFUSED)

    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "3 failed for good, needs an operator" in out and "9 archived" in out
    tried = len(sim.download_requests)

    # The bug this guards against: a rerun said "already archived" and exited 0.
    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "0 archived" in out and "3 still owed" in out
    assert "3 failed for good, needs an operator" in out
    assert len(sim.download_requests) == tried  # the budget is spent: no new attempts

    code, out = await cli(config, "status")
    assert code == 0
    assert "failed for good, needs an operator" in out and "archiver retry" in out
    assert all(rid in out for rid in bad)
    doc = await status_json(config)
    assert doc["owed"] == 3 and doc["needs_action"] == 3
    assert set(doc["owed_by_reason"]["needs_action"]) == bad

    # The fault is fixed at the source; nothing happens until an operator says so.
    for rid in bad:
        sim.point_download_url(rid, None)
    code, out = await cli(config, "retry", "--id", by_id)
    assert code == 0, out
    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "1 archived" in out and "2 failed for good" in out

    code, out = await cli(config, "give-up", "--id", given, "--reason", "legal hold lifted")
    assert code == 0, out
    code, out = await cli(config, "retry", "--all-failed")
    assert code == 0, out
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert "1 archived" in out and "0 still owed" in out and "1 given up" in out

    files = archived_files(tmp_path)
    assert set(files) == {r.id for r in recs} - {given}
    assert sim.download_completions[given] == 0
    for rid, path in files.items():
        assert sha256(path) == sim.expected_sha256(rid), rid
    doc = await status_json(config)
    assert doc["owed"] == 0 and doc["counts"]["given_up"] == 1

    entries = await audit(config)
    retried = [e["recording_id"] for e in entries if e["action"] == "retry_requested"]
    assert sorted(retried) == sorted([by_id, by_all])
    gave_up = [e for e in entries if e["action"] == "given_up"]
    assert [e["recording_id"] for e in gave_up] == [given]
    assert gave_up[0]["details"]["reason"] == "legal hold lifted"
    code, out = await cli(config, "audit", "verify")
    assert code == 0, out


# -- 2. a crash is no failure of the recording ---------------------------------------------------
async def start(config: Path, *args: str) -> asyncio.subprocess.Process:
    """``archiver --config CONFIG ARGS...`` in the background, its output discarded."""
    return await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


class Served:
    """Counts the body bytes the simulator's download host hands to its connections (a seam in
    this process: the simulator's content generator, wrapped)."""

    def __init__(self, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        import archiver.simulator as simulator

        self.bytes = 0
        real = simulator.iter_content

        def counting(rec, start=0, end=None):  # type: ignore[no-untyped-def]
            for chunk in real(rec, start, end):
                self.bytes += len(chunk)
                yield chunk

        monkeypatch.setattr(simulator, "iter_content", counting)


async def test_sigkill_at_random_moments_uses_no_attempts(sim_factory, tmp_path, monkeypatch):
    recs = make_recordings(100, seed=202, size=(1_000_000, 3_000_000))
    served = Served(monkeypatch)
    # Slow bodies: a transfer lasts long enough that every kill lands in the middle of some.
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.01))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    rng = random.Random(2020)
    kills = 0
    for _ in range(15):
        proc = await start(config, "backfill")
        before = served.bytes
        # A random moment: once this run has been sent between 64 KiB and 8 MB of bodies.
        moment = rng.randint(64 * 1024, 8_000_000)
        await until(
            lambda: served.bytes - before >= moment or proc.returncode is not None,
            what="a transfer in flight",
        )
        if proc.returncode is None:
            proc.kill()  # SIGKILL: no handler, no finally, no flush
            kills += 1
        await proc.wait()
    assert kills == 15
    assert sum(sim.download_completions.values()) < len(recs)  # the kills left work undone

    code, out = await cli(config, "backfill")
    assert code == 0, out
    # Read now: computing the expected hashes below runs the same generator.
    downloaded = served.bytes

    ids = [r.id for r in recs]
    rows = await ledger_rows(tmp_path, ids)
    files = archived_files(tmp_path)
    assert set(files) == set(ids)
    for rid in ids:
        row = rows[rid]
        assert row is not None and row.state is State.ARCHIVED, (rid, row)  # type: ignore[attr-defined]
        assert row.sha256 == sim.expected_sha256(rid)  # type: ignore[attr-defined]
        assert row.attempts == 0, (rid, row.attempts)  # type: ignore[attr-defined]
        assert sha256(files[rid]) == sim.expected_sha256(rid), rid
    assert partials(tmp_path) == []
    interruptions = sum(row.interruptions for row in rows.values())  # type: ignore[attr-defined]
    interrupted = sum(1 for row in rows.values() if row.interruptions)  # type: ignore[attr-defined]
    assert interrupted > 0
    needed = sum(r.size for r in recs)
    extra = downloaded - needed
    print(
        f"\n{kills} SIGKILLs: {interruptions} interruptions over {interrupted} recordings, "
        f"0 attempts used; {downloaded:,} body bytes served for {needed:,} archived "
        f"({extra:,} extra, {100 * extra / needed:.1f}%)"
    )


# -- 3. a signal stops a backfill: exit 3 while the scope is owed, 0 once it is archived ----------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_transfer_exits_3_and_leaves_no_partial(
    sim_factory, tmp_path, monkeypatch, sig
):
    recs = make_recordings(12, seed=303, size=(1_500_000, 2_500_000))
    served = Served(monkeypatch)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.02))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "backfill",
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    # Bodies are streaming: several transfers are mid-way (a 64 KiB chunk every 20 ms each).
    await until(lambda: served.bytes >= 1_000_000, what="transfers in flight")
    assert sum(sim.download_completions.values()) < len(recs)
    proc.send_signal(sig)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 3, text
    assert "interrupted before the end" in text and "still owed" in text
    assert partials(tmp_path) == []
    doc = await status_json(config)
    assert doc["owed"] > 0 and doc["counts"].get("in_progress", 0) == 0  # leases given back

    code, out = await cli(config, "backfill")
    assert code == 0, out
    files = archived_files(tmp_path)
    assert set(files) == {r.id for r in recs}
    assert all(sha256(files[r.id]) == sim.expected_sha256(r.id) for r in recs)


async def test_signal_after_everything_is_archived_exits_0(sim_factory, tmp_path):
    recs = make_recordings(6, seed=304)
    # Listing calls after the first page are throttled for long: the backfill sits in its
    # second pass with the whole scope archived, which is when the signal comes.
    sim: Simulator = await sim_factory(recs, Faults(throttle_reset_seconds=30))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    config.write_text(config.read_text().replace("max_backoff = 0.05", "max_backoff = 60"))
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "backfill",
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await until(lambda: len(sim.download_requests) > 0, what="the first download")
    sim.faults.list_throttle_rate = 1.0
    await until(lambda: sim.injected["list:throttle"] > 0, what="the second listing pass")
    assert all(sim.download_completions[r.id] == 1 for r in recs)
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "0 still owed" in text and "interrupted" not in text


# -- 4. still processing after the wait is owed ---------------------------------------------------
async def test_still_processing_after_the_wait_is_owed(sim_factory, tmp_path):
    recs = make_recordings(8, seed=404, processing=2)
    for rec in recs:
        rec.processing_lists_left = 0  # never completes
    sim: Simulator = await sim_factory(recs)
    processing = {r.id for r in recs if r.status == "processing"}
    config = write_config(sim, tmp_path, BUDGET + QUICK)

    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "6 archived" in out and "2 still owed" in out
    assert "2 still processing at the source" in out
    code, out = await cli(config, "status")
    assert "2 still processing at the source" in out and all(rid in out for rid in processing)
    doc = await status_json(config)
    assert doc["owed"] == 2 and set(doc["owed_by_reason"]["processing"]) == processing
    assert doc["counts"].get("failed", 0) == 0  # owed, not failed: nothing is wrong with them

    for rec in recs:
        if rec.id in processing:
            rec.processing_lists_left = 1  # the next listing shows them completed
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert set(archived_files(tmp_path)) == {r.id for r in recs}


# -- 5. a rejected listing entry is judged again when it is listed again --------------------------
async def test_an_entry_rejected_for_its_url_is_judged_again_an_unsafe_id_stays_rejected(
    sim_factory, tmp_path
):
    recs = make_recordings(6, seed=505)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    host = sim.download_base_url.removeprefix("http://")
    bad_urls = {
        recs[0].id: "file:///etc/passwd",
        recs[1].id: f"http://user:pass@{host}/recordings/{recs[1].id}.ogg",
    }
    for rec in recs[:2]:
        rec.entry_hook = lambda e, url=bad_urls[rec.id]: {**e, "download_url": url}

    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "2 listing entries were rejected" in out and "2 failed for good" in out
    doc = await status_json(config)
    assert set(doc["owed_by_reason"]["needs_action"]) == set(bad_urls)
    assert all(r.id not in bad_urls for r in sim.download_requests)

    for rec in recs[:2]:
        rec.entry_hook = None  # the listing gives a good URL now
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert "2 archived" in out and "0 still owed" in out
    assert set(archived_files(tmp_path)) == {r.id for r in recs}
    readmitted = [e["recording_id"] for e in await audit(config) if e["action"] == "readmitted"]
    assert sorted(readmitted) == sorted(bad_urls)

    # An unsafe id is refused whatever the rest of its entry says, on every listing.
    hostile = make_recordings(1, seed=506)[0]
    hostile.id = "../../etc/passwd"
    sim.add([hostile])
    for _ in range(2):
        code, out = await cli(config, "backfill")
        assert code == 1, out
        assert "1 failed for good, needs an operator" in out and "unsafe id" in out
    doc = await status_json(config)
    assert list(doc["owed_by_reason"]["needs_action"]) == [hostile.id]
    rejected = [e["recording_id"] for e in await audit(config) if e["action"] == "rejected"]
    assert rejected.count(hostile.id) == 1  # audited once, not on every pass
    assert not (tmp_path / "etc").exists() and not any(
        hostile.id in r.raw_path for r in sim.download_requests
    )


# -- 6. the scope includes owed rows the listing no longer brings ---------------------------------
async def delete_at_source(sim: Simulator, recording_id: str) -> None:
    """``DELETE /v2/room_recordings/{id}``: gone from the listing, retrieve answers 404."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http,
        http.delete(f"{sim.api_base_url}/room_recordings/{recording_id}") as resp,
    ):
        assert resp.status == 204


async def test_owed_rows_the_listing_no_longer_brings_stay_in_scope(sim_factory, tmp_path):
    recs = sorted(make_recordings(10, seed=606, days=10), key=lambda r: r.ended_at)  # type: ignore[arg-type, return-value]
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    gone = recs[4]
    since, until_ = day(recs[2]), day(recs[7])
    in_range = {r.id for r in recs if since <= day(r) <= until_}
    sim.point_download_url(gone.id, REFUSED)

    code, out = await cli(config, "backfill", "--since", since, "--until", until_)
    assert code == 1, out
    assert "1 failed for good" in out
    await delete_at_source(sim, gone.id)

    # Listed no more, still owed: the same range counts it and says what to do.
    code, out = await cli(config, "backfill", "--since", since, "--until", until_)
    assert code == 1, out
    assert f"in scope: {len(in_range)} recordings" in out and "1 still owed" in out
    assert "1 failed for good, needs an operator" in out and gone.id in out
    code, out = await cli(config, "status")
    assert "failed for good, needs an operator" in out and gone.id in out

    # Handed back, it is fetched again: the source says it is gone, and it stays owed.
    code, out = await cli(config, "retry", "--id", gone.id)
    assert code == 0, out
    code, out = await cli(config, "backfill", "--since", since, "--until", until_)
    assert code == 1, out
    assert "1 still owed" in out and gone.id in out
    # A range that does not cover it is not held by it.
    code, out = await cli(config, "backfill", "--since", day(recs[0]), "--until", day(recs[1]))
    assert code == 0, out
    assert "0 still owed" in out
