"""What a new user meets with the mistakes people make: a sentence and exit 2, never a
traceback, and nothing created where a typo points."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from archiver.simulator import Faults, ScriptedAnswer, Simulator, make_recordings
from tests.conftest import write_config
from tests.test_cli import cli


def retarget(config: Path, old: Path, new: Path, extra: str = "") -> None:
    config.write_text(config.read_text().replace(str(old), str(new)) + extra)


async def test_a_missing_parent_is_refused_not_created(sim_factory: Any, tmp_path: Path):
    sim: Simulator = await sim_factory(make_recordings(3, seed=141))
    config = write_config(sim, tmp_path)
    typo = tmp_path / "nonexistent-parent" / "deeper" / "archive"
    retarget(config, tmp_path / "archive", typo)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 2 and "storage.create_parents" in err and "Traceback" not in err, err
    assert not (tmp_path / "nonexistent-parent").exists()

    ledger_typo = tmp_path / "no-such-dir" / "deeper" / "ledger.db"
    config = write_config(sim, tmp_path)
    retarget(config, tmp_path / "ledger.db", ledger_typo)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 2 and "ledger.path" in err and "create_parents" in err, err
    assert not (tmp_path / "no-such-dir").exists()

    # Asked for: both are created, and the run goes on.
    config = write_config(sim, tmp_path)
    retarget(config, tmp_path / "archive", typo)
    retarget(config, tmp_path / "ledger.db", ledger_typo)
    text = config.read_text().replace("[storage]\n", "[storage]\ncreate_parents = true\n", 1)
    config.write_text(text)
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 0, err
    assert typo.is_dir() and ledger_typo.is_file()


def mount(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_read_only_archive_is_verified_and_refused_for_writing(
    sim_factory: Any, tmp_path: Path
):
    sim: Simulator = await sim_factory(make_recordings(4, seed=142))
    archive = tmp_path / "archive"
    mount(archive, "size=64m")
    try:
        config = str(write_config(sim, tmp_path))
        code, _, err = await cli("--config", config, "backfill")
        assert code == 0, err
        remount(archive, "ro")  # an auditor's read-only mount
        for command in (["verify", "--deep"], ["status"], ["manifest"], ["audit", "verify"]):
            code, out, err = await cli("--config", config, *command)
            assert code == 0, (command, out, err)
        code, out, err = await cli("--config", config, "verify", "--deep")
        assert "4 recordings checked" in out and "0 problem" in out, out
        code, _, err = await cli("--config", config, "backfill")
        assert code == 2 and "not writable" in err and "Traceback" not in err, err
    finally:
        umount(archive)


async def test_a_ledger_on_a_read_only_disk_is_a_sentence(sim_factory: Any, tmp_path: Path):
    sim: Simulator = await sim_factory(make_recordings(2, seed=143))
    place = tmp_path / "ro"
    mount(place, "size=8m,ro")
    try:
        config = write_config(sim, tmp_path)
        retarget(config, tmp_path / "ledger.db", place / "ledger.db")
        code, _, err = await cli("--config", str(config), "backfill")
        assert code == 2 and "ledger" in err and "Traceback" not in err, err
        code, _, err = await cli("--config", str(config), "status")
        assert code == 2 and "no ledger" in err and "Traceback" not in err, err
    finally:
        umount(place)


async def test_read_only_commands_create_no_ledger_and_no_archive(tmp_path: Path):
    config = tmp_path / "archiver.toml"
    config.write_text('[storage]\npath = "archive"\n[ledger]\npath = "ledger.db"\n')
    for command in (["status"], ["verify"], ["manifest"], ["audit", "verify"], ["audit", "export"]):
        code, _, err = await cli("--config", str(config), *command)
        assert code == 2 and "there is no ledger" in err and "Traceback" not in err, (command, err)
    assert sorted(os.listdir(tmp_path)) == ["archiver.toml"]


async def test_debug_shows_requests_retry_decisions_and_ledger_transitions(
    sim_factory: Any, tmp_path: Path
):
    recs = make_recordings(2, seed=143)
    # Every listed URL has expired: each download answers 403, then the API is asked again,
    # and the first of those retrieves answers 404 (its recording is gone for good).
    sim: Simulator = await sim_factory(recs, Faults(expired_first_url_rate=1.0))
    sim.script(ScriptedAnswer(404, route="retrieve"))
    config = write_config(sim, tmp_path)
    code, _, err = await cli("--config", str(config), "--log-level", "debug", "backfill")
    assert code == 1 and "Traceback" not in err, err
    lines = err.splitlines()

    def having(*parts: str) -> list[str]:
        return [line for line in lines if all(part in line for part in parts)]

    assert having("DEBUG", "API GET /v2/room_recordings?", ": HTTP 200"), err
    assert having("DEBUG", "API GET /v2/room_recordings/", ": HTTP 404"), err
    assert having("DEBUG", "download GET http://", ": HTTP 403"), err
    assert "X-Amz-Signature" not in err and "token=" not in err
    [gone] = [r.id for r in recs if having("ledger fail:", f"{r.id} in_progress -> failed")]
    [kept] = [r.id for r in recs if r.id != gone]
    assert having("DEBUG", "ledger claim:", f"{kept} pending -> in_progress"), err
    assert having("DEBUG", "ledger complete:", f"{kept} in_progress -> archived"), err
    assert having("DEBUG", f"download {gone}: not retried, NotFound is permanent"), err
    # The retry warning names the recording once, not in its subject and its error both.
    [warning] = having("WARNING", f"download {kept} failed (attempt 1/")
    assert warning.count(kept) == 1, warning

    # At the default level none of it is shown.
    code, _, err = await cli("--config", str(config), "backfill")
    assert "DEBUG" not in err and "ledger claim:" not in err and "API GET" not in err, err


async def test_a_small_body_cut_off_says_what_happened(sim_factory: Any, tmp_path: Path):
    recs = make_recordings(1, seed=147)
    sim: Simulator = await sim_factory(recs, Faults(truncate_rate=1.0))
    config = write_config(sim, tmp_path, "transfer_attempts = 2\nmax_attempts = 1\n")
    code, _, err = await cli("--config", str(config), "backfill")
    assert code == 1 and "Traceback" not in err, err
    assert "cut off at byte 0" not in err, err
    assert "the connection closed" in err and "the next attempt asks" in err, err
