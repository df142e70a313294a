"""The one suite every ledger passes (see ``archiver/ledger/base.py``).

Tests taking ``ledger`` or ``ledger_factory`` run against every backend in ``BACKENDS``; to add
one, add an entry there. Tests at the end that build a ``SqliteLedger`` themselves cover what only
a file ledger has: its schema file, its lock, tampering with it from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import archiver.ledger.sqlite as sqlite_module
from archiver.audit import GENESIS, verify_chain
from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger import Budget, Ledger, PassRecord, SqliteLedger, open_ledger, ops
from archiver.ledger.portable import KINDS
from archiver.ledger.sqlite import MIGRATIONS, SCHEMA_VERSION
from archiver.models import Recording, State, StoredObject
from tests import fixtures_pg

# A backend: given the test's tmp_path, set up an empty store and yield a callable that builds
# an unopened ledger on it (call it twice for two handles on the same store), with the attempt
# budget given (default: ``BUDGET``).
LedgerMaker = Callable[..., Ledger]
Backend = Callable[[Path], AbstractAsyncContextManager[LedgerMaker]]


@asynccontextmanager
async def _sqlite_backend(tmp_path: Path) -> AsyncIterator[LedgerMaker]:
    path = tmp_path / "ledger" / "archiver.sqlite3"
    yield lambda budget=BUDGET: SqliteLedger(path, budget=budget)


@asynccontextmanager
async def _postgres_backend(tmp_path: Path) -> AsyncIterator[LedgerMaker]:
    pg = fixtures_pg.cluster()
    async with pg.database() as url:
        # As ``open_ledger`` makes it: the adapter inside the one retry wrapper.
        yield lambda budget=BUDGET: open_ledger(
            url=url, password_file=pg.password_file, budget=budget
        )


BACKENDS: dict[str, Backend] = {"sqlite": _sqlite_backend, "postgres": _postgres_backend}

MAX = 3
BUDGET = Budget(max_attempts=MAX, max_interruptions=2)
LEASE = 30.0
SHORT_LEASE = 0.1
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=sorted(BACKENDS))
async def ledger_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LedgerMaker]:
    async with BACKENDS[request.param](tmp_path) as make:
        yield make


@pytest.fixture
async def ledger(ledger_factory: LedgerMaker) -> AsyncIterator[Ledger]:
    async with ledger_factory() as opened:
        yield opened


def rec(
    rec_id: str,
    *,
    ended: datetime | None = T0,
    status: str | None = "completed",
    **extra: Any,
) -> Recording:
    entry: dict[str, Any] = {
        "id": rec_id,
        "status": status,
        "room_id": "room-1",
        "session_id": "session-1",
        "participant_id": "participant-1",
        "started_at": (ended - timedelta(minutes=5)).isoformat() if ended else None,
        "ended_at": ended.isoformat() if ended else None,
        "download_url": "https://example.invalid/secret",
        **extra,
    }
    return Recording.from_api({k: v for k, v in entry.items() if v is not None})


def stored(rec_id: str, *, size: int = 1000) -> StoredObject:
    return StoredObject(
        key=f"room-1/{rec_id}.mp4",
        size=size,
        sha256="ab" * 32,
        version_id="v1",
        retain_until=T0 + timedelta(days=365),
    )


async def archive(ledger: Ledger, rec_id: str, *, size: int = 1000) -> None:
    assert await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
    assert await ledger.complete(rec_id, owner="w", stored=stored(rec_id, size=size))


async def state_of(ledger: Ledger, rec_id: str) -> State:
    row = await ledger.get(rec_id)
    assert row is not None
    return row.state


async def audit_actions(ledger: Ledger) -> list[tuple[str, str | None]]:
    return [(e.action, e.recording_id) async for e in ledger.iter_audit()]


# -- observe -----------------------------------------------------------------------------------
async def test_observe_inserts_pending_and_returns_ids_needing_work(ledger: Ledger) -> None:
    assert await ledger.observe([]) == set()
    got = await ledger.observe([rec("a"), rec("b"), rec("a")])
    assert got == {"a", "b"}

    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.PENDING
    assert row.attempts == 0
    assert row.source_status == "completed"
    assert (row.room_id, row.session_id, row.participant_id) == (
        "room-1",
        "session-1",
        "participant-1",
    )
    assert row.ended_at == T0
    assert row.ended_at.tzinfo is not None and row.ended_at.utcoffset() == timedelta(0)
    assert row.started_at == T0 - timedelta(minutes=5)
    assert row.metadata["id"] == "a"
    assert "download_url" not in row.metadata
    assert row.first_seen_at is not None and row.first_seen_at.tzinfo is not None
    assert await ledger.get("missing") is None
    # Observing never touches the audit chain.
    assert await audit_actions(ledger) == []


async def test_observe_of_archived_id_returns_nothing_and_keeps_it(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await archive(ledger, "a")
    assert await ledger.observe([rec("a", status="deleted")]) == set()
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.ARCHIVED
    assert row.storage_key == "room-1/a.mp4"


async def test_observe_refreshes_metadata_but_never_state(ledger: Ledger) -> None:
    await ledger.observe([rec("a", ended=None, status="processing")])
    row = await ledger.get("a")
    assert row is not None
    assert row.source_status == "processing"
    assert row.ended_at is None

    await ledger.observe([rec("a", codec="h264")])
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.PENDING
    assert row.source_status == "completed"
    assert row.ended_at == T0
    assert row.metadata["codec"] == "h264"

    assert await ledger.claim("a", owner="w", lease_seconds=LEASE) == 1
    assert await ledger.observe([rec("a", codec="vp8")]) == set()
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.IN_PROGRESS
    # A claim is no attempt: only a failure of the recording uses one.
    assert (row.attempts, row.claims) == (0, 1)
    assert row.metadata["codec"] == "vp8"


async def test_observe_returns_expired_leases_and_retryable_failures(ledger: Ledger) -> None:
    await ledger.observe([rec("leased"), rec("failed"), rec("perm")])
    await ledger.claim("leased", owner="w", lease_seconds=SHORT_LEASE)
    for rec_id, permanent in (("failed", False), ("perm", True)):
        await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
        await ledger.fail(rec_id, owner="w", error="boom", permanent=permanent)

    ids = [rec("leased"), rec("failed"), rec("perm")]
    assert await ledger.observe(ids) == {"failed"}
    await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await ledger.observe(ids) == {"failed", "leased"}


async def test_observe_many_pages(ledger: Ledger) -> None:
    """100,000 sightings in API pages of 250 (a few seconds at most)."""
    total, page = 100_000, 250
    for start in range(0, total, page):
        batch = [
            rec(f"rec-{n:06d}", ended=T0 + timedelta(seconds=n), duration_secs=60, size_mb=1.5)
            for n in range(start, start + page)
        ]
        assert len(await ledger.observe(batch)) == page
    summary = await ledger.summary()
    assert summary.counts[State.PENDING] == total
    assert summary.oldest_unarchived_ended_at == T0


# -- claim, complete, fail, release, reject -------------------------------------------------
async def test_claim_then_complete_archives(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    assert await ledger.claim("a", owner="w1", lease_seconds=LEASE) == 1
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.IN_PROGRESS
    assert row.lease_owner == "w1"
    assert row.lease_expires is not None and row.lease_expires > datetime.now(UTC)

    assert await ledger.complete("a", owner="w1", stored=stored("a", size=4242)) is True
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.ARCHIVED
    assert (row.storage_key, row.size, row.sha256) == ("room-1/a.mp4", 4242, "ab" * 32)
    assert row.version_id == "v1"
    assert row.retain_until == T0 + timedelta(days=365)
    assert row.archived_at is not None
    assert row.lease_owner is None
    assert (row.attempts, row.claims, row.completed_by) == (0, 1, "w1")

    # Archived is final: never claimed again, a second complete changes nothing.
    assert await ledger.claim("a", owner="w2", lease_seconds=LEASE) is None
    assert await ledger.complete("a", owner="w2", stored=stored("a", size=1)) is False
    # The transfer that archived it, asking again (its answer lost): its own commit stands.
    assert await ledger.complete("a", owner="w1", stored=stored("a", size=2)) is True
    row = await ledger.get("a")
    assert row is not None and row.size == 4242


async def test_claim_of_unknown_id_returns_none(ledger: Ledger) -> None:
    assert await ledger.claim("nope", owner="w", lease_seconds=LEASE) is None


async def test_complete_without_claim_is_refused(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    with pytest.raises(LedgerError, match="never claimed"):
        await ledger.complete("a", owner="w", stored=stored("a"))
    with pytest.raises(LedgerError):
        await ledger.complete("unknown", owner="w", stored=stored("unknown"))
    assert await state_of(ledger, "a") == State.PENDING
    assert await audit_actions(ledger) == []


async def test_transitions_at_once_succeed_or_fail_alone(ledger: Ledger) -> None:
    """Issued together (SQLite runs them in one group transaction), one refused transition
    undoes nothing of the others, and each caller gets its own answer."""
    ids = [f"r{i}" for i in range(12)]
    await ledger.observe([rec(i) for i in [*ids, "never"]])
    claims = await asyncio.gather(
        *(ledger.claim(i, owner="w", lease_seconds=LEASE) for i in ids),
        ledger.claim("unknown", owner="w", lease_seconds=LEASE),
    )
    assert claims == [1] * len(ids) + [None]
    results = await asyncio.gather(
        *(ledger.complete(i, owner="w", stored=stored(i)) for i in ids[:6]),
        ledger.complete("never", owner="w", stored=stored("never")),
        *(ledger.heartbeat(i, owner="w", lease_seconds=LEASE) for i in ids[6:]),
        ledger.heartbeat("never", owner="w", lease_seconds=LEASE),
        return_exceptions=True,
    )
    assert results[:6] == [True] * 6
    assert isinstance(results[6], LedgerError) and "never claimed" in str(results[6])
    assert results[7:] == [True] * 6 + [False]
    for i in ids[:6]:
        assert await state_of(ledger, i) == State.ARCHIVED
    for i in ids[6:]:
        assert await state_of(ledger, i) == State.IN_PROGRESS
    assert await state_of(ledger, "never") == State.PENDING
    assert sorted(await audit_actions(ledger)) == [("archived", i) for i in ids[:6]]


async def test_a_transition_refused_after_writing_undoes_only_itself(ledger: Ledger) -> None:
    """In one group transaction, a program refused after its writes leaves nothing of them and
    takes nothing of the others' (the SQLite ledger: a savepoint each)."""
    await ledger.observe([rec("a"), rec("b")])
    inner: Any = getattr(ledger, "inner", ledger)

    def refused() -> ops.Program[None]:
        yield ops.Load("a")
        yield ops.Update([("a", {"last_error": "written, then refused"})])
        yield ops.Audit("noted", "a", {})
        raise LedgerError("refused after writing")

    def kept() -> ops.Program[bool]:
        yield ops.Load("b")
        yield ops.Update([("b", {"last_error": "kept"})])
        yield ops.Audit("noted", "b", {})
        return True

    results = await asyncio.gather(
        inner._carry_out("test", refused, grouped=True),
        inner._carry_out("test", kept, grouped=True),
        return_exceptions=True,
    )
    assert isinstance(results[0], LedgerError) and results[1] is True
    a, b = await ledger.get("a"), await ledger.get("b")
    assert a is not None and a.last_error is None
    assert b is not None and b.last_error == "kept"
    assert await audit_actions(ledger) == [("noted", "b")]


