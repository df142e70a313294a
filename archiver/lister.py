"""Pages → entries within the filters → what the ledger says some instance may claim → the queue.

Every entry is checked against the listing's filters again (``scope.admits``, the same test a
ledger row gets) before anything else happens to it: an API that ignores a filter, or has no
form for it (an exact or a maximum duration), cannot widen what is observed, archived or
deleted. An entry outside the filters is not observed at all, only counted
(``PassStats.outside``).

Each page is recorded in the ledger in one batch (``WorkLedger.observe``), never one query per
recording. Entries that cannot be archived as they stand (no id, a hostile id, an unusable
download URL) are written to the ledger as rejected, with the reason, so they show in
``archiver status`` and fail alone; an entry refused for its URL is judged again when it is listed
again. The order of results is not documented and pages shift while new recordings arrive, so ids
are deduplicated here and a later pass catches what a shift hid.

A dry run is the same lister over the same ledger rules with nothing written
(``WorkLedger.would_observe``): what it would queue is exactly what a backfill queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from archiver import layout, metrics
from archiver.errors import UnsafeValue
from archiver.filters import Filters
from archiver.ledger.base import WorkLedger
from archiver.models import Recording
from archiver.scope import Facts, admits
from archiver.telnyx import Page

log = logging.getLogger(__name__)


class PageSource(Protocol):
    """A listing's pages, each fetched under the API's retry policy (``TelnyxClient``): the
    lister never tries a page again itself."""

    def iter_pages(self, filters: Filters) -> AsyncIterator[Page]: ...


@dataclass(slots=True)
class PassStats:
    pages: int = 0
    listed: int = 0
    enqueued: int = 0
    already_done: int = 0
    processing: int = 0
    # Entries refused as they stand (their id, or a stand-in for an entry without one).
    rejected_ids: set[str] = field(default_factory=set)
    # Entries the API returned outside the filters: never observed, queued or deleted.
    outside_ids: set[str] = field(default_factory=set)
    # Every id this pass saw (stand-ins of malformed entries included): its scope.
    seen: set[str] = field(default_factory=set)
    # The largest meta.total_results seen; more than ``unique`` means items shifted past us.
    total_results: int | None = None

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def rejected(self) -> int:
        return len(self.rejected_ids)

    @property
    def outside(self) -> int:
        return len(self.outside_ids)

    @property
    def shift_suspected(self) -> bool:
        # The API's total counts what it returned, entries outside the filters included.
        return self.total_results is not None and self.unique + self.outside < self.total_results


def screen(rec: Recording) -> str | None:
    """Why a listed entry cannot be archived as it stands, or None. An unsafe id is refused for
    good; anything else about the entry is judged again when it is listed again."""
    try:
        layout.check_id(rec.id)
        if rec.download_url:
            layout.check_download_url(rec.download_url)
    except UnsafeValue as exc:
        return str(exc)
    return None


def downloadable(rec: Recording) -> bool:
    """Worth queueing now: a URL to fetch, or completed (a retrieve gives a fresh URL)."""
    return bool(rec.download_url) or rec.is_completed


class Lister:
    def __init__(
        self,
        *,
        source: PageSource,
        ledger: WorkLedger,
        enqueue: Callable[[Recording], Awaitable[None]],
        in_flight: set[str],
        stop: asyncio.Event,
        dry_run: bool = False,
    ) -> None:
        self._source = source
        self._ledger = ledger
        self._enqueue = enqueue
        self._in_flight = in_flight
        self._stop = stop
        self._dry_run = dry_run

    async def list_pass(self, filters: Filters) -> PassStats:
        stats = PassStats()
        async with contextlib.aclosing(_read_ahead(self._source.iter_pages(filters))) as pages:
            async for page in pages:
                stats.pages += 1
                stats.listed += len(page.recordings) + len(page.malformed)
                if page.total_results is not None:
                    stats.total_results = max(stats.total_results or 0, page.total_results)
                await self._take_page(page, filters, stats)
                if self._stop.is_set():
                    log.info("stop requested: listing ends after page %d", page.number)
                    break
        return stats

    async def _take_page(self, page: Page, filters: Filters, stats: PassStats) -> None:
        seen = stats.seen
        for stand_in, reason in page.malformed:
            if stand_in in seen or stand_in in stats.outside_ids:
                continue
            if not admits(filters, Facts.of_entry(page.malformed_entries.get(stand_in))):
                self._outside(stand_in, stats)
                continue
            seen.add(stand_in)
            stats.rejected_ids.add(stand_in)
            if not self._dry_run:
                await self._ledger.reject(stand_in, reason=f"malformed entry: {reason}")
        fresh: list[Recording] = []
        for rec in page.recordings:
            if rec.id in seen or rec.id in stats.outside_ids:
                continue
            if not admits(filters, Facts.of_recording(rec)):
                self._outside(rec.id, stats)
                continue
            seen.add(rec.id)
            problem = screen(rec)
            if problem is not None:
                stats.rejected_ids.add(rec.id)
                metrics.SKIPPED.labels(reason="rejected").inc()
                log.warning("rejected entry %r: %s", rec.id[:80], problem)
                if not self._dry_run:
                    await self._ledger.reject(rec.id, reason=problem, metadata=rec.metadata)
                continue
            fresh.append(rec)
        if not fresh:
            return
        if self._dry_run:
            claimable = await self._ledger.would_observe(fresh)
        else:
            claimable = await self._ledger.observe(fresh)
        for rec in fresh:
            if rec.id not in claimable:
                stats.already_done += 1
                metrics.SKIPPED.labels(reason="not_claimable").inc()
            elif rec.id in self._in_flight:
                continue
            elif not downloadable(rec):
                stats.processing += 1
                metrics.SKIPPED.labels(reason="processing").inc()
            else:
                stats.enqueued += 1
                self._in_flight.add(rec.id)
                await self._enqueue(rec)

    def _outside(self, entry_id: str, stats: PassStats) -> None:
        if not stats.outside_ids:
            log.warning(
                "the API returned recordings outside the filters (it ignores one of them, or "
                "cannot express it); they are left alone, e.g. %r",
                entry_id[:80],
            )
        stats.outside_ids.add(entry_id)
        metrics.SKIPPED.labels(reason="outside_filters").inc()


async def _read_ahead(pages: AsyncIterator[Page]) -> AsyncGenerator[Page, None]:
    """Yield each page while the next one is already being fetched: the API's latency overlaps
    the ledger's work on the page before, instead of adding to it."""

    async def following() -> Page:
        return await anext(pages)

    ahead = asyncio.ensure_future(following())
    try:
        while True:
            try:
                page = await ahead
            except StopAsyncIteration:
                return
            ahead = asyncio.ensure_future(following())
            yield page
    finally:
        if not ahead.done():
            ahead.cancel()
        await asyncio.wait([ahead])
        if not ahead.cancelled():
            ahead.exception()  # retrieved: a page nobody asked for fails nobody
        aclose = getattr(pages, "aclose", None)
        if aclose is not None:
            await aclose()
