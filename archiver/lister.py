"""Pages → what the ledger says needs work → the queue.

Each page is recorded in the ledger in one batch (``Ledger.observe``), never one query per
recording. Entries that cannot be archived safely (no id, a hostile id) are written to the ledger
as rejected, with the reason, so they show in ``archiver status`` and fail alone. The order of
results is not documented and pages shift while new recordings arrive, so ids are deduplicated
here and a later pass catches what a shift hid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from archiver import layout, metrics
from archiver.errors import UnsafeValue
from archiver.ledger.base import Ledger
from archiver.models import Recording
from archiver.telnyx import Filters, Page

log = logging.getLogger(__name__)


class PageSource(Protocol):
    def iter_pages(self, filters: Filters) -> AsyncIterator[Page]: ...


@dataclass(slots=True)
class PassStats:
    pages: int = 0
    listed: int = 0
    unique: int = 0
    enqueued: int = 0
    already_done: int = 0
    processing: int = 0
    rejected: int = 0
    # The largest meta.total_results seen; more than ``unique`` means items shifted past us.
    total_results: int | None = None

    @property
    def shift_suspected(self) -> bool:
        return self.total_results is not None and self.unique < self.total_results


class Lister:
    def __init__(
        self,
        *,
        source: PageSource,
        ledger: Ledger,
        enqueue: Callable[[Recording], Awaitable[None]],
        in_flight: set[str],
        max_attempts: int,
        stop: asyncio.Event,
    ) -> None:
        self._source = source
        self._ledger = ledger
        self._enqueue = enqueue
        self._in_flight = in_flight
        self._max_attempts = max_attempts
        self._stop = stop

    async def list_pass(self, filters: Filters) -> PassStats:
        stats = PassStats()
        seen: set[str] = set()
        async with contextlib.aclosing(_read_ahead(self._source.iter_pages(filters))) as pages:
            async for page in pages:
                stats.pages += 1
                stats.listed += len(page.recordings) + len(page.malformed)
                if page.total_results is not None:
                    stats.total_results = max(stats.total_results or 0, page.total_results)
                await self._take_page(page, seen, stats)
                if self._stop.is_set():
                    log.info("stop requested: listing ends after page %d", page.number)
                    break
        stats.unique = len(seen)
        return stats

    async def _take_page(self, page: Page, seen: set[str], stats: PassStats) -> None:
        for stand_in, reason in page.malformed:
            if stand_in not in seen:
                seen.add(stand_in)
                stats.rejected += 1
                await self._ledger.reject(stand_in, reason=f"malformed entry: {reason}")
        fresh: list[Recording] = []
        for rec in page.recordings:
            if rec.id in seen:
                continue
            seen.add(rec.id)
            try:
                layout.check_id(rec.id)
                if rec.download_url:
                    layout.check_download_url(rec.download_url)
            except UnsafeValue as exc:
                stats.rejected += 1
                metrics.SKIPPED.labels(reason="rejected").inc()
                log.warning("rejected entry %r: %s", rec.id[:80], exc)
                await self._ledger.reject(rec.id, reason=str(exc), metadata=rec.metadata)
                continue
            fresh.append(rec)
        if not fresh:
            return
        needs_work = await self._ledger.observe(fresh, max_attempts=self._max_attempts)
        for rec in fresh:
            if rec.id not in needs_work:
                stats.already_done += 1
                metrics.SKIPPED.labels(reason="already_archived").inc()
            elif rec.id in self._in_flight:
                continue
            elif not rec.download_url and not rec.is_completed:
                stats.processing += 1
                metrics.SKIPPED.labels(reason="processing").inc()
            else:
                stats.enqueued += 1
                self._in_flight.add(rec.id)
                await self._enqueue(rec)


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
