"""The polling producer of ``archiver run`` (``archiver.producers.Polling``), in-process with a
fake clock: the window each pass lists and the high-water mark it may move to.

Most tests drive ``Polling`` through a scripted ``Work`` (what it lists is recorded, what the
listing returns is the test's) over a real SQLite ledger, whose rows are put in place through the
ledger's own transitions. One drives the real engine against the simulator, for the path that
needs transfers: a recording still processing at the source that holds the mark.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from archiver.config import DaemonSettings, FilterSettings
from archiver.errors import LedgerUnavailable, ServerError
from archiver.filters import Filters
from archiver.ledger import Budget, SqliteLedger, open_ledger
from archiver.lister import PassStats
from archiver.models import Recording, State, StoredObject
from archiver.pipeline import Counts, Work
from archiver.producers import HWM_KEY, RESCAN_KEY, PassResult, Polling
from archiver.scope import Scope
from archiver.service import make_engine, open_services
from archiver.simulator import Simulator, make_recordings
from tests.conftest import make_settings

NOW = datetime(2025, 3, 20, 12, 0, tzinfo=UTC)
TODAY = NOW.date()


class FakeClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class ScriptedWork:
    """What ``Polling`` drives: each ``list_pass`` records its filters and returns (or raises)
    the next scripted result (a complete, empty listing once the script is used up)."""

    def __init__(
        self, *results: PassStats | BaseException, sweep_error: BaseException | None = None
    ) -> None:
        self.stop = asyncio.Event()
        self.sweep_error = sweep_error
        self.counts = Counts()
        self.listed: list[Filters] = []
        self.swept: list[Scope] = []
        self._results = list(results)

    async def list_pass(self, filters: Filters) -> PassStats:
        self.listed.append(filters)
        result = self._results.pop(0) if self._results else PassStats()
        if isinstance(result, BaseException):
            raise result
        return result

    async def sweep(self, scope: Scope, *, exclude: set[str]) -> int:
        self.swept.append(scope)
        if self.sweep_error is not None:
            raise self.sweep_error
        return 0

    async def drain(self) -> None:
        return None


class Passes:
    """A ``PassObserver`` that keeps every result."""

    def __init__(self) -> None:
        self.results: list[PassResult] = []

    def pass_started(self) -> None:
        return None

    def pass_finished(self, result: PassResult) -> None:
        self.results.append(result)


def polling(
    ledger: Any,
    clock: FakeClock,
    *,
    once: bool = True,
    filters: FilterSettings | None = None,
    **daemon: Any,
) -> tuple[Polling, Passes]:
    values: dict[str, Any] = {"rescan_interval": 6 * 3600.0, **daemon}
    observer = Passes()
    producer = Polling(
        ledger=ledger,
        settings=DaemonSettings(**values),
        filters=filters or FilterSettings(),
        instance="test",
        observer=observer,
        once=once,
        clock=clock,
    )
    return producer, observer


async def one_pass(producer: Polling, work: ScriptedWork) -> PassResult:
    return await producer.one_pass(cast(Work, work))


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.db") as opened:
        yield opened


async def mark(ledger: Any) -> date | None:
    value = await ledger.get_meta(HWM_KEY)
    return None if value is None else date.fromisoformat(value)


def noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


def entry(
    rid: str, day: date, *, status: str = "completed", room_id: str | None = None
) -> Recording:
    ended = noon(day)
    url = "https://dl.example/x.ogg" if status == "completed" else None
    meta = {"id": rid, "status": status, "ended_at": ended.isoformat(), "room_id": room_id}
    return Recording(
        id=rid, status=status, download_url=url, ended_at=ended, room_id=room_id, metadata=meta
    )


OTHER = "other-host:4242:abcdef/1"


async def put_row(ledger: Any, kind: str, rid: str, day: date) -> None:
    """A row of ``kind`` that ended on ``day``, made through the ledger's own transitions."""
    status = "processing" if kind == "processing" else "completed"
    await ledger.observe([entry(rid, day, status=status)])
    if kind in ("pending", "processing"):
        return
    if kind == "rejected":
        await ledger.reject(rid, reason="download_url points at a private address")
        return
    lease = 0.001 if kind == "expired_lease" else 3600.0
    assert await ledger.claim(rid, owner=OTHER, lease_seconds=lease) == 1
    if kind in ("leased_elsewhere", "expired_lease"):
        return
    if kind == "archived":
        stored = StoredObject(key=f"k/{rid}", size=1, sha256="0" * 64)
        assert await ledger.complete(rid, owner=OTHER, stored=stored)
        return
    await ledger.fail(rid, owner=OTHER, error="HTTP 500", permanent=kind == "failed_for_good")


