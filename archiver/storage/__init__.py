"""Where archived recordings are written.

``base``: the contract every backend meets, and the upload state machine they share; ``keys``:
the one key validator; ``registry``: the backends by name (``storage.backend``); ``local`` (with
its file primitives in ``localfs``), ``s3/`` and ``memory``: the backends.

Backends load on first use (``from archiver.storage import LocalStorage``), so importing the
contract never pulls in a backend's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from archiver.storage.base import (
    Capabilities,
    CommitRequest,
    Leftover,
    ObjectInfo,
    ResumeNotes,
    StorageBackend,
    Upload,
)

if TYPE_CHECKING:
    from archiver.storage.local import LocalStorage
    from archiver.storage.memory import MemoryStorage

__all__ = [
    "Capabilities",
    "CommitRequest",
    "Leftover",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ResumeNotes",
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
