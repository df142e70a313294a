"""Completeness you can trust: nothing owed is ever reported done.

Every test drives the real ``archiver`` command in subprocesses against the simulator over
loopback. Exit codes are the public interface (``archiver.service``): ``backfill`` exits 0 only
when every recording of its scope is archived, 1 while any is owed (failed now or before, still
processing, held elsewhere), 3 when a signal stopped it before the scope was done. Crashes are real
SIGKILLs of the real process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archiver.ledger import open_ledger
from archiver.models import LedgerRow, State
from archiver.simulator import Faults, SimRecording, Simulator, make_recordings
from tests.conftest import API_KEY, ARCHIVER, cli_env, write_config

# A loopback port nothing listens on: every connection to it is refused.
REFUSED = "http://127.0.0.1:1/refused.ogg"
# A budget small enough that failing for good takes one backfill, not minutes.
BUDGET = "max_attempts = 2\ntransfer_attempts = 2\n"
QUICK = "[backfill]\nprocessing_wait = 0.0\n[daemon]\nshutdown_grace = 0.5\n"


# -- the real command ---------------------------------------------------------------------------
async def start(config: Path, *args: str, output: bool = True) -> asyncio.subprocess.Process:
    """``archiver --config CONFIG ARGS...`` in the background (stdout and stderr in one pipe,
    or discarded)."""
    pipe = asyncio.subprocess.PIPE if output else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        stdout=pipe,
        stderr=asyncio.subprocess.STDOUT if output else asyncio.subprocess.DEVNULL,
    )


async def finish(proc: asyncio.subprocess.Process, limit: float = 60) -> tuple[int, str]:
    out, _ = await asyncio.wait_for(proc.communicate(), limit)
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode()


async def cli(config: Path, *args: str) -> tuple[int, str]:
    """``archiver --config CONFIG ARGS...``: (exit code, stdout and stderr)."""
    return await finish(await start(config, *args))


async def status_json(config: Path) -> dict[str, Any]:
    code, out = await cli(config, "status", "--json")
    assert code == 0, out
    doc: dict[str, Any] = json.loads(out)
    return doc


async def audit(config: Path) -> list[dict[str, Any]]:
    code, out = await cli(config, "audit", "export")
    assert code == 0, out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def until(condition: Callable[[], bool], *, what: str, limit: float = 30) -> None:
    """Poll ``condition`` until it holds (the sleep only paces the loop)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def with_settings(config: Path, **sections: str) -> None:
    """Set keys in sections of a ``write_config`` file (``telnyx="page_size = 5\\n"``): a key
    the section has is replaced, a section it lacks is added."""
    lines = config.read_text().splitlines()
    for section, keys in sections.items():
        new = keys.splitlines()
        names = {line.split("=", 1)[0].strip() for line in new}
        header = f"[{section}]"
        if header not in lines:
            lines.append(header)
        first = lines.index(header) + 1
        end = next((i for i in range(first, len(lines)) if lines[i].startswith("[")), len(lines))
        kept = [line for line in lines[first:end] if line.split("=", 1)[0].strip() not in names]
        lines[first:end] = new + kept
    config.write_text("\n".join(lines) + "\n")


# -- what is where ------------------------------------------------------------------------------
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


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def ledger_rows(root: Path, ids: list[str]) -> dict[str, LedgerRow | None]:
    async with open_ledger(path=root / "ledger.db") as ledger:
        return {rid: await ledger.get(rid) for rid in ids}


def day(rec: SimRecording) -> str:
    assert rec.ended_at is not None
    return rec.ended_at.date().isoformat()


def by_end(recs: list[SimRecording]) -> list[SimRecording]:
    return sorted(recs, key=lambda r: (day(r), r.id))


def fetched_since(sim: Simulator, before: dict[str, int]) -> set[str]:
    """Ids downloaded to the end since the snapshot ``before`` of ``download_completions``."""
    return {rid for rid, n in sim.download_completions.items() if n > before.get(rid, 0)}


