"""Storage backends by name (``storage.backend``), as rclone registers its own: each with the
checks of its settings (pure, run by ``archiver.config`` at load) and a factory that imports the
backend on first use, so that naming one never loads another's dependencies.

A new backend joins with one ``register`` call here and one entry in the conformance suite
(``tests/test_storage_conformance.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from archiver.errors import ConfigError
from archiver.storage.s3.settings import check_storage as check_s3

if TYPE_CHECKING:
    from archiver.config import StorageSettings
    from archiver.storage.base import StorageBackend


class SettingsCheck(Protocol):
    def __call__(self, storage: StorageSettings, *, chosen: bool) -> list[str]: ...


def _no_problems(storage: StorageSettings, *, chosen: bool) -> list[str]:
    return []


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    # Opens the backend for these settings (importing it then).
    factory: Callable[[StorageSettings], StorageBackend]
    # The problems of this backend's settings, each naming its key; ``chosen``: it is the one
    # ``storage.backend`` names (a backend's table may be checked even when it is not).
    check: SettingsCheck = _no_problems


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def names() -> list[str]:
    return list(_BACKENDS)


def check(storage: StorageSettings) -> list[str]:
    """Every problem of the storage settings: an unknown backend, and each backend's own."""
    problems: list[str] = []
    chosen = _BACKENDS.get(storage.backend)
    if chosen is None:
        known = " or ".join(repr(name) for name in _BACKENDS)
        problems.append(f"storage.backend: must be {known}, not {storage.backend!r}")
    for backend in _BACKENDS.values():
        problems.extend(backend.check(storage, chosen=backend is chosen))
    return problems


def open_backend(storage: StorageSettings) -> StorageBackend:
    """The backend ``storage.backend`` names, made from the settings (not opened yet: use it
    with ``async with``)."""
    backend = _BACKENDS.get(storage.backend)
    if backend is None:
        raise ConfigError(f"storage.backend: unknown backend {storage.backend!r}")
    return backend.factory(storage)


def _local(storage: StorageSettings) -> StorageBackend:
    from archiver.storage.local import LocalStorage

    return LocalStorage(storage.path, create_parents=storage.create_parents)


def _s3(storage: StorageSettings) -> StorageBackend:
    try:
        from archiver.storage.s3.backend import S3Storage
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(f"storage.backend: S3 support is not available ({exc})") from exc
    if storage.s3 is None:
        raise ConfigError("storage.s3.bucket: required when storage.backend = 's3'")
    return S3Storage(storage.s3)


register(Backend("local", _local))
register(Backend("s3", _s3, check_s3))
