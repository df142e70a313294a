"""What each CLI command does, returning its exit code (``archiver.service`` defines them).
Output for people goes to stdout; data a program reads (``--json``, manifests) too, with
summaries on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from archiver.config import Settings
from archiver.errors import ConfigError
from archiver.filters import Filters
from archiver.ledger.base import OWED_STATES, Ledger, PassRecord, Tally
from archiver.lister import Lister, downloadable
from archiver.models import LedgerRow, Recording, State
from archiver.output import print_json
from archiver.pipeline import Work, sweep_ledger
from archiver.progress import human_bytes, make_progress
from archiver.purge import PurgeReport, SourceDeleter
from archiver.redact import redact
from archiver.scope import Scope, describe_owed
from archiver.service import (
    EXIT_OK,
    EXIT_OWED,
    BackfillResult,
    Services,
    install_stop_signals,
    make_engine,
    make_ledger,
    open_services,
)
from archiver.service import backfill as run_backfill
from archiver.sources import RECORDINGS
from archiver.verify import verify_archive

log = logging.getLogger(__name__)


# -- backfill and run ---------------------------------------------------------------------------
async def backfill(settings: Settings, filters: Filters) -> int:
    """Exit 0 only when every recording in the scope is archived (ledger), 1 while any is owed,
    3 when a signal stopped it before the scope was done."""
    async with open_services(settings, exclusive=True) as services:
        with make_progress("archiving") as progress:
            engine = make_engine(services, [progress])
            uninstall = install_stop_signals(engine)
            try:
                result = await run_backfill(services, filters, engine)
            finally:
                uninstall()
        print_backfill(result)
        if services.deleter is not None:
            print_purge(services.deleter.report)
    return result.exit_code


def print_backfill(result: BackfillResult) -> None:
    tally = result.tally
    print(
        f"{result.archived} archived ({human_bytes(result.bytes)}) by this run in "
        f"{result.passes} pass(es); in scope: {result.scope_size} recordings, "
        f"{tally.archived} archived, {tally.owed} still owed"
        + (f", {tally.given_up} given up" if tally.given_up else "")
    )
    if result.rejected:
        print(
            f"  {result.rejected} listing entries were rejected as they stand (hostile ids, "
            "unusable URLs, malformed entries): owed, among the failed for good below"
        )
    for line in describe_owed(tally):
        print(line)
    if result.storage_full:
        print("stopped: the archive is full; free space and run again (nothing was lost)")
    elif result.stopped and not result.all_archived:
        print(f"interrupted before the end: {tally.owed} still owed; run again to continue")


async def run(
    settings: Settings, *, once: bool = False, reopen_logs: Callable[[], None] | None = None
) -> int:
    """The daemon (``archiver.daemon``): exit 0 after a graceful stop on SIGTERM/SIGINT. With
    ``once``: one pass, exit 0 only if it listed without error and the ledger owes nothing."""
    from archiver.daemon import run_daemon

    engine, polling = await run_daemon(settings, once=once, reopen_logs=reopen_logs)
    if engine.storage_full:
        print("stopped: the archive is full; free space and start again (nothing was lost)")
        return EXIT_OWED
    if once:
        last = polling.last
        ok = last is not None and last.ok and last.owed == 0
        return EXIT_OK if ok else EXIT_OWED
    return EXIT_OK


# -- dry run ------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _existing_or_empty(settings: Settings) -> AsyncIterator[Settings]:
    """A dry run reads the ledger but never creates one: with no SQLite file yet, it reads an
    empty ledger in a temporary directory instead."""
    path = settings.ledger.path
    if settings.ledger.url is not None or path.exists():
        yield settings
        return
    import dataclasses

    with tempfile.TemporaryDirectory(prefix="archiver-dry-run-") as tmp:
        empty = dataclasses.replace(settings.ledger, path=Path(tmp) / "empty.db")
        yield dataclasses.replace(settings, ledger=empty)


async def dry_run(settings: Settings, filters: Filters) -> int:
    """Exactly what a backfill with ``filters`` would queue, by the same lister and ledger
    rules, with nothing written: listed until no page shift is suspected, then the owed rows of
    the scope the listing did not bring."""
    async with (
        _existing_or_empty(settings) as readable,
        open_services(readable, exclusive=False, storage_ready=False) as services,
    ):
        assert services.api is not None
        would: dict[str, Recording] = {}

        async def collect(rec: Recording) -> None:
            would[rec.id] = rec

        stop = asyncio.Event()
        in_flight: set[str] = set()
        lister = Lister(
            source=services.api,
            ledger=services.ledger,
            enqueue=collect,
            in_flight=in_flight,
            stop=stop,
            dry_run=True,
        )
        seen: set[str] = set()
        processing = rejected = 0
        for _ in range(1 + settings.backfill.max_passes):
            stats = await lister.list_pass(filters)
            seen |= stats.seen
            processing, rejected = stats.processing, stats.rejected
            if not stats.shift_suspected:
                break
        listed = len(would)
        scope = Scope.of(filters)
        await sweep_ledger(
            services.ledger, scope, exclude=seen, in_flight=in_flight, enqueue=collect, stop=stop
        )
        for rec in sorted(
            would.values(), key=lambda r: (r.ended_at or datetime.min.replace(tzinfo=UTC), r.id)
        ):
            where = "" if downloadable(rec) or rec.id not in seen else " (processing)"
            print(f"would archive {rec.id}  room={rec.room_id}  ended={rec.ended_at}{where}")
        tally = await services.ledger.tally(list(seen))
        print(
            f"dry run: {len(would)} would be archived ({len(would) - listed} owed by the ledger "
            f"without being listed), {tally.archived} already archived, {processing} still "
            f"processing, {rejected} rejected entries, {len(tally.needs_action)} failed for good "
            "(archiver retry)"
        )
        if settings.source.delete_after_archive:
            await _dry_run_deletions(services, scope, len(would))
    return EXIT_OK


# -- status -------------------------------------------------------------------------------------
async def quarantined_copies(ledger: Ledger) -> list[dict[str, Any]]:
    """Every stored copy kept in quarantine (it failed its checks and storage would not remove
    it: Object Lock), oldest first, with its recording's id: from the rows that keep one (an
    index finds them)."""
    copies: list[dict[str, Any]] = []
    for row in await ledger.with_quarantine(limit=100_000):
        for copy in row.quarantined.get("copies", []):
            copies.append({"id": row.id, **copy})
    return sorted(copies, key=lambda c: str(c.get("at")))


def print_quarantined(copies: list[dict[str, Any]], *, tag: str = "  ") -> None:
    for copy in copies:
        version = f", version {copy['version_id']}" if copy.get("version_id") else ""
        print(
            f"{tag}{copy['id']} ({copy.get('key')}{version}, since {copy.get('at')}): "
            f"{redact(str(copy.get('reason')))[:300]}"
        )


def reading(settings: Settings) -> contextlib.AbstractAsyncContextManager[Services]:
    """Ledger and archive for a read-only command: nothing is created or written in the
    archive, a missing ledger is an error, and the ledger must be the archive's."""
    return open_services(settings, exclusive=False, api=False, storage_ready=False, must_exist=True)