# -- the window ------------------------------------------------------------------------------
async def test_first_start_all_lists_the_whole_history(ledger):
    clock = FakeClock()
    producer, _ = polling(ledger, clock, first_start="all", rescan_days=7)
    work = ScriptedWork()
    result = await one_pass(producer, work)
    (filters,) = work.listed
    assert filters.date_ended_at_gte is None and filters.date_ended_at_lte == TODAY
    assert result.window is not None and result.window.start is None and result.window.wide
    assert result.ok and result.complete and result.high_water_mark == TODAY
    assert await mark(ledger) == TODAY
    assert await ledger.get_meta(RESCAN_KEY) == NOW.isoformat()


@pytest.mark.parametrize(
    ("first_start", "rescan_days", "days_back"),
    [
        (30, 7, 30),  # that many days back
        (3, 0, 3),  # no re-scans configured
        (3, 7, 7),  # the first pass is also the first wide re-scan
    ],
)
async def test_first_start_with_days_starts_that_many_days_back(
    ledger, first_start, rescan_days, days_back
):
    producer, _ = polling(ledger, FakeClock(), first_start=first_start, rescan_days=rescan_days)
    work = ScriptedWork()
    await one_pass(producer, work)
    (filters,) = work.listed
    assert filters.date_ended_at_gte == TODAY - timedelta(days=days_back)
    assert filters.date_ended_at_lte == TODAY
    assert await mark(ledger) == TODAY


async def test_later_windows_start_at_mark_minus_overlap_and_widen_every_rescan_interval(ledger):
    clock = FakeClock()
    producer, _ = polling(
        ledger, clock, first_start="all", overlap_days=2, rescan_days=10, rescan_interval=3600.0
    )
    work = ScriptedWork()

    def last_window() -> tuple[date | None, date | None]:
        return work.listed[-1].date_ended_at_gte, work.listed[-1].date_ended_at_lte

    first = await one_pass(producer, work)
    assert first.window is not None and first.window.wide and last_window() == (None, TODAY)

    clock.advance(minutes=30)  # the re-scan is not due
    second = await one_pass(producer, work)
    assert second.window is not None and not second.window.wide
    assert last_window() == (TODAY - timedelta(days=2), TODAY)

    clock.advance(minutes=31)  # an hour since the first (wide) pass: due again
    third = await one_pass(producer, work)
    assert third.window is not None and third.window.wide
    assert last_window() == (TODAY - timedelta(days=10), TODAY)
    assert await ledger.get_meta(RESCAN_KEY) == clock.now.isoformat()

    clock.advance(minutes=59)  # counted from the last wide pass, not the first
    await one_pass(producer, work)
    assert last_window() == (TODAY - timedelta(days=2), TODAY)

    clock.advance(hours=24)  # the next day: the window ends there, the mark follows it
    tomorrow = TODAY + timedelta(days=1)
    fifth = await one_pass(producer, work)
    assert fifth.window is not None and fifth.window.wide  # more than an hour since the last
    assert last_window() == (tomorrow - timedelta(days=10), tomorrow)
    assert await mark(ledger) == tomorrow
    clock.advance(minutes=1)
    await one_pass(producer, work)
    assert last_window() == (tomorrow - timedelta(days=2), tomorrow)


