"""Shared fixtures: the Telnyx API simulator on loopback and settings pointing at it."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from archiver.config import Settings, load_settings
from archiver.simulator import Faults, SimRecording, Simulator

# Fixtures for the real S3 server and PostgreSQL live in their own modules.
pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_pg"]

API_KEY = "KEY0123456789abcdefSECRET"
KEY_ENV = "ARCHIVER_TEST_KEY"

# Retries as fast as the tests need them; the policy is the production one.
FAST = {
    "telnyx.max_backoff": 0.05,
    "telnyx.max_attempts": 10,
    "workers.url_max_age": 240.0,
    "backfill.max_passes": 4,
    "backfill.processing_wait": 0.0,
}


@pytest.fixture
async def sim_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[Simulator] = []

    async def start(
        recordings: list[SimRecording], faults: Faults | None = None, **kw: Any
    ) -> Simulator:
        sim = Simulator(recordings, api_key=API_KEY, faults=faults, **kw)
        await sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


def make_settings(sim: Simulator, root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "telnyx.base_url": sim.api_base_url,
        "telnyx.api_key_env": KEY_ENV,
        "storage.path": str(root / "archive"),
        "ledger.path": str(root / "ledger.db"),
        **FAST,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_settings(env={KEY_ENV: API_KEY}, overrides=values, read_files=False)


def write_config(sim: Simulator, root: Path, extra: str = "") -> Path:
    """A TOML file for the real CLI in a subprocess."""
    path = root / "archiver.toml"
    path.write_text(
        f"""
[telnyx]
base_url = "{sim.api_base_url}"
api_key_env = "{KEY_ENV}"
max_backoff = 0.05
max_attempts = 10

[storage]
backend = "local"
path = "{root / "archive"}"

[ledger]
path = "{root / "ledger.db"}"

[workers]
concurrency = 4
{extra}
"""
    )
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env[KEY_ENV] = API_KEY
    env.pop("ARCHIVER_CONFIG", None)
    return env


ARCHIVER = [sys.executable, "-m", "archiver.cli"]
