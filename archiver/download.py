"""One attempt at a recording's bytes: (a fresh URL) → ask, from where the last attempt left off
→ check the answer → stream it into the storage upload, hashed on the way.

The bytes flow from the download host straight into a storage ``Upload`` in chunks of about
``workers.chunk_size``, hashed by the storage beside each write; memory stays at about two chunks
whatever the recording's size. A body cut off midway is continued by the next attempt with a
Range request from the bytes already written (the hash carries on); a server that ignores Range
makes it start over.

Where the request goes is ``archiver.netguard``'s to decide (no private, link-local or metadata
address, no credentials in URLs, every redirect checked). What comes back must plausibly be the
recording (``archiver.media``): no compressed or text body, a media container's first bytes, a
size consistent with the API's ``size_mb`` (a body growing past it is cut off), and at least
``workers.min_throughput`` bytes a second on average once ``workers.read_timeout`` has passed
(a drip fails the attempt, not the run). Anything else is ``WrongContent``: nothing of it is
kept, and the next attempt asks the API for a fresh URL.

Nothing here retries: an attempt raises, and the transfer's one loop (``archiver.transfer``)
decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

import aiohttp

from archiver import layout, media, metrics, netguard
from archiver.config import Settings
from archiver.errors import (
    ApiError,
    ArchiverError,
    LeaseLost,
    MalformedResponse,
    NetworkError,
    ProcessingAtSource,
    RateLimited,
    ServerError,
    TransientError,
    TruncatedBody,
    UnsafeValue,
    UrlExpired,
    WrongContent,
)
from archiver.ledger.base import Ledger
from archiver.models import Recording
from archiver.redact import safe_url
from archiver.storage.base import StorageBackend, Upload
from archiver.telnyx import wait_hint

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_BLOCK = 4096


class RecordingSource(Protocol):
    """What a download needs from the API: a fresh copy of one recording, in one attempt. The
    transfer's loop (``workers.transfer_attempts``) is the one retry on this path; a source
    retrying inside it would multiply the API calls (``TelnyxClient.retrieve_once``)."""

    async def retrieve_once(self, recording_id: str, source: str = ...) -> Recording: ...


class TooSlow(NetworkError):
    """The body arrives slower than ``workers.min_throughput`` on average."""


class Again(TransientError):
    """Internal: go straight to the next attempt (to resume with Range, or start over)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=0)


class ConfirmEnd(Again):
    """Internal: a body ended without a length to check it against (no Content-Length, no
    Content-Range total): ask past its end, which must answer 416 with its size, before
    trusting it. Not a failure: it takes none of the retries."""


class Resuming(Again):
    """Internal: a partial copy a stopped process left was found; ask for the rest with Range.
    Found once per transfer, and no failure of anything: it takes none of the retries."""


class LedgerNotes:
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
class TransferState:
    """What survives between attempts of one transfer."""

    rec: Recording
    owner: str
    upload: Upload | None = None
    # None while the upload holds bytes it cannot hand back (parts a stopped process sent to S3):
    # the commit then reads them back and computes the SHA-256 itself.
    hasher: Any = None
    # Where the storage keeps how far its upload has come, for backends that need it.
    notes: LedgerNotes | None = None
    # The upload the previous claimer noted was looked at (continued, or left to begin()).
    noted_tried: bool = False
    position: int = 0
    content_type: str | None = None
    need_fresh_url: bool = False
    # Set by the heartbeat when the ledger no longer gives us the lease: stop, store nothing.
    lease_lost: bool = False
    # A write failed after its chunk was hashed: hash and upload may disagree.
    hash_suspect: bool = False
    # Asking past the end of a body that came without a length (``ConfirmEnd``).
    confirming_end: bool = False
    # A small body read whole (``Downloader.attempt``'s fast path), and the key it goes to: the
    # transfer stores it with one ``put_whole``; no upload is open meanwhile.
    body: bytes | None = None
    key: str | None = None

    def check_lease(self) -> None:
        if self.lease_lost:
            raise LeaseLost(f"{self.rec.id}: the lease passed to another worker; stopping")

    def reset_hash(self) -> None:
        self.hasher = hashlib.sha256()
        self.position = 0


