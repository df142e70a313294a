"""The multipart upload behind an ``S3Upload``: its parts, how far it has come (the note the ledger
keeps for whoever continues it after a crash), its completion and the checks of what S3 made of it.

Every part is sent with the SHA-256 of its bytes, taken here from the very bytes sent, and kept
(in the note too). That is what proves the object afterwards, on any S3 dialect:

- the composite checksum S3 reports for the object (the SHA-256 of the parts' SHA-256s, with
  ``-N`` appended by AWS and SeaweedFS, without it by moto) is computed here and compared by
  value;
- where S3 reports none, or where some parts were sent by a killed process (whose running hash
  died with it: ``hashlib`` state cannot be saved), the object is read back once and every part
  hashed again against its kept SHA-256 (``read_back``), which also gives the whole SHA-256.

Methods block and run in the backend's threads, one at a time (``_lock``): an abort waits for a
part still going up (even one whose await was cancelled), so no part lands after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from archiver.errors import ArchiverError, IntegrityError, StorageError
from archiver.storage.base import CHUNK_SIZE, CommitRequest
from archiver.storage.s3.bucket import Bucket, b64
from archiver.storage.s3.settings import MAX_PARTS

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadOutputTypeDef,
        PartTypeDef,
    )

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Part:
    number: int
    size: int
    # The SHA-256 of the part's bytes, taken by the process that sent them.
    digest: bytes
    etag: str

    def completed(self) -> CompletedPartTypeDef:
        return {"PartNumber": self.number, "ETag": self.etag, "ChecksumSHA256": b64(self.digest)}


def _same_etag(a: str, b: str) -> bool:
    return a.strip('"') == b.strip('"')


def _noted_parts(note: Mapping[str, Any]) -> list[tuple[int, bytes, str | None]]:
    """The parts a note lists as (size, SHA-256, ETag), then the part that was going up when it
    was written (its ETag None); ValueError when the note is not that (another version of
    archiver wrote it, or it is damaged)."""
    entries = note.get("parts", [])
    if not isinstance(entries, list):
        raise ValueError("parts is not a list")
    pending = note.get("pending")
    parts: list[tuple[int, bytes, str | None]] = []
    for entry in [*entries, *([pending] if pending is not None else [])]:
        if not (isinstance(entry, list) and len(entry) in (2, 3)):
            raise ValueError(f"part {entry!r:.80} is not [size, sha256(, etag)]")
        size, digest_b64, *etag = entry
        if not (isinstance(size, int) and isinstance(digest_b64, str)):
            raise ValueError(f"part {entry!r:.80} is not [size, sha256(, etag)]")
        try:
            digest = base64.b64decode(digest_b64, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"part {entry!r:.80} has no base64 SHA-256") from exc
        if len(digest) != 32 or (etag and not isinstance(etag[0], str)):
            raise ValueError(f"part {entry!r:.80} is not [size, sha256(, etag)]")
        parts.append((size, digest, etag[0] if etag else None))
    if pending is not None and len(pending) != 2:
        raise ValueError("the pending part has an ETag")
    return parts


def confirmed_parts(
    noted: list[tuple[int, bytes, str | None]], listed: list[PartTypeDef]
) -> list[Part]:
    """The parts 1..k both the note and S3 agree on (size, ETag, and the checksum where S3 lists
    one), and the one that was going up if S3 holds a part of its size (its bytes are checked
    at commit like every part's): what an upload can be continued after. S3's parts past them
    are sent again."""
    by_number = {p["PartNumber"]: p for p in listed}
    parts: list[Part] = []
    for number, (size, digest, etag) in enumerate(noted, 1):
        held = by_number.get(number)
        if held is None or held.get("Size") != size:
            break
        if etag is not None and not _same_etag(held["ETag"], etag):
            break
        if held.get("ChecksumSHA256") not in (None, b64(digest)):
            break
        parts.append(Part(number, size, digest, held["ETag"]))
    return parts


class Multipart:
    def __init__(
        self, bucket: Bucket, key: str, *, upload_id: str | None = None, parts: Sequence[Part] = ()
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.upload_id = upload_id
        self.parts: list[Part] = list(parts)
        self.size = sum(p.size for p in self.parts)
        self.closed = False
        # Whether _hasher saw every byte: not when the first parts came from a killed process.
        self.whole_known = not self.parts
        self._hasher = hashlib.sha256()
        self._lock = threading.Lock()

    @classmethod
    def resumed(cls, bucket: Bucket, key: str, note: Mapping[str, Any]) -> Multipart | None:
        """The upload ``note`` describes, continued after the parts S3 confirms; None when S3
        no longer has it. A note that cannot be read has its upload aborted."""
        upload_id = note["upload_id"]
        try:
            noted = _noted_parts(note)
        except ValueError as exc:
            log.warning("the note of the upload of %s is unusable (%s): starting over", key, exc)
            bucket.abort_multipart(bucket.full_key(key), upload_id)
            return None
        listed = bucket.list_parts(bucket.full_key(key), upload_id)
        if listed is None:
            return None
        return cls(bucket, key, upload_id=upload_id, parts=confirmed_parts(noted, listed))

    @property
    def started(self) -> bool:
        return bool(self.parts) or self.upload_id is not None

    @property
    def whole_sha256(self) -> str | None:
        return self._hasher.hexdigest() if self.whole_known else None

    def note(self, pending: tuple[int, bytes] | None = None) -> dict[str, Any]:
        """How far the upload has come, for whoever continues it (``Ledger.note_upload``): its
        parts, and the one about to go up (``pending``: its size and SHA-256), which a successor
        takes when S3 holds it: a crash then costs at most the part that was filling."""
        note: dict[str, Any] = {
            "backend": "s3",
            "bucket": self.bucket.name,
            "object": self.bucket.full_key(self.key),
            "key": self.key,
            "upload_id": self.upload_id,
            "parts": [[p.size, b64(p.digest), p.etag] for p in self.parts],
        }
        if pending is not None:
            note["pending"] = [pending[0], b64(pending[1])]
        return note

    def create(self) -> None:
        with self._lock:
            self._check_open()
            if self.upload_id is None:
                self.upload_id = self.bucket.create_multipart(self.key, datetime.now(UTC))

    def upload_part(self, data: bytearray, digest: bytes | None = None) -> None:
        """Send ``data`` as the next part (``digest``: its SHA-256, when already taken)."""
        with self._lock:
            self._upload_part(data, digest)

    def abort(self) -> None:
        with self._lock:
            self._abort()

    def complete(
        self, rest: bytearray, request: CommitRequest, digest: bytes | None
    ) -> CompleteMultipartUploadOutputTypeDef:
        """Send ``rest`` as the last part and complete the upload (aborted should that fail):
        the object exists from here on, still to be checked (``matches``, ``read_back``)."""
        with self._lock:
            try:
                if rest or not self.parts:
                    self._upload_part(rest)
                if self.size != request.size:
                    raise IntegrityError(
                        f"{self.key}: {self.size} bytes uploaded, {request.size} expected"
                    )
                if digest is not None and self.whole_known and self._hasher.digest() != digest:
                    raise IntegrityError(
                        f"{self.key}: SHA-256 of the bytes written is {self._hasher.hexdigest()}, "
                        f"{digest.hex()} expected"
                    )
                assert self.upload_id is not None
                done = self.bucket.complete_multipart(
                    self.key, self.upload_id, [p.completed() for p in self.parts]
                )
            except BaseException:
                self._abort_quietly()
                raise
            self.closed = True
            self.upload_id = None
            return done

    def composite(self) -> str:
        """S3's composite checksum of the parts sent: base64 SHA-256 of their SHA-256s."""
        return b64(hashlib.sha256(b"".join(p.digest for p in self.parts)).digest())

    def matches(self, returned: str) -> bool:
        """Whether a checksum S3 reports for the object is the one of these parts: the composite
        with or without its ``-N`` (N, when given, the number of parts), or a store's SHA-256 of
        the whole object."""
        value, dash, count = returned.partition("-")
        if dash and count != str(len(self.parts)):
            return False
        if value == self.composite():
            return True
        whole = self.whole_sha256
        return not dash and whole is not None and value == b64(bytes.fromhex(whole))

    def read_back(self, version: str | None) -> tuple[str, str | None]:
        """Read the stored object once, hashing each part against the SHA-256 it was sent with:
        the whole object's SHA-256, and what differs (None: every byte is as sent)."""
        body = self.bucket.open(self.key, version)
        whole = hashlib.sha256()
        try:
            for part in self.parts:
                digest = hashlib.sha256()
                left = part.size
                while left:
                    chunk = self.bucket.read_chunk(self.key, body, min(CHUNK_SIZE, left))
                    if not chunk:
                        return whole.hexdigest(), f"S3 holds fewer bytes than the {self.size} sent"
                    digest.update(chunk)
                    whole.update(chunk)
                    left -= len(chunk)
                if digest.digest() != part.digest:
                    return whole.hexdigest(), (
                        f"part {part.number} reads back with SHA-256 {digest.hexdigest()}, "
                        f"{part.digest.hex()} sent"
                    )
            if self.bucket.read_chunk(self.key, body, 1):
                return whole.hexdigest(), f"S3 holds more bytes than the {self.size} sent"
        finally:
            body.close()
        return whole.hexdigest(), None

    # Called with the lock held.

    def _check_open(self) -> None:
        if self.closed:
            raise StorageError(f"upload of {self.key} is already closed")

    def _upload_part(self, data: bytearray, digest: bytes | None = None) -> None:
        self._check_open()
        if len(self.parts) >= MAX_PARTS:
            raise StorageError(
                f"{self.key} needs more than {MAX_PARTS} parts: raise storage.s3.part_size"
            )
        if self.upload_id is None:
            self.upload_id = self.bucket.create_multipart(self.key, datetime.now(UTC))
        number = len(self.parts) + 1
        digest = digest or hashlib.sha256(data).digest()
        etag = self.bucket.upload_part(self.key, self.upload_id, number, data, digest)
        if self.whole_known:
            self._hasher.update(data)
        self.parts.append(Part(number, len(data), digest, etag))
        self.size += len(data)

    def _abort(self) -> None:
        self.closed = True
        if self.upload_id is not None:
            self.bucket.abort_multipart(self.bucket.full_key(self.key), self.upload_id)
            self.upload_id = None

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except ArchiverError as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.key, exc)