async def test_a_mark_ahead_of_the_clock_still_lists_the_overlap_before_today(ledger):
    """A clock stepped back (or a mark written by a host whose clock ran ahead): the window
    still reaches ``overlap_days`` back from today, where late arrivals turn up."""
    await ledger.set_meta(HWM_KEY, (TODAY + timedelta(days=3)).isoformat())
    await ledger.set_meta(RESCAN_KEY, NOW.isoformat())
    producer, _ = polling(ledger, FakeClock(), overlap_days=1)
    work = ScriptedWork()
    await one_pass(producer, work)
    window = (work.listed[0].date_ended_at_gte, work.listed[0].date_ended_at_lte)
    assert window == (TODAY - timedelta(days=1), TODAY)
    assert await mark(ledger) == TODAY + timedelta(days=3)  # never moved back


# -- what holds the mark -----------------------------------------------------------------------
async def test_the_mark_moves_to_today_only_when_nothing_owed_is_older(ledger):
    old, older = TODAY - timedelta(days=5), TODAY - timedelta(days=9)
    await put_row(ledger, "pending", "rec-old", old)
    await put_row(ledger, "pending", "rec-older", older)
    await put_row(ledger, "pending", "rec-today", TODAY)
    clock = FakeClock()
    producer, _ = polling(ledger, clock)
    result = await one_pass(producer, ScriptedWork())
    assert result.complete and result.high_water_mark == older and result.owed == 3
    assert await mark(ledger) == older

    for rid in ("rec-older", "rec-old"):
        await put_row_archived(ledger, rid)
        clock.advance(minutes=5)
        work = ScriptedWork()
        result = await one_pass(producer, work)
        # Held at the oldest still owed; each window starts at the mark minus the overlap.
        assert result.high_water_mark == (old if rid == "rec-older" else TODAY)
        assert work.listed[0].date_ended_at_gte is not None
    assert await mark(ledger) == TODAY  # "rec-today" is owed, but not older than today


async def put_row_archived(ledger: Any, rid: str) -> None:
    owner = f"{OTHER}-{rid}"
    assert await ledger.claim(rid, owner=owner, lease_seconds=60) == 1
    stored = StoredObject(key=f"k/{rid}", size=1, sha256="0" * 64)
    assert await ledger.complete(rid, owner=owner, stored=stored)


@pytest.mark.parametrize(
    "kind",
    [
        "pending",
        "processing",  # still processing at the source
        "leased_elsewhere",  # in progress under another owner's live lease
        "expired_lease",  # left behind by an instance that stopped
        "retrying",  # failed, attempts left
    ],
)
async def test_every_owed_row_that_will_be_retried_holds_the_mark(ledger, kind):
    day = TODAY - timedelta(days=6)
    await ledger.set_meta(HWM_KEY, (day - timedelta(days=2)).isoformat())
    await put_row(ledger, kind, "rec-held", day)
    await put_row(ledger, "archived", "rec-done", day - timedelta(days=1))
    producer, _ = polling(ledger, FakeClock())
    result = await one_pass(producer, ScriptedWork())
    assert result.ok and result.complete
    assert result.high_water_mark == day and await mark(ledger) == day
    row = await ledger.get("rec-held")
    assert row is not None and row.attempts == (1 if kind == "retrying" else 0)


