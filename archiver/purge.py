"""Delete at source: remove a recording from Telnyx once, and only once, its copy is verified.

Opt-in with ``[source] delete_after_archive = true`` (default false). A recording is deleted at
the source only when all of these hold:

- its ledger row is archived: the object was committed with its size and SHA-256 checked, and
  ``Ledger.complete`` recorded it (and wrote the "archived" audit entry);
- the stored object is still there now with that size, and re-read right before the DELETE,
  its bytes hash to that SHA-256 and look like a recording (``verify.check_row``, deep, on every
  backend: a same-size corrupted copy blocks the deletion);
- where Object Lock is on (the backend's capabilities, or ``storage.s3.object_lock_mode``), the
  commit applied it: the row carries the retain-until date the backend reported, and the stored
  object still reports one;
- with ``source.media_check``, the copy parses as media (ffprobe) and its duration is the API's
  ``duration_secs`` within 2 s.

Deletion is by id only (``DELETE /v2/room_recordings/{id}``, ``TelnyxClient.delete``); the bulk
endpoint is never called. Each deletion is marked in the ledger (``mark_deleted_at_source``),
which writes it to the audit chain. A recording the API no longer has (404) is marked too, with
an audit note, so a DELETE whose answer was lost is not retried forever.

Two paths lead here. A transfer that completed hands its id to ``after_archive``: deleted at
once (the daemon), or, while ``deferred`` (a backfill, whose listing would shift under deletions),
at the next ``flush``, between passes. And ``sweep`` goes over archived rows not yet deleted: it
retries deletions that failed and covers recordings archived before the option was turned on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from archiver import media
from archiver.config import Settings
from archiver.errors import ArchiverError, AuthError, NotFound
from archiver.ledger.base import Ledger
from archiver.models import LedgerRow, State
from archiver.redact import redact
from archiver.storage.base import StorageBackend
from archiver.verify import check_row

log = logging.getLogger(__name__)

PARALLEL = 4
_BATCH = 64
_T = TypeVar("_T")


class SourceDelete(Protocol):
    """What deleting needs from the API: one recording, by id, under the API's retry policy
    (``TelnyxClient.delete``); a failure left is retried by the next sweep, not here."""

    async def delete(self, recording_id: str, source: str = ...) -> None: ...


@dataclass(slots=True)
class PurgeReport:
    deleted: list[str] = field(default_factory=list)
    would_delete: list[str] = field(default_factory=list)
    # Not deleted because the copy does not qualify: id → why.
    kept: dict[str, str] = field(default_factory=dict)
    # The copy qualified but the DELETE (or its ledger mark) failed: id → error. Retried later.
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.kept and not self.failed

    def line(self) -> str:
        return (
            f"{len(self.deleted)} deleted at source, {len(self.kept)} kept (copy not "
            f"verified), {len(self.failed)} failed to delete (retried on the next run)"
        )


def retention_required(settings: Settings) -> bool:
    s3 = settings.storage.s3
    return settings.storage.backend == "s3" and s3 is not None and bool(s3.object_lock_mode)


class SourceDeleter:
    def __init__(
        self,
        *,
        api: SourceDelete | None,
        ledger: Ledger,
        storage: StorageBackend,
        settings: Settings,
    ) -> None:
        self._api = api
        self._ledger = ledger
        self._storage = storage
        # Either side saying Object Lock is enough to insist on retention before deleting.
        self._retention = storage.capabilities.object_lock or retention_required(settings)
        self._media_check = settings.source.media_check
        self._deferred: list[str] | None = None
        self.report = PurgeReport()

    # -- the two entry points of a run ---------------------------------------------------------

    async def after_archive(self, recording_id: str) -> None:
        """Called once ``Ledger.complete`` returned True for the recording."""
        if self._deferred is not None:
            self._deferred.append(recording_id)
            return
        await self._delete_id(recording_id)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold deletions until ``flush``: a listing in progress must not shift under them."""
        self._deferred = []
        try:
            yield
        finally:
            self._deferred = None

    async def flush(self) -> None:
        if not self._deferred:
            return
        ids = self._deferred.copy()
        self._deferred.clear()
        await _each(ids, self._delete_id)

    async def sweep(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        match: Callable[[LedgerRow], bool] | None = None,
        dry_run: bool = False,
    ) -> PurgeReport:
        """Every archived row in [since, until) (by ended_at) not yet deleted at the source."""

        async def one(row: LedgerRow) -> None:
            await self.delete_row(row, dry_run=dry_run)

        batch: list[LedgerRow] = []
        async for row in self._ledger.iter_archived(since=since, until=until):
            if row.deleted_at_source is not None or (match is not None and not match(row)):
                continue
            batch.append(row)
            if len(batch) >= _BATCH:
                await _each(batch, one)
                batch = []
        await _each(batch, one)
        return self.report

    # -- one recording -----------------------------------------------------------------------

    async def copy_problem(self, row: LedgerRow) -> str | None:
        """Why the archived copy does not allow deleting the source, or None when it does."""
        if row.state is not State.ARCHIVED:
            return f"the ledger row is {row.state.value}, not archived"
        if self._retention and row.retain_until is None:
            return "Object Lock retention is configured but was not applied to the copy"
        try:
            # Re-read and re-hashed right before the DELETE: the source copy goes only while a
            # good one is known to exist (a size check alone passes a same-size corruption).
            problem = await check_row(row, self._storage, deep=True, sidecars=False)
            if problem is not None:
                return problem.what
            if self._retention and row.storage_key:
                info = await self._storage.stat(row.storage_key)
                if info is None or info.retain_until is None:
                    return "the stored object reports no Object Lock retention"
            if self._media_check and row.storage_key:
                duration = row.metadata.get("duration_secs")
                wrong = await media.check_media(
                    self._storage.read(row.storage_key),
                    duration if isinstance(duration, int) else None,
                )
                if wrong is not None:
                    return wrong
        except ArchiverError as exc:
            return f"the copy could not be checked: {redact(str(exc))}"
        return None

    async def delete_row(self, row: LedgerRow, *, dry_run: bool = False) -> bool:
        """Delete the recording at the source if its copy qualifies; True when it was (or, in a
        dry run, would be). Failures are recorded in ``report``; only AuthError is raised."""
        if row.deleted_at_source is not None:
            return False
        problem = await self.copy_problem(row)
        if problem is not None:
            self.report.kept[row.id] = problem
            log.log(
                logging.INFO if dry_run else logging.WARNING,
                "not deleting %s at the source: %s",
                row.id,
                problem,
                extra={"recording_id": row.id},
            )
            return False
        if dry_run:
            self.report.would_delete.append(row.id)
            return True
        if self._api is None:
            raise RuntimeError("SourceDeleter without an API client can only do a dry run")
        try:
            try:
                await self._api.delete(row.id, row.source)
            except NotFound:
                log.warning("%s was already gone at the source", row.id)
                await self._ledger.append_audit(
                    "source_already_gone", row.id, {"note": "DELETE answered 404"}
                )
            await self._ledger.mark_deleted_at_source(row.id)
        except AuthError:
            raise
        except ArchiverError as exc:
            error = redact(str(exc))
            self.report.failed[row.id] = error
            log.warning(
                "could not delete %s at the source (retried on the next run): %s",
                row.id,
                error,
                extra={"recording_id": row.id},
            )
            return False
        self.report.failed.pop(row.id, None)
        self.report.kept.pop(row.id, None)
        self.report.deleted.append(row.id)
        log.info("deleted %s at the source", row.id, extra={"recording_id": row.id})
        return True

    async def _delete_id(self, recording_id: str) -> None:
        row = await self._ledger.get(recording_id)
        if row is not None:
            await self.delete_row(row)


async def _each(items: Iterable[_T], fn: Callable[[_T], Awaitable[None]]) -> None:
    limit = asyncio.Semaphore(PARALLEL)

    async def one(item: _T) -> None:
        async with limit:
            await fn(item)

    async with asyncio.TaskGroup() as tg:
        for item in items:
            tg.create_task(one(item))