async def status(settings: Settings, *, as_json: bool) -> int:
    async with reading(settings) as svc:
        ledger = svc.ledger
        summary = await ledger.summary()
        failures = await ledger.failures(limit=50)
        passes = await ledger.last_passes(limit=50)
        high_water_mark = await ledger.get_meta("daemon.high_water_mark")
        owed_ids = [row.id async for row in ledger.iter_owed()]
        tally = await ledger.tally(owed_ids)
        quarantined = await quarantined_copies(ledger)
        holds = await ledger.holds(limit=1000)
    run = last_run(passes)
    passes = passes[:5]
    now = datetime.now(UTC)
    oldest = summary.oldest_unarchived_ended_at
    lag = (now - oldest).total_seconds() if oldest else 0.0
    doc: dict[str, Any] = {
        "counts": {state.value: n for state, n in summary.counts.items()},
        "owed": summary.owed,
        "needs_action": len(tally.needs_action),
        "archived_bytes": summary.archived_bytes,
        "permanent_failures": summary.permanent_failures,
        "retryable_failures": summary.retryable_failures,
        "oldest_unarchived_ended_at": oldest,
        "lag_seconds": round(lag, 1),
        "owed_by_reason": {
            "needs_action": dict(tally.needs_action),
            "retrying": dict(tally.retrying),
            "processing": dict(tally.processing),
            "pending": dict(tally.pending),
            "in_progress": dict(tally.in_progress),
        },
        "failures": [
            {
                "id": row.id,
                "attempts": row.attempts,
                "for_good": row.permanent,
                "error": row.last_error,
            }
            for row in failures
        ],
        "last_run": run,
        "last_passes": [asdict(p) for p in passes],
        "high_water_mark": high_water_mark,
        # Copies that failed their checks and stay in storage (locked): an examiner sees them.
        "quarantined": quarantined,
        "by_source": {
            source: {
                "counts": {state.value: n for state, n in counts.items()},
                "archived_bytes": summary.archived_bytes_by_source.get(source, 0),
            }
            for source, counts in summary.by_source.items()
        },
        "legal_holds": [row.id for row in holds],
        "retention_delete_after_days": settings.retention.delete_after_days,
    }
    if as_json:
        print_json(doc)
        return EXIT_OK
    counts = doc["counts"]
    print(
        "ledger: "
        + ", ".join(
            f"{counts.get(k, 0)} {k}"
            for k in ("archived", "pending", "in_progress", "failed", "given_up")
        )
        + (f", {counts['expired']} expired" if counts.get("expired") else "")
        + f"  ({human_bytes(summary.archived_bytes)} archived)"
    )
    # Per source once there is more than recordings to tell apart.
    if set(summary.by_source) - {RECORDINGS} or len(settings.sources.enabled()) > 1:
        for source, of_source in sorted(summary.by_source.items()):
            print(
                f"  {source}: {of_source.get(State.ARCHIVED, 0)} archived "
                f"({human_bytes(summary.archived_bytes_by_source.get(source, 0))}), "
                f"{sum(n for s, n in of_source.items() if s in OWED_STATES)} owed"
                + (f", {of_source[State.EXPIRED]} expired" if of_source.get(State.EXPIRED) else "")
            )
    if summary.owed:
        print(f"owed: {summary.owed} recording(s) not archived yet")
        for line in describe_owed(tally):
            print(line)
    else:
        print("owed: nothing; every recording the ledger has seen is archived (or given up)")
    if oldest:
        print(
            f"backlog: oldest owed recording ended {oldest:%Y-%m-%d %H:%M} UTC "
            f"(lag {lag / 3600:.1f} h)"
        )
    if run:
        print(
            f"last run: {run['kind']}, {run['started_at']:%Y-%m-%d %H:%M:%S} to "
            f"{run['finished_at']:%H:%M:%S} UTC ({run['seconds']:.1f} s), {run['passes']} "
            f"pass(es): {run['archived']} archived ({human_bytes(run['bytes'])}), "
            f"{run['failed']} failed{'' if run['ok'] else '; it did not finish'}"
        )
    if passes:
        last = passes[0]
        print(
            f"last pass: {last.finished_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{'ok' if last.ok else 'incomplete'}, {last.listed} listed, {last.enqueued} queued, "
            f"{last.archived} archived, {last.failed} failed"
        )
        if last.error:
            print(f"  error: {redact(last.error)[:300]}")
        if not last.ok:
            good = next((p for p in passes if p.ok), None)
            when = f"{good.finished_at:%Y-%m-%d %H:%M:%S} UTC" if good else "none in the last 5"
            print(f"  last successful pass: {when}")
    if high_water_mark:
        print(
            f"daemon high-water mark: {high_water_mark} (every recording that ended before it "
            "is archived, or owed and known to the ledger)"
        )
    if quarantined:
        print(
            f"quarantined: {len(quarantined)} stored cop{'y' if len(quarantined) == 1 else 'ies'} "
            "failed its checks and stays in storage under Object Lock (not the archived copy; "
            "the recording was stored again):"
        )
        print_quarantined(quarantined)
    days = settings.retention.delete_after_days
    if days is not None:
        print(
            f"retention: copies are deleted {days} days after their recording ended "
            f"(archiver expire; {counts.get('expired', 0)} expired so far)"
        )
    if holds:
        print(f"legal holds: {len(holds)} recording(s); their copies never expire while held:")
        for row in holds[:50]:
            print(f"  held {row.id}  key={row.storage_key}")
    return EXIT_OK


