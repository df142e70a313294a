"""The ``archiver`` command: parse arguments, run, map the outcome to an exit code.

Exit codes (public interface):
    0  everything asked for is archived (or verified)
    1  some recordings failed permanently or could not be archived; the rest are archived
    2  usage, configuration or credential error: nothing was changed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from archiver import __version__
from archiver.config import Settings, load_settings
from archiver.errors import (
    ArchiverError,
    AuthError,
    ConfigError,
    LedgerError,
    PreflightError,
)
from archiver.logs import setup_logging
from archiver.redact import redact
from archiver.telnyx import Filters

log = logging.getLogger("archiver")

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on its own; keep the message tidy
        self.print_usage(sys.stderr)
        print(f"archiver: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="archiver", description="Archive Telnyx Video Room recordings.")
    parser.add_argument("--version", action="version", version=f"archiver {__version__}")
    parser.add_argument("--config", help="TOML config (default: $ARCHIVER_CONFIG, ./archiver.toml)")
    parser.add_argument("--log-format", choices=("auto", "text", "json"), help="log line format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bf = sub.add_parser("backfill", help="archive every recording the filters match, then stop")
    bf.add_argument("--since", type=_date, help="ended on or after DATE (UTC, YYYY-MM-DD)")
    bf.add_argument("--until", type=_date, help="ended on or before DATE (inclusive)")
    bf.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be archived (and deleted at the source, if that is on)",
    )
    _filter_flags(bf)

    rn = sub.add_parser(
        "run", help="keep the archive current: poll, archive, repeat (the systemd service)"
    )
    rn.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")

    st = sub.add_parser("status", help="what the ledger holds: counts, failures, last passes")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    vf = sub.add_parser("verify", help="check the archive against the ledger")
    vf.add_argument("--deep", action="store_true", help="re-read and re-hash every object")

    mf = sub.add_parser("manifest", help="every archived recording, for an auditor")
    mf.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl")
    _range_flags(mf)
    mf.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")

    au = sub.add_parser("audit", help="the append-only, hash-chained audit log")
    au_sub = au.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    au_sub.add_parser("verify", help="check the hash chain and print its head hash")
    ax = au_sub.add_parser("export", help="every audit entry as JSON lines")
    ax.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")

    rc = sub.add_parser("reconcile", help="the source and the archive side by side")
    _range_flags(rc)
    rc.add_argument("--json", action="store_true", help="machine-readable output")

    pg = sub.add_parser(
        "purge", help="delete at the source what is archived and verified (by id, one by one)"
    )
    _range_flags(pg)
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted")

    lg = sub.add_parser("ledger", help="the ledger itself: schema, export, import")
    lg_sub = lg.add_subparsers(dest="ledger_command", required=True, parser_class=_Parser)
    lg_sub.add_parser("migrate", help="bring the schema up to date (every start does it too)")
    lx = lg_sub.add_parser("export", help="the whole ledger as JSON lines (history included)")
    lx.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")
    li = lg_sub.add_parser("import", help="load an export into the configured, empty ledger")
    li.add_argument("file", type=Path, help="a file written by 'archiver ledger export'")
    li.add_argument(
        "--force", action="store_true", help="replace whatever the ledger holds (all of it)"
    )

    demo = sub.add_parser("demo", help="archive a simulated account into ./demo-archive")
    demo.add_argument("--count", type=int, default=300, help="recordings to simulate")
    demo.add_argument("--dir", type=Path, default=Path("demo-archive"))
    return parser


def _range_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_date, help="ended on or after DATE (UTC, YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="ended on or before DATE (inclusive)")


def _filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (each maps to one API filter)")
    g.add_argument("--ended-on", type=_date, help="filter[date_ended_at][eq]")
    g.add_argument("--started-on", type=_date, help="filter[date_started_at][eq]")
    g.add_argument("--started-since", type=_date, help="filter[date_started_at][gte]")
    g.add_argument("--started-until", type=_date, help="filter[date_started_at][lte]")
    g.add_argument("--room-id", help="filter[room_id]")
    g.add_argument("--participant-id", help="filter[participant_id]")
    g.add_argument("--session-id", help="filter[session_id]")
    g.add_argument("--status", help="filter[status] (completed, processing)")
    g.add_argument("--type", help="filter[type] (audio, video)")
    g.add_argument("--duration", type=int, help="filter[duration_secs][eq]")
    g.add_argument("--min-duration", type=int, help="filter[duration_secs][gte]")
    g.add_argument("--max-duration", type=int, help="filter[duration_secs][lte]")


def filters_from_args(args: argparse.Namespace, settings: Settings) -> Filters:
    if args.since and args.until and args.since > args.until:
        raise ConfigError("--since is after --until")
    return Filters.standing(
        settings.filters,
        date_ended_at_gte=args.since,
        date_ended_at_lte=args.until,
        date_ended_at_eq=args.ended_on,
        date_started_at_eq=args.started_on,
        date_started_at_gte=args.started_since,
        date_started_at_lte=args.started_until,
        room_id=args.room_id,
        participant_id=args.participant_id,
        session_id=args.session_id,
        status=args.status,
        type=args.type,
        duration_secs_eq=args.duration,
        duration_secs_gte=args.min_duration,
        duration_secs_lte=args.max_duration,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from archiver.demo import run_demo

            # Retries are the point of the demo's faults: the summary counts them instead.
            setup_logging(fmt=args.log_format or "text", level=args.log_level or "error")
            return asyncio.run(run_demo(count=args.count, directory=args.dir.resolve()))
        settings = load_settings(args.config)
        setup_logging(
            fmt=args.log_format or settings.logging.format,
            level=args.log_level or settings.logging.level,
            file=settings.logging.file,
        )
        return asyncio.run(dispatch(args, settings))
    except (ConfigError, AuthError, PreflightError, LedgerError) as exc:
        print(f"archiver: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ArchiverError as exc:
        print(f"archiver: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        return EXIT_FAILURES


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    try:
        if args.command == "backfill":
            filters = filters_from_args(args, settings)
            if args.dry_run:
                return await commands.dry_run(settings, filters)
            return await commands.backfill(settings, filters)
        if args.command == "run":

            def reopen_logs() -> None:
                setup_logging(
                    fmt=args.log_format or settings.logging.format,
                    level=args.log_level or settings.logging.level,
                    file=settings.logging.file,
                )

            return await commands.run(settings, once=args.once, reopen_logs=reopen_logs)
        if args.command == "status":
            return await commands.status(settings, as_json=args.json)
        if args.command == "verify":
            return await commands.verify(settings, deep=args.deep)
        if args.command in ("manifest", "reconcile", "purge") and (
            args.since and args.until and args.since > args.until
        ):
            raise ConfigError("--since is after --until")
        if args.command == "manifest":
            return await commands.manifest(
                settings, fmt=args.format, since=args.since, until=args.until, output=args.output
            )
        if args.command == "audit" and args.audit_command == "verify":
            return await commands.audit_verify(settings)
        if args.command == "audit" and args.audit_command == "export":
            return await commands.audit_export(settings, output=args.output)
        if args.command == "ledger":
            if args.ledger_command == "migrate":
                return await commands.ledger_migrate(settings)
            if args.ledger_command == "export":
                return await commands.ledger_export(settings, output=args.output)
            return await commands.ledger_import(settings, args.file, force=args.force)
        if args.command == "reconcile":
            return await commands.reconcile(
                settings, since=args.since, until=args.until, as_json=args.json
            )
        if args.command == "purge":
            return await commands.purge(
                settings, since=args.since, until=args.until, dry_run=args.dry_run
            )
    except BaseExceptionGroup as group:
        raise _first_meaningful(group) from group
    raise ConfigError(f"unknown command {args.command!r}")


def _first_meaningful(group: BaseExceptionGroup[Any]) -> BaseException:
    """A TaskGroup wraps the error that stopped the run; surface the one that matters."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_meaningful(exc)
        if isinstance(exc, ArchiverError):
            return exc
    return group.exceptions[0]


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