@pytest.mark.parametrize("kind", ["failed_for_good", "rejected", "attempts_used_up"])
async def test_rows_failed_for_good_do_not_hold_the_mark(tmp_path, kind):
    path = tmp_path / "ledger.db"
    far, near = TODAY - timedelta(days=20), TODAY - timedelta(days=4)
    async with open_ledger(path=path) as ledger:
        await put_row(ledger, "retrying" if kind == "attempts_used_up" else kind, "rec-bad", far)
    # "attempts_used_up": failed once, retryable then; the budget is lowered to one attempt.
    async with open_ledger(path=path, budget=Budget(max_attempts=1)) as ledger:
        row = await ledger.get("rec-bad")
        assert row is not None and row.state is State.FAILED
        assert (await ledger.tally(["rec-bad"])).needs_action
        producer, _ = polling(ledger, FakeClock())
        assert (await one_pass(producer, ScriptedWork())).high_water_mark == TODAY
        # Beside a row that will be retried, the mark is held at that one, not at the failed.
        await put_row(ledger, "pending", "rec-owed", near)
        assert (await one_pass(producer, ScriptedWork())).high_water_mark == TODAY  # no going back
        await ledger.set_meta(HWM_KEY, far.isoformat())
        assert (await one_pass(producer, ScriptedWork())).high_water_mark == near


async def test_a_row_out_of_attempts_holds_neither_the_mark_nor_the_lag(tmp_path):
    path = tmp_path / "ledger.db"
    async with open_ledger(path=path) as ledger:
        await put_row(ledger, "retrying", "rec-bad", TODAY - timedelta(days=20))
    async with open_ledger(path=path, budget=Budget(max_attempts=1)) as ledger:
        producer, _ = polling(ledger, FakeClock())
        result = await one_pass(producer, ScriptedWork())
        assert result.high_water_mark == TODAY
        assert result.oldest_unarchived is None  # the lag (archiver_oldest_unarchived_age)


async def test_only_owed_rows_in_the_daemons_scope_hold_the_mark(ledger):
    """Standing filters (here a room) bound what the daemon lists, so what it holds for."""
    other_day, ours_day = TODAY - timedelta(days=12), TODAY - timedelta(days=3)
    await ledger.observe([entry("rec-other-room", other_day, room_id="room-b")])
    await ledger.observe([entry("rec-our-room", ours_day, room_id="room-a")])
    producer, _ = polling(ledger, FakeClock(), filters=FilterSettings(room_id="room-a"))
    work = ScriptedWork()
    result = await one_pass(producer, work)
    assert result.high_water_mark == ours_day
    assert work.listed[0].room_id == "room-a"


def shifted() -> PassStats:
    stats = PassStats(listed=4, total_results=5)
    stats.seen = {"a", "b", "c", "d"}  # one fewer than the API counted: something shifted
    return stats


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param(lambda: ServerError("HTTP 503 from the API"), id="api-error"),
        pytest.param(lambda: RuntimeError("a bug in a page"), id="unexpected-error"),
        pytest.param(shifted, id="page-shift"),
        pytest.param(None, id="stopped"),
    ],
)
async def test_a_failed_or_shifted_listing_never_moves_the_mark(
    ledger, listing: Callable[[], Any] | None
):
    before = TODAY - timedelta(days=3)
    await ledger.set_meta(HWM_KEY, before.isoformat())
    producer, _ = polling(ledger, FakeClock(), rescan_days=0)
    work = ScriptedWork() if listing is None else ScriptedWork(listing())
    if listing is None:
        work.stop.set()
    result = await one_pass(producer, work)
    assert not result.complete and result.high_water_mark == before
    assert await mark(ledger) == before
    if listing is not None and listing is not shifted:
        assert not result.ok and result.error and len(work.swept) == 1  # the sweep still ran
    passes = await ledger.last_passes(1)
    assert passes[0].extra["high_water_mark"] == before.isoformat()


async def test_a_listing_that_worked_with_a_sweep_that_failed_moves_nothing(ledger):
    before = TODAY - timedelta(days=3)
    await ledger.set_meta(HWM_KEY, before.isoformat())
    producer, _ = polling(ledger, FakeClock())
    work = ScriptedWork(sweep_error=LedgerUnavailable("the ledger is restarting"))
    result = await one_pass(producer, work)
    assert not result.ok and not result.complete and "restarting" in (result.error or "")
    assert await mark(ledger) == before


