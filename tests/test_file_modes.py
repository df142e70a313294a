"""The modes of what archiver creates: the archive root 0750, log and export files 0600, each
less what the user's umask removes (the modes are a maximum, applied as the OS applies them)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver.manifest import open_output
from archiver.storage import LocalStorage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    before = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(before)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_archive_root_made_by_preflight(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "archive"
    storage = LocalStorage(root)
    await storage.preflight()
    assert mode_of(root) == 0o750 & ~umask
    await storage.put_bytes("room/rec.json", b"{}", content_type="application/json")
    assert mode_of(root / "room") == 0o750 & ~umask


async def test_archive_root_made_by_the_first_write(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "archive"
    async with await LocalStorage(root).begin("room/rec.mp4") as upload:
        await upload.write(b"x")
    assert mode_of(root) == 0o750 & ~umask


def test_export_file(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "manifest.jsonl"
    with open_output(target) as out:
        out.write("{}\n")
    assert mode_of(target) == 0o600 & ~umask
    assert target.read_text() == "{}\n"


# setup_logging changes the root logger for good: it runs in a process of its own.
LOG_WRITER = """
import logging, os, sys
from pathlib import Path
from archiver.logs import setup_logging
os.umask(int(sys.argv[2], 8))
setup_logging(fmt="json", level="info", file=Path(sys.argv[1]))
logging.getLogger("archiver").info("archived one")
"""


def test_log_file(tmp_path: Path, umask: int) -> None:
    log = tmp_path / "archiver.log"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    subprocess.run([sys.executable, "-c", LOG_WRITER, str(log), f"{umask:o}"], env=env, check=True)
    assert mode_of(log) == 0o600 & ~umask
    assert "archived one" in log.read_text()
