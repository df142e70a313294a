"""Recordings in an S3 bucket (AWS or a compatible server such as SeaweedFS), through boto3.

An upload is buffered in memory and stored with one PutObject at commit while it stays below
``multipart_threshold``. A bigger one becomes a multipart upload once its buffer reaches the
threshold: parts of ``part_size`` go up while the download continues, so an upload holds about one
part plus one chunk. Every PutObject and UploadPart carries the SHA-256 of its bytes and S3 refuses
a mismatch (BadDigest); a multipart upload is also hashed here as a whole and compared with the
caller's hash before CompleteMultipartUpload makes it visible. Nothing shows at a key before that.

S3 fixes an object's metadata, content type and Object Lock retention when a multipart upload
*starts*, before the caller's SHA-256 (and the rest of ``CommitRequest``) exists. So a multipart
object takes its content type from its key's extension and its retention from the moment it starts;
at commit the retention is extended to the caller's date (extending COMPLIANCE retention is allowed,
shortening is not) and ``sha256`` / ``recording-id`` are set as object tags, where a single
PutObject carries them as metadata (``x-amz-meta-sha256``). ``stat`` reads either.

boto3 blocks, so every call runs in a bounded thread pool owned by the backend, never on the event
loop. A multipart upload left by a killed process cannot be continued (``resumes_after_crash`` is
false): the next run's ``cleanup_stale`` aborts it. Credentials come only from boto3's standard
chain (environment, profile, instance role), never from archiver's config.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import mimetypes
import re
import secrets
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, cast

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from archiver.config import S3Settings
from archiver.errors import (
    ArchiverError,
    ConfigError,
    IntegrityError,
    NetworkError,
    PreflightError,
    ServerError,
    StorageError,
    UnsafeValue,
)
from archiver.models import StoredObject
from archiver.redact import redact, safe_url
from archiver.storage.base import Capabilities, CommitRequest, Companion, Digest, ObjectInfo
from archiver.storage.local import CHUNK_SIZE, check_key

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, HeadObjectOutputTypeDef

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PUT_SIZE = 5 * GiB
MAX_PARTS = 10_000
# S3 allows 10 tags per object; a multipart object gets sha256 and recording-id as two of them.
MAX_CONFIGURED_TAGS = 8
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
SSE_MODES = ("AES256", "aws:kms")

# Chunks at least this big are hashed in a worker thread; smaller ones cost less than the hop.
_HASH_OFF_LOOP = 256 * 1024
_INTEGRITY_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchVersion"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


# -- pure helpers --------------------------------------------------------------------------


def check_settings(settings: S3Settings) -> list[str]:
    """Every problem with ``storage.s3``, each naming its key (empty when all is well)."""
    p = "storage.s3"
    problems: list[str] = []
    if not settings.bucket:
        problems.append(f"{p}.bucket: required")
    if settings.prefix:
        if settings.prefix.startswith("/"):
            problems.append(f"{p}.prefix: must not start with '/'")
        else:
            try:
                check_key(settings.prefix.rstrip("/"))
            except UnsafeValue as exc:
                problems.append(f"{p}.prefix: {exc}")
    if not MIN_PART_SIZE <= settings.part_size <= MAX_PART_SIZE:
        problems.append(f"{p}.part_size: must be between {MIN_PART_SIZE} (5 MiB) and 5 GiB")
    if not 1 <= settings.multipart_threshold <= MAX_PUT_SIZE:
        problems.append(f"{p}.multipart_threshold: must be between 1 and 5 GiB")
    if not 1 <= settings.max_threads <= 256:
        problems.append(f"{p}.max_threads: must be between 1 and 256")
    if settings.object_lock_mode is not None:
        if settings.object_lock_mode not in LOCK_MODES:
            problems.append(f"{p}.object_lock_mode: must be 'GOVERNANCE' or 'COMPLIANCE'")
        if settings.retention_days is None or settings.retention_days < 1:
            problems.append(f"{p}.retention_days: required (at least 1) with object_lock_mode")
    else:
        if settings.retention_days is not None:
            problems.append(f"{p}.retention_days: has no effect without object_lock_mode")
        if settings.legal_hold:
            problems.append(f"{p}.legal_hold: needs object_lock_mode (a bucket with Object Lock)")
    if settings.sse is not None and settings.sse not in SSE_MODES:
        problems.append(f"{p}.sse: must be 'AES256' or 'aws:kms'")
    if settings.kms_key_id is not None and settings.sse != "aws:kms":
        problems.append(f"{p}.kms_key_id: needs sse = 'aws:kms'")
    if len(settings.tags) > MAX_CONFIGURED_TAGS:
        problems.append(
            f"{p}.tags: at most {MAX_CONFIGURED_TAGS} (S3 allows 10 per object and archiver "
            "adds sha256 and recording-id to multipart objects)"
        )
    for name, value in settings.tags.items():
        if not 1 <= len(name) <= 128 or len(value) > 256:
            problems.append(f"{p}.tags: {name[:40]!r} is too long (keys 128, values 256)")
    return problems


def normalized_prefix(prefix: str) -> str:
    """``archive`` and ``archive/`` both put keys under ``archive/``; empty: the bucket's root."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def retain_until(
    settings: S3Settings, retain_from: datetime | None, now: datetime
) -> datetime | None:
    """``max(retain_from, now) + retention_days``, rounded up to a whole second (S3 keeps
    seconds: rounding down would make the retention shorter than asked), or None without a lock."""
    if not settings.object_lock_mode or not settings.retention_days:
        return None
    start = _aware(now)
    if retain_from is not None:
        start = max(start, _aware(retain_from))
    until = start + timedelta(days=settings.retention_days)
    if until.microsecond:
        until = until.replace(microsecond=0) + timedelta(seconds=1)
    return until


