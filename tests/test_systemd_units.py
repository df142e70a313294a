"""The systemd units: they pass ``systemd-analyze verify``, their exposure score stays at 2.0 or
lower, and they agree with the CLI and the config (credential name, commands, flags).

systemd-analyze is required: CI installs systemd. These tests fail, never skip, without it.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.cli import build_parser
from archiver.config import CREDENTIAL_NAME

UNITS = Path(__file__).resolve().parent.parent / "systemd"
NAMES = ("archiver.service", "archiver-backfill.service")
MAX_EXPOSURE = 2.0
INSTALLED_PATH = "/usr/local/bin/archiver"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
    )
    assert found, "systemd-analyze is missing: install systemd (CI does, in .ci/run)"
    return found


def directives(name: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, by key, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def archiver_executable() -> str:
    """This environment's ``archiver`` script, standing in for the installed path."""
    script = Path(sys.executable).parent / "archiver"
    return str(script) if script.exists() else sys.executable


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at an executable that exists here (verify checks it)."""
    for name in NAMES:
        text = (UNITS / name).read_text().replace(INSTALLED_PATH, archiver_executable())
        (tmp_path / name).write_text(text)
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", *(str(unit_dir / n) for n in NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in result.stderr.splitlines() if "archiver" in line]
    assert result.returncode == 0 and not ours, result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_exposure_score_is_at_most_two(unit_dir: Path, name: str) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(unit_dir / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"\nFIGURE exposure score of {name} = {score}")
    assert score <= MAX_EXPOSURE, result.stdout


def test_the_daemon_unit_has_what_an_operator_expects() -> None:
    d = directives("archiver.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert "2" in one["RestartPreventExitStatus"].split()  # config/credential errors
    assert one["WatchdogSec"]
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "archiver"
    assert one["LoadCredential"].split(":", 1)[0] == CREDENTIAL_NAME
    assert one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes" and one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in d["SystemCallFilter"]
    assert "HUP" in one["ExecReload"]
    # The stop timeout leaves room for the default shutdown grace (30 s) and the cancel.
    assert int(one["TimeoutStopSec"].rstrip("s")) > 30


def test_the_backfill_unit_is_a_oneshot_with_the_same_config() -> None:
    daemon = {k: v[-1] for k, v in directives("archiver.service").items()}
    oneshot = {k: v[-1] for k, v in directives("archiver-backfill.service").items()}
    assert oneshot["Type"] == "oneshot"
    assert "archiver.service" in oneshot["Conflicts"]  # one instance on a SQLite ledger
    for key in ("DynamicUser", "StateDirectory", "LoadCredential", "WorkingDirectory"):
        assert oneshot[key] == daemon[key], key


@pytest.mark.parametrize("name", NAMES)
def test_exec_start_is_a_valid_command_line(name: str) -> None:
    command = shlex.split(directives(name)["ExecStart"][0].replace("$ARCHIVER_BACKFILL_ARGS", ""))
    assert command[0] == INSTALLED_PATH
    args = build_parser().parse_args(command[1:])
    assert args.command == ("run" if name == "archiver.service" else "backfill")
    assert args.log_format == "json" and args.config


def test_units_parse_as_ini() -> None:
    for name in NAMES:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string((UNITS / name).read_text())
        assert parser.has_section("Unit") and parser.has_section("Service")