async def test_a_first_pass_that_fails_sets_no_mark(ledger):
    producer, _ = polling(ledger, FakeClock(), first_start="all")
    work = ScriptedWork(ServerError("HTTP 500"), ServerError("HTTP 502"))
    await one_pass(producer, work)
    await one_pass(producer, work)
    assert await mark(ledger) is None
    assert [f.date_ended_at_gte for f in work.listed] == [None, None]  # still the whole history
    assert await ledger.get_meta(RESCAN_KEY) is None  # the wide re-scan did not happen either


async def test_a_suspected_shift_lists_again_at_once_then_moves_the_mark(ledger):
    before = TODAY - timedelta(days=3)
    await ledger.set_meta(HWM_KEY, before.isoformat())
    producer, observer = polling(ledger, FakeClock(), once=True)
    work = ScriptedWork(shifted(), shifted())
    await producer(cast(Work, work))  # --once: still re-lists while a shift is suspected
    assert len(work.listed) == 3
    assert [r.complete for r in observer.results] == [False, False, True]
    assert await mark(ledger) == TODAY


async def test_a_wide_rescan_that_suspected_a_shift_is_still_due(ledger):
    """Recordings a shift hid may be anywhere in the wide window: the re-listing is wide too."""
    await ledger.set_meta(HWM_KEY, (TODAY - timedelta(days=1)).isoformat())
    await ledger.set_meta(RESCAN_KEY, (NOW - timedelta(days=1)).isoformat())
    producer, observer = polling(ledger, FakeClock(), overlap_days=1, rescan_days=7)
    work = ScriptedWork(shifted())
    await producer(cast(Work, work))
    wide_start = TODAY - timedelta(days=7)
    assert [f.date_ended_at_gte for f in work.listed] == [wide_start, wide_start]
    assert [r.complete for r in observer.results] == [False, True]
    assert await ledger.get_meta(RESCAN_KEY) == NOW.isoformat()
    assert await mark(ledger) == TODAY


# -- several handles on one ledger -------------------------------------------------------------
class Racing:
    """Every handle has read the mark before any of them tries to move it."""

    def __init__(self, ledger: Any, barrier: asyncio.Barrier, moves: list[bool]) -> None:
        real = ledger.advance_meta

        async def advance_meta(key: str, expected: str | None, new: str) -> bool:
            await barrier.wait()
            moved = await real(key, expected, new)
            moves.append(moved)
            return moved

        ledger.advance_meta = advance_meta  # type: ignore[method-assign]


async def test_several_handles_moving_the_mark_at_once_one_wins(tmp_path):
    path = tmp_path / "ledger.db"
    handles = 4
    clock = FakeClock()
    async with SqliteLedger(path):  # create and migrate it once
        pass
    ledgers = [SqliteLedger(path) for _ in range(handles)]
    for led in ledgers:
        await led.__aenter__()
    try:
        for round_number, expected_before in enumerate([None, TODAY]):
            if round_number:
                clock.advance(days=1)
            moves: list[bool] = []
            barrier = asyncio.Barrier(handles)
            for led in ledgers:
                Racing(led, barrier, moves)
            producers = [polling(led, clock)[0] for led in ledgers]
            assert await mark(ledgers[0]) == expected_before
            results = await asyncio.gather(*(one_pass(p, ScriptedWork()) for p in producers))
            assert sorted(moves) == [False] * (handles - 1) + [True], moves
            today = clock.now.date()
            assert {r.high_water_mark for r in results} == {today}
            assert await mark(ledgers[0]) == today
            for led in ledgers:
                del led.advance_meta  # back to the class's method
    finally:
        for led in ledgers:
            await led.__aexit__(None, None, None)