def object_args(
    settings: S3Settings,
    *,
    retain_from: datetime | None = None,
    now: datetime | None = None,
    lock: bool = True,
) -> dict[str, Any]:
    """The parameters every PutObject and CreateMultipartUpload of a stored object carries:
    storage class, encryption, tags and (with ``lock``) Object Lock retention and legal hold."""
    args: dict[str, Any] = {}
    if settings.storage_class:
        args["StorageClass"] = settings.storage_class
    if settings.sse:
        args["ServerSideEncryption"] = settings.sse
        if settings.sse == "aws:kms" and settings.kms_key_id:
            args["SSEKMSKeyId"] = settings.kms_key_id
    if settings.tags:
        args["Tagging"] = urllib.parse.urlencode(dict(settings.tags), quote_via=urllib.parse.quote)
    if lock and settings.object_lock_mode:
        args["ObjectLockMode"] = settings.object_lock_mode
        args["ObjectLockRetainUntilDate"] = retain_until(
            settings, retain_from, now or datetime.now(UTC)
        )
        if settings.legal_hold:
            args["ObjectLockLegalHoldStatus"] = "ON"
    return args


def translate(exc: Exception, doing: str) -> ArchiverError:
    """One botocore failure as an archiver error; ``doing`` completes the sentence "cannot …"."""
    if isinstance(exc, ArchiverError):
        return exc
    message = f"cannot {doing}: {reason(exc)}"
    if isinstance(exc, ClientError):
        code, status, _ = _client_error(exc)
        if code in _INTEGRITY_CODES:
            return IntegrityError(
                f"cannot {doing}: S3 found the bytes differ from their SHA-256 ({code})"
            )
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 408)):
            return ServerError(message)
        return StorageError(message)
    if isinstance(exc, FlexibleChecksumError):
        return IntegrityError(message)
    if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return NetworkError(message)
    return StorageError(message)


def reason(exc: Exception) -> str:
    """What went wrong, in a few words fit for an error message (never a credential)."""
    if isinstance(exc, ClientError):
        code, _, message = _client_error(exc)
        return redact(f"{code} ({message})" if message and message != code else code)
    if isinstance(exc, FlexibleChecksumError):
        return "the bytes S3 sent differ from their checksum"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            "no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run with an instance role)"
        )
    return f"{type(exc).__name__}: {redact(str(exc))}"


def _client_error(exc: ClientError) -> tuple[str, int | None, str]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or status or "error")
    return code, status, str(error.get("Message") or "")


def _is_missing(exc: ClientError) -> bool:
    """No such key (or version): not a missing bucket, which is an error, not an absence."""
    code, status, _ = _client_error(exc)
    return code not in _NO_BUCKET_CODES and (status == 404 or code in _MISSING_CODES)


