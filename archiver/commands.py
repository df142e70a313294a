"""What each CLI command does, returning its exit code. Output for people goes to stdout."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from archiver.config import Settings
from archiver.errors import UnsafeValue
from archiver.layout import check_id
from archiver.ledger.base import Ledger
from archiver.pipeline import RunReport
from archiver.progress import human_bytes, make_progress
from archiver.purge import PurgeReport
from archiver.redact import redact
from archiver.service import backfill as run_backfill
from archiver.service import install_stop_signals, make_engine, open_services
from archiver.storage.base import StorageBackend
from archiver.telnyx import Filters
from archiver.verify import verify_archive

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURES = 0, 1


async def backfill(settings: Settings, filters: Filters) -> int:
    async with open_services(settings, exclusive=True) as services:
        with make_progress("archiving") as progress:
            engine = make_engine(services, progress)
            uninstall = install_stop_signals(engine)
            try:
                report = await run_backfill(services, filters, engine)
            finally:
                uninstall()
        print_report(report)
        if services.deleter is not None:
            print_purge(services.deleter.report)
        return EXIT_OK if report.all_archived else EXIT_FAILURES


async def run(
    settings: Settings, *, once: bool = False, reopen_logs: Callable[[], None] | None = None
) -> int:
    """The daemon (``archiver.daemon``): exit 0 after a graceful stop on SIGTERM/SIGINT. With
    ``once``: one pass, exit 0 if it listed without error and everything it found is archived."""
    from archiver.daemon import run_daemon

    report, daemon = await run_daemon(settings, once=once, reopen_logs=reopen_logs)
    if report.storage_full:
        print("stopped: the archive is full; free space and start again (nothing was lost)")
        return EXIT_FAILURES
    if once:
        ok = daemon.last is not None and daemon.last.ok and report.all_archived
        return EXIT_OK if ok else EXIT_FAILURES
    return EXIT_OK


def print_report(report: RunReport) -> None:
    print(
        f"{report.archived} archived ({human_bytes(report.bytes)}) in {report.passes} pass(es); "
        f"{len(report.failed)} failed, {report.rejected} rejected entries, "
        f"{len(report.processing)} still processing at the source"
    )
    for rid, error in sorted(report.failed.items())[:50]:
        print(f"  failed {rid!r}: {error}")
    if report.rejected:
        print("  rejected entries are listed by `archiver status`")
    if report.storage_full:
        print("stopped: the archive is full; free space and run again (nothing was lost)")
    elif report.stopped:
        print("stopped before the end; run again to continue")


async def dry_run(settings: Settings, filters: Filters) -> int:
    """List what would be archived; touches neither the ledger nor the archive."""
    async with open_services(settings, exclusive=False, storage_ready=False) as services:
        assert services.api is not None
        would, done, processing, unsafe = 0, 0, 0, 0
        async for page in services.api.iter_pages(filters):
            states = await services.ledger.states([r.id for r in page.recordings])
            for rec in page.recordings:
                try:
                    check_id(rec.id)
                except UnsafeValue:
                    unsafe += 1
                    continue
                state = states.get(rec.id)
                if state is not None and state.value == "archived":
                    done += 1
                elif not rec.download_url and not rec.is_completed:
                    processing += 1
                else:
                    would += 1
                    print(f"would archive {rec.id}  room={rec.room_id}  ended={rec.ended_at}")
            unsafe += len(page.malformed)
        print(
            f"dry run: {would} would be archived, {done} already archived, "
            f"{processing} processing, {unsafe} unusable entries"
        )
        if settings.source.delete_after_archive:
            await _dry_run_deletions(services.ledger, services.storage, settings, filters, would)
    return EXIT_OK


async def status(settings: Settings, *, as_json: bool) -> int:
    from archiver.cli import print_json

    async with open_services(settings, exclusive=False, api=False, storage_ready=False) as svc:
        summary = await svc.ledger.summary()
        failures = await svc.ledger.failures(limit=50)
        passes = await svc.ledger.last_passes(limit=5)
        high_water_mark = await svc.ledger.get_meta("daemon.high_water_mark")
    now = datetime.now(UTC)
    lag = (
        (now - summary.oldest_unarchived_ended_at).total_seconds()
        if summary.oldest_unarchived_ended_at
        else 0.0
    )
    doc: dict[str, Any] = {
        "counts": {state.value: n for state, n in summary.counts.items()},
        "archived_bytes": summary.archived_bytes,
        "permanent_failures": summary.permanent_failures,
        "retryable_failures": summary.retryable_failures,
        "oldest_unarchived_ended_at": summary.oldest_unarchived_ended_at,
        "lag_seconds": round(lag, 1),
        "failures": [
            {"id": row.id, "attempts": row.attempts, "error": row.last_error} for row in failures
        ],
        "last_passes": [asdict(p) for p in passes],
        "high_water_mark": high_water_mark,
    }
    if as_json:
        print_json(doc)
        return EXIT_OK
    counts = doc["counts"]
    print(
        "ledger: "
        + ", ".join(
            f"{counts.get(k, 0)} {k}" for k in ("archived", "pending", "in_progress", "failed")
        )
        + f"  ({human_bytes(summary.archived_bytes)} archived)"
    )
    if summary.oldest_unarchived_ended_at:
        print(
            f"backlog: oldest not archived ended "
            f"{summary.oldest_unarchived_ended_at:%Y-%m-%d %H:%M} UTC (lag {lag / 3600:.1f} h)"
        )
    if passes:
        last = passes[0]
        print(
            f"last pass: {last.finished_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{'ok' if last.ok else 'incomplete'}, {last.listed} listed, {last.enqueued} queued"
        )
        if last.error:
            print(f"  error: {redact(last.error)}")
        if not last.ok:
            good = next((p for p in passes if p.ok), None)
            when = f"{good.finished_at:%Y-%m-%d %H:%M:%S} UTC" if good else "none in the last 5"
            print(f"  last successful pass: {when}")
    if high_water_mark:
        print(f"daemon high-water mark: {high_water_mark} (days before it were listed completely)")
    if failures:
        print(
            f"failures ({summary.permanent_failures} permanent, "
            f"{summary.retryable_failures} will be retried):"
        )
        for row in failures:
            print(f"  {row.id!r}  attempts={row.attempts}  {redact(row.last_error or '')}")
    return EXIT_OK


async def verify(settings: Settings, *, deep: bool) -> int:
    from archiver.models import LedgerRow, State
    from archiver.transfer import Outcome, Result
    from archiver.verify import Problem

    async with open_services(settings, exclusive=False, api=False) as svc:
        total = (await svc.ledger.summary()).counts.get(State.ARCHIVED, 0)
        with make_progress("verifying") as progress:
            progress.enqueued(total)

            def checked(row: LedgerRow, problem: Problem | None) -> None:
                progress.transferred(row.size or 0)
                ok = problem is None
                progress.finished(Outcome(row.id, Result.ARCHIVED if ok else Result.FAILED))

            report = await verify_archive(
                svc.ledger,
                svc.storage,
                deep=deep,
                sidecars=settings.storage.sidecar,
                on_checked=checked,
            )
        await svc.ledger.append_audit(
            "verified",
            None,
            {"deep": deep, "checked": report.checked, "problems": len(report.problems)},
        )
    for problem in sorted(report.problems, key=lambda p: p.recording_id):
        print(f"PROBLEM {problem}")
    kind = "deep" if deep else "quick"
    print(
        f"verify ({kind}): {report.checked} recordings checked, "
        f"{human_bytes(report.bytes)}, {len(report.problems)} problem(s)"
    )
    return EXIT_OK if report.ok else EXIT_FAILURES


# -- compliance: delete at source, manifest, audit chain, reconcile -----------------------------


def print_purge(report: PurgeReport) -> None:
    print(f"delete at source: {report.line()}")
    for rid, why in sorted(report.kept.items())[:50]:
        print(f"  kept at source {rid}: {why}")
    for rid, error in sorted(report.failed.items())[:50]:
        print(f"  delete failed {rid}: {error}")


def _print_would_delete(report: PurgeReport) -> None:
    for rid in report.would_delete:
        print(f"would delete at source {rid}  (archived, copy verified)")
    for rid, why in sorted(report.kept.items()):
        print(f"would keep at source {rid}: {why}")


async def _dry_run_deletions(
    ledger: Ledger,
    storage: StorageBackend,
    settings: Settings,
    filters: Filters,
    would_archive: int,
) -> None:
    from archiver.purge import SourceDeleter, scope_of

    deleter = SourceDeleter(api=None, ledger=ledger, storage=storage, settings=settings)
    since, until, match = scope_of(filters)
    report = await deleter.sweep(since=since, until=until, match=match, dry_run=True)
    _print_would_delete(report)
    print(
        f"dry run: delete_after_archive is on: {len(report.would_delete)} archived recordings "
        f"would be deleted at the source, {len(report.kept)} kept; the {would_archive} to "
        "archive would each be deleted once its copy is verified"
    )


async def purge(
    settings: Settings, *, since: date | None, until: date | None, dry_run: bool
) -> int:
    """Delete at the source every archived recording (ended in the range) whose copy checks out
    and that is not deleted yet: what a backfill does at its end, on its own."""
    from archiver.errors import ConfigError
    from archiver.manifest import day_range
    from archiver.purge import SourceDeleter

    enabled = settings.source.delete_after_archive
    if not dry_run and not enabled:
        raise ConfigError(
            "source.delete_after_archive is false: set it to true to delete archived "
            "recordings at the source (--dry-run shows what would go)"
        )
    start, end = day_range(since, until)
    async with open_services(
        settings, exclusive=not dry_run, api=not dry_run, storage_ready=False
    ) as svc:
        deleter = SourceDeleter(
            api=svc.api, ledger=svc.ledger, storage=svc.storage, settings=settings
        )
        report = await deleter.sweep(since=start, until=end, dry_run=dry_run)
    if dry_run:
        _print_would_delete(report)
        print(
            f"dry run: {len(report.would_delete)} would be deleted at the source, "
            f"{len(report.kept)} kept (copy not verified)"
            + ("" if enabled else "; source.delete_after_archive is false: nothing is deleted")
        )
        return EXIT_OK
    print_purge(report)
    return EXIT_OK if report.ok else EXIT_FAILURES


async def manifest(
    settings: Settings,
    *,
    fmt: str,
    since: date | None,
    until: date | None,
    output: Path | None,
) -> int:
    """Every archived recording as JSON lines or CSV; the data on stdout, the count on stderr."""
    from archiver.errors import ConfigError
    from archiver.manifest import day_range, open_output, write_manifest
    from archiver.service import make_ledger

    start, end = day_range(since, until)
    async with make_ledger(settings, exclusive=False) as ledger:
        try:
            with open_output(output) as out:
                rows = ledger.iter_archived(since=start, until=end)
                stats = await write_manifest(rows, out, fmt)
        except OSError as exc:
            raise ConfigError(f"--output {output}: {exc.strerror or exc}") from exc
    where = f" written to {output}" if output is not None else ""
    print(
        f"manifest: {stats.recordings} recordings, {human_bytes(stats.bytes)}{where}",
        file=sys.stderr,
    )
    return EXIT_OK


async def audit_verify(settings: Settings) -> int:
    """Check the audit chain; print the head hash so an examiner can note it elsewhere (an
    entry cut off the end is only detectable against a head noted before)."""
    from archiver.audit import GENESIS, verify_chain
    from archiver.errors import LedgerError
    from archiver.ledger.base import AuditEntry
    from archiver.service import make_ledger

    head: AuditEntry | None = None
    problems: list[str] = []
    checked = 0
    async with make_ledger(settings, exclusive=False) as ledger:

        async def entries() -> AsyncIterator[AuditEntry]:
            nonlocal head
            async for entry in ledger.iter_audit():
                head = entry
                yield entry

        try:
            chain = await verify_chain(entries())
            checked, problems = chain.entries, list(chain.problems)
        except LedgerError as exc:
            after = f"after entry {head.seq}" if head is not None else "at the start"
            problems.append(f"the audit log cannot be read {after}: {exc}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"audit chain: {checked} entries checked, {len(problems)} problem(s)")
    if head is None:
        print(f"head: (empty) {GENESIS}")
    else:
        print(f"head: entry {head.seq} at {head.at.isoformat()} hash {head.hash}")
    return EXIT_OK if not problems else EXIT_FAILURES


async def audit_export(settings: Settings, *, output: Path | None) -> int:
    """Every audit entry as one JSON line, in order, as stored (hashes included)."""
    import json

    from archiver.errors import ConfigError
    from archiver.manifest import open_output
    from archiver.service import make_ledger

    count = 0
    async with make_ledger(settings, exclusive=False) as ledger:
        try:
            with open_output(output) as out:
                async for entry in ledger.iter_audit():
                    doc = {
                        "seq": entry.seq,
                        "at": entry.at.isoformat(),
                        "action": entry.action,
                        "recording_id": entry.recording_id,
                        "details": dict(entry.details),
                        "prev_hash": entry.prev_hash,
                        "hash": entry.hash,
                    }
                    out.write(json.dumps(doc, separators=(",", ":")) + "\n")
                    count += 1
        except OSError as exc:
            raise ConfigError(f"--output {output}: {exc.strerror or exc}") from exc
    print(f"audit export: {count} entries", file=sys.stderr)
    return EXIT_OK


async def reconcile(
    settings: Settings, *, since: date | None, until: date | None, as_json: bool
) -> int:
    from archiver.cli import print_json
    from archiver.reconcile import format_report
    from archiver.reconcile import reconcile as compare

    async with open_services(settings, exclusive=False, storage_ready=False) as svc:
        assert svc.api is not None
        report = await compare(
            svc.api,
            svc.ledger,
            standing=Filters.standing(settings.filters),
            since=since,
            until=until,
        )
    if as_json:
        print_json(report.to_json())
    else:
        for line in format_report(report):
            print(line)
    return EXIT_OK if report.ok else EXIT_FAILURES


async def ledger_migrate(settings: Settings) -> int:
    """Bring the ledger's schema up to date (opening it does that; this says where it is)."""
    from archiver.service import make_ledger

    async with make_ledger(settings, exclusive=False) as ledger:
        version = await ledger.migrate()
    print(f"ledger schema at version {version}")
    return EXIT_OK