class Served:
    """Counts the body bytes the simulator's download host sends. The seam is in this process:
    the simulator's content generator, wrapped (``expected_sha256`` runs it too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import archiver.simulator as simulator

        self.bytes = 0
        real = simulator.iter_content

        def counting(rec: SimRecording, start: int = 0, end: int | None = None) -> Iterator[bytes]:
            for chunk in real(rec, start, end):
                self.bytes += len(chunk)
                yield chunk

        monkeypatch.setattr(simulator, "iter_content", counting)


def throttle_lists_after(sim: Simulator, rec: SimRecording) -> None:
    """From the listing page that shows ``rec`` on, every list call answers 429 with a 30 s
    reset: the backfill sits in its listing (the hook runs while that page is built)."""

    def hook(entry: dict[str, Any]) -> dict[str, Any]:
        sim.faults.list_throttle_rate = 1.0
        return entry

    rec.entry_hook = hook


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
    assert "9 archived" in out and "3 failed for good, needs an operator" in out
    tried = len(sim.download_requests)

    # The bug this guards against: the rerun said "already archived" and exited 0.
    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "0 archived" in out and "3 still owed" in out
    assert "3 failed for good, needs an operator" in out
    assert len(sim.download_requests) == tried  # the budget is spent: no new attempt

    code, out = await cli(config, "status")
    assert code == 0, out
    assert "3 failed for good, needs an operator" in out and "archiver retry" in out
    assert all(rid in out for rid in bad)
    doc = await status_json(config)
    assert doc["owed"] == 3 and doc["needs_action"] == 3
    assert set(doc["owed_by_reason"]["needs_action"]) == bad

    # Fixed at the source. Nothing changes until an operator says so, one id at a time...
    for rid in bad:
        sim.point_download_url(rid, None)
    code, out = await cli(config, "retry", "--id", by_id)
    assert code == 0, out
    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "1 archived" in out and "2 failed for good" in out and by_id in archived_files(tmp_path)

    # ... or gives one up (no longer owed) and hands the rest back at once.
    code, out = await cli(config, "give-up", "--id", given, "--reason", "consent withdrawn")
    assert code == 0, out
    code, out = await cli(config, "backfill")
    assert code == 1, out
    assert "1 still owed" in out and "1 given up" in out
    code, out = await cli(config, "retry", "--all-failed")
    assert code == 0, out
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert "1 archived" in out and "0 still owed" in out and "1 given up" in out

    files = archived_files(tmp_path)
    assert set(files) == {r.id for r in recs} - {given}
    assert all(sha256(path) == sim.expected_sha256(rid) for rid, path in files.items())
    assert sim.download_completions[given] == 0
    doc = await status_json(config)
    assert doc["owed"] == 0 and doc["counts"]["given_up"] == 1

    entries = await audit(config)
    retried = [e["recording_id"] for e in entries if e["action"] == "retry_requested"]
    assert retried == [by_id, by_all]
    gave_up = [e for e in entries if e["action"] == "given_up"]
    assert [(e["recording_id"], e["details"]["reason"]) for e in gave_up] == [
        (given, "consent withdrawn")
    ]
    code, out = await cli(config, "audit", "verify")
    assert code == 0, out


# -- 2. a crash is no failure of the recording ---------------------------------------------------
async def test_sigkill_at_random_moments_uses_no_attempts(sim_factory, tmp_path, monkeypatch):
    recs = make_recordings(100, seed=202, size=(1_000_000, 3_000_000))
    served = Served(monkeypatch)
    # Slow bodies (6.5 MB/s each): every kill lands with several transfers half-way.
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.01))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    rng = random.Random(2020)
    kills = 0
    for _ in range(15):
        proc = await start(config, "backfill", output=False)
        # The moment: once this run has been sent a random 64 KiB to 8 MB of bodies.
        until_bytes = served.bytes + rng.randint(64 * 1024, 8_000_000)
        await until(
            lambda p=proc, n=until_bytes: served.bytes >= n or p.returncode is not None,
            what="a transfer in flight",
        )
        if proc.returncode is None:
            proc.kill()  # SIGKILL: no handler, no finally, no flush
            kills += 1
        await proc.wait()
    assert kills == 15
    assert sum(sim.download_completions.values()) < len(recs)  # the kills left work undone
    assert any(r.range for r in sim.download_requests)  # partial copies outlived their process

    code, out = await cli(config, "backfill")
    downloaded = served.bytes  # before the expected hashes below run the generator
    assert code == 0, out

    ids = [r.id for r in recs]
    rows = await ledger_rows(tmp_path, ids)
    files = archived_files(tmp_path)
    assert set(files) == set(ids)
    interruptions: dict[str, int] = {}
    for rid in ids:
        row = rows[rid]
        assert row is not None and row.state is State.ARCHIVED, (rid, row)
        assert row.attempts == 0, (rid, row.attempts, row.last_error)
        assert row.sha256 == sim.expected_sha256(rid) == sha256(files[rid]), rid
        interruptions[rid] = row.interruptions
    assert partials(tmp_path) == []
    counts = (await status_json(config))["counts"]
    assert {state: n for state, n in counts.items() if n} == {"archived": len(recs)}
    hit = {rid: n for rid, n in interruptions.items() if n}
    assert hit
    needed = sum(r.size for r in recs)
    extra = downloaded - needed
    print(
        f"\n{kills} SIGKILLs of a backfill of {len(recs)} recordings ({needed:,} bytes): "
        f"{sum(hit.values())} interruptions over {len(hit)} recordings (at most "
        f"{max(hit.values())} on one), 0 attempts used; {downloaded:,} body bytes served, "
        f"{extra:,} extra ({100 * extra / needed:.1f}%)"
    )


# The state a process killed after a partial's last byte and before its commit leaves behind,
# made by a real process: it continues the partial through the archive's own storage, then
# SIGKILLs itself (that window is too short to hit from outside).
FILL_PARTIAL = """
import asyncio, os, signal, sys
from pathlib import Path
from archiver.simulator import iter_content, make_recordings
from archiver.storage.local import LocalStorage