# -- the real engine: a recording still processing at the source -------------------------------
async def test_a_processing_recording_older_than_the_overlap_holds_the_mark(sim_factory, tmp_path):
    now = datetime.now(UTC)
    today = now.date()
    recent = make_recordings(6, seed=61, start=now - timedelta(days=1, hours=1), days=1)
    old = make_recordings(1, seed=62, start=noon(today - timedelta(days=5)), days=0)[0]
    old.status, old.completed_at, old.processing_lists_left = "processing", None, 0  # for now
    old_day = today - timedelta(days=5)
    sim: Simulator = await sim_factory([*recent, old])
    settings = make_settings(
        sim,
        tmp_path,
        telnyx__max_attempts=2,
        daemon__first_start="all",
        daemon__overlap_days=1,
        daemon__rescan_days=2,
    )
    clock = FakeClock(now)
    seen: dict[str, Any] = {}

    def retrieves() -> int:
        return sum(r.path.endswith(f"/room_recordings/{old.id}") for r in sim.api_requests)

    def list_queries() -> list[Any]:
        return [r.query for r in sim.api_requests if r.path.endswith("/room_recordings")]

    async with open_services(settings, exclusive=True) as services:
        engine = make_engine(services)
        producer = Polling(
            ledger=services.ledger,
            settings=settings.daemon,
            filters=settings.filters,
            instance=services.owner,
            observer=Passes(),
            clock=clock,
        )
        led = services.ledger

        async def produce(work: Work) -> None:
            # 1: the whole history; the old recording is listed, still processing.
            seen["first"] = await producer.one_pass(work)
            seen["first_row"] = await led.get(old.id)
            # 2: listed again (the window starts a day before the mark), still processing.
            clock.advance(minutes=5)
            queries = len(list_queries())
            seen["second"] = await producer.one_pass(work)
            seen["second_queries"] = list_queries()[queries:]
            seen["retrieves_after_listing"] = retrieves()
            # 3: the listing fails; the sweep takes the row from the ledger and asks the API
            # for it (retrieve): still processing, given back without using an attempt.
            sim.faults.list_error_rate = 1.0
            clock.advance(minutes=5)
            seen["third"] = await producer.one_pass(work)
            seen["third_retrieves"] = retrieves()
            seen["third_row"] = await led.get(old.id)
            # 4: it completed at the source; the listing still fails; taken from the ledger
            # again, archived. The mark does not move on a failed listing.
            old.status, old.completed_at = "completed", datetime.now(UTC)
            clock.advance(minutes=5)
            seen["fourth"] = await producer.one_pass(work)
            seen["fourth_row"] = await led.get(old.id)
            # 5: the listing works again: nothing owed, the mark moves on to today.
            sim.faults.list_error_rate = 0.0
            clock.advance(minutes=5)
            seen["fifth"] = await producer.one_pass(work)

        await engine.run(produce)

    first, second, third, fourth, fifth = (
        seen[k] for k in ("first", "second", "third", "fourth", "fifth")
    )
    assert first.ok and first.complete and first.done.archived == len(recent)
    assert first.high_water_mark == old_day and first.owed == 1  # not today
    row = seen["first_row"]
    assert row.state is State.PENDING and row.source_status == "processing"

    assert second.ok and second.high_water_mark == old_day
    assert all(
        q["filter[date_ended_at][gte]"] == str(old_day - timedelta(days=1))
        for q in seen["second_queries"]
    )
    assert seen["retrieves_after_listing"] == 0  # the listing brought it: nothing to retrieve

    assert not third.ok and third.high_water_mark == old_day
    assert seen["third_retrieves"] == 1
    row = seen["third_row"]
    assert row.state is State.PENDING and row.attempts == 0
    assert row.last_error == "still processing at the source"

    assert not fourth.ok and fourth.done.archived == 1 and fourth.high_water_mark == old_day
    assert seen["fourth_row"].state is State.ARCHIVED

    assert fifth.ok and fifth.complete and fifth.owed == 0 and fifth.high_water_mark == today
    assert sim.download_completions[old.id] == 1
    assert all(sim.download_completions[r.id] == 1 for r in recent)
