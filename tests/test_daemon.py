"""``archiver run``: the real daemon as a subprocess against the simulator in this event loop,
plus in-process checks of the high-water mark."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from archiver.daemon import HWM_KEY, RESCAN_KEY, run_daemon
from archiver.identity import IDENTITY_KEY
from archiver.ledger import open_ledger
from archiver.models import State
from archiver.notify import Notifier
from archiver.simulator import Faults, SimRecording, Simulator, make_recordings
from tests.conftest import ARCHIVER, cli_env, make_settings, write_config

POLL = 0.5
# Figures measured by these tests, printed at the end of each (run pytest with -s to see them).
FIGURES: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recent(n: int, seed: int, *, days: float = 2, **kw: Any) -> list[SimRecording]:
    """Recordings that ended within the last ``days`` (inside the daemon's first window)."""
    now = datetime.now(UTC)
    span = max(int(days), 1)
    return make_recordings(n, seed=seed, start=now - timedelta(days=days), days=span, **kw)


def just_ended(n: int, seed: int) -> list[SimRecording]:
    return make_recordings(n, seed=seed, start=datetime.now(UTC) - timedelta(seconds=5), days=0)


def daemon_config(
    sim: Simulator, root: Path, *, page_size: int | None = None, **daemon: Any
) -> Path:
    settings = {"poll_interval": POLL, "shutdown_grace": 5.0, **daemon}
    lines = ["[daemon]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = write_config(sim, root, "\n".join(lines) + "\n")
    if page_size is not None:
        text = path.read_text().replace("[telnyx]\n", f"[telnyx]\npage_size = {page_size}\n", 1)
        path.write_text(text)
    return path


class Daemon:
    """A running ``archiver run`` subprocess; its stderr goes to a file (never a full pipe)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(
        cls, config: Path, *args: str, env: dict[str, str] | None = None, name: str = "daemon"
    ) -> Daemon:
        log = config.parent / f"{name}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *ARCHIVER,
                "--config",
                str(config),
                "--log-format",
                "json",
                "run",
                *args,
                env=env or cli_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        return cls(proc, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def stop(self, sig: int = signal.SIGTERM, limit: float = 15) -> tuple[int, float]:
        began = time.monotonic()
        self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), limit)
        return rc, time.monotonic() - began

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def wait_for(
    predicate: Callable[[], bool], limit: float, what: str, daemon: Daemon | None = None
) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    began = time.monotonic()
    while not predicate():
        if daemon is not None and daemon.proc.returncode is not None:
            raise AssertionError(f"daemon exited {daemon.proc.returncode}:\n{daemon.text()}")
        if time.monotonic() - began > limit:
            tail = daemon.text()[-4000:] if daemon else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


def archived(sim: Simulator, recs: list[SimRecording]) -> Callable[[], bool]:
    return lambda: all(sim.download_completions[r.id] >= 1 for r in recs)


def in_archive(root: Path, recs: list[SimRecording]) -> Callable[[], bool]:
    """True once every recording is visible in the archive (committed, not partial)."""
    wanted = {r.id for r in recs}

    def check() -> bool:
        names = {p.stem for p in (root / "archive").rglob("*") if p.is_file()}
        return wanted <= names

    return check


def stray_files(root: Path) -> list[Path]:
    """Partial uploads or temp files left in the archive."""
    return [p for p in (root / "archive").rglob("*") if p.is_file() and "partial" in p.name]


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


def report_figure(name: str, value: float) -> None:
    FIGURES[name] = round(value, 3)
    print(f"\nFIGURE {name} = {value:.3f}s")


# -- the daemon as a subprocess ----------------------------------------------------------------


async def test_new_and_processing_recordings_are_archived(sim_factory, tmp_path):
    recs = recent(20, seed=21, processing=3)
    processing = [r for r in recs if r.status == "processing"]
    for rec in processing:
        rec.processing_lists_left = 3
    sim: Simulator = await sim_factory(recs)
    port = free_port()
    config = daemon_config(sim, tmp_path, metrics_port=port)
    daemon = await Daemon.start(config)
    try:
        await wait_for(archived(sim, recs), 20, "the first recordings", daemon)
        # Those still processing at first were archived once they completed.
        assert len(processing) == 3 and all(r.status == "completed" for r in processing)

        # A second instance on the same ledger refuses to start.
        second = await Daemon.start(config, name="second")
        rc = await asyncio.wait_for(second.proc.wait(), 20)
        assert rc == 2, second.text()
        assert "another archiver instance" in second.text()

        # New recordings appear: archived within a couple of poll intervals.
        for round_number in range(3):
            new = just_ended(2, seed=100 + round_number)
            sim.add(new)
            took = await wait_for(
                in_archive(tmp_path, new), 10 * POLL, "the new recordings", daemon
            )
            assert took < 3 * POLL + 1.0, took
            report_figure(f"new recording archived after it appeared (round {round_number})", took)

        status, body = await http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        health = json.loads(body)
        assert health["status"] == "ok" and health["last_success"] is not None
        # A file is visible a moment before its ledger row and the counters say archived.
        expected = len(recs) + 6
        for _ in range(100):
            status, text = await http_get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            values = metric_values(text)
            if values['archiver_recordings_archived_total{source="room_recordings"}'] >= expected:
                break
            await asyncio.sleep(0.05)
        assert values['archiver_recordings_archived_total{source="room_recordings"}'] == expected
        assert values["archiver_last_successful_pass_timestamp_seconds"] > time.time() - 10
        assert values["archiver_oldest_unarchived_age_seconds"] == 0
        assert values['archiver_api_responses_total{status="200"}'] > 0
        assert values["archiver_pass_duration_seconds_count"] >= 3
        assert "archiver_transfer_duration_seconds_bucket" in text
        assert "archiver_queue_depth" in text and "archiver_transfers_in_flight" in text

        rc, took = await daemon.stop(signal.SIGINT)
        assert rc == 0, daemon.text()
    finally:
        await daemon.kill()
    passes = [e for e in daemon.events() if str(e.get("message", "")).startswith("pass ")]
    assert passes and all("pass_number" in e for e in passes)

    # `archiver status` shows the last pass, the lag and the high-water mark.
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "status",
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    assert "last pass:" in text and "ok" in text
    assert f"high-water mark: {datetime.now(UTC).date()}" in text


def metric_values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_page_shift_during_a_pass_loses_nothing(sim_factory, tmp_path):
    recs = recent(30, seed=22)
    sim: Simulator = await sim_factory(recs, Faults(shift_on_page=2, shift_count=5))
    config = daemon_config(sim, tmp_path, page_size=5, poll_interval=30.0)
    daemon = await Daemon.start(config)
    try:
        # The poll interval is long: only the immediate re-listing can find the shifted ones.
        await wait_for(lambda: len(sim.shifted_ids) == 5, 10, "the page shift", daemon)
        await wait_for(archived(sim, list(sim.recordings.values())), 10, "everything", daemon)
        rc, _ = await daemon.stop()
        assert rc == 0
    finally:
        await daemon.kill()
    assert set(sim.shifted_ids) <= {rid for rid, n in sim.download_completions.items() if n}
    assert all(n == 1 for n in sim.download_completions.values())


async def test_sigterm_mid_transfer_exits_cleanly_within_the_grace(sim_factory, tmp_path):
    recs = recent(6, seed=23, size=2_000_000)
    # 31 chunks of 64 KiB at 0.1 s each: every transfer takes about 3 s.
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.1, slow_rate=1.0))
    grace = 1.0
    config = daemon_config(sim, tmp_path, shutdown_grace=grace)
    daemon = await Daemon.start(config)
    try:
        await wait_for(lambda: len(sim.download_requests) >= 4, 15, "transfers to start", daemon)
        await asyncio.sleep(0.3)
        rc, took = await daemon.stop(signal.SIGTERM)
    finally:
        await daemon.kill()
    assert rc == 0, daemon.text()
    report_figure("SIGTERM to exit, transfers cancelled after a 1 s grace", took)
    assert took < grace + 3.0, took
    assert not any(sim.download_completions.values())
    # What the cancelled transfers wrote stays as their partial files, for the next start to
    # continue; nothing is visible but the archive's identity record (archiver.identity).
    left = stray_files(tmp_path)
    assert left and all(p.name.startswith(".") and p.name.endswith(".partial") for p in left)
    files = [p for p in (tmp_path / "archive").rglob("*") if p.is_file() and p not in left]
    assert [p.name for p in files] == [IDENTITY_KEY]
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        states = await ledger.states([r.id for r in recs])
        for rec in recs:
            row = await ledger.get(rec.id)
            assert row is not None and row.lease_owner is None, row
        # Released, not failed: the attempt is not counted against the recording.
        assert set(states.values()) == {State.PENDING}
    messages = " ".join(str(e.get("message")) for e in daemon.events())
    assert "grace period over" in messages


async def test_sigterm_lets_short_transfers_finish(sim_factory, tmp_path):
    recs = recent(4, seed=24, size=700_000)
    # About 1 s per transfer, well within the grace.
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.09, slow_rate=1.0))
    config = daemon_config(sim, tmp_path, shutdown_grace=10.0)
    daemon = await Daemon.start(config)
    try:
        await wait_for(lambda: len(sim.download_requests) >= 4, 15, "transfers to start", daemon)
        rc, took = await daemon.stop(signal.SIGTERM)
    finally:
        await daemon.kill()
    assert rc == 0, daemon.text()
    report_figure("SIGTERM to exit, in-flight transfers finished within the grace", took)
    assert took < 5.0
    assert in_archive(tmp_path, recs)()
    assert "grace period over" not in daemon.text()
    assert stray_files(tmp_path) == []


async def test_listing_errors_do_not_stop_the_daemon_but_a_401_does(sim_factory, tmp_path):
    recs = recent(5, seed=25)
    sim: Simulator = await sim_factory(recs, Faults(list_error_rate=1.0))
    port = free_port()
    config = daemon_config(sim, tmp_path, metrics_port=port)
    config.write_text(config.read_text().replace("max_attempts = 10", "max_attempts = 2"))
    daemon = await Daemon.start(config)
    try:

        def failed_passes() -> bool:
            return sum("failed:" in str(e.get("message")) for e in daemon.events()) >= 2

        await wait_for(failed_passes, 15, "failed passes", daemon)
        _, body = await http_get(f"http://127.0.0.1:{port}/metrics")
        assert metric_values(body)['archiver_retries_total{what="pass"}'] >= 2
        sim.faults.list_error_rate = 0.0
        await wait_for(archived(sim, recs), 10, "archiving after the API recovered", daemon)

        sim.api_key = "another-key"  # the key was revoked
        rc = await asyncio.wait_for(daemon.proc.wait(), 15)
    finally:
        await daemon.kill()
    assert rc == 2, daemon.text()
    assert "refused the key" in daemon.text()


async def test_sighup_reopens_the_log_file(sim_factory, tmp_path):
    sim: Simulator = await sim_factory(recent(2, seed=26))
    log_file = tmp_path / "archiver.log"
    config = daemon_config(sim, tmp_path)
    config.write_text(config.read_text() + f'\n[logging]\nfile = "{log_file}"\n')
    daemon = await Daemon.start(config)
    try:
        await wait_for(lambda: log_file.exists() and "pass 1" in log_file.read_text(), 15, "log")
        rotated = tmp_path / "archiver.log.1"
        log_file.rename(rotated)  # what logrotate does
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: log_file.exists() and "logs reopened" in log_file.read_text(), 10, "reopen"
        )
        await wait_for(lambda: "pass" in log_file.read_text().split("reopened", 1)[1], 10, "pass")
        rc, _ = await daemon.stop()
    finally:
        await daemon.kill()
    assert rc == 0


# -- the high-water mark, in-process -----------------------------------------------------------


def _quiet() -> Notifier:
    return Notifier(env={})


async def test_a_partial_failure_holds_the_high_water_mark(sim_factory, tmp_path):
    today = datetime.now(UTC).date()
    good = recent(10, seed=27, days=1)
    bad = make_recordings(1, seed=28, start=datetime.now(UTC) - timedelta(days=3), days=1)[0]
    bad_day = bad.ended_at.date()  # type: ignore[union-attr]
    bad.entry_hook = lambda e: {**e, "download_url": "http://127.0.0.1:1/unreachable"}
    sim: Simulator = await sim_factory([*good, bad])
    settings = make_settings(
        sim,
        tmp_path,
        workers__transfer_attempts=1,
        daemon__first_start=7,
        daemon__overlap_days=1,
        daemon__rescan_days=7,
    )

    engine, polling = await run_daemon(settings, once=True, notifier=_quiet())
    assert polling.last is not None and polling.last.ok and polling.last.owed == 1
    query = sim.api_requests[0].query
    assert query["filter[date_ended_at][gte]"] == str(today - timedelta(days=7))
    assert query["filter[date_ended_at][lte]"] == str(today)
    async with open_ledger(path=settings.ledger.path) as ledger:
        tally = await ledger.tally([bad.id])
        assert set(tally.retrying) == {bad.id}  # failed, will be retried: owed
        # Held at the failed recording's day, not moved to today.
        assert await ledger.get_meta(HWM_KEY) == bad_day.isoformat()
        assert await ledger.get_meta(RESCAN_KEY) is not None
        passes = await ledger.last_passes(1)
        assert passes[0].ok and passes[0].extra["high_water_mark"] == bad_day.isoformat()

    # The next window still lists the failed recording's day; once it succeeds the mark moves.
    bad.entry_hook = None
    seen = len(sim.api_requests)
    engine, polling = await run_daemon(settings, once=True, notifier=_quiet())
    assert engine.counts.archived == 1 and polling.last is not None and polling.last.owed == 0
    query = sim.api_requests[seen].query
    assert query["filter[date_ended_at][gte]"] == str(bad_day - timedelta(days=1))
    async with open_ledger(path=settings.ledger.path) as ledger:
        assert await ledger.get_meta(HWM_KEY) == today.isoformat()


async def test_a_failed_listing_never_moves_the_high_water_mark(sim_factory, tmp_path):
    sim: Simulator = await sim_factory(recent(5, seed=29))
    settings = make_settings(sim, tmp_path, telnyx__max_attempts=1)
    earlier = datetime.now(UTC).date() - timedelta(days=2)
    async with open_ledger(path=settings.ledger.path) as ledger:
        await ledger.set_meta(HWM_KEY, earlier.isoformat())
    sim.faults.list_error_rate = 1.0
    _, polling = await run_daemon(settings, once=True, notifier=_quiet())
    assert polling.last is not None and not polling.last.ok and polling.last.error
    async with open_ledger(path=settings.ledger.path) as ledger:
        assert await ledger.get_meta(HWM_KEY) == earlier.isoformat()
        last = (await ledger.last_passes(1))[0]
        assert not last.ok and "HTTP 5" in (last.error or "")


def teardown_module() -> None:
    if FIGURES and os.environ.get("ARCHIVER_PRINT_FIGURES"):
        print(json.dumps(FIGURES, indent=2))


async def test_run_once_is_one_pass_for_cron(sim_factory, tmp_path):
    recs = recent(6, seed=30)
    sim: Simulator = await sim_factory(recs)
    config = daemon_config(sim, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER, "--config", str(config), "run", "--once", env=cli_env()
    )
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert in_archive(tmp_path, recs)()
    lists = [r for r in sim.api_requests if r.path.endswith("/room_recordings")]
    assert len(lists) == 1


# -- the first start, the processing hold and the exit codes (the daemon as a subprocess) -------


def spread(n: int, seed: int, days: int, **kw: Any) -> list[SimRecording]:
    """Recordings that ended over the last ``days`` days."""
    start = datetime.now(UTC) - timedelta(days=days)
    return make_recordings(n, seed=seed, start=start, days=days, size=(2000, 8000), **kw)


def ended_day(rec: SimRecording) -> Any:
    assert rec.ended_at is not None
    return rec.ended_at.astimezone(UTC).date()


async def ledger_view(root: Path, fn: Callable[[Any], Any]) -> Any:
    """Read the daemon's SQLite ledger beside it (a reader needs no lock)."""
    async with open_ledger(path=root / "ledger.db") as ledger:
        return await fn(ledger)


async def wait_until(
    check: Callable[[], Any], limit: float, what: str, daemon: Daemon | None = None
) -> float:
    """``wait_for`` for an async predicate."""
    began = time.monotonic()
    while not await check():
        if daemon is not None and daemon.proc.returncode is not None:
            raise AssertionError(f"daemon exited {daemon.proc.returncode}:\n{daemon.text()}")
        if time.monotonic() - began > limit:
            tail = daemon.text()[-4000:] if daemon else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def mark_is(root: Path, day: Any) -> Callable[[], Any]:
    async def check() -> bool:
        return await ledger_view(root, lambda led: led.get_meta(HWM_KEY)) == day.isoformat()

    return check


def pass_lines(daemon: Daemon) -> list[str]:
    return [
        str(e["message"])
        for e in daemon.events()
        if str(e.get("message", "")).startswith("pass ") and "pass_number" in e
    ]


async def test_the_first_start_archives_the_whole_history(sim_factory, tmp_path):
    await first_start_archives(sim_factory, tmp_path, "all")


async def test_a_first_start_of_7_days_archives_only_the_last_week(sim_factory, tmp_path):
    await first_start_archives(sim_factory, tmp_path, 7)


async def first_start_archives(sim_factory: Any, tmp_path: Path, first_start: str | int) -> None:
    recs = [*spread(60, seed=71, days=90), *recent(6, seed=77)]
    today = datetime.now(UTC).date()
    # Nothing on the days around the 7-day boundary: a run across midnight cannot blur it.
    recs = [r for r in recs if (today - ended_day(r)).days not in (6, 7, 8)]
    wanted = [r for r in recs if first_start == "all" or (today - ended_day(r)).days < 7]
    assert 6 <= len(wanted) < len(recs) - 30 or first_start == "all"
    sim: Simulator = await sim_factory(recs)
    extra = {} if first_start == "all" else {"first_start": first_start}
    config = daemon_config(sim, tmp_path, page_size=25, **extra)  # the default is "all"
    daemon = await Daemon.start(config)
    try:
        took = await wait_for(archived(sim, wanted), 20, "the history", daemon)
        await wait_until(mark_is(tmp_path, today), 10, "the mark at today", daemon)
        report_figure(f"first start ({first_start}): {len(wanted)} recordings archived", took)
        # A few more passes: nothing older is ever fetched.
        passes = len(pass_lines(daemon))
        await wait_for(lambda: len(pass_lines(daemon)) >= passes + 2, 10, "more passes", daemon)
        rc, _ = await daemon.stop(signal.SIGTERM)
    finally:
        await daemon.kill()
    assert rc == 0, daemon.text()
    first = next(r for r in sim.api_requests if r.path.endswith("/room_recordings")).query
    if first_start == "all":
        assert "filter[date_ended_at][gte]" not in first
    else:
        assert first["filter[date_ended_at][gte]"] == str(today - timedelta(days=7))
    assert first["filter[date_ended_at][lte]"] == str(today)
    # Every one of them within the first pass (its listing covers the whole window).
    lines = pass_lines(daemon)
    assert lines[0].startswith("pass 1 ok") and f"{len(wanted)} archived" in lines[0], lines
    fetched = {rid for rid, n in sim.download_completions.items() if n}
    assert fetched == {r.id for r in wanted}
    assert all(n == 1 for n in sim.download_completions.values())
    known = await ledger_view(tmp_path, lambda led: led.states([r.id for r in recs]))
    assert set(known) == {r.id for r in wanted}  # the older ones were never even listed


async def test_archiver_run_holds_the_mark_at_a_processing_recording(sim_factory, tmp_path):
    today = datetime.now(UTC).date()
    day = today - timedelta(days=5)
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    old = make_recordings(1, seed=72, start=noon, days=0)[0]
    old.status, old.completed_at, old.processing_lists_left = "processing", None, 0  # for now
    recs = [*recent(8, seed=73), old]
    sim: Simulator = await sim_factory(recs)
    config = daemon_config(sim, tmp_path, overlap_days=1)
    config.write_text(config.read_text().replace("max_attempts = 10", "max_attempts = 2"))
    daemon = await Daemon.start(config)

    def retrieves() -> int:
        return sum(r.path.endswith(f"/room_recordings/{old.id}") for r in sim.api_requests)

    def lists_since(n: int) -> list[Any]:
        return [r.query for r in sim.api_requests[n:] if r.path.endswith("/room_recordings")]

    try:
        await wait_for(archived(sim, recs[:-1]), 15, "the others", daemon)
        await wait_until(mark_is(tmp_path, day), 10, "the mark held at its day", daemon)
        # Later passes list from the day before the mark: it is seen again, still processing.
        seen = len(sim.api_requests)
        passes = len(pass_lines(daemon))
        await wait_for(lambda: len(pass_lines(daemon)) >= passes + 2, 10, "more passes", daemon)
        assert lists_since(seen) and all(
            q["filter[date_ended_at][gte]"] == str(day - timedelta(days=1))
            for q in lists_since(seen)
        )
        assert await mark_is(tmp_path, day)() and retrieves() == 0

        # The listing fails: the row is taken from the ledger and asked for by id (retrieve).
        sim.faults.list_error_rate = 1.0
        await wait_for(lambda: retrieves() >= 2, 15, "retrieves from the ledger", daemon)
        row = await ledger_view(tmp_path, lambda led: led.get(old.id))
        assert row.state is State.PENDING and row.attempts == 0, row
        assert row.last_error == "still processing at the source"
        # It completes at the source: the next retrieve archives it; the mark waits for a
        # listing that works.
        old.status, old.completed_at = "completed", datetime.now(UTC)
        await wait_for(archived(sim, [old]), 15, "the old recording", daemon)
        assert await mark_is(tmp_path, day)()
        sim.faults.list_error_rate = 0.0
        await wait_until(mark_is(tmp_path, today), 15, "the mark to move on", daemon)
        rc, _ = await daemon.stop(signal.SIGTERM)
    finally:
        await daemon.kill()
    assert rc == 0, daemon.text()
    assert all(sim.download_completions[r.id] == 1 for r in recs)
    row = await ledger_view(tmp_path, lambda led: led.get(old.id))
    assert row.state is State.ARCHIVED and row.attempts == 0


async def run_once(config: Path) -> int:
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "run",
        "--once",
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_run_once_exits_1_while_anything_is_owed_0_once_not(sim_factory, tmp_path):
    recs = recent(4, seed=74)
    stuck = recent(1, seed=75)[0]
    stuck.status, stuck.completed_at, stuck.processing_lists_left = "processing", None, 0
    sim: Simulator = await sim_factory([*recs, stuck])
    config = daemon_config(sim, tmp_path)
    assert await run_once(config) == 1  # one recording still processing: owed
    assert all(sim.download_completions[r.id] == 1 for r in recs)
    assert await run_once(config) == 1  # still owed on the next run
    stuck.status, stuck.completed_at = "completed", datetime.now(UTC)
    assert await run_once(config) == 0
    assert sim.download_completions[stuck.id] == 1
    # A recording failed for good (its download host refuses it) is owed too: exit 1.
    bad = just_ended(1, seed=76)[0]
    bad.download_fault = "html"  # refused as not a recording
    sim.add([bad])
    config.write_text(config.read_text().replace("[workers]", "[workers]\nmax_attempts = 1"))
    assert await run_once(config) == 1
    failed = await ledger_view(tmp_path, lambda led: led.get(bad.id))
    assert failed.state is State.FAILED and failed.permanent, failed