def _aware(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _digest_of(key: str, sha256: str) -> bytes:
    try:
        digest = bytes.fromhex(sha256)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise IntegrityError(f"{key}: {sha256[:80]!r} is not a SHA-256 hex digest")
    return digest


def _content_type(key: str, given: str | None) -> str:
    return given or mimetypes.guess_type(key)[0] or "application/octet-stream"


def _metadata(key: str, request: CommitRequest) -> dict[str, str]:
    meta = {**(request.metadata or {}), "sha256": request.sha256.lower()}
    for name, value in meta.items():
        if not name or not _PRINTABLE_ASCII.fullmatch(name + value):
            raise UnsafeValue(f"{key}: metadata {name[:40]!r} is not printable ASCII")
    return meta


# -- the S3 side of an upload ------------------------------------------------------------------


class _Multipart:
    """The multipart upload behind an S3Upload, created with its first part. Its methods block and
    run in the backend's threads, one at a time: an abort waits for a part still going up (even one
    whose await was cancelled), so no part can land after the abort and leave an orphan."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self.key = key
        self.upload_id: str | None = None
        self.parts: list[CompletedPartTypeDef] = []
        self.digests: list[bytes] = []
        self.size = 0
        self.retain_until: datetime | None = None
        self.closed = False
        self._hasher = hashlib.sha256()
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return bool(self.parts) or self.upload_id is not None

    def upload_part(self, data: bytearray) -> None:
        with self._lock:
            self._upload_part(data)

    def abort(self) -> None:
        with self._lock:
            self._abort()

    def complete(self, rest: bytearray, request: CommitRequest, digest: bytes) -> StoredObject:
        storage = self._storage
        with self._lock:
            try:
                if rest or not self.parts:
                    self._upload_part(rest)
                if self.size != request.size:
                    raise IntegrityError(
                        f"{self.key}: {self.size} bytes uploaded, {request.size} expected"
                    )
                if self._hasher.digest() != digest:
                    raise IntegrityError(
                        f"{self.key}: SHA-256 of the bytes written is {self._hasher.hexdigest()}, "
                        f"{request.sha256.lower()} expected"
                    )
                assert self.upload_id is not None
                done = storage._call(
                    f"complete the upload of {self.key}",
                    storage.client.complete_multipart_upload,
                    Bucket=storage.bucket,
                    Key=storage.full_key(self.key),
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},
                )
            except BaseException:
                self._abort_quietly()
                raise
            self.closed = True
            self.upload_id = None
        # S3's composite checksum: the SHA-256 of the parts' SHA-256s, and the number of parts.
        composite = f"{_b64(hashlib.sha256(b''.join(self.digests)).digest())}-{len(self.parts)}"
        version = done.get("VersionId")
        returned = done.get("ChecksumSHA256")
        if returned is not None and returned != composite:
            storage._withdraw(self.key, version)
            raise IntegrityError(
                f"{self.key}: S3 reports checksum {returned} for the upload, {composite} expected"
            )
        until = storage._extend_retention(self.key, version, request, self.retain_until)
        storage._tag(self.key, version, request)
        return storage._confirm(self.key, request, version, composite, required=True, until=until)

    # Called with the lock held.

    def _upload_part(self, data: bytearray) -> None:
        storage = self._storage
        if self.closed:
            raise StorageError(f"upload of {self.key} is already closed")
        if len(self.parts) >= MAX_PARTS:
            raise StorageError(
                f"{self.key} needs more than {MAX_PARTS} parts: raise storage.s3.part_size"
            )
        if self.upload_id is None:
            self.upload_id, self.retain_until = storage._create_multipart(self.key)
        number = len(self.parts) + 1
        digest = hashlib.sha256(data).digest()
        answer = storage._call(
            f"upload part {number} of {self.key}",
            storage.client.upload_part,
            Bucket=storage.bucket,
            Key=storage.full_key(self.key),
            UploadId=self.upload_id,
            PartNumber=number,
            # botocore sends a bytearray as it is; bytes() would copy the whole part.
            Body=cast("bytes", data),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(digest),
        )
        returned = answer.get("ChecksumSHA256")
        if returned is not None and returned != _b64(digest):
            raise IntegrityError(f"{self.key}: S3 stored part {number} with another checksum")
        self._hasher.update(data)
        self.parts.append(
            {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": _b64(digest)}
        )
        self.digests.append(digest)
        self.size += len(data)

    def _abort(self) -> None:
        self.closed = True
        if self.upload_id is not None:
            self._storage._abort_multipart(self.key, self.upload_id)
            self.upload_id = None

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except ArchiverError as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.key, exc)


class S3Upload:
    """A write to one key, invisible until ``commit``. Use ``async with``: leaving aborts it."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._buffer = bytearray()
        self._written = 0
        self._multipart = _Multipart(storage, key)
        self._state: Literal["open", "committed", "aborted"] = "open"
        # A part upload was cancelled midway: whether it landed is unknown until restart or abort.
        self._interrupted = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def offset(self) -> int:
        return self._written

    async def existing(self) -> AsyncIterator[bytes]:
        if self._multipart.started:
            raise StorageError(
                f"{self._key}: parts already sent to S3 cannot be read back before commit"
            )
        held = bytes(self._buffer)
        for start in range(0, len(held), CHUNK_SIZE):
            yield held[start : start + CHUNK_SIZE]

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        self._check_writable()
        if not chunk:
            return
        if digest is not None:
            if len(chunk) >= _HASH_OFF_LOOP:
                # hashlib lets go of the GIL on big buffers: the event loop carries on meanwhile.
                await asyncio.to_thread(digest.update, chunk)
            else:
                digest.update(chunk)
        # Full parts go up before the chunk joins the buffer: a failed write changes nothing, so
        # the caller's retry can send the same bytes again.
        await self._send_parts(force=False)
        self._buffer += chunk
        self._written += len(chunk)

    async def restart(self) -> None:
        self._check_open()
        old, self._multipart = self._multipart, _Multipart(self._storage, self._key)
        busy = self._interrupted or old.started
        self._buffer = bytearray()
        self._written = 0
        self._interrupted = False
        if busy:
            try:
                await self._storage._abort_upload(old)
            except ArchiverError as exc:
                # The upload is forgotten either way; cleanup_stale aborts it on a later run.
                log.warning("could not abort the multipart upload of %s: %s", self._key, exc)

    async def commit(self, request: CommitRequest) -> StoredObject:
        self._check_writable()
        try:
            if self._written != request.size:
                raise IntegrityError(
                    f"{self._key}: {self._written} bytes written, {request.size} expected"
                )
            digest = _digest_of(self._key, request.sha256)
            threshold = self._storage.settings.multipart_threshold
            store: Callable[[], StoredObject]
            if not self._multipart.started and len(self._buffer) < threshold:
                store = functools.partial(
                    self._storage._put, self._key, self._buffer, request, digest
                )
            else:
                await self._send_parts(force=True)
                store = functools.partial(self._multipart.complete, self._buffer, request, digest)
            # The object and its companion in one call to a thread: a cancelled await cannot
            # part them once it has started.
            stored = await self._storage._run(self._storage._commit, store, request)
        except BaseException:
            await self._discard()
            raise
        self._state = "committed"
        self._buffer = bytearray()
        return stored

    async def abort(self) -> None:
        if self._state != "open":
            return
        await self._discard()

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
            # Keep the error that brought us here; the multipart upload waits for cleanup_stale.
            log.warning("could not abort the upload of %s: %s", self._key, failure)

    async def _send_parts(self, *, force: bool) -> None:
        settings = self._storage.settings
        if (
            not force
            and not self._multipart.started
            and len(self._buffer) < settings.multipart_threshold
        ):
            return
        while len(self._buffer) >= settings.part_size:
            await self._send_part(settings.part_size)

    async def _send_part(self, size: int) -> None:
        part = self._buffer
        tail = part[size:]
        del part[size:]
        try:
            await self._storage._run(self._multipart.upload_part, part)
        except asyncio.CancelledError:
            # The thread may still be sending ``part``: leave it alone, and refuse more writes.
            self._interrupted = True
            self._buffer = bytearray()
            raise
        except BaseException:
            part += tail
            raise
        self._buffer = tail

    async def _discard(self) -> None:
        self._state = "aborted"
        self._buffer = bytearray()
        # After an interrupted part the thread may be creating the multipart upload right now:
        # the abort has to queue behind it.
        if self._interrupted or self._multipart.started:
            await self._storage._abort_upload(self._multipart)
        else:
            self._multipart.closed = True

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"upload of {self._key} is already {self._state}")

    def _check_writable(self) -> None:
        self._check_open()
        if self._interrupted:
            raise StorageError(
                f"upload of {self._key} was interrupted while sending a part; restart or abort it"
            )


