"""The commands over the records an archive keeps: delete at the source, the manifest, the audit
chain, reconcile against the source, and the ledger's migrate, export, rebuild and import. Each
returns its exit code (``archiver.service`` defines them)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from datetime import date
from pathlib import Path

from archiver.commands import print_purge, print_would_delete, reading
from archiver.config import Settings
from archiver.errors import ConfigError
from archiver.filters import Filters
from archiver.ledger.base import Ledger
from archiver.output import print_json
from archiver.progress import human_bytes
from archiver.purge import SourceDeleter
from archiver.service import EXIT_OK, EXIT_OWED, make_ledger, open_services


async def purge(
    settings: Settings, *, since: date | None, until: date | None, dry_run: bool
) -> int:
    """Delete at the source every archived recording (ended in the range) whose copy checks out
    and that is not deleted yet: what a backfill does at its end, on its own."""
    from archiver.manifest import day_range

    enabled = settings.source.delete_after_archive
    if not dry_run and not enabled:
        raise ConfigError(
            "source.delete_after_archive is false: set it to true to delete archived "
            "recordings at the source (--dry-run shows what would go)"
        )
    start, end = day_range(since, until)
    async with open_services(
        settings, exclusive=not dry_run, api=not dry_run, storage_ready=False, must_exist=True
    ) as svc:
        deleter = SourceDeleter(
            api=svc.api, ledger=svc.ledger, storage=svc.storage, settings=settings
        )
        report = await deleter.sweep(since=start, until=end, dry_run=dry_run)
    if dry_run:
        print_would_delete(report)
        print(
            f"dry run: {len(report.would_delete)} would be deleted at the source, "
            f"{len(report.kept)} kept (copy not verified)"
            + ("" if enabled else "; source.delete_after_archive is false: nothing is deleted")
        )
        return EXIT_OK
    print_purge(report)
    return EXIT_OK if report.ok else EXIT_OWED


async def manifest(
    settings: Settings,
    *,
    fmt: str,
    since: date | None,
    until: date | None,
    output: Path | None,
    include_expired: bool = False,
) -> int:
    """Every archived recording as JSON lines or CSV; the data on stdout, the count on stderr.
    ``include_expired``: the rows whose copy expired too (their ``state`` says so)."""
    from archiver.manifest import day_range, open_output, write_manifest

    start, end = day_range(since, until)
    async with reading(settings) as svc:
        try:
            with open_output(output) as out:
                rows = svc.ledger.iter_archived(
                    since=start, until=end, include_expired=include_expired
                )
                stats = await write_manifest(rows, out, fmt, svc.storage.locate)
        except BrokenPipeError:
            raise
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

    head: AuditEntry | None = None
    problems: list[str] = []
    checked = 0
    async with reading(settings) as svc:

        async def entries() -> AsyncIterator[AuditEntry]:
            nonlocal head
            async for entry in svc.ledger.iter_audit():
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
    return EXIT_OK if not problems else EXIT_OWED


async def audit_export(settings: Settings, *, output: Path | None) -> int:
    """Every audit entry as one JSON line, in order, as stored (hashes included)."""
    import json

    from archiver.manifest import open_output

    count = 0
    async with make_ledger(settings, exclusive=False, must_exist=True) as ledger:
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
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise ConfigError(f"--output {output}: {exc.strerror or exc}") from exc
    print(f"audit export: {count} entries", file=sys.stderr)
    return EXIT_OK


async def reconcile(
    settings: Settings, *, since: date | None, until: date | None, as_json: bool
) -> int:
    from archiver.reconcile import format_report
    from archiver.reconcile import reconcile as compare

    async with open_services(
        settings, exclusive=False, storage_ready=False, must_exist=True
    ) as svc:
        assert svc.api is not None
        report = await compare(
            svc.api,
            svc.ledger,
            svc.storage,
            standing=Filters.standing(settings.filters),
            since=since,
            until=until,
        )
    if as_json:
        print_json(report.to_json())
    else:
        for line in format_report(report):
            print(line)
    return EXIT_OK if report.ok else EXIT_OWED


async def ledger_migrate(settings: Settings) -> int:
    """Bring the ledger's schema up to date (opening does that; this says where it is)."""
    async with make_ledger(settings, exclusive=False) as ledger:
        version = await ledger.migrate()
    print(f"ledger schema at version {version}")
    return EXIT_OK


