"""Wiring: open the ledger, the archive, the API and the download session as one stack, and run
the engine over them. The CLI and the daemon both come through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp

from archiver.config import Settings
from archiver.errors import ConfigError
from archiver.ledger.base import Ledger, PassRecord
from archiver.lister import Lister
from archiver.models import utcnow
from archiver.pipeline import Engine, ProgressSink, RunReport
from archiver.purge import SourceDeleter, scope_of
from archiver.storage.base import StorageBackend
from archiver.telnyx import Filters, TelnyxClient
from archiver.transfer import Transferer, download_session

log = logging.getLogger(__name__)

# Partial uploads younger than this are kept for a resume; older ones are debris.
STALE_PARTIAL_SECONDS = 24 * 3600.0


def instance_id() -> str:
    """Names this process in leases: host, pid and a random tag (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def make_storage(settings: Settings) -> StorageBackend:
    if settings.storage.backend == "local":
        from archiver.storage.local import LocalStorage

        return LocalStorage(settings.storage.path)
    if settings.storage.backend == "s3":
        try:
            from archiver.storage.s3 import S3Storage
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(f"storage.backend: S3 support is not available ({exc})") from exc
        assert settings.storage.s3 is not None
        return S3Storage(settings.storage.s3)
    raise ConfigError(f"storage.backend: unknown backend {settings.storage.backend!r}")


def make_ledger(settings: Settings, *, exclusive: bool) -> Ledger:
    from archiver.ledger import open_ledger

    return open_ledger(
        path=settings.ledger.path,
        url=settings.ledger.url,
        exclusive=exclusive,
        password_file=settings.ledger.password_file,
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
    settings: Settings, *, exclusive: bool = True, api: bool = True, storage_ready: bool = True
) -> AsyncIterator[Services]:
    """Everything a command needs, opened in data-flow order and closed in reverse."""
    async with AsyncExitStack() as stack:
        client = TelnyxClient(settings.telnyx) if api else None  # fails early without a key
        ledger = await stack.enter_async_context(make_ledger(settings, exclusive=exclusive))
        storage = await stack.enter_async_context(make_storage(settings))
        if storage_ready:
            await storage.preflight()
            removed = await storage.cleanup_stale(STALE_PARTIAL_SECONDS)
            if removed:
                log.info("removed %d stale partial uploads", removed)
        if client is not None:
            await stack.enter_async_context(client)
        http = await stack.enter_async_context(download_session(settings)) if api else None
        deleter = (
            SourceDeleter(api=client, ledger=ledger, storage=storage, settings=settings)
            if client is not None and settings.source.delete_after_archive
            else None
        )
        yield Services(settings, ledger, storage, client, http, instance_id(), deleter)


def make_engine(services: Services, progress: ProgressSink | None = None) -> Engine:
    assert services.api is not None and services.http is not None
    settings = services.settings
    sink = progress or ProgressSink()
    transferer = Transferer(
        source=services.api,
        http=services.http,
        storage=services.storage,
        ledger=services.ledger,
        settings=settings,
        owner=services.owner,
        on_bytes=sink.transferred,
        after_archive=services.deleter,
    )
    return Engine(
        transferer=transferer,
        source=services.api,
        ledger=services.ledger,
        concurrency=settings.workers.concurrency,
        max_attempts=settings.workers.max_attempts,
        shutdown_grace=settings.daemon.shutdown_grace,
        progress=sink,
    )


async def backfill(services: Services, filters: Filters, engine: Engine) -> RunReport:
    """List everything the filters match, archive what the ledger lacks, and list again while
    the last pass found work (a shift between pages may have hidden something)."""
    max_passes = 1 + services.settings.backfill.max_passes
    report = engine.report

    async def produce(lister: Lister, drain: Callable[[], Awaitable[None]]) -> None:
        for number in range(1, max_passes + 1):
            started = utcnow()
            stats = await lister.list_pass(filters)
            await drain()
            if services.deleter is not None:
                await services.deleter.flush()
            report.passes = number
            report.rejected += stats.rejected
            await services.ledger.record_pass(
                PassRecord(
                    started_at=started,
                    finished_at=utcnow(),
                    ok=not engine.stop.is_set(),
                    listed=stats.listed,
                    enqueued=stats.enqueued,
                    window=filters_label(filters),
                    instance=services.owner,
                    extra={"kind": "backfill", "pass": number, "rejected": stats.rejected},
                )
            )
            log.info(
                "pass %d: %d listed, %d queued, %d already archived, %d processing, %d rejected",
                number,
                stats.listed,
                stats.enqueued,
                stats.already_done,
                stats.processing,
                stats.rejected,
                extra={"pass_number": number},
            )
            if engine.stop.is_set() or number == max_passes:
                return
            if stats.enqueued == 0 and not stats.shift_suspected:
                if not stats.processing:
                    return
                # Only recordings still processing at the source are left: give them a moment.
                wait = services.settings.backfill.processing_wait
                log.info(
                    "%d recordings still processing; listing again in %.0fs", stats.processing, wait
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(engine.stop.wait(), timeout=wait)

    deleter = services.deleter
    if deleter is None:
        return await engine.run(produce)
    # Deleting while a pass lists would shift its pages: deletions wait for the pass's end.
    with deleter.deferred():
        await engine.run(produce)
    if not report.stopped:
        # Deletions that failed earlier, and recordings archived before the option was on.
        since, until, match = scope_of(filters)
        await deleter.sweep(since=since, until=until, match=match)
    return report


def filters_label(filters: Filters) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(filters.to_query().items())) or "all"


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
