"""One recording: claim → attempts at its bytes → commit with sidecar → complete (or fail).

A transfer holds the recording's lease (a heartbeat keeps it) while ``archiver.download`` makes
its attempts: each asks (for a fresh URL when the listed one is old or refused, and with Range
from the bytes already written), checks and streams. This module's loop is the one retry on the
path: ``workers.transfer_attempts`` attempts, each a single API retrieve at most and a single
download, with the one policy's waits (``archiver.retry``).

Nothing becomes visible in the archive until size and SHA-256 check out, and the ledger row is
marked archived only after that. A transfer that gives up leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import aiohttp

from archiver import layout, metrics, netguard
from archiver.config import Settings
from archiver.download import (
    ConfirmEnd,
    Downloader,
    LedgerNotes,
    RecordingSource,
    Resuming,
    TransferState,
)
from archiver.errors import (
    ArchiverError,
    AuthError,
    HeldElsewhere,
    LeaseLost,
    ProcessingAtSource,
    StorageError,
)
from archiver.ledger.base import Ledger
from archiver.models import Recording, StoredObject, utcnow
from archiver.redact import redact
from archiver.retry import RetryPolicy, retrying
from archiver.storage.base import CommitRequest, Companion, Leftover, StorageBackend, Upload

log = logging.getLogger(__name__)


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
        self._after_archive = after_archive
        self._storage = storage
        self._ledger = ledger
        self._settings = settings
        self._workers = settings.workers
        self._owner = owner
        # Each transfer is its own lease owner, so a ledger call repeated after a lost answer
        # is recognised as that transfer's (``archiver.ledger.core``).
        self._transfers = itertools.count(1)
        self._download = Downloader(
            source=source, http=http, storage=storage, settings=settings, on_bytes=on_bytes
        )
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
        progress = TransferState(rec=rec, owner=owner)
        progress.reset_hash()
        metrics.IN_FLIGHT.inc()
        # The first heartbeat is a timer: most transfers end before it, without costing a task.
        beats: list[asyncio.Task[None]] = []
        heartbeat = asyncio.get_running_loop().call_later(
            self._beat_interval,
            lambda: beats.append(asyncio.create_task(self._heartbeat(progress))),
        )
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
            for beat in beats:
                beat.cancel()
            metrics.IN_FLIGHT.dec()
        seconds = time.monotonic() - started
        metrics.ARCHIVED.labels(source=rec.source).inc()
        metrics.BYTES.labels(source=rec.source).inc(stored.size)
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

    async def _fail(self, progress: TransferState, exc: BaseException, attempt: int) -> Outcome:
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
        metrics.FAILED.labels(source=progress.rec.source, permanent=str(permanent).lower()).inc()
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

    async def _give_back(self, progress: TransferState) -> None:
        """On cancellation (a stop past ``daemon.shutdown_grace``, SIGINT): the row is free for
        the next run, and what was written so far stays for it to continue where the storage
        can (a partial file, an S3 upload the ledger notes), so a restart does not fetch a
        large recording again; elsewhere nothing partial stays."""
        if self._storage.capabilities.resumes_after_crash:
            await self._release(progress)
        else:
            await self._discard(progress)
        with contextlib.suppress(Exception):
            await self._ledger.release(progress.rec.id, owner=progress.owner)

    async def _discard(self, progress: TransferState) -> None:
        if progress.upload is not None:
            try:
                await progress.upload.abort()
            except Exception:
                log.exception("could not discard the partial upload of %s", progress.rec.id)
            progress.upload = None

    async def _release(self, progress: TransferState) -> None:
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

    @property
    def _beat_interval(self) -> float:
        return max(self._workers.lease_seconds / 3, 0.05)

    async def _heartbeat(self, progress: TransferState) -> None:
        """Renew the lease now and every ``_beat_interval`` until cancelled or lost."""
        recording_id = progress.rec.id
        while True:
            try:
                held = await self._ledger.heartbeat(
                    recording_id, owner=progress.owner, lease_seconds=self._workers.lease_seconds
                )
            except ArchiverError as exc:
                log.warning("lease heartbeat for %s failed: %s", recording_id, exc)
                held = True
            if not held:
                # Another worker may be fetching it already; going on would fetch it twice.
                progress.lease_lost = True
                return
            await asyncio.sleep(self._beat_interval)

    # -- the transfer proper ----------------------------------------------------------------

    async def _fetch(self, progress: TransferState) -> StoredObject:
        if self._storage.capabilities.resumes_from_notes:
            row = await self._ledger.get(progress.rec.id)
            previous = row.upload if row is not None else {}
            progress.notes = LedgerNotes(self._ledger, progress.rec.id, progress.owner, previous)
        async for attempt in retrying(self._policy, f"download {progress.rec.id}"):
            with attempt:
                try:
                    await self._download.attempt(progress)
                except Resuming:
                    # Charged to the retries, a crash would cost the recording an attempt
                    # (with transfer_attempts = 1, every crash would): go on at once instead.
                    await self._download.attempt(progress)
                except ConfirmEnd:
                    await self._download.attempt(progress)
        if progress.body is not None and progress.upload is None:
            # Read whole (a small recording): hashed, written, synced and made visible with its
            # sidecar by the storage in one call.
            assert progress.key is not None
            progress.check_lease()
            request = self._commit_request(progress, progress.key, None)
            return await self._storage.put_whole(progress.key, progress.body, request)
        assert progress.upload is not None
        return await self._store(progress, progress.upload)

    def _commit_request(
        self, progress: TransferState, key: str, sha256: str | None
    ) -> CommitRequest:
        rec = progress.rec
        metadata = {"recording-id": rec.id}
        if sha256 is not None:
            metadata["sha256"] = sha256
        sidecar = None
        if self._settings.storage.sidecar:
            sidecar = Companion(
                key=layout.sidecar_key(key),
                render=functools.partial(sidecar_json, rec, locate=self._storage.locate),
                content_type="application/json",
            )
        return CommitRequest(
            sha256=sha256,
            size=progress.position,
            content_type=progress.content_type,
            metadata=metadata,
            retain_from=max(rec.ended_at or utcnow(), utcnow()),
            companion=sidecar,
        )

    async def _store(self, progress: TransferState, upload: Upload) -> StoredObject:
        progress.check_lease()
        rec = progress.rec
        sha256: str | None = progress.hasher.hexdigest() if progress.hasher is not None else None
        try:
            stored = await upload.commit(self._commit_request(progress, upload.key, sha256))
        except BaseException:
            # A copy that failed its checks but stays locked is recorded before anything else.
            await asyncio.shield(self._quarantine(rec.id, upload.leftovers))
            raise
        progress.upload = None
        return stored


def sidecar_json(
    rec: Recording, stored: StoredObject, *, locate: Callable[[str], str] | None = None
) -> bytes:
    """The metadata kept beside each recording: the API's fields (no URL) plus what we verified.
    ``key`` is relative to the archive root or S3 prefix; ``location`` is where a person finds
    the copy (``StorageBackend.locate``: an absolute path, or ``s3://bucket/prefix/key``)."""
    doc = {
        "recording": dict(rec.metadata),
        "archive": {
            "source": rec.source,
            "key": stored.key,
            "location": locate(stored.key) if locate is not None else None,
            "size": stored.size,
            "sha256": stored.sha256,
            "archived_at": datetime.now(UTC).isoformat(),
            "retain_until": stored.retain_until.isoformat() if stored.retain_until else None,
        },
    }
    # One line: json's C encoder does not indent, and a sidecar per recording adds up.
    return json.dumps(doc, sort_keys=True, default=str).encode() + b"\n"