def last_run(passes: Sequence[PassRecord]) -> dict[str, Any] | None:
    """The newest run as a whole: the passes (newest first) that one process made in a row.
    One pass of a backfill is rarely the story (its last is the no-op that confirms it)."""
    if not passes:
        return None
    instance = passes[0].instance
    run: list[PassRecord] = []
    for record in passes:
        if record.instance != instance:
            break
        run.append(record)
    first, last = run[-1], run[0]
    return {
        "instance": instance,
        "kind": str(last.extra.get("kind", "pass")),
        "started_at": first.started_at,
        "finished_at": last.finished_at,
        "seconds": round((last.finished_at - first.started_at).total_seconds(), 3),
        "passes": len(run),
        "archived": sum(r.archived for r in run),
        "failed": sum(r.failed for r in run),
        "bytes": sum(int(r.extra.get("bytes", 0) or 0) for r in run),
        "ok": all(r.ok for r in run),
    }


# -- operator commands --------------------------------------------------------------------------
async def retry(settings: Settings, *, ids: Sequence[str], all_failed: bool) -> int:
    if not ids and not all_failed:
        raise ConfigError("retry: name recordings with --id ID (repeatable), or --all-failed")
    async with make_ledger(settings, exclusive=False, must_exist=True) as ledger:
        changed = await ledger.retry(None if all_failed else list(ids))
    for rid in changed:
        print(f"retry {rid}: pending again, attempts reset")
    for rid in sorted(set(ids) - set(changed)):
        print(f"not retried {rid[:80]}: the ledger has it in no failed state")
    print(
        f"{len(changed)} recording(s) handed back; the next backfill or daemon pass archives them"
    )
    return EXIT_OK if changed or all_failed else EXIT_OWED