async def main(root, key, seed, count, low, high, index):
    rec = make_recordings(count, seed=seed, size=(low, high))[index]
    upload = await LocalStorage(Path(root)).begin(key, resume=True)
    assert 0 < upload.offset < rec.size, upload.offset
    for chunk in iter_content(rec, upload.offset):
        await upload.write(chunk)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])))
"""


async def test_a_crash_before_the_commit_costs_neither_an_attempt_nor_the_bytes_again(
    sim_factory, tmp_path
):
    seed, count, low, high = 222, 2, 2_600_000, 3_000_000
    recs = make_recordings(count, seed=seed, size=(low, high))
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.02))
    # No retry to spare: resuming what a crash left must take none.
    config = write_config(sim, tmp_path, "max_attempts = 1\ntransfer_attempts = 1\n" + QUICK)
    root = tmp_path / "archive"

    def big_partials() -> list[Path]:
        # A temporary file may be renamed between the listing and its stat.
        return [p for p in partials(root) if size_of(p) >= 1024 * 1024]

    proc = await start(config, "backfill", output=False)
    await until(lambda: len(big_partials()) == count, what="two partial copies of 1 MiB")
    proc.kill()
    await proc.wait()
    # One partial is continued to its last byte by a process killed before its commit.
    whole = big_partials()[0]
    key = whole.relative_to(root).with_name(whole.name[1:].removesuffix(".partial")).as_posix()
    index = next(i for i, r in enumerate(recs) if r.id in key)
    filler = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FILL_PARTIAL,
        str(root),
        key,
        *map(str, (seed, count, low, high, index)),
    )
    assert await filler.wait() == -signal.SIGKILL
    assert whole.stat().st_size == recs[index].size

    completions = dict(sim.download_completions)
    asked = len(sim.download_requests)
    code, out = await cli(config, "backfill")
    assert code == 0, out
    rows = await ledger_rows(tmp_path, [r.id for r in recs])
    for rec in recs:
        row = rows[rec.id]
        assert row is not None and row.state is State.ARCHIVED and row.attempts == 0, row
        assert row.sha256 == sim.expected_sha256(rec.id)
    files = archived_files(tmp_path)
    assert all(sha256(files[r.id]) == sim.expected_sha256(r.id) for r in recs)
    # The whole copy was committed as it was (its last request asked for what follows its
    # last byte); the other one asked only for its rest.
    assert fetched_since(sim, completions) == {r.id for r in recs} - {recs[index].id}
    ranges = {r.id: [q.range for q in sim.download_requests[asked:] if q.id == r.id] for r in recs}
    assert ranges[recs[index].id][-1] == f"bytes={recs[index].size}-"
    other = next(r for r in recs if r.id != recs[index].id)
    resumed = ranges[other.id][-1] or ""
    assert int(resumed.removeprefix("bytes=").rstrip("-")) >= 1024 * 1024, ranges
    assert partials(tmp_path) == []


# -- 3. a signal: exit 3 while the scope is not done, 0 once it is -------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_mid_transfer_exits_3_and_the_rerun_continues_each_partial(
    sim_factory, tmp_path, monkeypatch, sig
):
    recs = make_recordings(12, seed=303, size=(1_500_000, 2_500_000))
    served = Served(monkeypatch)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.02))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    proc = await start(config, "backfill")
    # Bodies are streaming: 3.2 MB/s each, so every transfer begun is still mid-way.
    await until(
        lambda: served.bytes >= 1_000_000 or proc.returncode is not None,
        what="transfers in flight",
    )
    assert sum(sim.download_completions.values()) < len(recs)
    proc.send_signal(sig)
    code, out = await finish(proc)
    assert code == 3, out
    owed = re.search(r"interrupted before the end: (\d+) still owed", out)
    assert owed is not None and int(owed.group(1)) > 0, out
    # What was written before the signal stays, to be continued (a partial still empty
    # is simply asked for whole).
    left = [p for p in partials(tmp_path) if size_of(p) > 0]
    assert left, "nothing written before the signal was kept"
    doc = await status_json(config)
    assert doc["owed"] == int(owed.group(1))
    assert doc["counts"].get("in_progress", 0) == 0  # every lease given back

    before = len(sim.download_requests)
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert partials(tmp_path) == []
    # Each left partial was continued from its size with Range, not fetched again from zero.
    resumed = [r for r in sim.download_requests[before:] if r.range]
    assert len(resumed) >= len(left), (len(resumed), len(left))
    files = archived_files(tmp_path)
    assert set(files) == {r.id for r in recs}
    assert all(sha256(files[r.id]) == sim.expected_sha256(r.id) for r in recs)


async def test_a_signal_before_the_listing_ended_exits_3_with_nothing_owed_yet(
    sim_factory, tmp_path
):
    recs = by_end(make_recordings(30, seed=310))[::-1]  # newest first, as listed
    sim: Simulator = await sim_factory(recs, Faults(throttle_reset_seconds=30))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    with_settings(config, telnyx="page_size = 5\nmax_backoff = 60\n")

    async def stopped_while_listing() -> str:
        throttled = sim.injected["list:throttle"]
        proc = await start(config, "backfill")
        await until(
            lambda: sim.injected["list:throttle"] > throttled or proc.returncode is not None,
            what="a held-up listing",
        )
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
        assert code == 3, out
        assert "interrupted before the end" in out
        return out

    # Stopped before the first page: nothing is known, so nothing is known to be archived.
    sim.faults.list_throttle_rate = 1.0
    await stopped_while_listing()
    sim.faults.list_throttle_rate = 0.0
    code, out = await cli(config, "backfill")
    assert code == 0, out

    # Older recordings turn up (on the last pages). A rerun is stopped right after page 1,
    # all of which is archived: what the pages it never read hold is unknown, so not done.
    older = make_recordings(5, seed=311, start=recs[-1].ended_at - timedelta(days=3), days=1)
    sim.add(older)
    throttle_lists_after(sim, recs[0])
    await stopped_while_listing()
    recs[0].entry_hook = None
    sim.faults.list_throttle_rate = 0.0
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert "5 archived" in out
    assert set(archived_files(tmp_path)) == {r.id for r in recs + older}


async def test_a_signal_once_everything_is_archived_exits_0(sim_factory, tmp_path):
    recs = make_recordings(6, seed=304)
    sim: Simulator = await sim_factory(recs, Faults(throttle_reset_seconds=30))
    config = write_config(sim, tmp_path, BUDGET + QUICK)
    with_settings(config, telnyx="max_backoff = 60\n")
    # The first pass lists its one page and archives it; the second pass's listing (a backfill
    # lists again after a pass that found work) is held up, the whole scope archived.
    throttle_lists_after(sim, recs[0])
    proc = await start(config, "backfill")
    await until(
        lambda: sim.injected["list:throttle"] > 0 or proc.returncode is not None,
        what="the second listing pass",
    )
    assert all(sim.download_completions[r.id] == 1 for r in recs)
    proc.send_signal(signal.SIGTERM)
    code, out = await finish(proc)
    assert code == 0, out
    assert "0 still owed" in out and "interrupted" not in out


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
            rec.processing_lists_left = 1  # completed after the next listing shows it
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
    assert not {r.id for r in sim.download_requests} & set(bad_urls)

    for rec in recs[:2]:
        rec.entry_hook = None  # the listing gives a good URL now
    code, out = await cli(config, "backfill")
    assert code == 0, out
    assert "2 archived" in out and "0 still owed" in out
    assert set(archived_files(tmp_path)) == {r.id for r in recs}
    readmitted = [e["recording_id"] for e in await audit(config) if e["action"] == "readmitted"]
    assert sorted(readmitted) == sorted(bad_urls)

    # An unsafe id is refused on every listing, whatever the rest of its entry says.
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
    assert all("passwd" not in r.raw_path for r in sim.download_requests)


# -- 6. the scope includes owed rows the listing no longer brings ---------------------------------
async def delete_at_source(sim: Simulator, recording_id: str) -> None:
    """``DELETE /v2/room_recordings/{id}``: no longer listed, and retrieve answers 404."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http,
        http.delete(f"{sim.api_base_url}/room_recordings/{recording_id}") as resp,
    ):
        assert resp.status == 204


