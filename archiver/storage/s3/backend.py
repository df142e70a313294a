"""``S3Storage`` and its ``S3Upload``: the backend itself (see the package docstring for the rules).

boto3 blocks, so every call runs in a bounded thread pool owned by the backend, never on the event
loop; the calls themselves are in ``bucket``, the multipart state in ``multipart``, the commit's
checks in ``commit`` and the preflight in ``preflight``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.regions import EndpointResolver

from archiver.errors import ArchiverError, ConfigError, IntegrityError, StorageError
from archiver.models import StoredObject
from archiver.storage.base import (
    CHUNK_SIZE,
    Capabilities,
    CommitRequest,
    Digest,
    Leftover,
    ObjectInfo,
    Removal,
    ResumeNotes,
    UploadBase,
    put_whole_by_upload,
)
from archiver.storage.keys import check_key
from archiver.storage.s3.bucket import Bucket
from archiver.storage.s3.commit import Committer
from archiver.storage.s3.multipart import Multipart
from archiver.storage.s3.preflight import preflight
from archiver.storage.s3.settings import aware, check_settings, normalized_prefix

if TYPE_CHECKING:
    from botocore.awsrequest import AWSRequest
    from botocore.config import _S3Dict
    from botocore.response import StreamingBody
    from mypy_boto3_s3.client import S3Client

    from archiver.config import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Chunks at least this big are hashed in a worker thread; smaller ones cost less than the hop.
_HASH_OFF_LOOP = 256 * 1024


def _sha256(data: bytearray) -> bytes:
    return hashlib.sha256(data).digest()


def _digest_of(key: str, sha256: str) -> bytes:
    try:
        digest = bytes.fromhex(sha256)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise IntegrityError(f"{key}: {sha256[:80]!r} is not a SHA-256 hex digest")
    return digest


class S3Upload(UploadBase):
    """A write to one key, invisible until ``commit``. Use ``async with``: leaving aborts it.

    Buffered in memory and stored with one PutObject at commit while it stays below
    ``multipart_threshold``; a bigger one becomes a multipart upload once its buffer reaches the
    threshold. Then one part goes up while the next one fills: two buffers of ``part_size``,
    reused part after part and handed to botocore whole (it sends a bytearray as it is), so
    nothing else of that size is allocated. Parts go up one at a time, in order; after each,
    ``notes`` is told how far it has come."""

    def __init__(
        self, storage: S3Storage, key: str, multipart: Multipart, notes: ResumeNotes | None
    ) -> None:
        super().__init__(key)
        self._storage = storage
        # What is not sent yet: until the first part is cut, all of it (len is what it holds);
        # from then on a buffer of part_size holding ``_held`` bytes.
        self._buffer = bytearray()
        self._held = 0
        self._cut = False
        # The part going up (``_sending`` its task), a full part waiting to go (cut, or its send
        # failed: the next write or commit sends it again first), and a free part buffer.
        self._sending: asyncio.Task[None] | None = None
        self._in_flight: bytearray | None = None
        self._unsent: bytearray | None = None
        self._spare: bytearray | None = None
        self._multipart = multipart
        self._written = multipart.size
        self._notes = notes
        self._leftovers: list[Leftover] = []
        # A part upload was cancelled midway: whether it landed is unknown until restart or abort.
        self._interrupted = False

    @property
    def offset(self) -> int:
        return self._written

    @property
    def existing_readable(self) -> bool:
        return self._multipart.whole_known

    @property
    def leftovers(self) -> Sequence[Leftover]:
        return tuple(self._leftovers)

    async def existing(self) -> AsyncIterator[bytes]:
        if self._multipart.started or self._cut:
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
        # Full parts go (and the part in flight is through, if the chunk needs its buffer)
        # before the chunk joins the buffer and the digest: a failed write changes neither, so
        # the caller's retry can send the same bytes again. (A chunk bigger than a part may
        # wait once more while it is taken in.)
        await self._send_parts(force=False)
        if self._cut and self._held + len(chunk) >= self._storage.settings.part_size:
            await self._settle()
        if digest is not None:
            if len(chunk) >= _HASH_OFF_LOOP:
                # hashlib lets go of the GIL on big buffers: the event loop carries on meanwhile.
                await asyncio.to_thread(digest.update, chunk)
            else:
                digest.update(chunk)
        if self._cut:
            await self._take(memoryview(chunk))
        else:
            self._buffer += chunk
        self._written += len(chunk)

    async def restart(self) -> None:
        self._check_open()
        await self._stop_sending()
        old, self._multipart = self._multipart, Multipart(self._storage.api, self._key)
        busy = self._interrupted or old.started
        self._drop_buffers()
        self._written = 0
        self._interrupted = False
        if busy:
            try:
                await self._storage._abort_upload(old)
            except ArchiverError as exc:
                # The upload is forgotten either way; cleanup_stale aborts it on a later run.
                log.warning("could not abort the multipart upload of %s: %s", self._key, exc)

    async def _store(self, request: CommitRequest) -> StoredObject:
        if self._written != request.size:
            raise IntegrityError(
                f"{self._key}: {self._written} bytes written, {request.size} expected"
            )
        if request.sha256 is not None:
            _digest_of(self._key, request.sha256)
        committer = self._storage.committer
        store: Callable[[], StoredObject]
        threshold = self._storage.settings.multipart_threshold
        if not self._multipart.started and not self._cut and len(self._buffer) < threshold:
            store = functools.partial(
                committer.put, self._key, self._buffer, request, self._leftovers
            )
        else:
            await self._send_parts(force=True)
            await self._settle()
            rest = self._buffer
            if self._cut:
                del rest[self._held :]  # the last part, as long as it is
            store = functools.partial(
                committer.complete, self._multipart, rest, request, self._leftovers
            )
        # The object and its companion in one call to a thread: a cancelled await cannot part
        # them once it has started.
        stored = await self._storage._run(self._storage._commit, store, request, self._leftovers)
        self._drop_buffers()
        return stored

    async def _discard(self) -> None:
        await self._stop_sending()
        self._drop_buffers()
        # After an interrupted part the thread may be creating the multipart upload right now:
        # the abort has to queue behind it.
        if self._interrupted or self._multipart.started:
            await self._storage._abort_upload(self._multipart)
        else:
            self._multipart.closed = True

    async def _let_go(self) -> None:
        # The parts stay for whoever continues the upload (the ledger's note names them): the
        # one going up lands first.
        await self._stop_sending(finish=True)
        self._drop_buffers()
        self._multipart.closed = True

    def _drop_buffers(self) -> None:
        self._buffer = bytearray()
        self._held = 0
        self._cut = False
        self._unsent = self._spare = None

    async def _send_parts(self, *, force: bool) -> None:
        """Before the first part: cut it when the buffer is past the threshold (or ``force``)."""
        if self._cut:
            return
        settings = self._storage.settings
        if (
            not force
            and not self._multipart.started
            and len(self._buffer) < settings.multipart_threshold
        ):
            return
        if len(self._buffer) < settings.part_size:
            return
        first = self._buffer
        rest = bytes(memoryview(first)[settings.part_size :])
        del first[settings.part_size :]  # a downsize this small keeps the buffer's memory
        self._cut = True
        self._start_send(first)
        self._buffer, self._held = bytearray(settings.part_size), 0
        await self._take(memoryview(rest))

    async def _take(self, data: memoryview) -> None:
        """Copy ``data`` into the part filling; each part it fills goes up while the next fills
        (waiting for the one before it, whose buffer the next part reuses)."""
        size = self._storage.settings.part_size
        while data:
            room = size - self._held
            piece = data[:room]
            self._buffer[self._held : self._held + len(piece)] = piece
            self._held += len(piece)
            data = data[len(piece) :]
            if self._held < size:
                return
            await self._settle()
            self._start_send(self._buffer)
            self._buffer = self._spare or bytearray(size)
            self._spare = None
            self._held = 0

    def _start_send(self, part: bytearray) -> None:
        self._in_flight = part
        self._sending = asyncio.ensure_future(self._send_part(part))

    async def _settle(self) -> None:
        """Wait for the part in flight, then send the one waiting, if any: raises what failed
        (that part waits to be sent again)."""
        while True:
            if self._sending is None:
                if self._unsent is None:
                    return
                part, self._unsent = self._unsent, None
                self._start_send(part)
            sending, sent = self._sending, self._in_flight
            assert sending is not None and sent is not None
            try:
                await sending
            except asyncio.CancelledError:
                # The thread may still be sending ``part``: leave it alone, and refuse more writes.
                self._interrupted = True
                self._sending = self._in_flight = None
                raise
            except BaseException:
                self._sending = self._in_flight = None
                self._unsent = sent
                raise
            self._sending = self._in_flight = None
            self._spare = sent

    async def _stop_sending(self, *, finish: bool = False) -> None:
        """Cancel the part in flight, or with ``finish`` let it land first (what fails is
        dropped with the upload). A part cancelled midway is marked interrupted: its thread may
        still be sending it."""
        sending, self._sending, self._in_flight = self._sending, None, None
        if sending is None:
            return
        if finish:
            try:
                await asyncio.wait([sending])
            except asyncio.CancelledError:
                self._interrupted = True
                sending.cancel()
                raise
        if not sending.done():
            self._interrupted = True
            sending.cancel()
            await asyncio.wait([sending])
        if not sending.cancelled():
            sending.exception()  # retrieved: the upload is being dropped anyway

    async def _send_part(self, part: bytearray) -> None:
        multipart = self._multipart
        if multipart.upload_id is None:
            await self._storage._run(multipart.create)
            # Known to the ledger before a byte goes up: a crash from here on leaves no orphan.
            await self._note()
        digest = None
        if self._notes is not None:
            # Noted before it goes up: a successor takes it if S3 holds it.
            digest = await self._storage._run(_sha256, part)
            await self._note(pending=(len(part), digest))
        await self._storage._run(multipart.upload_part, part, digest)

    async def _note(self, pending: tuple[int, bytes] | None = None) -> None:
        if self._notes is not None:
            await self._notes.note(self._multipart.note(pending))

    def _check_writable(self) -> None:
        self._check_open()
        if self._interrupted:
            raise StorageError(
                f"upload of {self._key} was interrupted while sending a part; restart or abort it"
            )


class S3Storage:
    """Recordings as objects under ``prefix`` in one bucket. Open it with ``async with``."""

    def __init__(self, settings: S3Settings) -> None:
        problems = check_settings(settings)
        if problems:
            raise ConfigError(problems)
        self._settings = settings
        self._prefix = normalized_prefix(settings.prefix)
        self._executor: ThreadPoolExecutor | None = None
        self._api: Bucket | None = None
        self._committer: Committer | None = None
        self._capabilities = Capabilities(
            name="s3",
            resumes_after_crash=True,
            resumes_from_notes=True,
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
    def api(self) -> Bucket:
        """The bucket's calls (blocking: make them from a worker thread)."""
        if self._api is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        return self._api

    @property
    def committer(self) -> Committer:
        if self._committer is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        return self._committer

    @property
    def client(self) -> S3Client:
        """The boto3 client (blocking: call it from a worker thread)."""
        return self.api.client

    def full_key(self, key: str) -> str:
        """The object key in the bucket for a storage key."""
        return self._prefix + key

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.max_threads, thread_name_prefix="archiver-s3"
        )
        try:
            client = await self._run(self._make_client)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._api = Bucket(client, self._settings)
        self._committer = Committer(self._api)
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
        api, self._api = self._api, None
        self._committer = None
        if api is not None:
            api.client.close()

    async def preflight(self) -> None:
        await self._run(preflight, self.api)

    async def begin(
        self, key: str, *, resume: bool = True, notes: ResumeNotes | None = None
    ) -> S3Upload:
        check_key(key)
        if self._executor is None:
            raise StorageError("the S3 storage is not open: use `async with S3Storage(...)`")
        previous = dict(notes.previous) if notes is not None else {}
        multipart = None
        if previous.get("upload_id"):
            multipart = await self._run(self._continue, key, previous, resume)
        return S3Upload(self, key, multipart or Multipart(self.api, key), notes)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        check_key(key)
        request = CommitRequest(
            sha256=None, size=len(data), content_type=content_type, retain_from=retain_from
        )
        return await self._run(self.committer.put, key, bytes(data), request, [])

    async def put_whole(self, key: str, data: bytes, request: CommitRequest) -> StoredObject:
        return await put_whole_by_upload(self, key, data, request)

    async def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        return await self._run(self._stat, key)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        check_key(key)
        body: StreamingBody = await self._run(self.api.open, key)
        try:
            while chunk := await self._run(self.api.read_chunk, key, body):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        """Delete the object. In a versioned bucket this only adds a delete marker: the versions
        stay (and a locked version stays until its retention ends; see ``delete_version``)."""
        check_key(key)
        await self._run(self.api.delete, key, None)

    async def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version for good: refused (StorageError) while it is under Object Lock."""
        check_key(key)
        await self._run(self.api.delete, key, version_id)

    async def remove_copy(self, keys: Sequence[str], now: datetime) -> Removal:
        for key in keys:
            check_key(key)
        return await self._run(self.api.remove_versions, list(keys), now)

    async def set_legal_hold(self, keys: Sequence[str], on: bool) -> int:
        if not self.capabilities.object_lock:
            return 0  # a bucket without Object Lock has no legal hold: the ledger's flag is it
        changed = 0
        for key in keys:
            check_key(key)
            versions, _ = await self._run(self.api.versions_of, key)
            for version in versions:
                await self._run(functools.partial(self.api.put_legal_hold, on=on), key, version)
                changed += 1
        return changed

    def locate(self, key: str) -> str:
        check_key(key)
        return f"s3://{self.bucket}/{self.full_key(key)}"

    async def describe_missing(self, key: str) -> str | None:
        check_key(key)
        return await self._run(self.api.hidden_version, key)

    async def iter_keys(self) -> AsyncIterator[str]:
        token: str | None = None
        while True:
            keys, token = await self._run(self.api.list_page, token)
            for key in keys:
                yield key
            if token is None:
                return

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

    async def _abort_upload(self, multipart: Multipart) -> None:
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

    # The methods below block; they run in the backend's threads.

    def _make_client(self) -> S3Client:
        s = self._settings
        s3: _S3Dict = {
            # S3-compatible servers behind a custom endpoint want bucket names in the path.
            "addressing_style": "path" if s.endpoint_url else "auto"
        }
        # botocore alone: boto3 would add only its resource layer and s3transfer, unused here.
        core = botocore.session.get_session()
        core.register_component("data_loader", _data_loader())
        if s.endpoint_url and s.region:
            # AWS's table of its own hosts (about 7 MB once parsed) tells nothing about a store
            # at an endpoint of its own whose region is given; S3's endpoint rules still apply.
            # (botocore has no public setter for it.)
            components = getattr(core, "_internal_components", None)
            if components is not None:  # a botocore without it loads the table: slower, same
                components.register_component(
                    "endpoint_resolver", EndpointResolver({"partitions": []})
                )
                # Without the table, "us-east-1" must not be read as AWS's global endpoint.
                s3["us_east_1_regional_endpoint"] = "regional"
        config = Config(
            # One attempt: archiver's policy retries. (botocore reads "max_attempts" here as
            # retries *after* the first attempt: {"max_attempts": 1} would try twice.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(10, 2 * s.max_threads),
            connect_timeout=15,
            read_timeout=60,
            request_checksum_calculation="when_required",
            s3=s3,
        )
        client = core.create_client(
            "s3", region_name=s.region, endpoint_url=s.endpoint_url, config=config
        )
        # The client's own config (its region included), with payload signing off.
        unsigned = client.meta.config.merge(Config(s3={**s3, "payload_signing_enabled": False}))
        for operation in ("PutObject", "UploadPart"):
            client.meta.events.register(
                f"before-sign.s3.{operation}", functools.partial(_sign_checksum_only, unsigned)
            )
        return cast("S3Client", client)

    def _continue(self, key: str, previous: Mapping[str, Any], resume: bool) -> Multipart | None:
        """The multipart upload a stopped process noted, continued when it is one of ``key`` in
        this bucket that S3 still has; aborted at once when it is of another key (or ``resume``
        is off), so that no orphan waits for cleanup."""
        upload_id = previous["upload_id"]
        object_key = previous.get("object")
        if (
            not isinstance(upload_id, str)
            or not isinstance(object_key, str)
            or previous.get("backend") != "s3"
            or previous.get("bucket") != self.bucket
        ):
            log.warning("%s: the upload a stopped process noted is not in this bucket", key)
            return None
        if object_key != self.full_key(key) or not resume:
            self.api.abort_multipart(object_key, upload_id)
            log.info("aborted the unfinished upload %s a stopped process left", upload_id)
            return None
        multipart = Multipart.resumed(self.api, key, dict(previous))
        if multipart is None:
            log.info("%s: the upload a stopped process left is gone; starting over", key)
        else:
            log.info(
                "%s: continuing the upload a stopped process left after %d parts (%d bytes)",
                key,
                len(multipart.parts),
                multipart.size,
            )
        return multipart

    def _commit(
        self, store: Callable[[], StoredObject], request: CommitRequest, leftovers: list[Leftover]
    ) -> StoredObject:
        """Store an upload's object with ``store``, then its companion, if any. The companion
        describes the stored version, so it can only follow it: should it fail, the version just
        written is deleted again (an older one, in a versioned bucket, is current again)."""
        stored = store()
        if request.companion is not None:
            self.committer.store_companion(stored, request.companion, request, leftovers)
        return stored

    def _stat(self, key: str) -> ObjectInfo | None:
        head = self.api.head(key)
        if head is None:
            return None
        held = head.get("ObjectLockRetainUntilDate")
        hold = head.get("ObjectLockLegalHoldStatus")
        return ObjectInfo(
            key=key,
            size=head.get("ContentLength", 0),
            sha256=self.committer.stored_sha256(key, head),
            version_id=head.get("VersionId"),
            retain_until=aware(held) if held is not None else None,
            legal_hold=None if hold is None else hold == "ON",
        )

    def _cleanup_stale(self, cutoff: datetime) -> int:
        """Abort the unfinished uploads under the prefix that have been idle since ``cutoff``:
        those no stopped process's successor continued (it continues or aborts the ones the
        ledger names as soon as it claims their recording)."""
        aborted = 0
        for object_key, upload_id, initiated in self.api.list_uploads():
            if initiated > cutoff:
                continue
            last = self.api.last_activity(object_key, upload_id, initiated)
            if last is None or last > cutoff:
                continue
            self.api.abort_multipart(object_key, upload_id)
            key = object_key[len(self._prefix) :]
            log.info("aborted the unfinished upload of %s (%s)", key, upload_id)
            aborted += 1
        return aborted


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


def _sign_checksum_only(unsigned: Config, request: AWSRequest, **_: Any) -> None:
    """Sign a body by its SHA-256 checksum header alone, which S3 checks the bytes against and
    which is signed: botocore would otherwise hash every byte once more over plain HTTP."""
    if "x-amz-checksum-sha256" in request.headers:
        request.context["client_config"] = unsigned


def _log_abort_failure(key: str, future: asyncio.Future[None]) -> None:
    """Retrieve the outcome of an abort nobody may be awaiting any more (its task was cancelled)."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("could not abort the multipart upload of %s: %s", key, exc)
