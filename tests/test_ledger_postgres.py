"""What only the PostgreSQL ledger has: a shared server that can vanish, answers that can be
lost after a commit, a password, and the move of a SQLite ledger into it.

The protocol itself is covered for both backends by ``test_ledger_conformance.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import archiver.ledger.postgres as postgres_module
from archiver.audit import verify_chain
from archiver.errors import ConfigError, LedgerError, LedgerUnavailable
from archiver.ledger import open_ledger
from archiver.ledger.base import PassRecord
from archiver.ledger.postgres import SCHEMA_VERSION, PostgresLedger, describe_url
from archiver.ledger.retrying import RetryingLedger
from archiver.models import State
from archiver.retry import RetryPolicy
from archiver.simulator import Simulator, make_recordings
from tests.conftest import ARCHIVER, cli_env
from tests.conftest import write_config as write_sqlite_config
from tests.fixtures_pg import PG_PASSWORD, PgCluster
from tests.test_ledger_conformance import LEASE, T0, archive, rec, stored
from tests.test_postgres_multi import write_config as write_pg_config

FAST = RetryPolicy(attempts=6, total_seconds=30, initial_backoff=0.01, max_backoff=0.05)


def ledger_at(url: str, pg: PgCluster, policy: RetryPolicy = FAST, **kw: Any) -> RetryingLedger:
    """A PostgreSQL ledger as ``open_ledger`` makes one: retried by the wrapper, here fast."""
    return RetryingLedger(PostgresLedger(url, password_file=pg.password_file, **kw), policy)


def lose_answers(ledger: RetryingLedger) -> LoseAnswers:
    inner = ledger.inner
    assert isinstance(inner, PostgresLedger)
    pool = inner._pool = LoseAnswers(inner._pool)
    return pool


class LoseAnswers:
    """Stands in for the ledger's pool: the next ``lose`` transactions commit, then the
    connection "drops" before the answer arrives, as when the server dies right after a commit."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.lose = 0
        self.lost = 0

    def acquire(self) -> Any:
        outer = self

        class Acquire:
            async def __aenter__(self) -> Any:
                self.inner = outer.pool.acquire()
                return await self.inner.__aenter__()

            async def __aexit__(self, *exc: Any) -> None:
                await self.inner.__aexit__(*exc)
                if exc[0] is None and outer.lose > 0:
                    outer.lose -= 1
                    outer.lost += 1
                    raise asyncpg.ConnectionDoesNotExistError(
                        "connection was closed in the middle of operation"
                    )

        return Acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def test_a_call_retried_after_its_answer_was_lost_is_applied_once(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    async with ledger_at(pg_url, pg_cluster) as ledger:
        pool = lose_answers(ledger)

        pool.lose = 1
        assert await ledger.observe([rec("a"), rec("b"), rec("c")]) == {
            "a",
            "b",
            "c",
        }
        pool.lose = 1
        assert await ledger.claim("a", owner="w", lease_seconds=LEASE) == 1
        pool.lose = 1
        assert await ledger.complete("a", owner="w", stored=stored("a")) is True
        row = await ledger.get("a")
        assert row is not None and (row.state, row.attempts, row.claims) == (State.ARCHIVED, 0, 1)

        await ledger.claim("b", owner="w", lease_seconds=LEASE)
        pool.lose = 1
        await ledger.fail("b", owner="w", error="boom", permanent=False)
        await ledger.claim("c", owner="w", lease_seconds=LEASE)
        pool.lose = 1
        await ledger.release("c", owner="w")
        row = await ledger.get("c")
        assert row is not None and (row.state, row.attempts) == (State.PENDING, 0)

        pool.lose = 1
        note = await ledger.append_audit("note", None, {"n": 1})
        pool.lose = 1
        assert await ledger.advance_meta("hwm", None, "2026-03-01") is True
        pool.lose = 1
        assert await ledger.advance_meta("hwm", "2026-03-01", "2026-03-02") is True
        pool.lose = 1
        await ledger.record_pass(PassRecord(started_at=T0, finished_at=T0, ok=True))

        assert pool.lost == 9
        entries = [e async for e in ledger.iter_audit()]
        assert [(e.action, e.recording_id) for e in entries] == [
            ("archived", "a"),
            ("failed", "b"),
            ("note", None),
        ]
        assert entries[-1] == note
        assert (await verify_chain(ledger.iter_audit())).ok
        assert await ledger.get_meta("hwm") == "2026-03-02"
        assert len(await ledger.last_passes()) == 1


async def test_the_adapter_never_retries_the_wrapper_does(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """The commit went through, its answer was lost: the adapter says so once (it never loops);
    the same call through the wrapper is tried again and finds its own commit."""
    async with ledger_at(pg_url, pg_cluster) as ledger:
        pool = lose_answers(ledger)
        inner = ledger.inner
        pool.lose = 1
        with pytest.raises(LedgerUnavailable):
            await inner.observe([rec("a")])
        assert pool.lost == 1 and await inner.get("a") is not None  # committed, once
        pool.lose = 1
        assert await ledger.claim("a", owner="w", lease_seconds=LEASE) == 1
        assert pool.lost == 2


async def test_a_listing_cut_short_goes_on_where_it_was(
    pg_cluster: PgCluster, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the next batch is lost mid-listing: the wrapper lists again and skips what it
    yielded, by the listing's order; rows that end at the same time are told apart by id."""
    monkeypatch.setattr(postgres_module, "_BATCH", 3)
    async with ledger_at(pg_url, pg_cluster) as ledger:
        ends = [T0 + timedelta(minutes=n // 4) for n in range(10)]  # four rows per minute
        recs = [rec(f"u{n}", ended=None) for n in range(4)]
        recs += [rec(f"r{n:02d}", ended=end) for n, end in enumerate(ends)]
        await ledger.observe(recs)
        for r in recs:
            await archive(ledger, r.id)
        everything = [r.id for r in recs]
        assert [r.id async for r in ledger.iter_archived()] == everything
        audit = [e.seq async for e in ledger.iter_audit()]
        assert audit == list(range(1, len(recs) + 1))
        pool = lose_answers(ledger)
        # Cut after the 5th, 7th (mid-way through the first minute's four) and 11th row.
        for cut in (5, 7, 11):
            rows = ledger.iter_archived()
            got = [(await anext(rows)).id for _ in range(cut)]
            pool.lose = 1
            got += [r.id async for r in rows]
            assert got == everything, cut
            entries = ledger.iter_audit()
            seqs = [(await anext(entries)).seq for _ in range(cut)]
            pool.lose = 1
            seqs += [e.seq async for e in entries]
            assert seqs == audit, cut
        assert pool.lost == 6
        owed = ledger.iter_owed()
        assert [r.id async for r in owed] == []


async def test_a_lost_claim_answer_never_hands_the_row_to_two_owners(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    async with ledger_at(pg_url, pg_cluster) as first, ledger_at(pg_url, pg_cluster) as second:
        await first.observe([rec("a")])
        pool = lose_answers(first)
        pool.lose = 1
        assert await first.claim("a", owner="w1", lease_seconds=LEASE) == 1
        assert await second.claim("a", owner="w2", lease_seconds=LEASE) is None
        row = await second.get("a")
        assert row is not None and (row.lease_owner, row.claims) == ("w1", 1)


async def test_many_writers_keep_one_audit_chain(pg_cluster: PgCluster, pg_url: str) -> None:
    ids = [f"r{n:03d}" for n in range(90)]
    async with contextlib.AsyncExitStack() as stack:
        ledgers = [await stack.enter_async_context(ledger_at(pg_url, pg_cluster)) for _ in range(3)]
        await ledgers[0].observe([rec(i) for i in ids])

        async def work(n: int) -> None:
            ledger = ledgers[n % 3]
            rec_id = ids[n]
            await ledger.claim(rec_id, owner=f"w{n}", lease_seconds=LEASE)
            if n % 4:
                await ledger.complete(rec_id, owner=f"w{n}", stored=stored(rec_id))
            else:
                await ledger.fail(rec_id, owner=f"w{n}", error="x", permanent=False)
            await ledger.append_audit("note", rec_id, {"n": n})

        await asyncio.gather(*(work(n) for n in range(len(ids))))
        entries = [e async for e in ledgers[1].iter_audit()]
        assert [e.seq for e in entries] == list(range(1, 2 * len(ids) + 1))
        assert all(a.at <= b.at for a, b in itertools.pairwise(entries))
        report = await verify_chain(ledgers[2].iter_audit())
        assert report.ok, report.problems


class Statements:
    """Stands in for the ledger's pool: each transaction's statements, in order."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.transactions: list[list[str]] = []

    def acquire(self) -> Any:
        outer = self

        class Acquire:
            async def __aenter__(self) -> Any:
                self.inner = outer.pool.acquire()
                conn = await self.inner.__aenter__()
                said: list[str] = []
                outer.transactions.append(said)

                class Noted:
                    def __getattr__(self, name: str) -> Any:
                        found = getattr(conn, name)
                        if name not in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
                            return found

                        def note(sql: str, *args: Any, **kw: Any) -> Any:
                            said.append(" ".join(sql.split()))
                            return found(sql, *args, **kw)

                        return note

                return Noted()

            async def __aexit__(self, *exc: Any) -> None:
                await self.inner.__aexit__(*exc)

        return Acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def test_transitions_issued_together_share_one_transaction(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    ids = [f"r{n}" for n in range(8)]
    async with ledger_at(pg_url, pg_cluster) as led:
        await led.observe([rec(i) for i in ids])
        inner = led.inner
        assert isinstance(inner, PostgresLedger)
        pool = inner._pool = Statements(inner._pool)
        claims = await asyncio.gather(*(led.claim(i, owner="w", lease_seconds=LEASE) for i in ids))
        assert claims == [1] * len(ids)
        done = await asyncio.gather(
            *(led.complete(i, owner="w", stored=stored(i)) for i in ids[:4]),
            *(led.heartbeat(i, owner="w", lease_seconds=LEASE) for i in ids[4:]),
        )
        assert done == [True] * len(ids)
        claimed, completed = pool.transactions
        # Claims may commit without waiting for the disk; a group holding a completion may not.
        asynchronous = "SET LOCAL synchronous_commit = off"
        assert asynchronous in claimed
        assert asynchronous not in completed
        # The rows are locked by one statement, the writes go out once, the chain appended once.
        assert sum("FOR UPDATE" in sql for sql in completed) == 2  # the rows, the chain head
        assert sum(sql.startswith("UPDATE recordings") for sql in completed) == 2
        assert sum("INSERT INTO audit" in sql for sql in completed) == 1
        entries = [e async for e in led.iter_audit()]
        assert [e.recording_id for e in entries] == ids[:4]
        assert (await verify_chain(led.iter_audit())).ok


async def test_a_statement_the_database_refuses_fails_only_its_own_transition(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    async with ledger_at(pg_url, pg_cluster) as led:
        await led.observe([rec("a"), rec("b")])
        for rec_id in ("a", "b"):
            assert await led.claim(rec_id, owner="w", lease_seconds=LEASE) == 1
        results = await asyncio.gather(
            led.complete("a", owner="w", stored=stored("a", size=2**70)),  # beyond bigint
            led.complete("b", owner="w", stored=stored("b")),
            return_exceptions=True,
        )
        assert isinstance(results[0], LedgerError) and results[1] is True
        a, b = await led.get("a"), await led.get("b")
        assert a is not None and a.state is State.IN_PROGRESS
        assert b is not None and b.state is State.ARCHIVED
        assert [e.recording_id async for e in led.iter_audit()] == ["b"]


async def test_the_database_restarting_under_a_ledger(
    pg_cluster: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [f"r{n:03d}" for n in range(150)]
    policy = RetryPolicy(attempts=40, total_seconds=60, initial_backoff=0.05, max_backoff=0.5)
    async with ledger_at(pg_url, pg_cluster, policy) as led:
        await led.observe([rec(i) for i in ids])

        async def archive_all() -> None:
            for rec_id in ids:
                assert await led.claim(rec_id, owner="w", lease_seconds=LEASE)
                assert await led.complete(rec_id, owner="w", stored=stored(rec_id))
                await asyncio.sleep(0.005)

        worker = asyncio.create_task(archive_all())
        await asyncio.sleep(0.2)
        assert not worker.done()
        await asyncio.to_thread(pg_cluster.restart)
        await asyncio.wait_for(worker, 60)
        # The calls caught by the restart were retried whole (and nothing was applied twice).
        assert any("retrying" in r.getMessage() for r in caplog.records)
        summary = await led.summary()
        assert summary.counts[State.ARCHIVED] == len(ids)
        entries = [e async for e in led.iter_audit()]
        assert sorted(e.recording_id or "" for e in entries) == ids
        assert (await verify_chain(led.iter_audit())).ok


async def test_errors_are_translated_and_never_show_the_password(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password-1234\n")
    with pytest.raises(LedgerError) as caught:
        async with RetryingLedger(PostgresLedger(pg_url, password_file=wrong), FAST):
            pass
    assert not isinstance(caught.value, LedgerUnavailable)  # refused, not worth retrying
    assert "not-the-password-1234" not in str(caught.value)
    assert describe_url(pg_url) in str(caught.value)
    assert isinstance(caught.value.__cause__, asyncpg.InvalidPasswordError)

    # Nobody listening: transient, retried, then given up.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = f"postgresql://postgres@127.0.0.1:{port}/db"
    with pytest.raises(LedgerUnavailable, match="unavailable right now"):
        async with ledger_at(down, pg_cluster):
            pass

    # A password in the URL is refused without repeating it.
    for url in (
        f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1/db",
        f"postgresql://postgres@127.0.0.1/db?password={PG_PASSWORD}",
    ):
        with pytest.raises(ConfigError, match="must not contain a password") as refused:
            PostgresLedger(url)
        assert PG_PASSWORD not in str(refused.value)
    with pytest.raises(ConfigError, match="password_file"):
        async with PostgresLedger(pg_url, password_file=tmp_path / "missing"):
            pass

    # PGPASSWORD works when no file is given; open_ledger passes the file through.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", PG_PASSWORD)
        async with open_ledger(url=pg_url) as ledger:
            assert await ledger.migrate() == SCHEMA_VERSION
    async with open_ledger(url=pg_url, password_file=pg_cluster.password_file) as ledger:
        assert await ledger.get("nothing") is None
        assert repr(ledger) == f"PostgresLedger({describe_url(pg_url)!r})"


async def test_a_newer_schema_is_refused(pg_cluster: PgCluster, pg_url: str) -> None:
    async with ledger_at(pg_url, pg_cluster):
        pass
    conn = await asyncpg.connect(pg_url, password=PG_PASSWORD)
    try:
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    ledger = ledger_at(pg_url, pg_cluster)
    with pytest.raises(LedgerError, match=r"newer than the \d+ this archiver knows"):
        await ledger.__aenter__()
    with pytest.raises(LedgerError, match="not open"):
        await ledger.get("a")


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_moving_a_sqlite_ledger_into_postgres(
    sim_factory: Any, tmp_path: Path, pg_cluster: PgCluster, pg_url: str
) -> None:
    recs = make_recordings(40, seed=61)
    sim: Simulator = await sim_factory(recs)
    old = tmp_path / "old"
    old.mkdir()
    sqlite_config = write_sqlite_config(sim, old)
    code, out, err = await cli("--config", str(sqlite_config), "backfill")
    assert code == 0, err
    code, _, err = await cli("--config", str(sqlite_config), "verify")  # one more audit entry
    assert code == 0, err

    export = tmp_path / "ledger.jsonl"
    code, out, err = await cli(
        "--config", str(sqlite_config), "ledger", "export", "--output", str(export)
    )
    assert code == 0, err
    # One audit entry per recording, the archive's identity record, the verify.
    assert "exported 40 recordings, 42 audit entries" in err
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["backend"] == "sqlite"
    counts = lines[-1]["counts"]
    assert (counts["recording"], counts["audit"]) == (40, 42) and counts["pass"] >= 1

    # The same archive, now with a PostgreSQL ledger.
    new = tmp_path / "new"
    new.mkdir()
    pg_config = write_pg_config(sim, new, pg_url, pg_cluster, lease=30)
    pg_config.write_text(pg_config.read_text().replace(str(new / "archive"), str(old / "archive")))
    code, out, err = await cli("--config", str(pg_config), "ledger", "import", str(export))
    assert code == 0, err + out
    assert f"imported 40 recordings, 42 audit entries, {counts['pass']} passes" in out
    assert "audit chain: 42 entries, ok" in out
    code, out, err = await cli("--config", str(pg_config), "audit", "verify")
    assert code == 0, err + out
    code, out, _ = await cli("--config", str(pg_config), "status", "--json")
    assert json.loads(out)["counts"]["archived"] == 40

    # What came out of SQLite comes out of PostgreSQL unchanged (the header aside).
    code, again, err = await cli("--config", str(pg_config), "ledger", "export")
    assert code == 0, err
    assert again.splitlines()[1:] == export.read_text().splitlines()[1:]

    # Nothing is fetched twice after the move.
    code, out, err = await cli("--config", str(pg_config), "backfill")
    assert code == 0, err
    assert out.startswith("0 archived")
    assert all(sim.download_completions[r.id] == 1 for r in recs)

    # A ledger with history is never overwritten by accident.
    code, out, err = await cli("--config", str(pg_config), "ledger", "import", str(export))
    assert code == 2 and "not empty" in err
    code, out, err = await cli(
        "--config", str(pg_config), "ledger", "import", str(export), "--force"
    )
    assert code == 0, err
    # A cut-short or edited export is refused, and changes nothing.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(export.read_text().splitlines()[:-1]) + "\n")
    code, out, err = await cli("--config", str(pg_config), "ledger", "import", str(cut), "--force")
    assert code == 2 and "cut short" in err
    edited = tmp_path / "edited.jsonl"
    text = export.read_text().splitlines()
    first_audit = next(
        n for n, line in enumerate(text) if '"type":"audit"' in line and '"size":' in line
    )
    text[first_audit] = text[first_audit].replace('"size":', '"size":1', 1)
    edited.write_text("\n".join(text) + "\n")
    code, out, err = await cli(
        "--config", str(pg_config), "ledger", "import", str(edited), "--force"
    )
    assert code == 2 and "does not match its hash" in err
    code, out, _ = await cli("--config", str(pg_config), "status", "--json")
    assert json.loads(out)["counts"]["archived"] == 40
    assert PG_PASSWORD not in out + err


async def test_a_version_1_ledger_is_upgraded(pg_cluster: PgCluster, pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url, password=PG_PASSWORD)
    try:
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(postgres_module.MIGRATIONS[0])
        await conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for rid, state, attempts, permanent, token in (
            ("spent", "failed", 5, False, None),
            ("refused", "failed", 0, True, None),
            ("done", "archived", 1, False, "t1"),
        ):
            await conn.execute(
                """INSERT INTO recordings (id, state, attempts, permanent, first_seen_at,
                   updated_at, completion_token) VALUES ($1, $2, $3, $4, now(), now(), $5)""",
                rid,
                state,
                attempts,
                permanent,
                token,
            )
    finally:
        await conn.close()
    async with ledger_at(pg_url, pg_cluster) as ledger:
        got = {}
        for rid in ("spent", "refused", "done"):
            row = await ledger.get(rid)
            assert row is not None
            got[rid] = (row.state, row.attempts, row.claims, row.permanent, row.rejected)
        assert got == {
            "spent": (State.FAILED, 5, 5, True, False),
            "refused": (State.FAILED, 0, 0, True, True),
            "done": (State.ARCHIVED, 1, 1, False, False),
        }
        assert await ledger.observe([rec("refused"), rec("spent")]) == {"refused"}
        assert await ledger.give_up("spent", reason="operator") is True
        assert await ledger.migrate() == SCHEMA_VERSION
