"""One recording: claim → (fresh URL) → stream, check and hash → commit with sidecar → complete.

The bytes flow from the download host straight into a storage ``Upload`` in chunks, hashed on
the way (by the storage, beside each write); memory stays at about one chunk whatever the
recording's size. A transfer cut off midway continues with a Range request from the bytes already
written (the hash carries on), asking the API for a fresh URL when the old one expired; a server
that ignores Range makes it start over.

Where the request goes is ``archiver.netguard``'s to decide (no private, link-local or metadata
address, no credentials in URLs, every redirect checked). What comes back must plausibly be the
recording (``archiver.media``): no compressed or text body, a media container's first bytes, a
size consistent with the API's ``size_mb`` (a body growing past it is cut off), and at least
``workers.min_throughput`` bytes a second on average once ``workers.read_timeout`` has passed
(a drip fails the transfer, not the run). Anything else is ``WrongContent``: nothing of it is
kept, and the next attempt asks the API for a fresh URL.

Nothing becomes visible in the archive until size and SHA-256 check out, and the ledger row is
marked archived only after that. A transfer that gives up leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Protocol

import aiohttp

from archiver import layout, media, metrics, netguard
from archiver.config import Settings
from archiver.errors import (
    ApiError,
    ArchiverError,
    AuthError,
    HeldElsewhere,
    LeaseLost,
    MalformedResponse,
    NetworkError,
    ProcessingAtSource,
    RateLimited,
    ServerError,
    StorageError,
    TransientError,
    TruncatedBody,
    UnsafeValue,
    UrlExpired,
    WrongContent,
)
from archiver.ledger.base import Ledger
from archiver.models import Recording, StoredObject, utcnow
from archiver.redact import redact, safe_url
from archiver.retry import RetryPolicy, retrying
from archiver.storage.base import CommitRequest, Companion, Leftover, StorageBackend, Upload
from archiver.telnyx import wait_hint

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_BLOCK = 4096


class RecordingSource(Protocol):
    """What a transfer needs from the API: a fresh copy of one recording."""

    async def retrieve(self, recording_id: str) -> Recording: ...


class AfterArchive(Protocol):
    """Told of each recording this transfer archived (delete at source: ``archiver.purge``)."""

    async def after_archive(self, recording_id: str) -> None: ...


class Result(enum.StrEnum):
    ARCHIVED = "archived"
    FAILED = "failed"
    SKIPPED = "skipped"  # not claimable: archived meanwhile, or leased by another worker
    PROCESSING = "processing"  # not downloadable yet
    HELD = "held"  # another instance is writing its copy right now
    RELEASED = "released"  # given back on shutdown


@dataclass(frozen=True, slots=True)
class Outcome:
    recording_id: str
    result: Result
    error: str | None = None
    permanent: bool = False
    bytes: int = 0
    seconds: float = 0.0
    key: str | None = None
    error_kind: type[BaseException] | None = None


class TooSlow(NetworkError):
    """The body arrives slower than ``workers.min_throughput`` on average."""


class _Again(TransientError):
    """Internal: go straight to the next attempt (to resume with Range, or start over)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=0)


class _ConfirmEnd(_Again):
    """Internal: a body ended without a length to check it against (no Content-Length, no
    Content-Range total): ask past its end, which must answer 416 with its size, before
    trusting it. Not a failure: it takes none of the retries."""


class _Resuming(_Again):
    """Internal: a partial copy a stopped process left was found; ask for the rest with Range.
    Found once per transfer, and no failure of anything: it takes none of the retries."""


class _LedgerNotes:
    """The recording's ledger row as the place its storage upload keeps how far it has come
    (``storage.base.ResumeNotes``: an S3 multipart upload's id and parts), for whoever claims the
    recording next."""

    def __init__(
        self, ledger: Ledger, recording_id: str, owner: str, previous: Mapping[str, Any]
    ) -> None:
        self._ledger = ledger
        self._id = recording_id
        self._owner = owner
        self.previous: Mapping[str, Any] = previous

    async def note(self, state: Mapping[str, Any]) -> None:
        try:
            held = await self._ledger.note_upload(self._id, owner=self._owner, upload=state)
        except ArchiverError as exc:
            # A note that lags costs a resume some bytes, never its correctness: the next
            # claimer continues only after what the storage confirms it holds.
            log.warning("could not note how far the upload of %s has come: %s", self._id, exc)
            return
        if not held:
            raise LeaseLost(f"{self._id}: the lease passed to another worker; stopping")