async def ledger_export(settings: Settings, *, output: Path | None) -> int:
    """The whole ledger as JSON lines (``archiver.ledger.portable``), from one snapshot."""
    from archiver.ledger.portable import export_ledger
    from archiver.manifest import open_output

    backend = "postgres" if settings.ledger.url else "sqlite"
    async with make_ledger(settings, exclusive=False, must_exist=True) as ledger:
        with open_output(output) as out:
            report = await export_ledger(ledger, out, backend=backend)
    # stdout may be the export itself: the summary goes to stderr.
    where = f" to {output}" if output is not None else ""
    print(f"exported {report.line()}{where}", file=sys.stderr)
    return EXIT_OK


async def ledger_rebuild(settings: Settings, *, deep: bool) -> int:
    """Make a new ledger from what the archive holds (``archiver.identity.rebuild``)."""
    from archiver.identity import rebuild
    from archiver.service import ledger_files_of

    async with open_services(
        settings, exclusive=True, api=False, storage_ready=False, check_identity=False
    ) as svc:
        report = await rebuild(svc.ledger, svc.storage, deep=deep, ignore=ledger_files_of(settings))
    print(f"ledger rebuild: {report.line()}; ledger id {report.ledger_id}")
    for key, why in sorted(report.skipped.items())[:50]:
        print(f"  skipped {key}: {why}")
    print(
        "the rebuilt rows are archived copies only: run `archiver backfill` to find what the "
        "source still has that the archive lacks, and `archiver verify --deep` to check them"
    )
    return EXIT_OK


async def ledger_import(settings: Settings, path: Path, *, force: bool) -> int:
    """Load an export into the configured ledger, then re-check its audit chain there."""
    from archiver.audit import verify_chain
    from archiver.ledger.portable import import_ledger

    ledger: Ledger
    async with make_ledger(settings, exclusive=True) as ledger:
        report = await import_ledger(ledger, path, replace=force)
        chain = await verify_chain(ledger.iter_audit())
    print(f"imported {report.line()}")
    for problem in chain.problems:
        print(f"PROBLEM audit {problem}")
    print(f"audit chain: {chain.entries} entries, {'ok' if chain.ok else 'BROKEN'}")
    return EXIT_OK if chain.ok else EXIT_OWED


async def expire(settings: Settings, *, dry_run: bool) -> int:
    """Delete the archived copies past ``retention.delete_after_days`` (``archiver.expire``)."""
    from archiver.expire import Expirer

    days = settings.retention.delete_after_days
    if days is None:
        raise ConfigError(
            "retention.delete_after_days is not set: copies are kept for ever unless it says "
            "after how many days from a recording's end they must be deleted"
        )
    async with open_services(
        settings, exclusive=not dry_run, api=False, storage_ready=not dry_run, must_exist=True
    ) as svc:
        report = await Expirer(svc.ledger, svc.storage, days=days).sweep(dry_run=dry_run)
    for rid in report.would_expire:
        print(f"would delete the copy of {rid}: its retention has ended")
    for rid in report.expired:
        print(f"expired {rid}: its copy is deleted")
    for rid, why in sorted(report.kept.items()):
        print(f"kept {rid}: {why}")
    for rid, error in sorted(report.failed.items()):
        print(f"FAILED {rid}: {error}")
    print(("dry run: " if dry_run else "expire: ") + report.line())
    return EXIT_OK if report.ok else EXIT_OWED


async def hold(settings: Settings, *, ids: Sequence[str], release: bool, reason: str) -> int:
    """Set or release a legal hold: the ledger's flag (audited), and on an Object Lock bucket
    the hold of every stored version of the copy (sidecar and quarantined copies included). A
    hold is set in the ledger first and released there last, so an expiry sweep in between
    keeps the copy. Every id is checked before anything changes."""
    from archiver.expire import keys_of

    if not reason.strip():
        raise ConfigError("hold: --reason is required (it goes into the audit log)")
    on = not release
    async with open_services(
        settings, exclusive=False, api=False, storage_ready=False, must_exist=True
    ) as svc:
        rows = {rid: await svc.ledger.get(rid) for rid in dict.fromkeys(ids)}
        unknown = [rid for rid, row in rows.items() if row is None]
        if unknown:
            raise ConfigError(f"hold: the ledger has no recording {unknown[0][:80]!r}")
        for rid, row in rows.items():
            assert row is not None
            keys = keys_of(row)
            if on:
                was = await svc.ledger.hold(rid, on=True, reason=reason)
                versions = await svc.storage.set_legal_hold(keys, True)
            else:
                versions = await svc.storage.set_legal_hold(keys, False)
                was = await svc.ledger.hold(rid, on=False, reason=reason)
            state = (
                ("held" if was else "already held") if on else ("released" if was else "not held")
            )
            where = f"; {versions} object version(s) in storage" if versions else ""
            print(f"{state} {rid}{where}")
    return EXIT_OK
