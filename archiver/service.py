"""Wiring: open the ledger, the archive, the API and the download session as one stack, and run
the engine over them with a producer (``archiver.producers``). The CLI, the demo and the daemon
all come through here."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp

from archiver import identity
from archiver.config import Settings
from archiver.errors import ConfigError
from archiver.filters import Filters
from archiver.ledger.base import Budget, Ledger, Tally
from archiver.pipeline import Counts, Engine, Listener
from archiver.producers import Backfill
from archiver.purge import SourceDeleter
from archiver.storage import registry as storage_registry
from archiver.storage.base import StorageBackend
from archiver.telnyx import TelnyxClient
from archiver.transfer import Transferer, download_session

log = logging.getLogger(__name__)

# Partial uploads younger than this are kept for a resume; older ones are debris.
STALE_PARTIAL_SECONDS = 24 * 3600.0

# Exit codes (public interface, also in ``archiver --help`` and README).
EXIT_OK = 0
EXIT_OWED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


def instance_id() -> str:
    """Names this process in leases: host, pid and a random tag (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def make_storage(settings: Settings) -> StorageBackend:
    """The archive ``storage.backend`` names (``archiver.storage.registry``), not opened yet."""
    return storage_registry.open_backend(settings.storage)


def ledger_files_of(settings: Settings) -> identity.Ignore:
    """The SQLite ledger's own files, where they sit inside a local archive (the demo's)."""
    if settings.storage.backend != "local" or settings.ledger.url is not None:
        return lambda key: False
    return identity.ledger_files(settings.ledger.path, settings.storage.path)


def check_ledger_directory(settings: Settings) -> None:
    """A SQLite ledger's directory is created when missing, not its parents (a typo, or a disk
    not mounted, would put the ledger on the root disk): unless storage.create_parents."""
    path = settings.ledger.path
    if settings.ledger.url is not None or settings.storage.create_parents:
        return
    if not path.parent.exists() and not path.parent.parent.is_dir():
        raise ConfigError(
            f"ledger.path {path}: neither {path.parent} nor {path.parent.parent} exists: a "
            "typo, or a disk that is not mounted? Create it, or set storage.create_parents = true"
        )


def budget_of(settings: Settings) -> Budget:
    return Budget(
        max_attempts=settings.workers.max_attempts,
        max_interruptions=settings.workers.max_interruptions,
    )


def make_ledger(settings: Settings, *, exclusive: bool, must_exist: bool = False) -> Ledger:
    from archiver.ledger import open_ledger

    return open_ledger(
        path=settings.ledger.path,
        url=settings.ledger.url,
        exclusive=exclusive,
        password_file=settings.ledger.password_file,
        budget=budget_of(settings),
        must_exist=must_exist,
    )


@dataclass(slots=True)
class Services:
    settings: Settings
    ledger: Ledger
    storage: StorageBackend
    api: TelnyxClient | None
    http: aiohttp.ClientSession | None
    owner: str
    # Set when ``[source] delete_after_archive`` is on and the API is open.
    deleter: SourceDeleter | None = None


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    exclusive: bool = True,
    api: bool = True,
    storage_ready: bool = True,
    must_exist: bool = False,
    check_identity: bool = True,
) -> AsyncIterator[Services]:
    """Everything a command needs, opened in data-flow order and closed in reverse. The ledger
    must be the archive's (``archiver.identity``); a writer (``exclusive`` and
    ``storage_ready``) records that on an archive that has no identity record yet."""
    if not must_exist:
        check_ledger_directory(settings)
    async with AsyncExitStack() as stack:
        # Fails early without a key.
        client = TelnyxClient(settings.telnyx, sources=settings.sources.enabled()) if api else None
        ledger = await stack.enter_async_context(
            make_ledger(settings, exclusive=exclusive, must_exist=must_exist)
        )
        storage = await stack.enter_async_context(make_storage(settings))
        if storage_ready:
            await storage.preflight()
            removed = await storage.cleanup_stale(STALE_PARTIAL_SECONDS)
            if removed:
                log.info("removed %d stale partial uploads", removed)
        if check_identity:
            await identity.check(
                ledger,
                storage,
                writable=exclusive and storage_ready,
                ignore=ledger_files_of(settings),
            )
        if client is not None:
            await stack.enter_async_context(client)
        http = await stack.enter_async_context(download_session(settings)) if api else None
        deleter = (
            SourceDeleter(api=client, ledger=ledger, storage=storage, settings=settings)
            if client is not None and settings.source.delete_after_archive
            else None
        )
        yield Services(settings, ledger, storage, client, http, instance_id(), deleter)