@dataclass(slots=True)
class _Progress:
    """What survives between attempts of one transfer."""

    rec: Recording
    owner: str
    upload: Upload | None = None
    # None while the upload holds bytes it cannot hand back (parts a stopped process sent to S3):
    # the commit then reads them back and computes the SHA-256 itself.
    hasher: Any = None
    # Where the storage keeps how far its upload has come, for backends that need it.
    notes: _LedgerNotes | None = None
    # The upload the previous claimer noted was looked at (continued, or left to begin()).
    noted_tried: bool = False
    position: int = 0
    content_type: str | None = None
    need_fresh_url: bool = False
    # Set by the heartbeat when the ledger no longer gives us the lease: stop, store nothing.
    lease_lost: bool = False
    # A write failed after its chunk was hashed: hash and upload may disagree.
    hash_suspect: bool = False
    # Asking past the end of a body that came without a length (``_ConfirmEnd``).
    confirming_end: bool = False

    def check_lease(self) -> None:
        if self.lease_lost:
            raise LeaseLost(f"{self.rec.id}: the lease passed to another worker; stopping")

    def reset_hash(self) -> None:
        self.hasher = hashlib.sha256()
        self.position = 0


def download_session(settings: Settings) -> aiohttp.ClientSession:
    """The session for download hosts: no API key, no compression (bytes are stored as
    served), and a connector that only connects where ``netguard`` allows."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=settings.workers.connect_timeout,
            sock_read=settings.workers.read_timeout,
        ),
        auto_decompress=False,
        headers={"User-Agent": "archiver/0.1"},
        connector=netguard.download_connector(
            netguard.DownloadPolicy.from_settings(settings.telnyx)
        ),
    )


class Transferer:
    def __init__(
        self,
        *,
        source: RecordingSource,
        http: aiohttp.ClientSession,
        storage: StorageBackend,
        ledger: Ledger,
        settings: Settings,
        owner: str,
        on_bytes: Callable[[int], None] | None = None,
        after_archive: AfterArchive | None = None,
    ) -> None:
        self._source = source
        self._after_archive = after_archive
        self._http = http
        self._storage = storage
        self._ledger = ledger
        self._settings = settings
        self._workers = settings.workers
        # The same policy as the session's connector (``download_session``): compared by value.
        self._net_policy = netguard.DownloadPolicy.from_settings(settings.telnyx)
        self._owner = owner
        # Each transfer is its own lease owner, so a ledger call repeated after a lost answer
        # is recognised as that transfer's (``archiver.ledger.core``).
        self._transfers = itertools.count(1)
        self._on_bytes = on_bytes or (lambda n: None)
        # ``workers.concurrency`` bounds the downloads in flight, not the transfers: a transfer
        # that is claiming, committing or recording its result holds no connection.
        self._download_slots = asyncio.Semaphore(settings.workers.concurrency)
        self._policy = RetryPolicy(
            attempts=settings.workers.transfer_attempts,
            # Time spent streaming counts too, so the cap is on attempts, not on the clock.
            total_seconds=float("inf"),
            initial_backoff=0.5,
            max_backoff=settings.telnyx.max_backoff,
        )

    async def transfer(self, rec: Recording) -> Outcome:
        owner = f"{self._owner}/{next(self._transfers)}"
        attempt = await self._ledger.claim(
            rec.id, owner=owner, lease_seconds=self._workers.lease_seconds
        )
        if attempt is None:
            return Outcome(rec.id, Result.SKIPPED)
        started = time.monotonic()
        progress = _Progress(rec=rec, owner=owner)
        progress.reset_hash()
        metrics.IN_FLIGHT.inc()
        heartbeat = asyncio.create_task(self._heartbeat(progress))
        try:
            stored = await self._fetch(progress)
            if not await self._ledger.complete(rec.id, owner=owner, stored=stored):
                log.warning("%s was archived by another worker meanwhile", rec.id)
                if self._storage.capabilities.object_lock and stored.version_id is not None:
                    # Our copy is locked beside theirs: the ledger must know it is there.
                    copy = Leftover(
                        stored.key,
                        stored.version_id,
                        "a second copy: another worker archived the recording meanwhile",
                        stored.retain_until,
                    )
                    await self._quarantine(rec.id, [copy])
                return Outcome(rec.id, Result.SKIPPED, key=stored.key)
        except asyncio.CancelledError:
            await asyncio.shield(self._give_back(progress))
            raise
        except AuthError:
            # A refused key is no fault of this recording: give it back and stop the run.
            await asyncio.shield(self._give_back(progress))
            raise
        except LeaseLost as exc:
            # The row is someone else's now: touch nothing in the ledger. An upload the ledger
            # notes stays for them (the next claimer may be continuing that very upload); a
            # partial found by its key is ours alone while we hold it, and goes.
            if self._storage.capabilities.resumes_from_notes:
                await self._release(progress)
            else:
                await self._discard(progress)
            log.warning("%s", exc)
            return Outcome(rec.id, Result.SKIPPED, error=str(exc))
        except ProcessingAtSource as exc:
            await self._discard(progress)
            await self._ledger.release(rec.id, owner=owner, note="still processing at the source")
            return Outcome(rec.id, Result.PROCESSING, error=str(exc))
        except HeldElsewhere as exc:
            # Another instance (alive, or stopped) writes this copy: no fault of the recording,
            # so no attempt is used; it stays owed and is taken again on a later pass.
            await self._discard(progress)
            await self._ledger.release(rec.id, owner=owner, note=str(exc))
            log.warning("%s", exc, extra={"recording_id": rec.id})
            return Outcome(rec.id, Result.HELD, error=str(exc))
        except Exception as exc:
            await self._discard(progress)
            return await self._fail(progress, exc, attempt)
        finally:
            heartbeat.cancel()
            metrics.IN_FLIGHT.dec()
        seconds = time.monotonic() - started
        metrics.ARCHIVED.inc()
        metrics.BYTES.inc(stored.size)
        metrics.TRANSFER_SECONDS.observe(seconds)
        log.info(
            "archived %s",
            rec.id,
            extra={
                "recording_id": rec.id,
                "room_id": rec.room_id,
                "bytes": stored.size,
                "duration": round(seconds, 3),
                "attempt": attempt,
                "key": stored.key,
            },
        )
        if self._after_archive is not None:
            # Only here: ``complete`` returned True, so the copy is committed and recorded.
            try:
                await self._after_archive.after_archive(rec.id)
            except Exception:
                # The recording is archived whatever happens at the source; a sweep retries.
                log.exception("after archiving %s: deleting it at the source failed", rec.id)
        return Outcome(rec.id, Result.ARCHIVED, bytes=stored.size, seconds=seconds, key=stored.key)

    async def _fail(self, progress: _Progress, exc: BaseException, attempt: int) -> Outcome:
        recording_id = progress.rec.id
        if isinstance(exc, ArchiverError):
            # Storage trouble is the archive's fault, not the recording's: keep it retryable.
            permanent = not exc.transient and not isinstance(exc, StorageError)
            message = redact(str(exc))
        else:
            log.exception("internal error archiving %s", recording_id)
            permanent = False
            message = redact(f"internal error: {type(exc).__name__}: {exc}")
        # The row is the recording's: its error need not name it again (status prints both).
        message = message.removeprefix(f"{recording_id}: ")
        await self._ledger.fail(
            recording_id, owner=progress.owner, error=message, permanent=permanent
        )
        metrics.FAILED.labels(permanent=str(permanent).lower()).inc()
        log.warning(
            "failed %s: %s",
            recording_id,
            message,
            extra={"recording_id": recording_id, "attempt": attempt, "permanent": permanent},
        )
        return Outcome(
            recording_id,
            Result.FAILED,
            error=message,
            permanent=permanent,
            error_kind=type(exc),
        )

    async def _give_back(self, progress: _Progress) -> None:
        """On cancellation: nothing partial stays, and the row is free for the next run."""
        await self._discard(progress)
        with contextlib.suppress(Exception):
            await self._ledger.release(progress.rec.id, owner=progress.owner)

    async def _discard(self, progress: _Progress) -> None:
        if progress.upload is not None:
            try:
                await progress.upload.abort()
            except Exception:
                log.exception("could not discard the partial upload of %s", progress.rec.id)
            progress.upload = None

    async def _release(self, progress: _Progress) -> None:
        if progress.upload is not None:
            try:
                await progress.upload.release()
            except Exception:
                log.exception("could not let go of the upload of %s", progress.rec.id)
            progress.upload = None

    async def _quarantine(self, recording_id: str, copies: Sequence[Leftover]) -> None:
        """Copies storage stored but would not remove (Object Lock): kept on the ledger row, so
        that nothing locked is ever unknown to it (``archiver status``, ``archiver verify``)."""
        for copy in copies:
            where = f"{copy.key}, version {copy.version_id}" if copy.version_id else copy.key
            log.warning(
                "%s: a copy stays in storage at %s: %s (kept in quarantine)",
                recording_id,
                where,
                copy.reason,
                extra={"recording_id": recording_id},
            )
            try:
                await self._ledger.quarantine(
                    recording_id, key=copy.key, version_id=copy.version_id, reason=copy.reason
                )
            except ArchiverError:
                log.exception("could not record the quarantined copy of %s", recording_id)

    async def _heartbeat(self, progress: _Progress) -> None:
        recording_id = progress.rec.id
        interval = max(self._workers.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self._ledger.heartbeat(
                    recording_id, owner=progress.owner, lease_seconds=self._workers.lease_seconds
                )
            except ArchiverError as exc:
                log.warning("lease heartbeat for %s failed: %s", recording_id, exc)
                continue
            if not held:
                # Another worker may be fetching it already; going on would fetch it twice.
                progress.lease_lost = True
                return

    # -- the transfer proper ----------------------------------------------------------------

    async def _fetch(self, progress: _Progress) -> StoredObject:
        if self._storage.capabilities.resumes_from_notes:
            row = await self._ledger.get(progress.rec.id)
            previous = row.upload if row is not None else {}
            progress.notes = _LedgerNotes(self._ledger, progress.rec.id, progress.owner, previous)
        async for attempt in retrying(self._policy, f"download {progress.rec.id}"):
            with attempt:
                try:
                    await self._attempt(progress)
                except _Resuming:
                    # Charged to the retries, a crash would cost the recording an attempt
                    # (with transfer_attempts = 1, every crash would): go on at once instead.
                    await self._attempt(progress)
                except _ConfirmEnd:
                    await self._attempt(progress)
        assert progress.upload is not None
        return await self._store(progress, progress.upload)

    async def _attempt(self, progress: _Progress) -> None:
        rec = progress.rec
        if (
            progress.need_fresh_url
            or not rec.download_url
            or rec.url_age() > self._workers.url_max_age
        ):
            rec = progress.rec = await self._source.retrieve(rec.id)
            progress.need_fresh_url = False
            if not rec.download_url and rec.is_completed:
                raise MalformedResponse(f"{rec.id} is completed but the API gives no download_url")
            if not rec.download_url:
                raise ProcessingAtSource(f"{rec.id} is {rec.status or 'not ready'} at the source")
        url = rec.download_url or ""  # its shape and destination: netguard.open_download
        if progress.upload is None and progress.notes is not None and not progress.noted_tried:
            progress.noted_tried = True
            await self._continue_noted(progress, progress.notes)
        if progress.hash_suspect:
            await self._restart(progress)
        headers = {"Accept-Encoding": "identity"}
        if progress.position > 0:
            headers["Range"] = f"bytes={progress.position}-"
        try:
            async with (
                self._download_slots,
                netguard.open_download(
                    self._http, url, headers=headers, policy=self._net_policy
                ) as resp,
            ):
                metrics.DOWNLOAD_RESPONSES.labels(status=str(resp.status)).inc()
                total: int | None = progress.position
                if not self._has_every_byte(progress, resp):
                    await self._check_status(progress, resp)
                    total = await self._prepare(progress, resp)
                    await self._stream(progress, resp)
        except WrongContent as exc:
            await self._refuse(progress, exc)
        except aiohttp.ClientPayloadError as exc:
            raise TruncatedBody(
                f"{rec.id}: body cut off at byte {progress.position}: {type(exc).__name__}"
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NetworkError(
                f"{rec.id}: download from {safe_url(url)} failed: {type(exc).__name__}"
            ) from exc
        if total is not None and progress.position != total:
            raise TruncatedBody(f"{rec.id}: got {progress.position} of {total} bytes")
        try:
            # What size_mb cannot stand for is refused at once, whatever the host says.
            media.check_size(progress.position, rec.size_mb)
        except WrongContent as exc:
            await self._refuse(progress, exc)
        if total is None:
            # A connection that closes early looks like a body that ended: without a length,
            # only the host saying there is nothing past it (416) proves this is all of it.
            progress.confirming_end = True
            raise _ConfirmEnd(f"{rec.id}: confirming the end of a body sent without a length")
        progress.confirming_end = False

    async def _stream(self, progress: _Progress, resp: aiohttp.ClientResponse) -> None:
        """Copy the body into the upload in chunks of about ``chunk_size``, hashing on the way.
        One chunk is hashed and written while the next one arrives, so memory stays at about two
        chunks. Whatever arrived before a connection broke is still written, so the next attempt
        resumes after it."""
        upload = progress.upload
        assert upload is not None
        pieces: list[bytes] = []
        held = 0
        limit = self._workers.chunk_size
        writing: asyncio.Task[None] | None = None
        cap, capped_by = media.size_limit(progress.rec.size_mb, progress.rec.duration_secs)
        floor = self._workers.min_throughput
        grace = self._workers.read_timeout
        began, received = time.monotonic(), 0

        def check_pace(nbytes: int) -> None:
            """Refuse a body past the size the API announced, or slower than the floor."""
            nonlocal received
            received += nbytes
            if progress.position + held > cap:
                raise WrongContent(
                    f"the download host sends more than the {cap:,} bytes {capped_by} allows; "
                    "refusing the body"
                )
            elapsed = time.monotonic() - began
            if floor and elapsed > grace and received < floor * (elapsed - grace):
                raise TooSlow(
                    f"{progress.rec.id}: the download host sent {received:,} bytes in "
                    f"{elapsed:.0f}s, slower than workers.min_throughput ({floor:,} bytes/s)"
                )

        async def put(chunk: bytes) -> None:
            progress.check_lease()
            if progress.position == 0:
                # The first bytes say what this is: a recording, or a page from a portal.
                media.check_head(chunk[: media.HEAD_BYTES], content_type=progress.content_type)
            try:
                # The storage hashes beside its write, in the same hand-off to a disk thread.
                await upload.write(chunk, digest=progress.hasher)
            except Exception:
                # The hash may hold bytes the upload does not: the next attempt starts over.
                progress.hash_suspect = True
                raise
            progress.position += len(chunk)
            self._on_bytes(len(chunk))

        async def settle() -> None:
            """Wait for the chunk in flight; a failed write raises here."""
            nonlocal writing
            if writing is not None:
                done, writing = writing, None
                await done

        async def flush(last: bool = False) -> None:
            nonlocal held, writing
            await settle()
            if held:
                head: list[bytes | memoryview] = list(pieces)
                carry = b""
                extra = held % _BLOCK
                if not last and extra and len(pieces[-1]) > extra:
                    # Whole 4 KiB blocks only, the rest starts the next chunk: storage that
                    # writes past the page cache (direct IO) takes nothing else.
                    split = len(pieces[-1]) - extra
                    carry = pieces[-1][split:]
                    head[-1] = memoryview(pieces[-1])[:split]
                first = head[0]
                chunk = first if len(head) == 1 and isinstance(first, bytes) else b"".join(head)
                pieces.clear()
                held = 0
                if carry:
                    pieces.append(carry)
                    held = len(carry)
                if last:
                    await put(chunk)
                else:
                    writing = asyncio.create_task(put(chunk))

        try:
            # Buffer by buffer as received: iter_any would first join what is buffered (a copy).
            async for data, _ in resp.content.iter_chunks():
                pieces.append(data)
                held += len(data)
                check_pace(len(data))
                if held >= limit:
                    await flush()
        except (aiohttp.ClientError, TimeoutError):
            await flush(last=True)
            raise
        except BaseException:
            # Cancelled: the write in flight finishes before the upload can be discarded.
            if writing is not None:
                await asyncio.wait([writing])
                if not writing.cancelled():
                    writing.exception()  # retrieved; the cancellation is what counts
            raise
        await flush(last=True)

    @staticmethod
    def _has_every_byte(progress: _Progress, resp: aiohttp.ClientResponse) -> bool:
        """A 416 to ``bytes=N-`` saying the size is N: the partial copy holds the whole body
        (its process was stopped between the last byte and the commit). Starting over would
        download it all again, and take a retry for a crash."""
        if resp.status != 416 or progress.position == 0 or progress.upload is None:
            return False
        match = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        return match is not None and int(match.group(1)) == progress.position

    async def _check_status(self, progress: _Progress, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if status in (200, 206):
            return
        where = f"{progress.rec.id}: download host answered HTTP {status}"
        if status in (401, 403, 404, 410):
            # Presigned links expire (403) or vanish: ask the API for a fresh one. If the
            # recording is really gone, retrieve raises NotFound and the failure is permanent.
            progress.need_fresh_url = True
            raise UrlExpired(f"{where}; fetching a fresh URL", retry_after=0)
        if status == 416:
            asked = progress.position
            await self._restart(progress)
            raise _Again(f"{where} for bytes={asked}-; starting over")
        if status == 429:
            raise RateLimited(where, retry_after=wait_hint(resp.headers))
        if status == 408 or status >= 500:
            raise ServerError(where, retry_after=wait_hint(resp.headers))
        raise ApiError(where, status=status)

    async def _prepare(self, progress: _Progress, resp: aiohttp.ClientResponse) -> int | None:
        """Open (or continue) the upload for this response; return the expected final size."""
        media.check_headers(resp.headers.get("Content-Type"), resp.headers.get("Content-Encoding"))
        if progress.content_type is None:
            progress.content_type = resp.headers.get("Content-Type")
        if progress.upload is None:
            ext = layout.extension(progress.content_type, str(resp.url), progress.rec)
            key = layout.render_key(self._settings.storage.key_template, progress.rec, ext)
            progress.upload = await self._begin(progress, key)
            if progress.upload.offset > 0:
                # A killed process left bytes behind: take them over, then ask for the rest.
                await self._take_over(progress, progress.upload)
                if resp.status == 200 and resp.headers.get("Accept-Ranges") == "bytes":
                    raise _Resuming("resuming with a Range request")
        if progress.confirming_end and resp.status == 200:
            raise WrongContent(
                "the download host sends no length and ignores Range: the end of the body "
                "cannot be confirmed, so it may be cut short"
            )
        if resp.status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != progress.position:
                await self._restart(progress)
                raise _Again(f"{progress.rec.id}: unusable Content-Range; starting over")
            total = None if match.group(3) == "*" else int(match.group(3))
        else:
            if progress.position > 0:
                # A 200 to a Range request: the server ignored it: take the whole body again.
                log.info("%s: server ignored Range; starting over", progress.rec.id)
                await self._restart(progress)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            media.check_size(total, progress.rec.size_mb)  # announced: refused before a byte
        return total

    async def _continue_noted(self, progress: _Progress, notes: _LedgerNotes) -> None:
        """Continue the upload the recording's previous claimer noted before any request, when it
        is of the key this recording has: the source is then asked only for the bytes after what
        the storage confirms it holds. A note of another key is left to ``begin`` for the right
        one, which aborts that upload."""
        key = notes.previous.get("key")
        if not isinstance(key, str):
            return
        try:
            ext = PurePosixPath(layout.check_key(key)).suffix.lstrip(".")
            expected = layout.render_key(self._settings.storage.key_template, progress.rec, ext)
        except UnsafeValue:
            return
        if key != expected:
            return
        upload = await self._begin(progress, key)
        progress.upload = upload
        if upload.offset > 0:
            await self._take_over(progress, upload)

    async def _begin(self, progress: _Progress, key: str) -> Upload:
        if progress.notes is None:
            # A backend that finds a stopped upload by its key alone is given no notes.
            return await self._storage.begin(key, resume=True)
        return await self._storage.begin(key, resume=True, notes=progress.notes)

    async def _take_over(self, progress: _Progress, upload: Upload) -> None:
        """Seed the hash and the position from the bytes a stopped process left in ``upload``."""
        progress.reset_hash()
        if upload.existing_readable:
            async for chunk in upload.existing():
                if progress.position == 0:
                    media.check_head(chunk[: media.HEAD_BYTES], content_type=progress.content_type)
                progress.hasher.update(chunk)
                progress.position += len(chunk)
        else:
            # Parts already in S3 (checked by their SHA-256 when they were sent): the commit
            # reads the object back to check them again and to compute the SHA-256 of the whole.
            progress.hasher = None
            progress.position = upload.offset
        log.info("resuming %s from byte %d", progress.rec.id, progress.position)

    async def _refuse(self, progress: _Progress, exc: WrongContent) -> None:
        """Not the recording: keep none of it, and ask the API for a fresh URL next time."""
        await self._restart(progress)
        progress.need_fresh_url = True
        raise exc

    async def _restart(self, progress: _Progress) -> None:
        if progress.upload is not None:
            await progress.upload.restart()
        progress.reset_hash()
        progress.hash_suspect = False
        progress.confirming_end = False

    async def _store(self, progress: _Progress, upload: Upload) -> StoredObject:
        progress.check_lease()
        rec = progress.rec
        sha256: str | None = progress.hasher.hexdigest() if progress.hasher is not None else None
        metadata = {"recording-id": rec.id}
        if sha256 is not None:
            metadata["sha256"] = sha256
        retain_from = max(rec.ended_at or utcnow(), utcnow())
        sidecar = None
        if self._settings.storage.sidecar:
            sidecar = Companion(
                key=layout.sidecar_key(upload.key),
                render=functools.partial(sidecar_json, rec),
                content_type="application/json",
            )
        try:
            stored = await upload.commit(
                CommitRequest(
                    sha256=sha256,
                    size=progress.position,
                    content_type=progress.content_type,
                    metadata=metadata,
                    retain_from=retain_from,
                    companion=sidecar,
                )
            )
        except BaseException:
            # A copy that failed its checks but stays locked is recorded before anything else.
            await asyncio.shield(self._quarantine(rec.id, upload.leftovers))
            raise
        progress.upload = None
        return stored


def sidecar_json(rec: Recording, stored: StoredObject) -> bytes:
    """The metadata kept beside each recording: the API's fields (no URL) plus what we verified."""
    doc = {
        "recording": dict(rec.metadata),
        "archive": {
            "key": stored.key,
            "size": stored.size,
            "sha256": stored.sha256,
            "archived_at": datetime.now(UTC).isoformat(),
            "retain_until": stored.retain_until.isoformat() if stored.retain_until else None,
        },
    }
    # One line: json's C encoder does not indent, and a sidecar per recording adds up.
    return json.dumps(doc, sort_keys=True, default=str).encode() + b"\n"
