"""The storage backend contract, and the upload state machine every backend shares.

A backend stores recordings under keys (``/``-separated relative paths produced by
``archiver.layout``, checked by ``archiver.storage.keys``). Its one promise: nothing is ever
visible under a key until ``Upload.commit`` succeeds, and a committed object has exactly the size
and SHA-256 that commit was given (or, for an upload that continued bytes it cannot hand back,
the SHA-256 it read back from the stored object, every part checked; see ``Upload.commit``).
Backends never retry; the caller's retry policy decides (see ``archiver.retry``). Failures are
raised as ``archiver.errors`` types, never as third-party exceptions.

Optional features are declared in ``Capabilities``; callers ask them, never ``isinstance``.
Every backend passes the shared conformance suite in ``tests/test_storage_conformance.py``.
Backends are found by name in ``archiver.storage.registry``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self

from archiver.errors import ArchiverError, IntegrityError, StorageError
from archiver.models import StoredObject
from archiver.storage.keys import check_key

log = logging.getLogger(__name__)

# The size of the chunks ``read`` and ``existing`` yield.
CHUNK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Capabilities:
    name: str
    # A partial upload left by a killed process can be continued from where it stopped.
    resumes_after_crash: bool = False
    # ... and only with what the caller noted for it (``ResumeNotes``): the backend cannot find
    # a killed upload by its key alone (S3: the upload id, the parts and their checksums).
    resumes_from_notes: bool = False
    # Objects can be made immutable until a date (S3 Object Lock).
    object_lock: bool = False
    # The server itself checks the SHA-256 it is sent and rejects a mismatch.
    server_verifies_checksum: bool = False
    # ``put_whole`` is one call to the storage, cheaper than ``begin``, ``write`` and ``commit``
    # (local disk: one hand-off to a disk thread instead of three); elsewhere it is those three.
    puts_whole: bool = False


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
class Removal:
    """What removing a recording's copy did (``StorageBackend.remove_copy``): every object
    version deleted, as ``{"key", "version_id"}``; or, when something keeps the copy (Object
    Lock retention still running, a legal hold), why, and nothing was deleted."""

    removed: tuple[Mapping[str, str | None], ...] = ()
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Companion:
    """A small object stored by the same commit as the main one (its JSON sidecar): the two become
    visible together or not at all (see ``Upload.commit``). ``render`` is given what is being
    stored, so it can describe it (retention included); should it raise, nothing is stored."""

    key: str
    render: Callable[[StoredObject], bytes]
    content_type: str = "application/json"

    def body_for(self, stored: StoredObject) -> bytes:
        """The companion's bytes for ``stored``; its key is checked first (UnsafeValue)."""
        check_key(self.key)
        return bytes(self.render(stored))


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """What the caller asserts about the bytes it wrote, checked before anything becomes visible."""

    # None only for an upload whose ``existing_readable`` is False: the caller could not hash
    # what a killed process had stored, so commit derives the SHA-256 from the stored object.
    sha256: str | None
    size: int
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    # Object Lock retention is counted from here (the recording's end, or now if later).
    retain_from: datetime | None = None
    # Stored by the same commit: the object and its companion become visible together or not at
    # all (see ``Upload.commit``).
    companion: Companion | None = None


@dataclass(frozen=True, slots=True)
class Leftover:
    """A stored copy an upload could not take back (Object Lock refused its deletion): it stays
    at ``key`` and ``version_id`` until ``retain_until``. Recording it (``Ledger.quarantine``) is
    the caller's part."""

    key: str
    version_id: str | None
    reason: str
    retain_until: datetime | None = None


class Digest(Protocol):
    """A running hash (``hashlib`` objects are): what ``Upload.write`` feeds beside the write."""

    def update(self, data: bytes, /) -> None: ...


