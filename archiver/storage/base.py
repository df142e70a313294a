"""The storage backend contract.

A backend stores recordings under keys (``/``-separated relative paths produced by
``archiver.layout``). Its one promise: nothing is ever visible under a key until ``Upload.commit``
succeeds, and a committed object has exactly the size and SHA-256 that commit was given. Backends
never retry; the caller's retry policy decides (see ``archiver.retry``). Failures are raised as
``archiver.errors`` types, never as third-party exceptions.

Optional features are declared in ``Capabilities``; callers ask them, never ``isinstance``.
Every backend passes the shared conformance suite in ``tests/test_storage_conformance.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from archiver.models import StoredObject


@dataclass(frozen=True, slots=True)
class Capabilities:
    name: str
    # A partial upload left by a killed process can be continued from where it stopped.
    resumes_after_crash: bool = False
    # Objects can be made immutable until a date (S3 Object Lock).
    object_lock: bool = False
    # The server itself checks the SHA-256 it is sent and rejects a mismatch.
    server_verifies_checksum: bool = False


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    # The SHA-256 recorded with the object at write time, where the backend keeps one.
    sha256: str | None = None
    version_id: str | None = None
    retain_until: datetime | None = None
    legal_hold: bool | None = None


@dataclass(frozen=True, slots=True)
class Companion:
    """A small object stored by the same commit as the main one (its JSON sidecar): the two become
    visible together or not at all (see ``Upload.commit``). ``render`` is given what is being
    stored, so it can describe it (retention included); should it raise, nothing is stored."""

    key: str
    render: Callable[[StoredObject], bytes]
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """What the caller asserts about the bytes it wrote, checked before anything becomes visible."""

    sha256: str
    size: int
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    # Object Lock retention is counted from here (the recording's end, or now if later).
    retain_from: datetime | None = None
    # Stored by the same commit: the object and its companion become visible together or not at
    # all (see ``Upload.commit``).
    companion: Companion | None = None


class Digest(Protocol):
    """A running hash (``hashlib`` objects are): what ``Upload.write`` feeds beside the write."""

    def update(self, data: bytes, /) -> None: ...


class Upload(Protocol):
    """A write in progress. Abort it (or commit it) in every path: use ``async with``."""

    @property
    def key(self) -> str: ...

    @property
    def offset(self) -> int:
        """Bytes already held, e.g. from a partial file a killed process left behind."""
        ...

    def existing(self) -> AsyncIterator[bytes]:
        """The bytes already held (``offset`` of them), so the caller can seed its hash."""
        ...

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        """Append ``chunk``. ``digest`` is fed the chunk first, where the write happens (on a disk
        thread, the hash costs no extra hand-off). After a failed write, the upload and the
        digest may disagree: the caller starts both over."""
        ...

    async def restart(self) -> None:
        """Drop everything written so far; the next write starts at byte 0."""
        ...

    async def commit(self, request: CommitRequest) -> StoredObject:
        """Check size and hash, then make the object visible at ``key`` atomically and durably.

        With a ``request.companion``, the object and its companion become visible together or not
        at all: when commit raises, it has stored neither, and a key that held an older object
        holds it still, but for the cases named below. The upload is over either way: a failed
        commit leaves no partial upload to resume, and a retry writes both again.

        - Local disk writes and fsyncs the companion to a temporary file before the object is
          renamed into place, then renames the companion and fsyncs their directory (once, when
          they share it). Should the companion's rename fail after the object's, the object is
          removed again, and an older object it replaced is gone with it.
        - S3 can only store the companion once the object exists (it describes its version and
          retention). Should that fail, the version just written is deleted, which makes an
          older version current again in a versioned bucket (an unversioned one has lost it).
          Object Lock may refuse that delete: commit then raises a StorageError saying the
          object stays locked at its key and version (any other failed delete raises one naming
          where it stays). Recording such a leftover is the caller's part, not the backend's.

        A crash (power cut, SIGKILL) between the two steps can still leave the object without its
        companion: no backend makes two names appear at once.
        """
        ...

    async def abort(self) -> None:
        """Discard the write, leaving nothing behind. Safe to call twice or after commit."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class StorageBackend(Protocol):
    @property
    def capabilities(self) -> Capabilities: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def preflight(self) -> None:
        """Raise PreflightError with one clear sentence if the archive cannot be written."""
        ...

    async def begin(self, key: str, *, resume: bool = True) -> Upload:
        """Start (or, with ``resume``, continue) writing the object at ``key``."""
        ...

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        """Store a small object (a metadata sidecar) atomically."""
        ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and recorded hash, or None when nothing is stored at ``key``."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """Stream the stored bytes. Raises StorageError when the object is missing."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object (refused by a locked object: StorageError)."""
        ...

    def iter_keys(self) -> AsyncIterator[str]:
        """Every committed key, in no promised order; partial uploads are not keys."""
        ...

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        """Remove what killed processes left behind: partial uploads older than the limit, and
        temporary files that are never resumed (a sidecar being written) as soon as no live
        process holds them (after a short grace), whatever the limit. Returns how many went."""
        ...