async def test_owed_rows_the_listing_no_longer_brings_stay_in_scope(sim_factory, tmp_path):
    recs = by_end(make_recordings(10, seed=606, days=10))
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

    # Listed no more, still owed: the same range counts it and says what to do about it.
    code, out = await cli(config, "backfill", "--since", since, "--until", until_)
    assert code == 1, out
    assert f"in scope: {len(in_range)} recordings" in out and "1 still owed" in out
    assert "1 failed for good, needs an operator" in out and gone.id in out
    code, out = await cli(config, "status")
    assert "1 failed for good, needs an operator" in out and gone.id in out

    # Handed back, it is tried again (the ledger's sweep): the source says it is gone, and
    # it stays owed.
    code, out = await cli(config, "retry", "--id", gone.id)
    assert code == 0, out
    code, out = await cli(config, "backfill", "--since", since, "--until", until_)
    assert code == 1, out
    assert "1 still owed" in out and gone.id in out and "not found" in out.lower()
    # A range that does not cover it is not held by it.
    code, out = await cli(config, "backfill", "--since", day(recs[0]), "--until", day(recs[1]))
    assert code == 0, out
    assert "0 still owed" in out


# -- 7. a dry run is the backfill that follows it, minus the writing ------------------------------
def would_archive(out: str) -> set[str]:
    return {line.split()[2] for line in out.splitlines() if line.startswith("would archive ")}


