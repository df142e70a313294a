"""What a person sees: the real ``archiver`` in a pseudo-terminal (a live display, warnings above
it, a line per recording only with --verbose), and piped (log lines only)."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
from pathlib import Path
from typing import Any

from archiver.simulator import Simulator, make_recordings
from tests.conftest import ARCHIVER, cli_env, write_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def screen(raw: bytes) -> str:
    """The terminal's text without its control sequences: what the failure message shows."""
    return ANSI.sub("", raw.decode(errors="replace")).replace("\r\n", "\n").replace("\r", "\n")


def run_in_terminal(args: list[str], timeout: float = 60) -> tuple[int, str]:
    leader, follower = pty.openpty()
    env = {**cli_env(), "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(
        [*ARCHIVER, *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout), screen(b"".join(chunks))


async def in_terminal(*args: str) -> tuple[int, str]:
    return await asyncio.to_thread(run_in_terminal, list(args))


async def test_a_terminal_shows_the_display_and_warnings_above_it(sim_factory: Any, tmp_path: Path):
    recs = make_recordings(12, seed=131)
    bad = recs[0]
    bad.entry_hook = lambda e: {**e, "download_url": "http://127.0.0.1:1/gone.ogg"}
    sim: Simulator = await sim_factory(recs)
    config = str(write_config(sim, tmp_path, "max_attempts = 1\ntransfer_attempts = 1\n"))
    code, text = await in_terminal("--config", config, "backfill")
    assert code == 1, text
    assert "archiving" in text, text  # the live display
    assert "11 archived (" in text and "still owed" in text, text
    # No line per recording, but the warning about the failing one, on a line of its own.
    assert not re.search(r"INFO +archived ", text), text
    warning = [line for line in text.splitlines() if "WARNING" in line and bad.id in line]
    assert warning and re.match(r"\d\d:\d\d:\d\d WARNING", warning[0].strip()), text

    code, text = await in_terminal("--config", config, "--verbose", "backfill")
    assert code == 1, text
    assert re.search(r"INFO +pass 1", text), text  # --verbose: the info lines too


async def test_piped_output_is_log_lines_only(sim_factory: Any, tmp_path: Path):
    sim: Simulator = await sim_factory(make_recordings(5, seed=132))
    config = write_config(sim, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "backfill",
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    log = err.decode()
    assert "\x1b[" not in log + out.decode()  # no display, no colour
    assert len(re.findall(r"INFO +archived ", log)) == 5, log


def read_a_little(args: list[str]) -> tuple[int, bytes]:
    """``archiver ... | head -c 100``: the reader closes the pipe after a few bytes (a small
    pipe, so the command is still writing when it does)."""
    proc = subprocess.Popen(
        [*ARCHIVER, *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pipesize=4096,
    )
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(100)) == 100
        proc.stdout.close()
        err = proc.stderr.read()
        return proc.wait(60), err


async def test_a_closed_stdout_ends_quietly(sim_factory: Any, tmp_path: Path):
    sim: Simulator = await sim_factory(make_recordings(60, seed=133))
    config = str(write_config(sim, tmp_path))
    done = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        config,
        "backfill",
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await done.wait() == 0
    for args in (["status", "--json"], ["manifest"], ["audit", "export"]):
        code, err = await asyncio.to_thread(read_a_little, ["--config", config, *args])
        assert code == 0 and b"Traceback" not in err and b"Broken pipe" not in err, err
