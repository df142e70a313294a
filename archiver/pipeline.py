"""The engine: producers feeding a bounded queue, a pool of workers in one TaskGroup.

``backfill`` and ``run`` are this one engine: they differ only in the producer
(``archiver.producers``), finite passes or polling windows, which drives it through ``Work``:
list a pass, sweep the ledger for owed rows no listing brings (an expired lease, a row no window
lists any more), wait for the queue to drain. Back-pressure comes from the bounded queue: the
lister waits while the workers are busy.

Each outcome goes to the engine's listeners (the run's counts, a progress display, the daemon's
health): nothing that decides what is done depends on them; that is the ledger's.

Shutdown (``stop`` set): listing stops at once, queued recordings are dropped (they were never
claimed), in-flight transfers get ``grace`` seconds to finish, then they are cancelled, which
aborts their partial uploads and releases their leases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from archiver import metrics
from archiver.errors import StorageFull
from archiver.filters import Filters
from archiver.ledger.base import WorkLedger
from archiver.lister import Lister, PageSource, PassStats
from archiver.models import Recording
from archiver.scope import Scope
from archiver.transfer import Outcome, Result, Transferer

log = logging.getLogger(__name__)


class Listener:
    """Told of what the engine does; every method does nothing unless overridden."""

    def enqueued(self, count: int) -> None: ...

    def transferred(self, nbytes: int) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


@dataclass(slots=True)
class Counts(Listener):
    """What this process did, for display and pass records. Never proof that anything is done:
    that is the ledger's (``archiver.scope``)."""

    archived: int = 0
    bytes: int = 0
    failed: int = 0
    processing: int = 0
    held: int = 0
    skipped: int = 0

    def finished(self, outcome: Outcome) -> None:
        if outcome.result is Result.ARCHIVED:
            self.archived += 1
            self.bytes += outcome.bytes
        elif outcome.result is Result.FAILED:
            self.failed += 1
        elif outcome.result is Result.PROCESSING:
            self.processing += 1
        elif outcome.result is Result.HELD:
            self.held += 1
        elif outcome.result is Result.SKIPPED:
            self.skipped += 1

    def since(self, before: Counts) -> Counts:
        """What happened after the snapshot ``before``."""
        return Counts(
            **{
                f.name: getattr(self, f.name) - getattr(before, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def snapshot(self) -> Counts:
        return dataclasses.replace(self)


class Work:
    """What a producer drives the engine with (one per ``Engine.run``)."""

    def __init__(
        self,
        engine: Engine,
        lister: Lister,
        enqueue: Callable[[Recording], Awaitable[None]],
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        self._engine = engine
        self._lister = lister
        self._enqueue = enqueue
        self.drain = drain

    @property
    def stop(self) -> asyncio.Event:
        return self._engine.stop

    @property
    def counts(self) -> Counts:
        return self._engine.counts

    async def list_pass(self, filters: Filters) -> PassStats:
        """List every page the filters match, queueing what the ledger says is claimable."""
        stats = await self._lister.list_pass(filters)
        if not self.stop.is_set():
            # Only a listing that reached its last page makes the scope known: what a listing
            # cut short by a stop never reached is in no ledger (see ``Engine.listed_to_end``).
            self._engine.listed_to_end += 1
        return stats

    async def sweep(self, scope: Scope, *, exclude: set[str]) -> int:
        """Queue every claimable row in ``scope`` that no listing of this pass brought: a lease
        a stopped instance left, a pending row no window lists any more, a retryable failure.
        Each goes without a URL; its transfer asks the API for a fresh one."""
        queued = await sweep_ledger(
            self._engine.ledger,
            scope,
            exclude=exclude,
            in_flight=self._engine.in_flight,
            enqueue=self._enqueue,
            stop=self.stop,
        )
        if queued:
            log.info("queued %d recordings the ledger still owes (no listing brought them)", queued)
        return queued


async def sweep_ledger(
    ledger: WorkLedger,
    scope: Scope,
    *,
    exclude: set[str],
    in_flight: set[str],
    enqueue: Callable[[Recording], Awaitable[None]],
    stop: asyncio.Event,
) -> int:
    """Hand every claimable row of ``scope`` not in ``exclude`` or ``in_flight`` to ``enqueue``
    (as the ledger last saw it, without a URL); the same for a run and for a dry run."""
    queued = 0
    async for row in ledger.iter_claimable(since=scope.since, until=scope.until):
        if stop.is_set():
            break
        if row.id in exclude or row.id in in_flight or not scope.match(row):
            continue
        in_flight.add(row.id)
        await enqueue(Recording.from_row(row))
        queued += 1
    return queued


Produce = Callable[[Work], Coroutine[Any, Any, None]]


class Engine:
    def __init__(
        self,
        *,
        transferer: Transferer,
        source: PageSource,
        ledger: WorkLedger,
        concurrency: int,
        shutdown_grace: float,
        listeners: Sequence[Listener] = (),
        dry_run: bool = False,
    ) -> None:
        self._transferer = transferer
        self._source = source
        self.ledger = ledger
        # Twice as many workers as downloads (the transferer bounds those): while one worker
        # commits its file and records it, the next download is already streaming.
        self._workers = concurrency * 2
        self._grace = shutdown_grace
        self._dry_run = dry_run
        self.counts = Counts()
        self.listeners: list[Listener] = [self.counts, *listeners]
        self.stop = asyncio.Event()
        # Set when stop came before the producer was done (a signal, a full archive).
        self.stopped = False
        # Listing passes that ran to their last page, not cut short by stop.
        self.listed_to_end = 0
        self.storage_full = False
        self.in_flight: set[str] = set()
        # Set while ``run`` is running: how ``submit`` reaches the queue.
        self._enqueue: Callable[[Recording], Awaitable[None]] | None = None

    async def run(self, produce: Produce) -> None:
        """Run ``produce(work)`` with the worker pool until it returns or stop is set."""
        # One slot per worker: room for every worker's stop marker once the queue is drained.
        queue: asyncio.Queue[Recording | None] = asyncio.Queue(maxsize=self._workers)

        async def enqueue(rec: Recording) -> None:
            await queue.put(rec)
            metrics.QUEUE_DEPTH.set(queue.qsize())
            for listener in self.listeners:
                listener.enqueued(1)

        lister = Lister(
            source=self._source,
            ledger=self.ledger,
            enqueue=enqueue,
            in_flight=self.in_flight,
            stop=self.stop,
            dry_run=self._dry_run,
        )
        self._enqueue = enqueue
        try:
            await self._run(queue, Work(self, lister, enqueue, queue.join), produce)
        finally:
            self._enqueue = None

    async def submit(self, rec: Recording) -> bool:
        """Archive one recording now, outside any listing pass (the webhook's way in).

        The recording is observed in the ledger first, so it is owed even if this process never
        transfers it; it is queued only if the ledger says it is claimable and no queue slot or
        worker holds it already (the lister's dedupe set). Waits while the queue is full.
        Returns True if it was queued; False while the engine is not running or stopping.
        """
        enqueue = self._enqueue
        if enqueue is None or self.stop.is_set():
            return False
        claimable = await self.ledger.observe([rec])
        if rec.id not in claimable or rec.id in self.in_flight or self.stop.is_set():
            return False
        if not rec.download_url and not rec.is_completed:
            return False
        self.in_flight.add(rec.id)
        try:
            await enqueue(rec)
        except BaseException:
            self.in_flight.discard(rec.id)
            raise
        return True

    async def _run(
        self, queue: asyncio.Queue[Recording | None], work: Work, produce: Produce
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            workers = [tg.create_task(self._worker(queue)) for _ in range(self._workers)]
            producer = tg.create_task(produce(work))
            stopper = tg.create_task(self.stop.wait())
            await asyncio.wait({producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                stopper.cancel()
                for _ in workers:
                    await queue.put(None)
            else:
                self.stopped = True
                producer.cancel()
                await self._shutdown(queue, workers)

    async def _shutdown(
        self, queue: asyncio.Queue[Recording | None], workers: list[asyncio.Task[None]]
    ) -> None:
        dropped = 0
        while not queue.empty():
            item = queue.get_nowait()
            queue.task_done()
            if item is not None:
                dropped += 1
                self.in_flight.discard(item.id)
        for _ in workers:
            queue.put_nowait(None)
        log.info(
            "stopping: %d queued dropped, waiting up to %.0fs for %d transfers",
            dropped,
            self._grace,
            len(self.in_flight),
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
                for listener in self.listeners:
                    listener.finished(outcome)
                if outcome.error_kind is StorageFull:
                    # Every further write would fail the same way: stop rather than churn.
                    log.error("the archive is full: stopping (%s)", outcome.error)
                    self.storage_full = True
                    self.stop.set()
            finally:
                if item is not None:
                    self.in_flight.discard(item.id)
                queue.task_done()