async def export_lines(config: Path) -> list[str]:
    code, out = await cli(config, "ledger", "export")
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return lines[1:]  # the header line says when it was exported


async def test_dry_run_prints_exactly_what_the_backfill_then_archives(sim_factory, tmp_path):
    recs = by_end(make_recordings(45, seed=707))
    sim: Simulator = await sim_factory(recs)
    d1, d2 = day(recs[14]), day(recs[29])
    older = [r for r in recs if day(r) <= d1]
    middle = [r for r in recs if d1 < day(r) <= d2]
    newer = {r.id for r in recs if day(r) > d2}
    assert len(older) >= 5 and len(middle) >= 5 and newer
    for_good = {r.id for r in older[:3]}
    retryable = {r.id for r in middle[:3]}
    config = write_config(sim, tmp_path, QUICK)
    plain = config.read_text()

    # The ledger before: the older days archived but three failed for good (a budget of one
    # attempt), the middle days archived but three failed once (of three), the newer unlisted.
    for rid in for_good | retryable:
        sim.point_download_url(rid, REFUSED)
    with_settings(config, workers="max_attempts = 1\ntransfer_attempts = 1\n")
    code, out = await cli(config, "backfill", "--until", d1)
    assert code == 1 and "3 failed for good" in out, out
    config.write_text(plain)
    with_settings(config, workers="max_attempts = 3\ntransfer_attempts = 1\n")
    with_settings(config, backfill="max_passes = 0\n")
    code, out = await cli(config, "backfill", "--since", day(middle[0]), "--until", d2)
    assert code == 1 and "3 failed, will be retried" in out, out
    for rid in retryable:
        sim.point_download_url(rid, None)  # fixed: their next attempt succeeds

    # Pages of 5, and 3 new recordings arrive as page 2 is asked for: page 2 repeats the end
    # of page 1, and the new ones are only seen by listing again.
    config.write_text(plain)
    with_settings(config, telnyx="page_size = 5\n", workers="max_attempts = 3\n")
    sim.faults.shift_on_page = 2
    before = await export_lines(config)
    downloads = len(sim.download_requests)
    code, out = await cli(config, "backfill", "--dry-run")
    assert code == 0, out
    assert sim.injected["list:shift"] == 1
    dry = would_archive(out)
    assert dry == newer | retryable | set(sim.shifted_ids), out
    assert len(sim.download_requests) == downloads  # nothing fetched
    assert await export_lines(config) == before  # nothing written

    completions = dict(sim.download_completions)
    sim.faults.shift_on_page = 2  # the real run meets a shift of its own
    code, out = await cli(config, "backfill")
    assert code == 1 and "3 failed for good" in out, out  # the three an operator must see to
    arrived_since = set(sim.shifted_ids[3:])
    archived_now = fetched_since(sim, completions)
    assert len(arrived_since) == 3 and arrived_since <= archived_now
    assert archived_now - arrived_since == dry
    rows = await ledger_rows(tmp_path, sorted(archived_now))
    assert all(row is not None and row.state is State.ARCHIVED for row in rows.values())
    first = next(p for p in (await status_json(config))["last_passes"] if p["extra"]["pass"] == 1)
    assert first["listed"] > first["extra"]["unique"]  # it did see entries twice


