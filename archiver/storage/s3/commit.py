"""What a commit does once the bytes are up: make the object, check what S3 made of it, lock and
tag it, store its companion, and take back (or, locked, report as a ``Leftover``) a version that
fails any of it. Blocking: runs in the backend's threads.

The checks, whatever the S3 dialect: the size S3 holds; the checksum it reports, compared by value
(a single PutObject: the SHA-256 sent; a multipart object: ``Multipart.matches``); where it reports
none, or where a killed process sent some parts, the object read back once (``read_back``). The
Object Lock retention and legal hold are those S3 reports after the commit, set again where a
store ignored them at the start of a multipart upload (moto does), so the ledger never holds a
date the store does not.

A version that fails a check after it became visible is deleted. Object Lock may refuse: the
version then stays, and is one of the upload's leftovers (key, version, why) for the caller to
record (``Ledger.quarantine``). Failures of the bytes S3 holds are transient (``ServerError``): the
next attempt uploads the recording again, as a new version.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from archiver.errors import ArchiverError, IntegrityError, ServerError, StorageError
from archiver.models import StoredObject
from archiver.storage.base import CommitRequest, Companion, Leftover
from archiver.storage.s3.bucket import Bucket, b64
from archiver.storage.s3.multipart import Multipart
from archiver.storage.s3.settings import aware, content_type, metadata, retain_until

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.settings = bucket.settings

    def put(
        self,
        key: str,
        body: bytes | bytearray,
        request: CommitRequest,
        leftovers: list[Leftover],
    ) -> StoredObject:
        """One PutObject of ``body``, checked here against the caller's SHA-256 before it goes
        (S3 then checks the bytes it receives against it) and checked again as stored."""
        digest = hashlib.sha256(body).digest()
        if request.sha256 is not None and digest.hex() != request.sha256.lower():
            raise IntegrityError(
                f"{key}: SHA-256 of the bytes written is {digest.hex()}, "
                f"{request.sha256.lower()} expected"
            )
        now = datetime.now(UTC)
        answer = self.bucket.put(
            key,
            body,
            digest=digest,
            content_type=content_type(key, request.content_type),
            metadata=metadata(key, dict(request.metadata or {}), digest.hex()),
            retain_from=request.retain_from,
            now=now,
        )
        version = answer.get("VersionId")

        def check() -> StoredObject:
            returned = answer.get("ChecksumSHA256")
            head = self._head(key, version, request)
            if returned is not None and returned != b64(digest):
                raise _Faulty(f"stored it with another checksum ({returned})", head)
            returned = head.get("ChecksumSHA256")
            if returned is None:
                # A store that reports no checksum: what it holds is read back once.
                held = self._hash_stored(key, version)
                if held != digest.hex():
                    raise _Faulty(f"reads back with SHA-256 {held}, {digest.hex()} sent", head)
            elif returned != b64(digest):
                raise _Faulty(f"reports checksum {returned}, {b64(digest)} expected", head)
            wanted = retain_until(self.settings, request.retain_from, now)
            return StoredObject(
                key=key,
                size=request.size,
                sha256=digest.hex(),
                version_id=head.get("VersionId") or version,
                retain_until=self._lock(key, version, head, wanted),
            )

        return self._checked(key, version, check, leftovers)

    def complete(
        self,
        multipart: Multipart,
        rest: bytearray,
        request: CommitRequest,
        leftovers: list[Leftover],
    ) -> StoredObject:
        """Complete ``multipart`` with ``rest`` as its last part, then check, lock and tag it."""
        key = multipart.key
        digest = bytes.fromhex(request.sha256) if request.sha256 is not None else None
        now = datetime.now(UTC)
        done = multipart.complete(rest, request, digest)
        version = done.get("VersionId")

        def check() -> StoredObject:
            head = self._head(key, version, request)
            returned = done.get("ChecksumSHA256") or head.get("ChecksumSHA256")
            if returned is not None and not multipart.matches(returned):
                expected = f"{multipart.composite()}-{len(multipart.parts)}"
                why = f"reports checksum {returned} for the upload, {expected} expected"
                raise _Faulty(why, head)
            sha256 = multipart.whole_sha256
            if returned is None or sha256 is None:
                started = time.monotonic()
                sha256, problem = multipart.read_back(version)
                log.info(
                    "read %s back to check it: %d bytes in %.2f s",
                    key,
                    request.size,
                    time.monotonic() - started,
                )
                if problem is not None:
                    raise _Faulty(problem, head)
            if digest is not None and sha256 != digest.hex():
                why = f"holds SHA-256 {sha256}, {digest.hex()} expected"
                raise _Faulty(why, head, kind=IntegrityError)
            wanted = retain_until(self.settings, request.retain_from, now)
            until = self._lock(key, version, head, wanted)
            self._tag(key, version, request, sha256)
            return StoredObject(
                key=key,
                size=request.size,
                sha256=sha256,
                version_id=head.get("VersionId") or version,
                retain_until=until,
            )

        return self._checked(key, version, check, leftovers)

    def store_companion(
        self,
        stored: StoredObject,
        companion: Companion,
        request: CommitRequest,
        leftovers: list[Leftover],
    ) -> None:
        """Store ``stored``'s companion; should that fail, take ``stored`` back."""
        try:
            body = companion.body_for(stored)
            self.put(
                companion.key,
                body,
                CommitRequest(
                    sha256=None,
                    size=len(body),
                    content_type=companion.content_type,
                    retain_from=request.retain_from,
                ),
                leftovers,
            )
        except Exception as exc:
            self._take_back(stored, companion, exc, leftovers)
            raise

    def stored_sha256(self, key: str, head: HeadObjectOutputTypeDef) -> str | None:
        """The SHA-256 kept with an object: its metadata (a single PutObject) or its tag."""
        sha256 = head.get("Metadata", {}).get("sha256")
        if sha256 is None and head.get("TagCount"):
            sha256 = (self.bucket.tags(key, head.get("VersionId")) or {}).get("sha256")
        return sha256

    # -- the steps -------------------------------------------------------------------------

    def _head(
        self, key: str, version: str | None, request: CommitRequest
    ) -> HeadObjectOutputTypeDef:
        head = self.bucket.head(key, version, checksum=True)
        if head is None:
            raise StorageError(
                f"{key} is not in S3 bucket {self.bucket.name!r} right after its upload"
            )
        size = head.get("ContentLength")
        if size != request.size:
            raise _Faulty(f"holds {size} bytes, {request.size} expected", head)
        return head

    def _checked(
        self,
        key: str,
        version: str | None,
        check: Callable[[], StoredObject],
        leftovers: list[Leftover],
    ) -> StoredObject:
        """Run the checks of a version that exists now; should any fail (or fail to run), the
        version is withdrawn, or, where S3 will not delete it, becomes a leftover."""
        try:
            return check()
        except _Faulty as faulty:
            stays = self._withdraw(key, version, faulty.why, leftovers, _until(faulty.head))
            raise faulty.kind(f"{key}: S3 {faulty.why}{stays}") from None
        except ArchiverError as exc:
            stays = self._withdraw(key, version, f"could not be checked ({exc})", leftovers, None)
            if stays:
                raise type(exc)(f"{exc}{stays}") from exc
            raise

    def _hash_stored(self, key: str, version: str | None) -> str:
        digest = hashlib.sha256()
        body = self.bucket.open(key, version)
        try:
            while chunk := self.bucket.read_chunk(key, body):
                digest.update(chunk)
        finally:
            body.close()
        return digest.hexdigest()

    def _lock(
        self,
        key: str,
        version: str | None,
        head: HeadObjectOutputTypeDef,
        wanted: datetime | None,
    ) -> datetime | None:
        """The retention the object has once this returns: at least ``wanted`` where S3 lets it
        be set, and the legal hold where configured. Extending COMPLIANCE retention is allowed;
        S3 never lets it be shortened."""
        held = _until(head)
        if self.settings.object_lock_mode is None or wanted is None:
            return held
        if held is None or held < wanted:
            try:
                self.bucket.put_retention(key, version, wanted)
                held = wanted
            except ArchiverError as exc:
                # The object is stored; the ledger gets the date it really has.
                log.warning("%s stays retained until %s: %s", key, held, exc)
        if self.settings.legal_hold and head.get("ObjectLockLegalHoldStatus") != "ON":
            try:
                self.bucket.put_legal_hold(key, version)
            except ArchiverError as exc:
                log.warning("%s has no legal hold: %s", key, exc)
        return held

    def _tag(self, key: str, version: str | None, request: CommitRequest, sha256: str) -> None:
        """A multipart object's sha256 and recording-id as tags: its metadata was fixed at start."""
        tags = {**self.settings.tags, **(request.metadata or {}), "sha256": sha256}
        try:
            self.bucket.tag(key, version, tags)
        except ArchiverError as exc:
            # Verified and stored all the same; the ledger and the sidecar keep the SHA-256.
            log.warning("could not tag %s with its SHA-256: %s", key, exc)

    def _withdraw(
        self,
        key: str,
        version: str | None,
        why: str,
        leftovers: list[Leftover],
        until: datetime | None,
    ) -> str:
        """Delete a version that failed its check after it became visible. What S3 will not
        delete becomes a leftover; returns how the error should say where it stays ("": gone)."""
        try:
            self.bucket.delete(key, version)
        except ArchiverError as refused:
            leftovers.append(Leftover(key=key, version_id=version, reason=why, retain_until=until))
            where = f"{key}, version {version}" if version else key
            log.warning("the faulty upload of %s stays at %s: %s", key, where, refused)
            return f"; it stays at {where} ({refused})"
        return ""

    def _take_back(
        self,
        stored: StoredObject,
        companion: Companion,
        failure: Exception,
        leftovers: list[Leftover],
    ) -> None:
        """Delete the version ``stored`` names, whose companion ``failure`` kept from being stored.

        Object Lock refuses that delete (retention or a legal hold): the object then stays, locked,
        at its key and version, a leftover, and the StorageError raised says so. Any other failed
        delete raises the same way, naming where the object stays."""
        key, version = stored.key, stored.version_id
        try:
            self.bucket.delete(key, version)
        except ArchiverError as refused:
            where = f"{key}, version {version}" if version else key
            if self.settings.object_lock_mode is not None or stored.retain_until is not None:
                until = f" until {stored.retain_until.isoformat()}" if stored.retain_until else ""
                stays = f"it stays locked at {where}{until}"
            else:
                stays = f"it stays at {where}"
            leftovers.append(
                Leftover(
                    key=key,
                    version_id=version,
                    reason=f"its companion {companion.key} could not be stored ({failure})",
                    retain_until=stored.retain_until,
                )
            )
            raise StorageError(
                f"{key}: its companion {companion.key} could not be stored ({failure}), and S3 "
                f"refused to delete it again ({refused}): {stays}"
            ) from failure


class _Faulty(Exception):
    """A check of a stored version failed: ``why`` (after "S3 ..."), raised as ``kind``."""

    def __init__(
        self,
        why: str,
        head: HeadObjectOutputTypeDef | None = None,
        *,
        kind: type[ArchiverError] = ServerError,
    ) -> None:
        super().__init__(why)
        self.why = why
        self.head = head
        self.kind = kind


def _until(head: HeadObjectOutputTypeDef | dict[str, Any] | None) -> datetime | None:
    held = head.get("ObjectLockRetainUntilDate") if head is not None else None
    return aware(held) if held is not None else None