def make_engine(
    services: Services, listeners: Sequence[Listener] = (), *, dry_run: bool = False
) -> Engine:
    assert services.api is not None and services.http is not None
    settings = services.settings

    def on_bytes(nbytes: int) -> None:
        for listener in listeners:
            listener.transferred(nbytes)

    transferer = Transferer(
        source=services.api,
        http=services.http,
        storage=services.storage,
        ledger=services.ledger,
        settings=settings,
        owner=services.owner,
        on_bytes=on_bytes,
        after_archive=services.deleter,
    )
    return Engine(
        transferer=transferer,
        source=services.api,
        ledger=services.ledger,
        concurrency=settings.workers.concurrency,
        shutdown_grace=settings.daemon.shutdown_grace,
        listeners=listeners,
        dry_run=dry_run,
    )


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """Where a backfill's scope stands, from the ledger, and what this run did."""

    tally: Tally
    counts: Counts
    passes: int
    # Stopped before the end: a signal, or the archive full.
    stopped: bool
    storage_full: bool
    scope_size: int = 0
    # Listing entries refused as they stand (owed, failed for good, in ``tally``).
    rejected: int = 0
    # Some listing pass reached its last page. A stop before that leaves the scope unknown.
    listed_to_end: bool = True

    @property
    def all_archived(self) -> bool:
        # The tally covers what was listed and what the ledger knew; recordings on pages a
        # stopped listing never reached are in neither, so nothing owed there proves nothing.
        return self.tally.owed == 0 and self.listed_to_end

    @property
    def archived(self) -> int:
        """Archived by this run (the ledger may hold the rest of the scope from before)."""
        return self.counts.archived

    @property
    def bytes(self) -> int:
        return self.counts.bytes

    @property
    def failed(self) -> dict[str, str]:
        return {**self.tally.needs_action, **self.tally.retrying}

    @property
    def exit_code(self) -> int:
        if self.all_archived:
            return EXIT_OK
        if self.stopped and not self.storage_full:
            return EXIT_INTERRUPTED
        return EXIT_OWED


async def backfill(services: Services, filters: Filters, engine: Engine) -> BackfillResult:
    """Archive everything ``filters`` cover (``producers.Backfill``); the result is the
    ledger's view of that scope afterwards."""
    producer = Backfill(
        filters=filters,
        ledger=services.ledger,
        settings=services.settings.backfill,
        instance=services.owner,
        deleter=services.deleter,
    )
    deleter = services.deleter
    if deleter is None:
        await engine.run(producer)
    else:
        # Deleting while a pass lists would shift its pages: deletions wait for the pass's end.
        with deleter.deferred():
            await engine.run(producer)
        if not engine.stopped:
            # Deletions that failed earlier, and recordings archived before the option was on.
            scope = producer.scope
            await deleter.sweep(since=scope.since, until=scope.until, match=scope.match)
    tally = await producer.scope.tally(services.ledger, producer.seen)
    return BackfillResult(
        tally=tally,
        counts=engine.counts.snapshot(),
        passes=producer.passes,
        stopped=engine.stopped,
        storage_full=engine.storage_full,
        scope_size=tally.owed + tally.archived + tally.given_up,
        rejected=len(producer.rejected),
        listed_to_end=engine.listed_to_end > 0,
    )


def install_stop_signals(engine: Engine) -> Callable[[], None]:
    """SIGINT/SIGTERM stop listing and start the graceful shutdown. Returns an uninstaller."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, _request_stop, engine, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass

    def uninstall() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return uninstall


def _request_stop(engine: Engine, sig: int) -> None:
    if engine.stop.is_set():
        return
    log.warning("%s received: stopping after in-flight transfers", signal.Signals(sig).name)
    engine.stop.set()