async def test_dry_run_creates_no_ledger(sim_factory, tmp_path):
    recs = make_recordings(5, seed=708)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path, QUICK)
    code, out = await cli(config, "backfill", "--dry-run")
    assert code == 0, out
    assert would_archive(out) == {r.id for r in recs}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["archiver.toml"]
    assert sim.download_requests == []


async def test_dry_run_after_a_crash_counts_what_the_crash_left_in_progress(
    sim_factory, tmp_path, monkeypatch
):
    recs = make_recordings(10, seed=709, size=(1_500_000, 2_500_000))
    served = Served(monkeypatch)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.02))
    # Long leases: the dry run comes well within the leases of the process it follows.
    config = write_config(sim, tmp_path, "lease_seconds = 600.0\n" + QUICK)
    proc = await start(config, "backfill", output=False)
    await until(lambda: served.bytes >= 1_000_000, what="transfers in flight")
    proc.kill()
    await proc.wait()
    sim.faults.slow_chunk_delay = 0.0
    owed = (await status_json(config))["owed_by_reason"]
    # No writer holds the ledger: nothing is "being archived" now; what the killed process held
    # is pending, to be taken over.
    assert owed["in_progress"] == {}
    left = {rid for rid, why in owed["pending"].items() if "stopped mid-transfer" in why}
    assert left

    code, out = await cli(config, "backfill", "--dry-run")
    assert code == 0, out
    dry = would_archive(out)
    completions = dict(sim.download_completions)
    code, out = await cli(config, "backfill")
    assert code == 0, out
    archived_now = fetched_since(sim, completions)
    assert left <= archived_now
    assert dry == archived_now, sorted(archived_now - dry)
