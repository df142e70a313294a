"""Recordings in a dict, for fast unit tests of the pipeline.

Same contract as the real backends (keys checked like every backend checks them, nothing visible
before a verified commit, ``async with`` aborts) but nothing survives the process, so there is never
a partial upload to resume: ``offset`` starts at 0 and ``cleanup_stale`` has nothing to remove.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from archiver.errors import IntegrityError, StorageError
from archiver.models import StoredObject
from archiver.storage.base import (
    CHUNK_SIZE,
    Capabilities,
    CommitRequest,
    Digest,
    ObjectInfo,
    PlainCopies,
    ResumeNotes,
    UploadBase,
    put_whole_by_upload,
)
from archiver.storage.keys import check_key


@dataclass(frozen=True, slots=True)
class _Stored:
    data: bytes
    sha256: str
    content_type: str | None


class MemoryUpload(UploadBase):
    def __init__(self, storage: MemoryStorage, key: str) -> None:
        super().__init__(key)
        self._storage = storage
        self._buffer = bytearray()

    @property
    def offset(self) -> int:
        return len(self._buffer)

    async def existing(self) -> AsyncIterator[bytes]:
        held = bytes(self._buffer)
        for start in range(0, len(held), CHUNK_SIZE):
            yield held[start : start + CHUNK_SIZE]

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        self._check_open()
        if digest is not None:
            digest.update(chunk)
        self._buffer += chunk

    async def restart(self) -> None:
        self._check_open()
        self._buffer.clear()

    async def _store(self, request: CommitRequest) -> StoredObject:
        data = bytes(self._buffer)
        actual = hashlib.sha256(data).hexdigest()
        expected = request.sha256.lower() if request.sha256 else actual
        if len(data) != request.size:
            raise IntegrityError(f"{self._key}: {len(data)} bytes written, {request.size} expected")
        if actual != expected:
            raise IntegrityError(
                f"{self._key}: SHA-256 of the bytes written is {actual}, {expected} expected"
            )
        stored = StoredObject(key=self._key, size=len(data), sha256=expected)
        objects = {self._key: _Stored(data, expected, request.content_type)}
        if (companion := request.companion) is not None:
            body = companion.body_for(stored)
            objects[companion.key] = _Stored(
                body, hashlib.sha256(body).hexdigest(), companion.content_type
            )
        # Both at once, or (above) neither.
        self._storage._objects.update(objects)
        self._buffer = bytearray()
        return stored

    async def _discard(self) -> None:
        self._buffer = bytearray()


class MemoryStorage(PlainCopies):
    def __init__(self) -> None:
        self._objects: dict[str, _Stored] = {}
        self._capabilities = Capabilities(name="memory", resumes_after_crash=False)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def keys(self) -> list[str]:
        """Every committed key, sorted: for tests to check what was (and was not) written."""
        return sorted(self._objects)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def preflight(self) -> None:
        return None

    async def begin(
        self, key: str, *, resume: bool = True, notes: ResumeNotes | None = None
    ) -> MemoryUpload:
        check_key(key)
        return MemoryUpload(self, key)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        check_key(key)
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        self._objects[key] = _Stored(data, digest, content_type)
        return StoredObject(key=key, size=len(data), sha256=digest)

    async def put_whole(self, key: str, data: bytes, request: CommitRequest) -> StoredObject:
        return await put_whole_by_upload(self, key, data, request)

    async def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        stored = self._objects.get(key)
        if stored is None:
            return None
        return ObjectInfo(key=key, size=len(stored.data), sha256=stored.sha256)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        check_key(key)
        stored = self._objects.get(key)
        if stored is None:
            raise StorageError(f"nothing is stored at {key}")
        for start in range(0, len(stored.data), CHUNK_SIZE):
            yield stored.data[start : start + CHUNK_SIZE]

    async def delete(self, key: str) -> None:
        check_key(key)
        self._objects.pop(key, None)

    def locate(self, key: str) -> str:
        check_key(key)
        return f"memory:{key}"

    async def describe_missing(self, key: str) -> str | None:
        return None

    async def iter_keys(self) -> AsyncIterator[str]:
        for key in sorted(self._objects):
            yield key

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        return 0