async def give_up(settings: Settings, *, ids: Sequence[str], reason: str) -> int:
    if not reason.strip():
        raise ConfigError("give-up: --reason is required (it goes into the audit log)")
    gave_up: list[str] = []
    async with make_ledger(settings, exclusive=False, must_exist=True) as ledger:
        for rid in ids:
            if await ledger.give_up(rid, reason=reason):
                gave_up.append(rid)
                print(f"given up {rid}: no longer owed ({reason})")
            else:
                print(f"not changed {rid[:80]}: it is not owed (archived or given up already)")
    return EXIT_OK if len(gave_up) == len(ids) else EXIT_OWED


# -- verify and repair --------------------------------------------------------------------------
async def verify(settings: Settings, *, deep: bool, repair: bool = False) -> int:
    """Check every archived copy; with ``repair``, fetch every missing or damaged one again.
    Read-only without ``repair``: it never writes to the archive (an auditor's read-only mount)."""
    from archiver.verify import Problem

    opened = open_services(settings, exclusive=True) if repair else reading(settings)
    async with opened as svc:
        total = (await svc.ledger.summary()).counts.get(State.ARCHIVED, 0)
        with make_progress("verifying") as progress:
            progress.enqueued(total)

            by_source: Counter[str] = Counter()

            def checked(row: LedgerRow, problem: Problem | None) -> None:
                by_source[row.source] += 1
                progress.checked(row.size or 0, ok=problem is None)

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
        # Known and recorded, so no problem of the archive; listed for whoever examines it.
        quarantined = await quarantined_copies(svc.ledger)
        print_quarantined(quarantined, tag="QUARANTINED ")
        kind = "deep" if deep else "quick"
        if len(by_source) > 1:
            print("checked: " + ", ".join(f"{n} {src}" for src, n in sorted(by_source.items())))
        print(
            f"verify ({kind}): {report.checked} recordings checked, "
            f"{human_bytes(report.bytes)}, {len(report.problems)} problem(s)"
            + (f", {len(quarantined)} copies in quarantine" if quarantined else "")
        )
        if not repair or report.ok:
            return EXIT_OK if report.ok else EXIT_OWED
        return await _repair(svc, [(p.recording_id, p.what) for p in report.problems])