# -- the backend -----------------------------------------------------------------------------


class S3Storage:
    """Recordings as objects under ``prefix`` in one bucket. Open it with ``async with``."""

    def __init__(self, settings: S3Settings) -> None:
        problems = check_settings(settings)
        if problems:
            raise ConfigError(problems)
        self._settings = settings
        self._prefix = normalized_prefix(settings.prefix)
        self._executor: ThreadPoolExecutor | None = None
        self._client: S3Client | None = None
        self._capabilities = Capabilities(
            name="s3",
            resumes_after_crash=False,
            object_lock=settings.object_lock_mode is not None,
            server_verifies_checksum=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def settings(self) -> S3Settings:
        return self._settings

    @property
    def bucket(self) -> str:
        return self._settings.bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def client(self) -> S3Client:
        """The boto3 client (blocking: call it from a worker thread)."""
        if self._client is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        return self._client

    def full_key(self, key: str) -> str:
        """The object key in the bucket for a storage key."""
        return self._prefix + key

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.max_threads, thread_name_prefix="archiver-s3"
        )
        try:
            self._client = await self._run(self._make_client)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Let running calls (aborts above all) finish before the client goes.
            await asyncio.to_thread(executor.shutdown, wait=True)
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def preflight(self) -> None:
        await self._run(self._preflight)

    async def begin(self, key: str, *, resume: bool = True) -> S3Upload:
        # Nothing of a killed process's upload can be continued, so ``resume`` changes nothing.
        check_key(key)
        if self._executor is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        return S3Upload(self, key)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        check_key(key)
        return await self._run(self._put_bytes, key, bytes(data), content_type, retain_from)

    async def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        return await self._run(self._stat, key)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        check_key(key)
        body = await self._run(self._open, key)
        try:
            while chunk := await self._run(self._read_chunk, key, body):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        """Delete the object. In a versioned bucket this only adds a delete marker: the versions
        stay (and a locked version stays until its retention ends; see ``delete_version``)."""
        check_key(key)
        await self._run(self._delete, key, None)

    async def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version for good: refused (StorageError) while it is under Object Lock."""
        check_key(key)
        await self._run(self._delete, key, version_id)

    async def iter_keys(self) -> AsyncIterator[str]:
        token: str | None = None
        while True:
            keys, token = await self._run(self._list_page, token)
            for key in keys:
                yield key
            if token is None:
                return

    def _list_page(self, token: str | None) -> tuple[list[str], str | None]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._prefix, "MaxKeys": 1000}
        if token is not None:
            kwargs["ContinuationToken"] = token
        try:
            page = self.client.list_objects_v2(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"list the objects in S3 bucket {self.bucket!r}") from exc
        keys = [obj["Key"][len(self._prefix) :] for obj in page.get("Contents", [])]
        following = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return keys, following

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        return await self._run(self._cleanup_stale, cutoff)

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the backend's threads."""
        executor = self._executor
        if executor is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        try:
            future = asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(fn, *args)
            )
        except RuntimeError as exc:  # shut down meanwhile
            raise StorageError("the S3 storage is closed") from exc
        return await future

    async def _abort_upload(self, multipart: _Multipart) -> None:
        """Abort a multipart upload, also when the awaiting task is being cancelled: the abort
        goes on in its thread (a cancelled executor future that had not started would never run)."""
        executor = self._executor
        if executor is None:
            raise StorageError(f"cannot abort the upload of {multipart.key}: the storage is closed")
        future = asyncio.get_running_loop().run_in_executor(executor, multipart.abort)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(_log_abort_failure, multipart.key))
            raise

    def _call(self, doing: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """One boto3 call, its failure translated. Runs in a worker thread."""
        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, doing) from exc

    def _where(self) -> str:
        return f"endpoint {safe_url(self.client.meta.endpoint_url)}"

    # The methods below block; they run in the backend's threads.

    def _make_client(self) -> S3Client:
        s = self._settings
        config = Config(
            # One attempt: archiver's policy retries. (botocore reads "max_attempts" here as
            # retries *after* the first attempt: {"max_attempts": 1} would try twice.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(10, 2 * s.max_threads),
            connect_timeout=15,
            read_timeout=60,
            request_checksum_calculation="when_required",
            # S3-compatible servers behind a custom endpoint want bucket names in the path.
            s3={"addressing_style": "path" if s.endpoint_url else "auto"},
        )
        core = botocore.session.get_session()
        core.register_component("data_loader", _data_loader())
        session = boto3.session.Session(botocore_session=core, region_name=s.region)
        return session.client("s3", endpoint_url=s.endpoint_url, config=config)

    def _create_multipart(self, key: str) -> tuple[str, datetime | None]:
        # The caller's retain_from only comes at commit: retain from now, extended at commit.
        args = object_args(self._settings, now=datetime.now(UTC))
        answer = self._call(
            f"start the upload of {key}",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=self.full_key(key),
            ContentType=_content_type(key, None),
            ChecksumAlgorithm="SHA256",
            **args,
        )
        return answer["UploadId"], args.get("ObjectLockRetainUntilDate")

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id
            )
        except ClientError as exc:
            if _client_error(exc)[0] == "NoSuchUpload" or _is_missing(exc):
                return  # already gone: aborted elsewhere, or completed
            raise translate(exc, f"abort the upload of {key}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"abort the upload of {key}") from exc

    def _put(
        self, key: str, body: bytes | bytearray, request: CommitRequest, digest: bytes
    ) -> StoredObject:
        args = object_args(self._settings, retain_from=request.retain_from)
        answer = self._call(
            f"write {key} to S3 bucket {self.bucket!r}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.full_key(key),
            Body=cast("bytes", body),
            ContentType=_content_type(key, request.content_type),
            Metadata=_metadata(key, request),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(digest),
            **args,
        )
        version = answer.get("VersionId")
        returned = answer.get("ChecksumSHA256")
        if returned is not None and returned != _b64(digest):
            self._withdraw(key, version)
            raise IntegrityError(f"{key}: S3 stored it with another checksum ({returned})")
        until = args.get("ObjectLockRetainUntilDate")
        return self._confirm(key, request, version, _b64(digest), required=False, until=until)

    def _put_bytes(
        self, key: str, body: bytes, content_type: str, retain_from: datetime | None
    ) -> StoredObject:
        digest = hashlib.sha256(body).digest()
        request = CommitRequest(
            sha256=digest.hex(), size=len(body), content_type=content_type, retain_from=retain_from
        )
        return self._put(key, body, request, digest)

    def _commit(self, store: Callable[[], StoredObject], request: CommitRequest) -> StoredObject:
        """Store an upload's object with ``store``, then its companion, if any. The companion
        describes the stored version, so it can only follow it: should it fail, the version just
        written is deleted again (an older one, in a versioned bucket, is current again)."""
        stored = store()
        companion = request.companion
        if companion is None:
            return stored
        try:
            check_key(companion.key)
            body = bytes(companion.render(stored))
            self._put_bytes(companion.key, body, companion.content_type, request.retain_from)
        except Exception as exc:
            self._take_back(stored, companion, exc)
            raise
        return stored

    def _take_back(self, stored: StoredObject, companion: Companion, failure: Exception) -> None:
        """Delete the version ``stored`` names, whose companion ``failure`` kept from being stored.

        Object Lock refuses that delete (retention or a legal hold): the object then stays, locked,
        at its key and version, and the StorageError raised says so. Keeping track of such a
        leftover (the ledger has no row for it) is the caller's part, not the backend's. Any other
        failed delete raises the same way, naming where the object stays."""
        key, version = stored.key, stored.version_id
        try:
            self._delete(key, version)
        except ArchiverError as refused:
            where = f"{key}, version {version}" if version else key
            if self._settings.object_lock_mode is not None or stored.retain_until is not None:
                until = f" until {stored.retain_until.isoformat()}" if stored.retain_until else ""
                stays = f"it stays locked at {where}{until}"
            else:
                stays = f"it stays at {where}"
            raise StorageError(
                f"{key}: its companion {companion.key} could not be stored ({failure}), and S3 "
                f"refused to delete it again ({refused}): {stays}"
            ) from failure

    def _confirm(
        self,
        key: str,
        request: CommitRequest,
        version: str | None,
        checksum: str,
        *,
        required: bool,
        until: datetime | None,
    ) -> StoredObject:
        """Read back what S3 holds after a commit: its size, and its checksum where S3 gives one
        (always for a multipart upload: the composite SHA-256 proves every part was checked)."""
        head = self._head(key, version, checksum_mode=True)
        if head is None:
            raise StorageError(f"{key} is not in S3 bucket {self.bucket!r} right after its upload")
        size = head.get("ContentLength")
        if size != request.size:
            self._withdraw(key, version)
            raise IntegrityError(f"{key}: S3 holds {size} bytes, {request.size} expected")
        returned = head.get("ChecksumSHA256")
        if (returned is None and required) or (returned is not None and returned != checksum):
            self._withdraw(key, version)
            raise IntegrityError(
                f"{key}: S3 reports checksum {returned or 'none'}, {checksum} expected"
            )
        held = head.get("ObjectLockRetainUntilDate")
        return StoredObject(
            key=key,
            size=request.size,
            sha256=request.sha256.lower(),
            version_id=head.get("VersionId") or version,
            retain_until=_aware(held) if held is not None else until,
        )

    def _withdraw(self, key: str, version: str | None) -> None:
        """Remove an object that failed its check after it became visible (a locked version
        cannot be removed: the error says so and the ledger never records it)."""
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key), **kwargs)
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not remove the faulty upload of %s: %s", key, reason(exc))

    def _extend_retention(
        self, key: str, version: str | None, request: CommitRequest, held: datetime | None
    ) -> datetime | None:
        mode = self._settings.object_lock_mode
        wanted = retain_until(self._settings, request.retain_from, datetime.now(UTC))
        if mode is None or wanted is None or (held is not None and wanted <= held):
            return held
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            self._call(
                f"extend the retention of {key}",
                self.client.put_object_retention,
                Bucket=self.bucket,
                Key=self.full_key(key),
                Retention={"Mode": cast(Any, mode), "RetainUntilDate": wanted},
                **kwargs,
            )
        except ArchiverError as exc:
            # The object is stored and locked; the ledger gets the date it really has.
            log.warning("%s stays retained until %s: %s", key, held, exc)
            return held
        return wanted

    def _tag(self, key: str, version: str | None, request: CommitRequest) -> None:
        """A multipart object's sha256 and recording-id as tags: its metadata was fixed at start."""
        tags = {**self._settings.tags, **(request.metadata or {}), "sha256": request.sha256.lower()}
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            self._call(
                f"tag {key}",
                self.client.put_object_tagging,
                Bucket=self.bucket,
                Key=self.full_key(key),
                Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]},
                **kwargs,
            )
        except ArchiverError as exc:
            # Verified and stored all the same; the ledger and the sidecar keep the SHA-256.
            log.warning("could not tag %s with its SHA-256: %s", key, exc)

    def _head(
        self, key: str, version: str | None = None, *, checksum_mode: bool = False
    ) -> HeadObjectOutputTypeDef | None:
        kwargs: dict[str, Any] = {}
        if version:
            kwargs["VersionId"] = version
        if checksum_mode:
            kwargs["ChecksumMode"] = "ENABLED"
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.full_key(key), **kwargs)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise translate(exc, f"look up {key} in S3 bucket {self.bucket!r}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"look up {key} in S3 bucket {self.bucket!r}") from exc

    def _stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key)
        if head is None:
            return None
        version = head.get("VersionId")
        sha256 = head.get("Metadata", {}).get("sha256")
        if sha256 is None and head.get("TagCount"):
            sha256 = self._tagged_sha256(key, version)
        held = head.get("ObjectLockRetainUntilDate")
        hold = head.get("ObjectLockLegalHoldStatus")
        return ObjectInfo(
            key=key,
            size=head.get("ContentLength", 0),
            sha256=sha256,
            version_id=version,
            retain_until=_aware(held) if held is not None else None,
            legal_hold=None if hold is None else hold == "ON",
        )

    def _tagged_sha256(self, key: str, version: str | None) -> str | None:
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            tags = self._call(
                f"read the tags of {key}",
                self.client.get_object_tagging,
                Bucket=self.bucket,
                Key=self.full_key(key),
                **kwargs,
            )
        except StorageError as exc:
            # Without s3:GetObjectTagging the hash is just unknown here (the ledger has it).
            log.debug("no SHA-256 tag for %s: %s", key, exc)
            return None
        return next((t["Value"] for t in tags["TagSet"] if t["Key"] == "sha256"), None)

    def _open(self, key: str) -> StreamingBody:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"]
        except ClientError as exc:
            if _is_missing(exc):
                raise StorageError(f"nothing is stored at {key}") from exc
            raise translate(exc, f"read {key} from S3 bucket {self.bucket!r}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"read {key} from S3 bucket {self.bucket!r}") from exc

    def _read_chunk(self, key: str, body: StreamingBody) -> bytes:
        try:
            return body.read(CHUNK_SIZE)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"read {key} from S3 bucket {self.bucket!r}") from exc

    def _delete(self, key: str, version: str | None) -> None:
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        what = f"version {version} of {key}" if version else key
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key), **kwargs)
        except ClientError as exc:
            code, status, _ = _client_error(exc)
            if code == "AccessDenied" or status == 403:
                raise StorageError(
                    f"S3 refused to delete {what} ({code}): it is under Object Lock retention "
                    "or a legal hold, or the credentials may not delete it"
                ) from exc
            if _is_missing(exc):
                return
            raise translate(exc, f"delete {what} from S3 bucket {self.bucket!r}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"delete {what} from S3 bucket {self.bucket!r}") from exc

    def _cleanup_stale(self, cutoff: datetime) -> int:
        aborted = 0
        doing = f"list the unfinished uploads in S3 bucket {self.bucket!r}"
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._prefix
            )
            stale = [
                (upload["Key"], upload["UploadId"])
                for page in pages
                for upload in page.get("Uploads", [])
                if "Initiated" in upload and _aware(upload["Initiated"]) <= cutoff
            ]
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, doing) from exc
        for full_key, upload_id in stale:
            key = full_key[len(self._prefix) :]
            self._abort_multipart(key, upload_id)
            log.info("aborted the unfinished upload of %s (%s)", key, upload_id)
            aborted += 1
        return aborted

    def _preflight(self) -> None:
        s = self._settings
        bucket = s.bucket
        name = f"S3 bucket {bucket!r}"
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code, status, _ = _client_error(exc)
            if status == 404 or code in _NO_BUCKET_CODES or code == "404":
                raise PreflightError(f"{name} does not exist ({self._where()})") from exc
            if status == 403 or code in ("403", "AccessDenied"):
                raise PreflightError(
                    f"access to {name} is denied ({self._where()}): check the credentials "
                    "and the bucket policy"
                ) from exc
            raise self._unusable(name, exc) from exc
        except BotoCoreError as exc:
            raise self._unusable(name, exc) from exc
        if s.object_lock_mode:
            setting = f"storage.s3.object_lock_mode = {s.object_lock_mode}"
            try:
                answer = self.client.get_object_lock_configuration(Bucket=bucket)
                enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
            except ClientError as exc:
                if _client_error(exc)[0] != "ObjectLockConfigurationNotFoundError":
                    raise self._unusable(name, exc) from exc
                enabled = None
            except BotoCoreError as exc:
                raise self._unusable(name, exc) from exc
            if enabled != "Enabled":
                raise PreflightError(f"{name} has Object Lock disabled but {setting}")
            try:
                versioning = self.client.get_bucket_versioning(Bucket=bucket).get("Status")
            except (BotoCoreError, ClientError) as exc:
                raise self._unusable(name, exc) from exc
            if versioning != "Enabled":
                raise PreflightError(f"{name} has versioning disabled but {setting} needs it")
        self._probe(name)

    def _probe(self, name: str) -> None:
        # Named like a partial upload: no storage key can ever collide with it.
        key = f"{self._prefix}.preflight-{secrets.token_hex(6)}.partial"
        body = b"archiver preflight probe\n"
        try:
            # Without retention: a locked probe could never be removed.
            answer = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                **object_args(self._settings, lock=False),
            )
        except ClientError as exc:
            code, _, message = _client_error(exc)
            detail = code if code in ("AccessDenied", "403") else f"{code} ({message})"
            raise PreflightError(f"cannot write to {name}: {redact(detail)}") from exc
        except BotoCoreError as exc:
            raise self._unusable(name, exc) from exc
        version = answer.get("VersionId")
        kwargs: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            # archiver never deletes from the archive, so this does not stop it.
            log.warning("could not remove the preflight probe %s: %s", key, reason(exc))

    def _unusable(self, name: str, exc: Exception) -> PreflightError:
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            endpoint = safe_url(self.client.meta.endpoint_url)
            return PreflightError(f"S3 endpoint {endpoint} cannot be reached: {type(exc).__name__}")
        return PreflightError(f"{name} cannot be used ({self._where()}): {reason(exc)}")


_loader_lock = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def _data_loader() -> botocore.loaders.Loader:
    """botocore's parsed service descriptions, shared by the clients of this process: parsing
    them costs more than the rest of making a client. Each client keeps its own session, so
    credentials are still looked up afresh."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def _log_abort_failure(key: str, future: asyncio.Future[None]) -> None:
    """Retrieve the outcome of an abort nobody may be awaiting any more (its task was cancelled)."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("could not abort the multipart upload of %s: %s", key, exc)
