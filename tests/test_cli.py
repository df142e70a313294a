"""The real ``archiver`` command in a subprocess: exit codes, secrets, crashes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Faults, Simulator, add_hostile_entries, make_recordings
from tests.conftest import API_KEY, ARCHIVER, KEY_ENV, cli_env, write_config


async def cli(
    *args: str, env: dict[str, str] | None = None, limit: float = 60
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        *args,
        env=env or cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_backfill(config: Path) -> asyncio.subprocess.Process:
    """``archiver backfill`` in a subprocess, its output discarded."""
    return await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "backfill",
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.partial")]


async def test_backfill_exit_codes_and_no_secret_in_any_output(sim_factory, tmp_path):
    recs = make_recordings(25, seed=21)
    sim: Simulator = await sim_factory(
        recs,
        Faults(
            truncate_rate=0.2,
            expired_first_url_rate=0.3,
            list_throttle_rate=0.1,
            throttle_reset_seconds=0.05,
            error_shapes_mixed=True,
        ),
    )
    config = write_config(sim, tmp_path, '[logging]\nlevel = "debug"\nformat = "json"\n')
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    assert "25 archived" in out
    code, out2, err2 = await cli("--config", str(config), "status", "--json")
    assert code == 0 and '"archived": 25' in out2
    code, out3, err3 = await cli("--config", str(config), "verify", "--deep")
    assert code == 0 and "25 recordings checked" in out3 and "0 problem" in out3

    # Hostile entries: the run continues, reports them, exits 1.
    add_hostile_entries(sim)
    code, out4, err4 = await cli("--config", str(config), "backfill")
    assert code == 1
    assert "rejected" in out4
    code, out5, _ = await cli("--config", str(config), "status")
    assert "unsafe id" in out5 and "../../etc/passwd" in out5

    everything = out + err + out2 + err2 + out3 + err3 + out4 + err4 + out5
    assert "Signature=" not in everything.replace("Signature=[REDACTED]", "")
    assert API_KEY not in everything
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert all("Authorization" not in r.headers for r in sim.download_requests)


async def test_auth_failure_stops_with_clear_message(sim_factory, tmp_path):
    sim: Simulator = await sim_factory(make_recordings(3, seed=1))
    config = write_config(sim, tmp_path)
    env = cli_env()
    env[KEY_ENV] = "wrong-key-value-123"
    code, out, err = await cli("--config", str(config), "backfill", env=env)
    assert code == 2
    assert "check TELNYX_API_KEY" in err
    assert "wrong-key-value-123" not in out + err
    env.pop(KEY_ENV)
    code, _, err = await cli("--config", str(config), "backfill", env=env)
    assert code == 2 and KEY_ENV in err


async def test_bad_config_lists_every_problem_and_touches_nothing(tmp_path):
    config = tmp_path / "archiver.toml"
    config.write_text(
        '[telnyx]\npage_size = 900\npagesize = 3\n[workers]\nconcurrency = "many"\n'
        '[storage]\nbackend = "ftp"\npath = "archive"\n[ledger]\npath = "l.db"\n'
    )
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 2
    for needle in ("telnyx.page_size", "telnyx.pagesize", "workers.concurrency", "storage.backend"):
        assert needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archiver.toml"]
    code, _, err = await cli("backfill", "--since", "yesterday")
    assert code == 2 and "not a date" in err


async def test_sigkill_at_any_moment_then_rerun_archives_each_once(sim_factory, tmp_path):
    recs = make_recordings(40, seed=31, size=(200_000, 700_000))
    sim: Simulator = await sim_factory(
        recs, Faults(slow_chunk_delay=0.04, truncate_rate=0.1, expired_first_url_rate=0.2)
    )
    concurrency = 4
    config = write_config(sim, tmp_path)
    rng = random.Random(5)
    kills = 0
    for _ in range(4):
        proc = await start_backfill(config)
        await asyncio.sleep(rng.uniform(0.6, 2.0))
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        await proc.wait()
    assert kills >= 2
    code, out, err = await cli("--config", str(config), "backfill")
    assert code == 0, out + err

    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        for rec in recs:
            row = await ledger.get(rec.id)
            assert row is not None and row.state is State.ARCHIVED
            assert row.sha256 == sim.expected_sha256(rec.id)
    files = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    media = [p for p in files if not p.name.endswith((".json", ".partial"))]
    assert len(media) == len(recs)
    assert partials(tmp_path) == []
    # Each kill can cost at most one completed download per worker (bytes fetched, not recorded).
    completed = sum(sim.download_completions[r.id] for r in recs)
    assert len(recs) <= completed <= len(recs) + kills * concurrency
    code, out, _ = await cli("--config", str(config), "verify", "--deep")
    assert code == 0, out


async def test_verify_catches_changed_and_missing_files(sim_factory, tmp_path):
    recs = make_recordings(6, seed=41)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path)
    assert (await cli("--config", str(config), "backfill"))[0] == 0
    media = sorted(
        p for p in (tmp_path / "archive").rglob("*") if p.is_file() and p.suffix != ".json"
    )
    changed, missing, grown = media[0], media[1], media[2]
    data = bytearray(changed.read_bytes())
    data[100] ^= 0xFF
    changed.write_bytes(bytes(data))
    missing.unlink()
    grown.write_bytes(grown.read_bytes() + b"x")

    code, out, _ = await cli("--config", str(config), "verify")
    assert code == 1
    assert "missing from the archive" in out and "size is" in out
    assert changed.stem not in out  # same size: only a deep verify can see it
    code, out, _ = await cli("--config", str(config), "verify", "--deep")
    assert code == 1
    assert f"{changed.stem}" in out and "SHA-256 does not match" in out
    assert out.count("PROBLEM") == 3


async def test_dry_run_lists_without_downloading(sim_factory, tmp_path):
    recs = make_recordings(8, seed=51)
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, tmp_path)
    code, out, err = await cli("--config", str(config), "backfill", "--dry-run")
    assert code == 0, err
    assert "8 would be archived" in out
    assert sim.download_requests == []
    assert not (tmp_path / "archive").exists() or not any((tmp_path / "archive").rglob("*.*"))


async def test_second_instance_on_same_sqlite_ledger_refuses(sim_factory, tmp_path):
    recs = make_recordings(20, seed=61, size=400_000)
    sim: Simulator = await sim_factory(recs, Faults(slow_chunk_delay=0.05))
    config = write_config(sim, tmp_path)
    first = await start_backfill(config)
    try:
        await asyncio.sleep(0.8)
        code, _, err = await cli("--config", str(config), "backfill")
        assert code == 2 and "another archiver instance" in err
    finally:
        first.send_signal(signal.SIGINT)
        await asyncio.wait_for(first.wait(), 30)
    assert partials(tmp_path) == []


async def test_help_says_what_each_flag_and_exit_code_means(tmp_path):
    code, out, _ = await cli("--help")
    assert code == 0
    for needle in (
        "exit codes:",
        "0  everything asked for",
        "3  backfill interrupted",
        "--log-level",
    ):
        assert needle in out, out
    assert "how much to log" in out
    code, out, _ = await cli("demo", "--help")
    assert code == 0 and "where the demo's archive and ledger go" in out
    code, out, _ = await cli("backfill", "--help")
    assert code == 0 and "exit codes:" in out and "--dry-run" in out
    # A command alone, or with a flag it does not know: its own usage, exit 2.
    code, _, err = await cli("audit")
    assert code == 2 and "usage: archiver audit" in err and "{verify,export}" in err
    code, _, err = await cli("backfill", "--no-such-flag")
    assert code == 2 and "usage: archiver backfill" in err and "--no-such-flag" in err