async def test_leased_row_is_not_claimable_until_the_lease_expires(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    assert await ledger.claim("a", owner="w1", lease_seconds=SHORT_LEASE) == 1
    assert await ledger.claim("a", owner="w2", lease_seconds=LEASE) is None
    # An owner names one transfer: the same owner again is that claim, retried.
    assert await ledger.claim("a", owner="w1", lease_seconds=SHORT_LEASE) == 1
    await asyncio.sleep(SHORT_LEASE * 1.5)
    # The stopped transfer's claim used no attempt: taking it over counts an interruption.
    assert await ledger.claim("a", owner="w2", lease_seconds=LEASE) == 1
    row = await ledger.get("a")
    assert row is not None and row.lease_owner == "w2"
    assert (row.attempts, row.claims, row.interruptions) == (0, 2, 1)
    assert await ledger.heartbeat("a", owner="w1", lease_seconds=LEASE) is False


async def test_heartbeat_extends_the_lease(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await ledger.claim("a", owner="w1", lease_seconds=SHORT_LEASE)
    assert await ledger.heartbeat("a", owner="w1", lease_seconds=LEASE) is True
    await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await ledger.claim("a", owner="w2", lease_seconds=LEASE) is None
    assert await ledger.heartbeat("a", owner="w2", lease_seconds=LEASE) is False
    assert await ledger.heartbeat("missing", owner="w1", lease_seconds=LEASE) is False


async def test_complete_after_a_lost_lease(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b")])
    for rec_id in ("a", "b"):
        await ledger.claim(rec_id, owner="slow", lease_seconds=SHORT_LEASE)
    await asyncio.sleep(SHORT_LEASE * 1.5)
    for rec_id in ("a", "b"):
        assert await ledger.claim(rec_id, owner="fast", lease_seconds=LEASE)

    # a: the slow worker finishes first; its verified bytes are recorded, the other's are not.
    assert await ledger.complete("a", owner="slow", stored=stored("a", size=1)) is True
    assert await ledger.complete("a", owner="fast", stored=stored("a", size=2)) is False
    # b: the other worker archived it meanwhile; the late complete changes nothing.
    assert await ledger.complete("b", owner="fast", stored=stored("b", size=3)) is True
    assert await ledger.complete("b", owner="slow", stored=stored("b", size=4)) is False

    for rec_id, size in (("a", 1), ("b", 3)):
        row = await ledger.get(rec_id)
        assert row is not None
        assert (row.state, row.size) == (State.ARCHIVED, size)
    assert await audit_actions(ledger) == [("archived", "a"), ("archived", "b")]


async def test_fail_and_retry_until_max_attempts(ledger_factory: LedgerMaker) -> None:
    async with ledger_factory(budget=Budget(max_attempts=2)) as ledger:
        await ledger.observe([rec("a")])
        assert await ledger.claim("a", owner="w1", lease_seconds=LEASE) == 1
        await ledger.fail("a", owner="w1", error="timeout", permanent=False)
        row = await ledger.get("a")
        assert row is not None
        assert (row.state, row.attempts, row.last_error) == (State.FAILED, 1, "timeout")
        assert (row.lease_owner, row.permanent) == (None, False)

        assert await ledger.observe([rec("a")]) == {"a"}
        assert await ledger.claim("a", owner="w2", lease_seconds=LEASE) == 2
        await ledger.fail("a", owner="w2", error="timeout again", permanent=False)
        # The budget is used up: failed for good, still owed, never claimed again by itself.
        row = await ledger.get("a")
        assert row is not None and (row.state, row.permanent) == (State.FAILED, True)
        assert await ledger.observe([rec("a")]) == set()
        assert await ledger.claim("a", owner="w3", lease_seconds=LEASE) is None
        tally = await ledger.tally(["a"])
        assert tally.owed == 1 and tally.needs_action == {"a": "timeout again"}
        assert [e.details for e in [e async for e in ledger.iter_audit()]] == [
            {"error": "timeout", "permanent": False, "attempt": 1},
            {"error": "timeout again", "permanent": True, "attempt": 2},
        ]
    # A ledger opened with a larger budget does not undo "for good": an operator does.
    async with ledger_factory(budget=Budget(max_attempts=9)) as ledger:
        assert await ledger.claim("a", owner="w4", lease_seconds=LEASE) is None
        assert await ledger.retry(["a", "unknown"]) == ["a"]
        row = await ledger.get("a")
        assert row is not None
        assert (row.state, row.attempts, row.permanent) == (State.PENDING, 0, False)
        assert await ledger.claim("a", owner="w4", lease_seconds=LEASE) == 1
        assert (await audit_actions(ledger))[-1] == ("retry_requested", "a")


async def test_interruptions_use_no_attempt_but_have_a_limit(ledger: Ledger) -> None:
    """A claim cut short by its process stopping (its lease expires) is an interruption; past
    ``max_interruptions`` (2 here) the row is failed for good instead of looping forever."""
    await ledger.observe([rec("a")])
    for n in range(3):
        assert await ledger.claim("a", owner=f"w{n}", lease_seconds=SHORT_LEASE) == 1
        await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await ledger.claim("a", owner="w3", lease_seconds=LEASE) is None
    row = await ledger.get("a")
    assert row is not None
    assert (row.state, row.permanent, row.attempts) == (State.FAILED, True, 0)
    assert row.last_error is not None and row.last_error.startswith("interrupted 3 times")
    assert (await audit_actions(ledger)) == [("failed", "a")]


async def test_permanent_failure_is_never_claimable(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await ledger.claim("a", owner="w", lease_seconds=LEASE)
    await ledger.fail("a", owner="w", error="404", permanent=True)
    assert await ledger.claim("a", owner="w", lease_seconds=LEASE) is None
    assert await ledger.observe([rec("a")]) == set()
    row = await ledger.get("a")
    assert row is not None and (row.state, row.last_error) == (State.FAILED, "404")


async def test_fail_and_release_by_a_non_owner_change_nothing(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b")])
    await ledger.fail("a", owner="w", error="never claimed", permanent=False)
    await ledger.release("a", owner="w")
    assert await state_of(ledger, "a") == State.PENDING

    await ledger.claim("b", owner="owner", lease_seconds=LEASE)
    await ledger.fail("b", owner="intruder", error="x", permanent=True)
    await ledger.release("b", owner="intruder")
    row = await ledger.get("b")
    assert row is not None
    assert (row.state, row.lease_owner, row.claims) == (State.IN_PROGRESS, "owner", 1)
    assert await audit_actions(ledger) == []


async def test_release_returns_to_pending_without_counting(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    assert await ledger.claim("a", owner="w", lease_seconds=LEASE) == 1
    await ledger.release("a", owner="w")
    row = await ledger.get("a")
    assert row is not None
    assert (row.state, row.attempts, row.lease_owner) == (State.PENDING, 0, None)
    assert await ledger.observe([rec("a")]) == {"a"}
    assert await ledger.claim("a", owner="w", lease_seconds=LEASE) == 1
    assert await audit_actions(ledger) == []


async def test_reject(ledger: Ledger) -> None:
    await ledger.reject("../evil", reason="unsafe id", metadata={"id": "../evil"})
    row = await ledger.get("../evil")
    assert row is not None
    assert (row.state, row.last_error, row.permanent) == (State.FAILED, "unsafe id", True)
    assert row.metadata == {"id": "../evil"}
    assert await ledger.claim("../evil", owner="w", lease_seconds=LEASE) is None

    await ledger.observe([rec("seen")])
    await ledger.reject("seen", reason="no size")
    row = await ledger.get("seen")
    assert row is not None
    assert (row.state, row.last_error, row.rejected) == (State.FAILED, "no size", True)
    assert row.metadata["id"] == "seen"  # kept when reject gives none
    assert (await ledger.summary()).permanent_failures == 2

    await ledger.observe([rec("done")])
    await archive(ledger, "done")
    await ledger.reject("done", reason="too late")
    assert await state_of(ledger, "done") == State.ARCHIVED

    # Rejecting the same entry for the same reason on every pass records it once.
    await ledger.reject("../evil", reason="unsafe id")
    await ledger.reject("seen", reason="no size")
    # An entry rejected for what it said is judged again when it is listed again.
    assert await ledger.observe([rec("seen")]) == {"seen"}
    row = await ledger.get("seen")
    assert row is not None
    assert (row.state, row.permanent, row.rejected, row.last_error) == (
        State.PENDING,
        False,
        False,
        None,
    )
    assert await audit_actions(ledger) == [
        ("rejected", "../evil"),
        ("rejected", "seen"),
        ("archived", "done"),
        ("readmitted", "seen"),
    ]
    summary = await ledger.summary()
    assert summary.permanent_failures == 1


async def test_tally_says_what_is_owed_and_why(ledger: Ledger) -> None:
    await ledger.observe(
        [
            rec("done"),
            rec("busy"),
            rec("flaky"),
            rec("bad"),
            rec("new"),
            rec("proc", status="processing"),
        ]
    )
    await archive(ledger, "done")
    await ledger.claim("busy", owner="elsewhere", lease_seconds=LEASE)
    for rec_id, permanent in (("flaky", False), ("bad", True)):
        await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
        await ledger.fail(rec_id, owner="w", error=f"{rec_id} error", permanent=permanent)
    await ledger.observe([rec("gone")])
    assert await ledger.give_up("gone", reason="deleted at the source before archiving") is True
    assert await ledger.give_up("gone", reason="again") is False
    with pytest.raises(LedgerError, match="being archived right now"):
        await ledger.give_up("busy", reason="no")

    tally = await ledger.tally(
        ["done", "busy", "flaky", "bad", "new", "proc", "gone", "never-seen", "done"]
    )
    assert (tally.archived, tally.given_up, tally.unknown, tally.owed) == (1, 1, 1, 5)
    assert tally.needs_action == {"bad": "bad error"}
    assert tally.retrying == {"flaky": "flaky error (attempt 1 of 3)"}
    assert tally.in_progress == {"busy": "being archived by elsewhere"}
    assert tally.processing == {"proc": "still processing at the source"}
    assert set(tally.pending) == {"new"}
    owed = {row.id async for row in ledger.iter_owed()}
    assert owed == {"busy", "flaky", "bad", "new", "proc"}
    summary = await ledger.summary()
    assert summary.counts[State.GIVEN_UP] == 1 and summary.owed == 5
    assert (await audit_actions(ledger))[-1] == ("given_up", "gone")


async def test_reopen_makes_an_archived_copy_owed_again(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b")])
    await archive(ledger, "a")
    assert await ledger.reopen("a", reason="missing from the archive") is True
    assert await ledger.reopen("b", reason="not archived") is False
    row = await ledger.get("a")
    assert row is not None
    assert (row.state, row.storage_key, row.last_error) == (
        State.PENDING,
        "room-1/a.mp4",
        "repair: missing from the archive",
    )
    assert [r.id async for r in ledger.iter_archived()] == []
    await archive(ledger, "a", size=77)
    row = await ledger.get("a")
    assert row is not None and (row.state, row.size) == (State.ARCHIVED, 77)
    assert await audit_actions(ledger) == [
        ("archived", "a"),
        ("reopened", "a"),
        ("archived", "a"),
    ]


async def test_an_expired_row_is_settled_and_never_claimed_again(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b"), rec("c")])
    await archive(ledger, "a", size=10)
    await archive(ledger, "b", size=20)
    removed = [{"key": "room-1/a.mp4", "version_id": "v1"}]
    assert await ledger.expire("a", rule="delete_after_days = 30", removed=removed) is True
    assert await ledger.expire("a", rule="again", removed=[]) is False  # once
    assert await ledger.expire("c", rule="not archived", removed=[]) is False
    row = await ledger.get("a")
    assert row is not None and row.state is State.EXPIRED and row.expired_at is not None
    assert row.storage_key == "room-1/a.mp4" and row.sha256 == "ab" * 32  # the record stays
    # Listed again at the source (not deleted there): still expired, never fetched again.
    assert await ledger.observe([rec("a")]) == set()
    assert await ledger.claim("a", owner="w", lease_seconds=LEASE) is None
    assert await state_of(ledger, "a") is State.EXPIRED
    assert [r.id async for r in ledger.iter_archived()] == ["b"]
    assert [r.id async for r in ledger.iter_expired()] == ["a"]
    assert "a" not in {r.id async for r in ledger.iter_owed()}
    tally = await ledger.tally(["a", "b", "c", "never-seen"])
    assert (tally.expired, tally.archived, tally.owed, tally.unknown) == (1, 1, 1, 1)
    summary = await ledger.summary()
    assert summary.counts[State.EXPIRED] == 1 and summary.archived_bytes == 20
    assert await ledger.reopen("a", reason="repair") is False  # nothing to repair
    entries = [e async for e in ledger.iter_audit()]
    assert entries[-1].action == "expired" and entries[-1].recording_id == "a"
    assert entries[-1].details["removed"] == removed
    assert entries[-1].details["sha256"] == "ab" * 32


async def test_a_legal_hold_is_set_released_and_audited(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b")])
    await archive(ledger, "a")
    assert await ledger.hold("a", on=True, reason="case 42") is True
    assert await ledger.hold("a", on=True, reason="case 42") is False  # already held
    row = await ledger.get("a")
    assert row is not None and row.legal_hold and row.state is State.ARCHIVED
    assert await ledger.hold("b", on=True, reason="before its copy exists") is True
    assert await ledger.hold("a", on=False, reason="case closed") is True
    row = await ledger.get("a")
    assert row is not None and not row.legal_hold
    with pytest.raises(LedgerError, match="no recording"):
        await ledger.hold("zzz", on=True, reason="x")
    await ledger.expire("a", rule="r", removed=[])
    with pytest.raises(LedgerError, match="expired"):
        await ledger.hold("a", on=True, reason="too late")
    actions = await audit_actions(ledger)
    assert actions[-4:] == [
        ("legal_hold", "a"),
        ("legal_hold", "b"),
        ("legal_hold_released", "a"),
        ("expired", "a"),
    ]


async def test_concurrent_claims_have_exactly_one_winner(ledger_factory: LedgerMaker) -> None:
    async with ledger_factory() as first, ledger_factory() as second:
        await first.observe([rec("a")])
        handles = (first, second)
        results = await asyncio.gather(
            *(handles[n % 2].claim("a", owner=f"w{n}", lease_seconds=LEASE) for n in range(20))
        )
    assert sorted(results, key=lambda r: r is None) == [1] + [None] * 19


async def test_mark_deleted_at_source(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await archive(ledger, "a")
    await ledger.mark_deleted_at_source("a")
    await ledger.mark_deleted_at_source("a")
    row = await ledger.get("a")
    assert row is not None
    assert row.state == State.ARCHIVED
    assert row.deleted_at_source is not None
    assert await audit_actions(ledger) == [("archived", "a"), ("deleted_at_source", "a")]


# -- reads ---------------------------------------------------------------------------------
async def test_states_in_one_call(ledger: Ledger) -> None:
    assert await ledger.states([]) == {}
    await ledger.observe([rec(f"r{n:04d}") for n in range(1200)])
    await archive(ledger, "r0001")
    await ledger.reject("bad", reason="unsafe")
    ids = [f"r{n:04d}" for n in range(1200)] + ["bad", "unknown", "r0001"]
    got = await ledger.states(ids)
    assert set(got) == set(ids) - {"unknown"}
    assert got["r0001"] == State.ARCHIVED
    assert got["r0000"] == State.PENDING
    assert got["bad"] == State.FAILED


async def test_summary(ledger: Ledger) -> None:
    empty = await ledger.summary()
    assert dict(empty.counts) == dict.fromkeys(State, 0)
    assert empty.oldest_unarchived_ended_at is None
    assert (empty.archived_bytes, empty.permanent_failures, empty.retryable_failures) == (0, 0, 0)

    day = timedelta(days=1)
    recs = [rec(f"r{n}", ended=T0 + n * day) for n in range(7)] + [rec("undated", ended=None)]
    await ledger.observe(recs)
    await archive(ledger, "r0", size=100)  # the oldest, but archived
    await archive(ledger, "r1", size=23)
    await ledger.claim("r2", owner="w", lease_seconds=LEASE)
    for rec_id, permanent in (("r3", True), ("r4", False), ("r5", False)):
        await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
        await ledger.fail(rec_id, owner="w", error="e", permanent=permanent)

    summary = await ledger.summary()
    assert dict(summary.counts) == {
        State.PENDING: 2,
        State.IN_PROGRESS: 1,
        State.ARCHIVED: 2,
        State.FAILED: 3,
        State.GIVEN_UP: 0,
        State.EXPIRED: 0,
    }
    assert (summary.permanent_failures, summary.retryable_failures) == (1, 2)
    assert summary.oldest_unarchived_ended_at == T0 + 2 * day
    assert summary.archived_bytes == 123

    # A permanent failure is counted apart; it does not hold the lag forever.
    await ledger.observe([rec("ancient", ended=T0 - day)])
    assert (await ledger.summary()).oldest_unarchived_ended_at == T0 - day
    await ledger.reject("ancient", reason="unsafe id")
    after = await ledger.summary()
    assert after.oldest_unarchived_ended_at == T0 + 2 * day
    assert after.permanent_failures == 2


async def test_failures_newest_first(ledger: Ledger) -> None:
    await ledger.observe([rec("a"), rec("b"), rec("c"), rec("ok")])
    for rec_id in ("b", "a", "c"):
        await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
        await ledger.fail(rec_id, owner="w", error=f"error {rec_id}", permanent=False)
        await asyncio.sleep(0.002)
    # Being seen again is not a new failure.
    await ledger.observe([rec("b")])
    assert [r.id for r in await ledger.failures()] == ["c", "a", "b"]
    assert [r.last_error for r in await ledger.failures(limit=2)] == ["error c", "error a"]


async def test_iter_archived_order_and_bounds(ledger: Ledger) -> None:
    hour = timedelta(hours=1)
    ends = {"e": T0 + 2 * hour, "d": T0, "b": T0 + hour, "a": T0 + hour, "c": T0 + 3 * hour}
    recs = [rec(i, ended=e) for i, e in ends.items()]
    recs += [rec("undated", ended=None), rec("pending", ended=T0)]
    await ledger.observe(recs)
    for rec_id in [*ends, "undated"]:
        await archive(ledger, rec_id)

    everything = [r.id async for r in ledger.iter_archived()]
    assert sorted(everything) == ["a", "b", "c", "d", "e", "undated"]
    assert [i for i in everything if i != "undated"] == ["d", "a", "b", "e", "c"]
    assert [r.id async for r in ledger.iter_archived(since=T0 + hour)] == ["a", "b", "e", "c"]
    assert [r.id async for r in ledger.iter_archived(until=T0 + 2 * hour)] == ["d", "a", "b"]
    window = ledger.iter_archived(since=T0 + hour, until=T0 + 3 * hour)
    assert [r.id async for r in window] == ["a", "b", "e"]
    assert [r.id async for r in ledger.iter_archived(since=T0 + 9 * hour)] == []
    (row,) = [r async for r in ledger.iter_archived(since=T0, until=T0 + hour)]
    assert (row.id, row.state, row.storage_key) == ("d", State.ARCHIVED, "room-1/d.mp4")


# -- audit chain, passes, meta -------------------------------------------------------------
async def test_audit_chain(ledger: Ledger) -> None:
    assert (await verify_chain(ledger.iter_audit())).entries == 0
    await ledger.observe([rec("a"), rec("b")])
    await archive(ledger, "a", size=7)
    await ledger.claim("b", owner="w", lease_seconds=LEASE)
    await ledger.fail("b", owner="w", error="HTTP 500", permanent=False)
    await ledger.reject("bad", reason="no id")
    appended = await ledger.append_audit("note", None, {"by": "test", "at": T0, "n": [1, 2]})

    entries = [e async for e in ledger.iter_audit()]
    assert [(e.seq, e.action, e.recording_id) for e in entries] == [
        (1, "archived", "a"),
        (2, "failed", "b"),
        (3, "rejected", "bad"),
        (4, "note", None),
    ]
    assert entries[0].prev_hash == GENESIS
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(entries))
    assert entries[0].details == {
        "key": "room-1/a.mp4",
        "size": 7,
        "sha256": "ab" * 32,
        "version_id": "v1",
        "retain_until": entries[0].details["retain_until"],
    }
    retain = datetime.fromisoformat(entries[0].details["retain_until"])
    assert retain == T0 + timedelta(days=365)
    assert entries[1].details == {"error": "HTTP 500", "permanent": False, "attempt": 1}
    assert entries[2].details == {"reason": "no id"}
    assert entries[3] == appended
    assert all(e.at.tzinfo is not None for e in entries)

    report = await verify_chain(ledger.iter_audit())
    assert report.ok, report.problems
    assert report.entries == 4


async def test_passes_round_trip_newest_first(ledger: Ledger) -> None:
    assert await ledger.last_passes() == []
    records = [
        PassRecord(
            started_at=T0 + timedelta(minutes=n),
            finished_at=T0 + timedelta(minutes=n, seconds=30),
            ok=n != 1,
            listed=10 * n,
            enqueued=n,
            archived=n,
            failed=1,
            window="2026-03-01/2026-03-02" if n else None,
            error="HTTP 503" if n == 1 else None,
            instance="host-a",
            extra={"pages": n, "nested": {"x": [1, 2]}},
        )
        for n in range(3)
    ]
    for record in records:
        await ledger.record_pass(record)
    assert await ledger.last_passes() == records[::-1]
    assert await ledger.last_passes(limit=2) == [records[2], records[1]]
    await ledger.record_pass(PassRecord(started_at=T0, finished_at=T0, ok=True))
    oldest = (await ledger.last_passes())[-1]
    assert (oldest.extra, oldest.window, oldest.listed) == ({}, None, 0)


async def test_meta_round_trip(ledger: Ledger) -> None:
    assert await ledger.get_meta("cursor") is None
    await ledger.set_meta("cursor", "2026-03-01T00:00:00Z")
    await ledger.set_meta("other", "")
    assert await ledger.get_meta("cursor") == "2026-03-01T00:00:00Z"
    await ledger.set_meta("cursor", "next")
    assert await ledger.get_meta("cursor") == "next"
    assert await ledger.get_meta("other") == ""


async def test_advance_meta_is_a_compare_and_set(ledger_factory: LedgerMaker) -> None:
    async with ledger_factory() as first, ledger_factory() as second:
        assert await first.advance_meta("hwm", "2026-03-01", "2026-03-02") is False
        assert await first.get_meta("hwm") is None
        assert await first.advance_meta("hwm", None, "2026-03-01") is True
        assert await second.advance_meta("hwm", None, "2026-03-09") is False
        assert await second.get_meta("hwm") == "2026-03-01"
        # Several instances moving the same mark from the same view: exactly one wins.
        handles = (first, second)
        results = await asyncio.gather(
            *(
                handles[n % 2].advance_meta("hwm", "2026-03-01", f"2026-03-{n + 2:02d}")
                for n in range(10)
            )
        )
        assert results.count(True) == 1
        winner = f"2026-03-{results.index(True) + 2:02d}"
        assert await first.get_meta("hwm") == winner
        await second.set_meta("hwm", "reset")
        assert await first.advance_meta("hwm", winner, "x") is False
        assert await first.advance_meta("hwm", "reset", "2026-04-01") is True
        assert await second.get_meta("hwm") == "2026-04-01"


async def test_migrate_is_idempotent(ledger: Ledger) -> None:
    version = await ledger.migrate()
    assert version >= 1
    assert await ledger.migrate() == version


async def fill(ledger: Ledger) -> None:
    """A ledger with something of everything: states, attempts, leases, audit, passes, meta."""
    hour = timedelta(hours=1)
    recs = [rec(f"r{n}", ended=T0 + n * hour, codec="opus") for n in range(6)]
    await ledger.observe([*recs, rec("undated", ended=None, status="processing")])
    await archive(ledger, "r0", size=10)
    await archive(ledger, "r1", size=11)
    await ledger.mark_deleted_at_source("r1")
    for rec_id, permanent in (("r2", True), ("r3", False)):
        await ledger.claim(rec_id, owner="w", lease_seconds=LEASE)
        await ledger.fail(rec_id, owner="w", error=f"boom {rec_id}", permanent=permanent)
    await ledger.claim("r4", owner="host-a:1:x", lease_seconds=LEASE)
    upload = {"key": "room-1/r4.mp4", "upload_id": "u-1", "parts": [{"n": 1, "size": 8}]}
    assert await ledger.note_upload("r4", owner="host-a:1:x", upload=upload)
    await ledger.quarantine("r0", key="room-1/r0.mp4", version_id="v0", reason="hash mismatch")
    await ledger.reject("../evil", reason="unsafe id", metadata={"id": "../evil", "n": 1.5})
    await ledger.append_audit("verified", None, {"checked": 2, "at": T0})
    for n in range(3):
        await ledger.record_pass(
            PassRecord(
                started_at=T0 + n * hour,
                finished_at=T0 + n * hour + timedelta(seconds=5),
                ok=n != 1,
                listed=n,
                window="all" if n else None,
                instance="host-a",
                extra={"pass": n},
            )
        )
    await ledger.set_meta("daemon.high_water_mark", "2026-03-01")
    await ledger.set_meta("empty", "")


async def exported(ledger: Ledger) -> list[tuple[str, dict[str, Any]]]:
    return [item async for item in ledger.export_records()]


async def replay(items: list[tuple[str, dict[str, Any]]]) -> AsyncIterator[tuple[str, Any]]:
    for item in items:
        yield item


@pytest.mark.parametrize("target_name", sorted(BACKENDS))
@pytest.mark.parametrize("source_name", sorted(BACKENDS))
async def test_export_import_round_trip(source_name: str, target_name: str, tmp_path: Path) -> None:
    async with BACKENDS[source_name](tmp_path / "a") as make_source, make_source() as source:
        await fill(source)
        items = await exported(source)
        before = await source.summary()
    kinds = [kind for kind, _ in items]
    assert kinds == sorted(kinds, key=KINDS.index)
    assert kinds.count("recording") == 8 and kinds.count("audit") == 8
    assert kinds.count("pass") == 3 and kinds.count("meta") == 2

    async with BACKENDS[target_name](tmp_path / "b") as make_target, make_target() as target:
        await target.import_records(replay(items))
        assert await exported(target) == items
        assert await target.summary() == before
        report = await verify_chain(target.iter_audit())
        assert report.ok and report.entries == 8, report.problems
        row = await target.get("r4")
        assert row is not None and (row.state, row.lease_owner) == (
            State.IN_PROGRESS,
            "host-a:1:x",
        )
        # The chain goes on from the imported head, and the ledger works as before.
        await target.observe([rec("r5")])
        await archive(target, "r5")
        assert (await verify_chain(target.iter_audit())).ok
        assert await target.last_passes(limit=1) == [
            PassRecord(
                started_at=T0 + timedelta(hours=2),
                finished_at=T0 + timedelta(hours=2, seconds=5),
                ok=True,
                listed=2,
                window="all",
                instance="host-a",
                extra={"pass": 2},
            )
        ]

        # Never mixed into a ledger that holds something: refused, and nothing changed.
        with pytest.raises(LedgerError, match="not empty"):
            await target.import_records(replay(items))
        assert await state_of(target, "r5") == State.ARCHIVED
        # Unless replacing it is asked for.
        await target.import_records(replay(items), replace=True)
        assert await exported(target) == items

        # A failure midway leaves the ledger as it was.
        async def broken() -> AsyncIterator[tuple[str, Any]]:
            for item in items[:3]:
                yield item
            raise LedgerError("cut short")

        with pytest.raises(LedgerError, match="cut short"):
            await target.import_records(broken(), replace=True)
        assert await exported(target) == items


async def test_data_survives_reopening(ledger_factory: LedgerMaker) -> None:
    async with ledger_factory() as first:
        await first.observe([rec("a")])
        await archive(first, "a")
        await first.set_meta("k", "v")
    async with ledger_factory() as second:
        assert await state_of(second, "a") == State.ARCHIVED
        assert await second.get_meta("k") == "v"
        assert (await verify_chain(second.iter_audit())).ok


# -- SQLite only -----------------------------------------------------------------------------
def _execute(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        return db.execute(sql, params).fetchall()


async def test_sqlite_audit_tampering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with SqliteLedger(path) as ledger:
        await ledger.observe([rec(f"r{n}") for n in range(4)])
        for n in range(4):
            await archive(ledger, f"r{n}", size=100 + n)
        assert (await verify_chain(ledger.iter_audit())).ok

        # Editing one value breaks that entry's hash.
        details = _execute(path, "SELECT details FROM audit WHERE seq = 2")[0][0]
        _execute(path, "UPDATE audit SET details = ? WHERE seq = 2", (details.replace("101", "9"),))
        report = await verify_chain(ledger.iter_audit())
        assert not report.ok
        assert report.problems == ["entry 2: content does not match its hash (edited)"]
        _execute(path, "UPDATE audit SET details = ? WHERE seq = 2", (details,))
        assert (await verify_chain(ledger.iter_audit())).ok

        # Removing a middle entry breaks the sequence and the chain.
        _execute(path, "DELETE FROM audit WHERE seq = 3")
        report = await verify_chain(ledger.iter_audit())
        assert report.entries == 3
        assert "entry 4: expected sequence 3 (entry missing)" in report.problems
        assert "entry 4: does not chain to the entry before it" in report.problems


async def test_sqlite_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / "ledger.sqlite3"
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    async with SqliteLedger(path) as ledger:
        assert await ledger.migrate() == SCHEMA_VERSION
    async with SqliteLedger(path) as ledger:
        assert await ledger.migrate() == SCHEMA_VERSION
    versions = _execute(path, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert _execute(path, "PRAGMA journal_mode") == [("wal",)]


async def test_sqlite_two_processes_migrating_at_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with AsyncExitStack() as stack:
        ledgers = [SqliteLedger(path) for _ in range(4)]
        await asyncio.gather(*(stack.enter_async_context(led) for led in ledgers))
        await ledgers[0].observe([rec("a")])
        assert await state_of(ledgers[3], "a") == State.PENDING
    versions = _execute(path, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with SqliteLedger(path):
        pass
    _execute(path, "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    ledger = SqliteLedger(path)
    with pytest.raises(LedgerError, match=r"newer than the \d+ this archiver knows"):
        await ledger.__aenter__()
    with pytest.raises(LedgerError, match="not open"):
        await ledger.get("a")


async def test_sqlite_exclusive_lock(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with SqliteLedger(path, exclusive=True) as owner:
        await owner.observe([rec("a")])
        message = (
            f"another archiver instance is using the ledger {path} (lock held); "
            "stop it first or use a PostgreSQL ledger to run several"
        )
        with pytest.raises(LedgerError) as caught:
            async with SqliteLedger(path, exclusive=True):
                pass
        assert str(caught.value) == message
        async with SqliteLedger(path) as reader:
            assert await state_of(reader, "a") == State.PENDING
    async with SqliteLedger(path, exclusive=True) as next_owner:
        assert await state_of(next_owner, "a") == State.PENDING


async def test_sqlite_busy_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with SqliteLedger(path, busy_timeout=0.05) as ledger:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(LedgerUnavailable, match="locked") as caught:
                await ledger.set_meta("k", "v")
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
            other.execute("ROLLBACK")
        await ledger.set_meta("k", "v")
        assert await ledger.get_meta("k") == "v"


async def test_sqlite_not_a_database_is_permanent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(LedgerError, match="not a database") as caught:
        async with SqliteLedger(path):
            pass
    assert not isinstance(caught.value, LedgerUnavailable)


async def test_sqlite_iterators_page_through_ties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_BATCH", 3)
    async with SqliteLedger(tmp_path / "ledger.sqlite3") as ledger:
        ends = [T0 + timedelta(minutes=n // 4) for n in range(10)]  # four rows per minute
        recs = [rec(f"r{n:02d}", ended=e) for n, e in enumerate(ends)]
        recs += [rec(f"u{n}", ended=None) for n in range(4)]
        await ledger.observe(recs)
        for r in recs:
            await archive(ledger, r.id)
        ids = [r.id async for r in ledger.iter_archived()]
        assert ids == ["u0", "u1", "u2", "u3"] + [f"r{n:02d}" for n in range(10)]
        since = T0 + timedelta(minutes=1)
        assert [r.id async for r in ledger.iter_archived(since=since)] == [
            f"r{n:02d}" for n in range(4, 10)
        ]
        seqs = [e.seq async for e in ledger.iter_audit()]
        assert seqs == list(range(1, 15))
        assert (await verify_chain(ledger.iter_audit())).ok


async def test_ledger_must_be_open(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    with pytest.raises(LedgerError, match="not open"):
        await ledger.summary()


def test_open_ledger(tmp_path: Path) -> None:
    ledger = open_ledger(path=tmp_path / "l.sqlite3", exclusive=True)
    assert isinstance(ledger, SqliteLedger) and ledger.exclusive
    with pytest.raises(ConfigError, match=r"ledger\.path"):
        open_ledger()
    with pytest.raises(ConfigError, match="unsupported scheme") as caught:
        open_ledger(url="mysql://user:hunter2@host/db")
    assert "hunter2" not in str(caught.value)


async def test_sqlite_upgrades_a_version_1_ledger(tmp_path: Path) -> None:
    """A ledger written before claims were told from attempts: rows exhausted then are failed
    for good now, rejected entries become judgeable again, claims are what attempts were."""
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for statement in sqlite_module._statements(MIGRATIONS[0]):
            db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        now = T0.isoformat(timespec="microseconds")
        for rid, state, attempts, permanent in (
            ("spent", "failed", 5, 0),
            ("flaky", "failed", 2, 0),
            ("refused", "failed", 0, 1),
            ("done", "archived", 1, 0),
        ):
            db.execute(
                """INSERT INTO recordings (id, state, attempts, permanent, first_seen_at,
                   updated_at, last_error) VALUES (?, ?, ?, ?, ?, ?, 'x')""",
                (rid, state, attempts, permanent, now, now),
            )
    async with SqliteLedger(path, budget=Budget(max_attempts=5)) as ledger:
        rows = {rid: await ledger.get(rid) for rid in ("spent", "flaky", "refused", "done")}
        got = {
            rid: (row.state, row.attempts, row.claims, row.permanent, row.rejected)
            for rid, row in rows.items()
            if row is not None
        }
        assert got == {
            "spent": (State.FAILED, 5, 5, True, False),
            "flaky": (State.FAILED, 2, 2, False, False),
            "refused": (State.FAILED, 0, 0, True, True),
            "done": (State.ARCHIVED, 1, 1, False, False),
        }
        assert await ledger.observe([rec("refused"), rec("spent")]) == {"refused"}
        assert await ledger.give_up("spent", reason="operator") is True
    assert _execute(path, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_sqlite_the_only_instance_takes_back_what_a_killed_one_held(tmp_path: Path) -> None:
    """With the exclusive lock nobody else can be transferring: rows left in progress are
    pending again at once, as an interruption (no attempt); past the limit, failed for good."""
    path = tmp_path / "ledger.sqlite3"
    budget = Budget(max_attempts=MAX, max_interruptions=1)
    async with SqliteLedger(path, exclusive=True, budget=budget) as ledger:
        await ledger.observe([rec("a"), rec("b")])
        assert await ledger.claim("a", owner="killed/1", lease_seconds=LEASE) == 1
        assert await ledger.claim("b", owner="killed/2", lease_seconds=LEASE) == 1
    # (closed without release: what SIGKILL leaves)
    async with SqliteLedger(path, exclusive=True, budget=budget) as ledger:
        row = await ledger.get("a")
        assert row is not None
        assert (row.state, row.attempts, row.interruptions, row.lease_owner) == (
            State.PENDING,
            0,
            1,
            None,
        )
        assert await ledger.claim("a", owner="next/1", lease_seconds=LEASE) == 1
    async with SqliteLedger(path, exclusive=True, budget=budget) as ledger:
        row = await ledger.get("a")
        assert row is not None and (row.state, row.permanent) == (State.FAILED, True)
        assert row.last_error is not None and row.last_error.startswith("interrupted 2 times")
        assert await state_of(ledger, "b") == State.PENDING
    async with SqliteLedger(path) as reader:  # a reader never takes anything back
        assert await state_of(reader, "b") == State.PENDING


@pytest.mark.parametrize("umask", [0o022, 0o077])
async def test_sqlite_files_are_private(tmp_path: Path, umask: int) -> None:
    """The ledger holds every recording's metadata: it, its WAL and its lock are 0600, and a
    directory it creates 0750 (less where the umask says so)."""
    path = tmp_path / "new" / "ledger.sqlite3"
    old = os.umask(umask)
    try:
        async with SqliteLedger(path, exclusive=True) as ledger:
            await ledger.observe([rec("a")])
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir() if p.is_file()
            }
    finally:
        os.umask(old)
    assert modes["ledger.sqlite3"] == modes["ledger.sqlite3.lock"] == 0o600
    assert modes.get("ledger.sqlite3-wal", 0o600) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750 & ~umask


async def test_upload_progress_passes_to_the_next_claimer(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await ledger.claim("a", owner="w1", lease_seconds=LEASE)
    upload = {"key": "room-1/a.mp4", "upload_id": "u-1", "parts": [{"n": 1, "sha256": "x"}]}
    assert await ledger.note_upload("a", owner="w1", upload=upload) is True
    assert await ledger.note_upload("a", owner="intruder", upload={}) is False
    await ledger.release("a", owner="w1")
    row = await ledger.get("a")
    assert row is not None and row.upload == upload  # kept for whoever continues it
    await ledger.claim("a", owner="w2", lease_seconds=LEASE)
    assert await ledger.complete("a", owner="w2", stored=stored("a"))
    row = await ledger.get("a")
    assert row is not None and row.upload == {}
    assert await audit_actions(ledger) == [("archived", "a")]  # progress is not audited


async def test_a_copy_that_cannot_be_removed_is_quarantined(ledger: Ledger) -> None:
    await ledger.observe([rec("a")])
    await archive(ledger, "a")
    await ledger.quarantine("a", key="room-1/a.mp4", version_id="v1", reason="hash mismatch")
    await ledger.quarantine("a", key="room-1/a.mp4", version_id="v2", reason="wrong size")
    row = await ledger.get("a")
    assert row is not None and row.state is State.ARCHIVED
    copies = row.quarantined["copies"]
    assert [(c["version_id"], c["reason"]) for c in copies] == [
        ("v1", "hash mismatch"),
        ("v2", "wrong size"),
    ]
    assert (await audit_actions(ledger))[-2:] == [("quarantined", "a"), ("quarantined", "a")]
    with pytest.raises(LedgerError):
        await ledger.quarantine("nope", key="k", version_id=None, reason="r")
    # Found by the rows that keep one, not by reading the audit chain.
    await ledger.observe([rec("b")])
    await archive(ledger, "b")
    assert [row.id for row in await ledger.with_quarantine()] == ["a"]
    assert [row.id for row in await ledger.holds()] == []
    await ledger.hold("b", on=True, reason="case")
    assert [row.id for row in await ledger.holds()] == ["b"]