async def ledger_export(settings: Settings, *, output: Path | None) -> int:
    """The whole ledger as JSON lines (``archiver.ledger.portable``), from one snapshot."""
    from archiver.ledger.portable import export_ledger
    from archiver.manifest import open_output
    from archiver.service import make_ledger

    backend = "postgres" if settings.ledger.url else "sqlite"
    async with make_ledger(settings, exclusive=False) as ledger:
        with open_output(output) as out:
            report = await export_ledger(ledger, out, backend=backend)
    # stdout may be the export itself: the summary goes to stderr.
    where = f" to {output}" if output is not None else ""
    print(f"exported {report.line()}{where}", file=sys.stderr)
    return EXIT_OK


async def ledger_import(settings: Settings, path: Path, *, force: bool) -> int:
    """Load an export into the configured ledger, then re-check its audit chain there."""
    from archiver.audit import verify_chain
    from archiver.ledger.portable import import_ledger
    from archiver.service import make_ledger

    async with make_ledger(settings, exclusive=True) as ledger:
        report = await import_ledger(ledger, path, replace=force)
        chain = await verify_chain(ledger.iter_audit())
    print(f"imported {report.line()}")
    for problem in chain.problems:
        print(f"PROBLEM audit {problem}")
    print(f"audit chain: {chain.entries} entries, {'ok' if chain.ok else 'BROKEN'}")
    return EXIT_OK if chain.ok else EXIT_FAILURES
