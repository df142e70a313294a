"""Backends by name (``archiver.storage.registry``), the one key validator, and what importing the
configuration loads."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver import layout
from archiver.config import load_settings
from archiver.errors import ConfigError, UnsafeValue
from archiver.service import make_storage
from archiver.storage import LocalStorage, MemoryStorage, registry
from archiver.storage.keys import check_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_loads_no_backend() -> None:
    """config checks ``[storage.s3]`` through pure modules: no boto3, no backend imported."""
    script = (
        "import sys\n"
        "from archiver.config import load_settings\n"
        "load_settings(env={}, read_files=False, overrides={'storage.backend': 's3', "
        "'storage.s3.bucket': 'b', 'storage.s3.part_size': 6291456})\n"
        "loaded = [m for m in sys.modules if m.startswith(('boto', 'archiver.storage.'))]\n"
        "print(sorted(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "boto" not in out
    assert "archiver.storage.s3.backend" not in out and "archiver.storage.local'" not in out
    assert "archiver.storage.s3.settings" in out


def test_backends_by_name() -> None:
    assert registry.names() == ["local", "s3"]
    settings = load_settings(env={}, read_files=False)
    assert isinstance(make_storage(settings), LocalStorage)
    s3 = load_settings(
        env={}, read_files=False, overrides={"storage.backend": "s3", "storage.s3.bucket": "b"}
    )
    assert make_storage(s3).capabilities.name == "s3"


def test_an_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, read_files=False, overrides={"storage.backend": "ftp"})
    assert "storage.backend: must be 'local' or 's3', not 'ftp'" in str(caught.value)


def test_a_backend_without_its_table_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"storage\.s3\.bucket: required"):
        load_settings(env={}, read_files=False, overrides={"storage.backend": "s3"})


@pytest.fixture
def memory_backend() -> Iterator[None]:
    registry.register(registry.Backend("memory", lambda storage: MemoryStorage()))
    try:
        yield
    finally:
        registry._BACKENDS.pop("memory")


def test_a_registered_backend_is_known_everywhere(memory_backend: None) -> None:
    settings = load_settings(env={}, read_files=False, overrides={"storage.backend": "memory"})
    assert isinstance(make_storage(settings), MemoryStorage)
    with pytest.raises(ConfigError, match="must be 'local' or 's3' or 'memory', not 'ftp'"):
        load_settings(env={}, read_files=False, overrides={"storage.backend": "ftp"})


@pytest.mark.parametrize("key", ["", "../x", "/abs", "a//b", "a\\b", "a\x00b", "x/.y.mp4.partial"])
def test_layout_and_storage_refuse_the_same_hostile_keys(key: str) -> None:
    with pytest.raises(UnsafeValue):
        check_key(key)
    with pytest.raises(UnsafeValue):
        layout.check_key(key)


def test_layout_asks_for_plain_components_only() -> None:
    # A key storage takes (a space, a non-ASCII letter) but layout never makes.
    for key in ("rooms/a b.mp4", "rooms/é.mp4", "rooms/.hidden"):
        assert check_key(key)
        with pytest.raises(UnsafeValue, match="not a safe relative path"):
            layout.check_key(key)
    assert layout.check_key("2024/05/01/room/rec-1.mp4") == "2024/05/01/room/rec-1.mp4"