class Downloader:
    """Makes the attempts of the transfers of one engine: the download session, the storage, and
    the bound on downloads in flight (``workers.concurrency``) are shared by all of them."""

    def __init__(
        self,
        *,
        source: RecordingSource,
        http: aiohttp.ClientSession,
        storage: StorageBackend,
        settings: Settings,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._source = source
        self._http = http
        self._storage = storage
        self._settings = settings
        self._workers = settings.workers
        # The same policy as the session's connector (``download_session``): compared by value.
        self._net_policy = netguard.DownloadPolicy.from_settings(settings.telnyx)
        self._on_bytes = on_bytes or (lambda n: None)
        # ``workers.concurrency`` bounds the downloads in flight, not the transfers: a transfer
        # that is claiming, committing or recording its result holds no connection.
        self._download_slots = asyncio.Semaphore(settings.workers.concurrency)

    def _key_template(self, rec: Recording) -> str:
        storage = self._settings.storage
        return self._settings.sources.key_template(rec.source, storage.key_template)

    async def attempt(self, progress: TransferState) -> None:
        """One request for the bytes still missing, streamed into ``progress.upload``; returns
        once the upload holds the whole body, raises otherwise (``Again`` and its kinds: go on
        at once)."""
        rec = progress.rec
        if (
            progress.need_fresh_url
            or not rec.download_url
            or rec.url_age() > self._workers.url_max_age
        ):
            rec = progress.rec = await self._source.retrieve_once(rec.id, rec.source)
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
            await self.restart(progress)
        headers = {"Accept-Encoding": "identity"}
        if progress.position > 0:
            headers["Range"] = f"bytes={progress.position}-"
        total: int | None = progress.position
        try:
            async with (
                self._download_slots,
                netguard.open_download(
                    self._http, url, headers=headers, policy=self._net_policy
                ) as resp,
            ):
                metrics.DOWNLOAD_RESPONSES.labels(status=str(resp.status)).inc()
                if not self._has_every_byte(progress, resp):
                    await self._check_status(progress, resp)
                    whole = self._fits_whole(progress, resp)
                    if whole is not None:
                        total = whole
                        await self._read_whole(progress, resp, whole)
                    else:
                        total = await self._prepare(progress, resp)
                        await self._stream(progress, resp)
        except WrongContent as exc:
            await self._refuse(progress, exc)
        except aiohttp.ClientPayloadError as exc:
            raise TruncatedBody(_cut_off(rec.id, progress.position, total)) from exc
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
            raise ConfirmEnd(f"{rec.id}: confirming the end of a body sent without a length")
        progress.confirming_end = False

    def _fits_whole(self, progress: TransferState, resp: aiohttp.ClientResponse) -> int | None:
        """The fast path for a small recording, read whole and stored by one ``put_whole``: its
        length (at most ``chunk_size``, so memory stays within what streaming holds) when a
        fresh transfer gets a whole body of a known length from a storage that ``puts_whole``;
        None otherwise (streamed). Checked as ``_prepare`` checks a streamed one."""
        if (
            resp.status != 200
            or progress.upload is not None
            or progress.position
            or progress.confirming_end
            or not self._storage.capabilities.puts_whole
        ):
            return None
        length = resp.headers.get("Content-Length")
        if not length or not length.isdigit() or int(length) > self._workers.chunk_size:
            return None
        media.check_headers(resp.headers.get("Content-Type"), resp.headers.get("Content-Encoding"))
        if progress.content_type is None:
            progress.content_type = resp.headers.get("Content-Type")
        media.check_size(int(length), progress.rec.size_mb)  # announced: refused before a byte
        ext = layout.extension(progress.content_type, str(resp.url), progress.rec)
        progress.key = layout.render_key(self._key_template(progress.rec), progress.rec, ext)
        return int(length)

    async def _read_whole(
        self, progress: TransferState, resp: aiohttp.ClientResponse, length: int
    ) -> None:
        """Read a body of ``length`` bytes whole into ``progress.body``; one cut off midway goes
        to a storage upload as far as it came, so that the next attempt resumes it with Range,
        as a streamed one would."""
        pieces: list[bytes] = []
        began, received = time.monotonic(), 0
        floor, grace = self._workers.min_throughput, self._workers.read_timeout
        try:
            async for data, _ in resp.content.iter_chunks():
                pieces.append(data)
                received += len(data)
                elapsed = time.monotonic() - began
                if floor and elapsed > grace and received < floor * (elapsed - grace):
                    raise TooSlow(
                        f"{progress.rec.id}: the download host sent {received:,} bytes in "
                        f"{elapsed:.0f}s, slower than workers.min_throughput ({floor:,} bytes/s)"
                    )
        except (aiohttp.ClientError, TimeoutError):
            if pieces:
                await self._keep_partial(progress, b"".join(pieces))
            raise
        body = b"".join(pieces)
        if body:
            # The first bytes say what this is: a recording, or a page from a portal.
            media.check_head(body[: media.HEAD_BYTES], content_type=progress.content_type)
        progress.check_lease()
        if len(body) == length:
            progress.body = body
            progress.position = length
            self._on_bytes(length)
        else:  # aiohttp raises on a short body; this is only a guard
            await self._keep_partial(progress, body)

    async def _keep_partial(self, progress: TransferState, data: bytes) -> None:
        """What arrived of a cut-off body read whole, into an upload for the next attempt."""
        assert progress.key is not None
        media.check_head(data[: media.HEAD_BYTES], content_type=progress.content_type)
        upload = progress.upload = await self._storage.begin(progress.key, resume=False)
        progress.reset_hash()
        try:
            await upload.write(data, digest=progress.hasher)
        except Exception:
            progress.hash_suspect = True
            raise
        progress.position = len(data)
        self._on_bytes(len(data))

    async def _stream(self, progress: TransferState, resp: aiohttp.ClientResponse) -> None:
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
    def _has_every_byte(progress: TransferState, resp: aiohttp.ClientResponse) -> bool:
        """A 416 to ``bytes=N-`` saying the size is N: the partial copy holds the whole body
        (its process was stopped between the last byte and the commit). Starting over would
        download it all again, and take a retry for a crash."""
        if resp.status != 416 or progress.position == 0 or progress.upload is None:
            return False
        match = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        return match is not None and int(match.group(1)) == progress.position

    async def _check_status(self, progress: TransferState, resp: aiohttp.ClientResponse) -> None:
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
            await self.restart(progress)
            raise Again(f"{where} for bytes={asked}-; starting over")
        if status == 429:
            raise RateLimited(where, retry_after=wait_hint(resp.headers))
        if status == 408 or status >= 500:
            raise ServerError(where, retry_after=wait_hint(resp.headers))
        raise ApiError(where, status=status)

    async def _prepare(self, progress: TransferState, resp: aiohttp.ClientResponse) -> int | None:
        """Open (or continue) the upload for this response; return the expected final size."""
        media.check_headers(resp.headers.get("Content-Type"), resp.headers.get("Content-Encoding"))
        if progress.content_type is None:
            progress.content_type = resp.headers.get("Content-Type")
        if progress.upload is None:
            ext = layout.extension(progress.content_type, str(resp.url), progress.rec)
            key = layout.render_key(self._key_template(progress.rec), progress.rec, ext)
            progress.upload = await self._begin(progress, key)
            if progress.upload.offset > 0:
                # A killed process left bytes behind: take them over, then ask for the rest.
                await self._take_over(progress, progress.upload)
                if resp.status == 200 and resp.headers.get("Accept-Ranges") == "bytes":
                    raise Resuming("resuming with a Range request")
        if progress.confirming_end and resp.status == 200:
            raise WrongContent(
                "the download host sends no length and ignores Range: the end of the body "
                "cannot be confirmed, so it may be cut short"
            )
        if resp.status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != progress.position:
                await self.restart(progress)
                raise Again(f"{progress.rec.id}: unusable Content-Range; starting over")
            total = None if match.group(3) == "*" else int(match.group(3))
        else:
            if progress.position > 0:
                # A 200 to a Range request: the server ignored it: take the whole body again.
                log.info("%s: server ignored Range; starting over", progress.rec.id)
                await self.restart(progress)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            media.check_size(total, progress.rec.size_mb)  # announced: refused before a byte
        return total

    async def _continue_noted(self, progress: TransferState, notes: LedgerNotes) -> None:
        """Continue the upload the recording's previous claimer noted before any request, when it
        is of the key this recording has: the source is then asked only for the bytes after what
        the storage confirms it holds. A note of another key is left to ``begin`` for the right
        one, which aborts that upload."""
        key = notes.previous.get("key")
        if not isinstance(key, str):
            return
        try:
            ext = PurePosixPath(layout.check_key(key)).suffix.lstrip(".")
            expected = layout.render_key(self._key_template(progress.rec), progress.rec, ext)
        except UnsafeValue:
            return
        if key != expected:
            return
        upload = await self._begin(progress, key)
        progress.upload = upload
        if upload.offset > 0:
            await self._take_over(progress, upload)

    async def _begin(self, progress: TransferState, key: str) -> Upload:
        if progress.notes is None:
            # A backend that finds a stopped upload by its key alone is given no notes.
            return await self._storage.begin(key, resume=True)
        return await self._storage.begin(key, resume=True, notes=progress.notes)

    async def _take_over(self, progress: TransferState, upload: Upload) -> None:
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

    async def _refuse(self, progress: TransferState, exc: WrongContent) -> None:
        """Not the recording: keep none of it, and ask the API for a fresh URL next time."""
        await self.restart(progress)
        progress.need_fresh_url = True
        raise exc

    async def restart(self, progress: TransferState) -> None:
        """Drop what the upload holds: the next attempt starts from the first byte."""
        if progress.upload is not None:
            await progress.upload.restart()
        progress.reset_hash()
        progress.hash_suspect = False
        progress.confirming_end = False
        progress.body = None


def _cut_off(recording_id: str, position: int, total: int | None) -> str:
    """What happened when a body stopped short, and what the next attempt does about it."""
    if position == 0:
        # aiohttp hands over nothing of a read the cut-off ended: a small body that arrived
        # with the close is lost whole, so the next attempt asks for all of it again.
        size = f" ({total} bytes)" if total else ""
        return (
            f"{recording_id}: the connection closed before the body's end{size}, before any "
            "of it could be kept; the next attempt asks for it whole"
        )
    of = f" of {total}" if total else ""
    return (
        f"{recording_id}: the connection closed after {position}{of} bytes; the next attempt "
        f"asks for the rest from byte {position}"
    )