class ResumeNotes(Protocol):
    """Where an upload keeps how far it has come, for whoever continues it after a crash (the
    ledger row of the recording: ``Ledger.note_upload``). Only backends whose capabilities say
    ``resumes_from_notes`` use it; the description is theirs, as JSON-able values."""

    @property
    def previous(self) -> Mapping[str, Any]:
        """What the last writer of this recording noted (``{}``: nothing)."""
        ...

    async def note(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` (``{}``: no upload under way). Raises LeaseLost when the caller no
        longer holds the recording: the upload then stops and leaves everything as it is."""
        ...


class Upload(Protocol):
    """A write in progress. Abort it (or commit it) in every path: use ``async with``."""

    @property
    def key(self) -> str: ...

    @property
    def offset(self) -> int:
        """Bytes already held, e.g. from a partial upload a killed process left behind."""
        ...

    @property
    def existing_readable(self) -> bool:
        """Whether ``existing`` can give back the ``offset`` bytes already held. False for parts a
        killed process already stored in S3 (an unfinished upload cannot be read): the caller
        then hashes nothing and commits with ``sha256=None``."""
        ...

    @property
    def leftovers(self) -> Sequence[Leftover]:
        """Copies this upload stored but could not remove after a failed commit (Object Lock):
        the caller records them. Empty otherwise."""
        ...

    def existing(self) -> AsyncIterator[bytes]:
        """The bytes already held (``offset`` of them), so the caller can seed its hash. Raises
        StorageError when ``existing_readable`` is False."""
        ...

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        """Append ``chunk``. ``digest`` is fed the chunk first, where the write happens (on a disk
        thread, the hash costs no extra hand-off). After a failed write, the upload and the
        digest may disagree: the caller starts both over."""
        ...

    async def restart(self) -> None:
        """Drop everything written so far (a killed process's parts too); the next write starts
        at byte 0."""
        ...

    async def commit(self, request: CommitRequest) -> StoredObject:
        """Check size and hash, then make the object visible at ``key`` atomically and durably.

        An upload that continued bytes it could not read back (``existing_readable`` False) is
        committed with ``request.sha256`` None: the backend reads the stored object back, checks
        every part against the SHA-256 taken when that part was sent, and returns the SHA-256 of
        the whole in the StoredObject. A backend whose store returns no checksum for an object
        checks it the same way.

        With a ``request.companion``, the object and its companion become visible together or not
        at all: when commit raises, it has stored neither, and a key that held an older object
        holds it still, but for the cases named below. The upload is over either way: a failed
        commit leaves no partial upload to resume, and a retry writes both again.

        - Local disk writes and fsyncs the companion to a temporary file before the object is
          renamed into place, then renames the companion and fsyncs their directory (once, when
          they share it). Should the companion's rename fail after the object's, the object is
          removed again, and an older object it replaced is gone with it.
        - S3 can only check a multipart object, and store the companion, once the object exists
          (the companion describes its version and retention). Should either fail, the version
          just written is deleted, which makes an older version current again in a versioned
          bucket (an unversioned one has lost it). Object Lock may refuse that delete: the copy
          is then one of ``leftovers`` (key, version, why) and commit raises a StorageError
          saying where it stays. Recording it is the caller's part, not the backend's.

        A crash (power cut, SIGKILL) between the two steps can still leave the object without its
        companion: no backend makes two names appear at once.
        """
        ...

    async def abort(self) -> None:
        """Discard the write, leaving nothing behind. Safe to call twice or after commit."""
        ...

    async def release(self) -> None:
        """Stop writing and keep what is held, as a killed process would, for whoever continues
        it (the recording passed to another worker). Nothing more can be written."""
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
        """Raise PreflightError with one clear sentence if the archive cannot be written; log a
        warning for what works but should be fixed (an S3 bucket without a lifecycle rule for
        unfinished uploads)."""
        ...

    async def begin(
        self, key: str, *, resume: bool = True, notes: ResumeNotes | None = None
    ) -> Upload:
        """Start (or, with ``resume``, continue) writing the object at ``key``. A backend that
        ``resumes_from_notes`` continues what ``notes.previous`` describes when it is an upload of
        ``key`` it can confirm; anything else it describes is aborted at once. It keeps ``notes``
        up to date as the upload goes."""
        ...

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        """Store a small object (a metadata sidecar) atomically."""
        ...

    async def put_whole(self, key: str, data: bytes, request: CommitRequest) -> StoredObject:
        """Store a whole body held in memory (a small recording) as ``begin`` (not resuming),
        one ``write`` and ``commit`` would, with every promise of theirs: ``data`` hashed by the
        storage beside its write (``request.sha256`` None) or checked against it, size checked,
        durable, the object and its companion visible together or not at all, nothing left
        behind on failure, another live writer of ``key`` refused (``HeldElsewhere``)."""
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

    def locate(self, key: str) -> str:
        """Where a person finds the object: an absolute path, or ``s3://bucket/prefix/key``."""
        ...

    async def describe_missing(self, key: str) -> str | None:
        """When ``stat`` finds nothing at ``key``: what storage still knows of it (on S3, a
        version a delete marker hides), for the report; None when there is nothing to say."""
        ...

    def iter_keys(self) -> AsyncIterator[str]:
        """Every committed key, in no promised order; partial uploads are not keys."""
        ...

    async def remove_copy(self, keys: Sequence[str], now: datetime) -> Removal:
        """Delete a recording's copy for good (its retention ended): every version stored at
        ``keys`` (media and sidecar). Every version is checked first: while any is under Object
        Lock retention (until after ``now``) or a legal hold, nothing is deleted and
        ``refused`` says why. Keys with nothing stored are no error."""
        ...

    async def set_legal_hold(self, keys: Sequence[str], on: bool) -> int:
        """Set (``on``) or release the store's own legal hold on every version at ``keys``;
        how many versions were changed. 0 where the store has none (local disk, a bucket
        without Object Lock): the ledger's flag is the hold there."""
        ...

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        """Remove what killed processes left behind: partial uploads idle for longer than the
        limit, and temporary files that are never resumed (a sidecar being written) as soon as no
        live process holds them (after a short grace), whatever the limit. Returns how many
        went."""
        ...


UploadState = Literal["open", "committed", "aborted", "released"]


async def put_whole_by_upload(
    storage: StorageBackend, key: str, data: bytes, request: CommitRequest
) -> StoredObject:
    """``put_whole`` for a backend that has no cheaper way: ``begin``, one ``write``, ``commit``."""
    digest = hashlib.sha256()
    async with await storage.begin(key, resume=False) as upload:
        await upload.write(data, digest=digest)
        sha256 = digest.hexdigest()
        if request.sha256 is not None and request.sha256.lower() != sha256:
            raise IntegrityError(f"{key}: SHA-256 is {sha256}, {request.sha256} expected")
        return await upload.commit(dataclasses.replace(request, sha256=sha256))


class UploadBase(ABC):
    """The state machine every upload shares: ``open`` → ``committed`` | ``aborted`` |
    ``released``, each final. A failed commit aborts; ``async with`` aborts what was neither
    committed nor released. Subclasses keep the bytes: ``_store`` (commit's work, given the
    request), ``_discard`` (drop everything, idempotent) and ``_let_go`` (keep it for a resume)."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._state: UploadState = "open"

    @property
    def key(self) -> str:
        return self._key

    @property
    def state(self) -> UploadState:
        return self._state

    @property
    def existing_readable(self) -> bool:
        return True

    @property
    def leftovers(self) -> Sequence[Leftover]:
        return ()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"upload of {self._key} is already {self._state}")

    async def commit(self, request: CommitRequest) -> StoredObject:
        self._check_open()
        try:
            stored = await self._store(request)
        except BaseException:
            self._state = "aborted"
            await self._discard()
            raise
        self._state = "committed"
        return stored

    async def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        await self._discard()

    async def release(self) -> None:
        if self._state != "open":
            return
        self._state = "released"
        await self._let_go()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.abort()
            return
        try:
            await self.abort()
        except ArchiverError as failure:
            # Keep the error that brought us here; what stays is cleaned up later.
            log.warning("could not abort the upload of %s: %s", self._key, failure)

    @abstractmethod
    async def _store(self, request: CommitRequest) -> StoredObject: ...

    @abstractmethod
    async def _discard(self) -> None: ...

    async def _let_go(self) -> None:
        return None


class PlainCopies:
    """``remove_copy`` and ``set_legal_hold`` for a store with one version per key and no lock
    of its own (local disk, memory): delete what is there; the ledger's flag is the hold."""

    async def stat(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def remove_copy(self, keys: Sequence[str], now: datetime) -> Removal:
        removed: list[Mapping[str, str | None]] = []
        for key in keys:
            if await self.stat(key) is not None:
                await self.delete(key)
                removed.append({"key": key, "version_id": None})
        return Removal(tuple(removed))

    async def set_legal_hold(self, keys: Sequence[str], on: bool) -> int:
        return 0
