"""Where archived recordings are written. The contract every backend meets is in ``base``.

Backends load on first use (``from archiver.storage import LocalStorage``), so importing the
contract never pulls in a backend's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from archiver.storage.base import Capabilities, CommitRequest, ObjectInfo, StorageBackend, Upload

if TYPE_CHECKING:
    from archiver.storage.local import LocalStorage
    from archiver.storage.memory import MemoryStorage

__all__ = [
    "Capabilities",
    "CommitRequest",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "StorageBackend",
    "Upload",
]

_BACKENDS = {
    "LocalStorage": "archiver.storage.local",
    "MemoryStorage": "archiver.storage.memory",
}


def __getattr__(name: str) -> Any:
    module = _BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
