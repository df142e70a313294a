"""What each CLI command does, returning its exit code. Output for people goes to stdout."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from archiver.config import Settings
from archiver.errors import UnsafeValue
from archiver.layout import check_id
from archiver.pipeline import RunReport
from archiver.progress import human_bytes, make_progress
from archiver.redact import redact
from archiver.service import backfill as run_backfill
from archiver.service import install_stop_signals, make_engine, open_services
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
        return EXIT_OK if report.all_archived else EXIT_FAILURES


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
    return EXIT_OK


async def status(settings: Settings, *, as_json: bool) -> int:
    from archiver.cli import print_json

    async with open_services(settings, exclusive=False, api=False, storage_ready=False) as svc:
        summary = await svc.ledger.summary()
        failures = await svc.ledger.failures(limit=50)
        passes = await svc.ledger.last_passes(limit=5)
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
    if failures:
        print(
            f"failures ({summary.permanent_failures} permanent, "
            f"{summary.retryable_failures} will be retried):"
        )
        for row in failures:
            print(f"  {row.id!r}  attempts={row.attempts}  {redact(row.last_error or '')}")
    return EXIT_OK


async def verify(settings: Settings, *, deep: bool) -> int:
    async with open_services(settings, exclusive=False, api=False) as svc:
        with make_progress("verifying") as progress:
            report = await verify_archive(
                svc.ledger,
                svc.storage,
                deep=deep,
                sidecars=settings.storage.sidecar,
                on_checked=lambda row: progress.transferred(row.size or 0),
            )
        await svc.ledger.append_audit(
            "verified",
            None,
            {"deep": deep, "checked": report.checked, "problems": len(report.problems)},
        )
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    kind = "deep" if deep else "quick"
    print(
        f"verify ({kind}): {report.checked} recordings checked, "
        f"{human_bytes(report.bytes)}, {len(report.problems)} problem(s)"
    )
    return EXIT_OK if report.ok else EXIT_FAILURES
