"""The engine: a lister feeding a bounded queue, a pool of workers in one TaskGroup.

``backfill`` and ``run`` are this one engine: they differ only in the coroutine that produces
passes (finite for backfill, polling for the daemon). Back-pressure comes from the bounded queue:
the lister waits while the workers are busy.

Shutdown (``stop`` set): listing stops at once, queued recordings are dropped (they were never
claimed), in-flight transfers get ``grace`` seconds to finish, then they are cancelled, which
aborts their partial uploads and releases their leases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from archiver import metrics
from archiver.errors import StorageFull
from archiver.ledger.base import Ledger
from archiver.lister import Lister, PageSource
from archiver.models import Recording
from archiver.transfer import Outcome, Result, Transferer

log = logging.getLogger(__name__)


class ProgressSink:
    """Receives progress events; the default does nothing (see ``archiver.progress``)."""

    def enqueued(self, count: int) -> None: ...

    def transferred(self, nbytes: int) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


@dataclass(slots=True)
class RunReport:
    archived: int = 0
    bytes: int = 0
    skipped: int = 0
    processing: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    permanent: set[str] = field(default_factory=set)
    passes: int = 0
    rejected: int = 0
    stopped: bool = False
    storage_full: bool = False

    @property
    def all_archived(self) -> bool:
        return not self.failed and not self.rejected and not self.storage_full

    def record(self, outcome: Outcome) -> None:
        rid = outcome.recording_id
        if outcome.result is Result.ARCHIVED:
            self.archived += 1
            self.bytes += outcome.bytes
            self.failed.pop(rid, None)
            self.processing.discard(rid)
        elif outcome.result is Result.FAILED:
            self.failed[rid] = outcome.error or "failed"
            if outcome.permanent:
                self.permanent.add(rid)
        elif outcome.result is Result.PROCESSING:
            self.processing.add(rid)
        elif outcome.result is Result.SKIPPED:
            self.skipped += 1


Produce = Callable[[Lister, Callable[[], Awaitable[None]]], Coroutine[Any, Any, None]]


class Engine:
    def __init__(
        self,
        *,
        transferer: Transferer,
        source: PageSource,
        ledger: Ledger,
        concurrency: int,
        max_attempts: int,
        shutdown_grace: float,
        progress: ProgressSink | None = None,
    ) -> None:
        self._transferer = transferer
        self._source = source
        self._ledger = ledger
        # Twice as many workers as downloads (the transferer bounds those): while one worker
        # commits its file and records it, the next download is already streaming.
        self._workers = concurrency * 2
        self._max_attempts = max_attempts
        self._grace = shutdown_grace
        self.progress = progress or ProgressSink()
        self.report = RunReport()
        self.stop = asyncio.Event()
        self._in_flight: set[str] = set()
        # Set while ``run`` is running: how ``submit`` reaches the queue.
        self._enqueue: Callable[[Recording], Awaitable[None]] | None = None

    async def run(self, produce: Produce) -> RunReport:
        """Run ``produce(lister, drain)`` with the worker pool until it returns or stop is set.

        ``drain()`` waits until everything enqueued so far has been transferred.
        """
        # One slot per worker: room for every worker's stop marker once the queue is drained.
        queue: asyncio.Queue[Recording | None] = asyncio.Queue(maxsize=self._workers)

        async def enqueue(rec: Recording) -> None:
            await queue.put(rec)
            metrics.QUEUE_DEPTH.set(queue.qsize())
            self.progress.enqueued(1)

        lister = Lister(
            source=self._source,
            ledger=self._ledger,
            enqueue=enqueue,
            in_flight=self._in_flight,
            max_attempts=self._max_attempts,
            stop=self.stop,
        )
        self._enqueue = enqueue
        try:
            return await self._run(queue, lister, produce)
        finally:
            self._enqueue = None

    async def submit(self, rec: Recording) -> bool:
        """Archive one recording now, outside any listing pass (the webhook's way in).

        The recording is observed in the ledger first, so it is known even if this process never
        transfers it; it is queued only if the ledger says it needs work and no queue slot or
        worker holds it already (the lister's dedupe set). Waits while the queue is full.
        Returns True if it was queued; False while the engine is not running or stopping.
        """
        enqueue = self._enqueue
        if enqueue is None or self.stop.is_set():
            return False
        needs_work = await self._ledger.observe([rec], max_attempts=self._max_attempts)
        if rec.id not in needs_work or rec.id in self._in_flight or self.stop.is_set():
            return False
        if not rec.download_url and not rec.is_completed:
            return False
        self._in_flight.add(rec.id)
        try:
            await enqueue(rec)
        except BaseException:
            self._in_flight.discard(rec.id)
            raise
        return True

    async def _run(
        self, queue: asyncio.Queue[Recording | None], lister: Lister, produce: Produce
    ) -> RunReport:
        async with asyncio.TaskGroup() as tg:
            workers = [tg.create_task(self._worker(queue)) for _ in range(self._workers)]
            producer = tg.create_task(produce(lister, queue.join))
            stopper = tg.create_task(self.stop.wait())
            await asyncio.wait({producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                stopper.cancel()
                for _ in workers:
                    await queue.put(None)
            else:
                self.report.stopped = True
                producer.cancel()
                await self._shutdown(queue, workers)
        return self.report

    async def _shutdown(
        self, queue: asyncio.Queue[Recording | None], workers: list[asyncio.Task[None]]
    ) -> None:
        dropped = 0
        while not queue.empty():
            item = queue.get_nowait()
            queue.task_done()
            if item is not None:
                dropped += 1
                self._in_flight.discard(item.id)
        for _ in workers:
            queue.put_nowait(None)
        log.info(
            "stopping: %d queued dropped, waiting up to %.0fs for %d transfers",
            dropped,
            self._grace,
            len(self._in_flight),
        )
        _, pending = await asyncio.wait(workers, timeout=self._grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("grace period over: cancelled %d transfers", len(pending))
            await asyncio.wait(pending)

    async def _worker(self, queue: asyncio.Queue[Recording | None]) -> None:
        while True:
            item = await queue.get()
            metrics.QUEUE_DEPTH.set(queue.qsize())
            try:
                if item is None:
                    return
                outcome = await self._transferer.transfer(item)
                self.report.record(outcome)
                self.progress.finished(outcome)
                if outcome.error_kind is StorageFull:
                    # Every further write would fail the same way: stop rather than churn.
                    log.error("the archive is full: stopping (%s)", outcome.error)
                    self.report.storage_full = True
                    self.stop.set()
            finally:
                if item is not None:
                    self._in_flight.discard(item.id)
                queue.task_done()