async def _repair(svc: Services, problems: list[tuple[str, str]]) -> int:
    """Fetch every listed copy again: owed once more (audited), then archived by the engine
    with a fresh URL, or reported lost when the source no longer has it."""
    from archiver.expire import retention_ended

    days = svc.settings.retention.delete_after_days
    now = datetime.now(UTC)
    due: set[str] = set()
    for rid in sorted({rid for rid, _ in problems}):
        row = await svc.ledger.get(rid)
        if row is not None and retention_ended(row, days, now):
            # Its copy must go now: fetching it again would keep what the rule says to delete.
            due.add(rid)
            print(f"  not repaired {rid}: its retention has ended; `archiver expire` deletes it")
    problems = [(rid, what) for rid, what in problems if rid not in due]
    ids = sorted({rid for rid, _ in problems})
    for rid, what in problems:
        await svc.ledger.reopen(rid, reason=what)
    wanted = set(ids)
    scope = Scope(None, None, lambda row: row.id in wanted)
    if not ids:
        return EXIT_OWED  # the damaged copies stay until `archiver expire` deletes them
    with make_progress("repairing") as progress:
        engine = make_engine(svc, [progress])

        async def produce(work: Work) -> None:
            await work.sweep(scope, exclude=set())
            await work.drain()

        uninstall = install_stop_signals(engine)
        try:
            await engine.run(produce)
        finally:
            uninstall()
    tally = await svc.ledger.tally(ids)
    print(f"repair: {tally.archived} of {len(ids)} copies fetched again and verified")
    _print_lost(tally)
    return EXIT_OK if tally.owed == 0 and not due else EXIT_OWED


def _print_lost(tally: Tally) -> None:
    for rid, why in sorted(tally.needs_action.items()):
        print(f"  LOST {rid}: the archived copy is damaged and it cannot be fetched again: {why}")
    for group in (tally.retrying, tally.pending, tally.processing, tally.in_progress):
        for rid, why in sorted(group.items()):
            print(f"  not repaired yet {rid}: {why} (owed; the next run tries again)")


# -- compliance: delete at source, manifest, audit chain, reconcile -----------------------------
def print_purge(report: PurgeReport) -> None:
    print(f"delete at source: {report.line()}")
    for rid, why in sorted(report.kept.items())[:50]:
        print(f"  kept at source {rid}: {why}")
    for rid, error in sorted(report.failed.items())[:50]:
        print(f"  delete failed {rid}: {error}")


def print_would_delete(report: PurgeReport) -> None:
    for rid in report.would_delete:
        print(f"would delete at source {rid}  (archived, copy verified)")
    for rid, why in sorted(report.kept.items()):
        print(f"would keep at source {rid}: {why}")


async def _dry_run_deletions(services: Services, scope: Scope, would_archive: int) -> None:
    deleter = SourceDeleter(
        api=None, ledger=services.ledger, storage=services.storage, settings=services.settings
    )
    report = await deleter.sweep(
        since=scope.since, until=scope.until, match=scope.match, dry_run=True
    )
    print_would_delete(report)
    print(
        f"dry run: delete_after_archive is on: {len(report.would_delete)} archived recordings "
        f"would be deleted at the source, {len(report.kept)} kept; the {would_archive} to "
        "archive would each be deleted once its copy is verified"
    )
