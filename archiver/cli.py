"""The ``archiver`` command: parse arguments, run the command's handler, map the outcome to an
exit code. Each subcommand names its handler (``set_defaults(handler=...)``); what the commands
do is in ``archiver.commands`` and ``archiver.records``.

Exit codes (public interface; ``archiver.service`` defines them):
    0  everything asked for is archived (or verified)
    1  something is still owed (failed now or earlier, processing after the wait, held by
       another instance), or a check found problems
    2  usage, configuration or credential error: nothing was changed
    3  interrupted by SIGTERM/SIGINT before the scope was done (backfill; ``run`` exits 0)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from archiver import __version__
from archiver.config import Settings, load_settings
from archiver.errors import (
    ArchiverError,
    AuthError,
    ConfigError,
    InvalidRequest,
    LedgerError,
    PreflightError,
    UsageError,
)
from archiver.filters import Filters
from archiver.logs import setup_logging
from archiver.output import quiet_broken_pipe
from archiver.redact import redact
from archiver.service import EXIT_INTERRUPTED, EXIT_OK, EXIT_OWED, EXIT_USAGE

log = logging.getLogger("archiver")

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]

EXIT_CODES = f"""exit codes:
  {EXIT_OK}  everything asked for is archived (or verified)
  {EXIT_OWED}  something is still owed (failed, processing, held elsewhere), or problems found
  {EXIT_USAGE}  usage, configuration or credential error; nothing was changed
  {EXIT_INTERRUPTED}  backfill interrupted by SIGTERM/SIGINT before it was done (run again)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on its own; keep the message tidy
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD)") from None


# -- handlers -----------------------------------------------------------------------------------
async def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    filters = filters_from_args(args, settings)
    if args.dry_run:
        return await commands.dry_run(settings, filters)
    return await commands.backfill(settings, filters)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    def reopen_logs() -> None:
        setup_logging(
            fmt=args.log_format or settings.logging.format,
            level=args.log_level or settings.logging.level,
            file=settings.logging.file,
        )

    standing_filters(settings)  # refused before the service starts, not on its first pass
    return await commands.run(settings, once=args.once, reopen_logs=reopen_logs)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    return await commands.status(settings, as_json=args.json)


async def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    return await commands.verify(settings, deep=args.deep, repair=args.repair)


async def _retry(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    return await commands.retry(settings, ids=args.id or [], all_failed=args.all_failed)


async def _give_up(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import commands

    return await commands.give_up(settings, ids=args.id, reason=args.reason)


async def _manifest(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    _check_range(args)
    return await records.manifest(
        settings,
        fmt=args.format,
        since=args.since,
        until=args.until,
        output=args.output,
        include_expired=args.include_expired,
    )


async def _audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.audit_verify(settings)


async def _audit_export(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.audit_export(settings, output=args.output)


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    _check_range(args)
    standing_filters(settings)
    return await records.reconcile(settings, since=args.since, until=args.until, as_json=args.json)


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    _check_range(args)
    return await records.purge(settings, since=args.since, until=args.until, dry_run=args.dry_run)


async def _expire(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.expire(settings, dry_run=args.dry_run)


async def _hold(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.hold(settings, ids=args.id, release=args.release, reason=args.reason)


async def _ledger_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.ledger_migrate(settings)


async def _ledger_export(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.ledger_export(settings, output=args.output)


async def _ledger_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.ledger_rebuild(settings, deep=args.deep)


async def _ledger_import(args: argparse.Namespace, settings: Settings) -> int:
    from archiver import records

    return await records.ledger_import(settings, args.file, force=args.force)


def _check_range(args: argparse.Namespace) -> None:
    if args.since and args.until and args.since > args.until:
        raise ConfigError("--since is after --until")


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="archiver",
        description="Archive Telnyx Video Room recordings.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"archiver {__version__}")
    parser.add_argument("--config", help="TOML config (default: $ARCHIVER_CONFIG, ./archiver.toml)")
    parser.add_argument("--log-format", choices=("auto", "text", "json"), help="log line format")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="how much to log (default: logging.level of the config, info)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="in a terminal, also a line per recording above the progress display",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    commands: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(_commands=commands)

    def command(name: str, handler: Handler | None, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if handler is not None:
            p.set_defaults(handler=handler)
        commands[name] = p
        return p

    bf = command("backfill", _backfill, "archive every recording the filters match, then stop")
    bf.add_argument("--since", type=_date, help="ended on or after DATE (UTC, YYYY-MM-DD)")
    bf.add_argument("--until", type=_date, help="ended on or before DATE (inclusive)")
    bf.add_argument(
        "--dry-run",
        action="store_true",
        help="list exactly what a backfill would archive (and delete at the source, if that "
        "is on); change nothing",
    )
    _filter_flags(bf)

    rn = command(
        "run", _run, "keep the archive current: poll, archive, repeat (the systemd service)"
    )
    rn.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")

    st = command("status", _status, "what the ledger holds: owed, failures, last passes")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    vf = command("verify", _verify, "check the archive against the ledger")
    vf.add_argument("--deep", action="store_true", help="re-read and re-hash every object")
    vf.add_argument(
        "--repair",
        action="store_true",
        help="fetch every missing or damaged copy again (with --deep: hash mismatches too)",
    )

    rt = command("retry", _retry, "put failed recordings back to pending, attempts reset")
    rt.add_argument("--id", action="append", metavar="ID", help="a recording id (repeatable)")
    rt.add_argument("--all-failed", action="store_true", help="every failed recording")

    gu = command("give-up", _give_up, "stop owing recordings that will never be archived (audited)")
    gu.add_argument(
        "--id", action="append", metavar="ID", required=True, help="a recording id (repeatable)"
    )
    gu.add_argument("--reason", required=True, help="why (kept in the audit log)")

    mf = command("manifest", _manifest, "every archived recording, for an auditor")
    mf.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl")
    _range_flags(mf)
    mf.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")
    mf.add_argument(
        "--include-expired",
        action="store_true",
        help="also the recordings whose copy was deleted when their retention ended",
    )

    au = command("audit", None, "the append-only, hash-chained audit log")
    au_sub = au.add_subparsers(
        dest="audit_command", required=True, parser_class=_Parser, metavar="{verify,export}"
    )
    au_sub.add_parser("verify", help="check the hash chain and print its head hash").set_defaults(
        handler=_audit_verify
    )
    ax = au_sub.add_parser("export", help="every audit entry as JSON lines")
    ax.set_defaults(handler=_audit_export)
    ax.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")

    rc = command("reconcile", _reconcile, "the source and the archive side by side")
    _range_flags(rc)
    rc.add_argument("--json", action="store_true", help="machine-readable output")

    pg = command(
        "purge",
        _purge,
        "delete at the source what is archived and verified (by id, one by one)",
    )
    _range_flags(pg)
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted")

    ex = command(
        "expire",
        _expire,
        "delete the archived copies whose retention has ended (retention.delete_after_days)",
    )
    ex.add_argument("--dry-run", action="store_true", help="list what would be deleted")

    hd = command("hold", _hold, "set or release a legal hold: a held copy never expires")
    hd.add_argument(
        "--id", action="append", metavar="ID", required=True, help="a recording id (repeatable)"
    )
    hd.add_argument("--release", action="store_true", help="release the hold instead")
    hd.add_argument("--reason", required=True, help="why (kept in the audit log)")

    lg = command("ledger", None, "the ledger itself: schema, export, import")
    lg_sub = lg.add_subparsers(
        dest="ledger_command",
        required=True,
        parser_class=_Parser,
        metavar="{migrate,export,import,rebuild}",
    )
    lg_sub.add_parser(
        "migrate", help="bring the schema up to date (every start does it too)"
    ).set_defaults(handler=_ledger_migrate)
    lx = lg_sub.add_parser("export", help="the whole ledger as JSON lines (history included)")
    lx.set_defaults(handler=_ledger_export)
    lx.add_argument("--output", type=Path, help="write FILE (complete or not at all), not stdout")
    li = lg_sub.add_parser("import", help="load an export into the configured, empty ledger")
    li.set_defaults(handler=_ledger_import)
    li.add_argument("file", type=Path, help="a file written by 'archiver ledger export'")
    li.add_argument(
        "--force", action="store_true", help="replace whatever the ledger holds (all of it)"
    )
    lr = lg_sub.add_parser(
        "rebuild",
        help="make the configured, empty ledger from the archive (sidecars and objects)",
    )
    lr.set_defaults(handler=_ledger_rebuild)
    lr.add_argument(
        "--deep", action="store_true", help="re-hash every object instead of trusting sidecars"
    )

    demo = command("demo", None, "archive a simulated account into ./demo-archive")
    demo.add_argument("--count", type=int, default=300, help="recordings to simulate")
    demo.add_argument(
        "--dir",
        type=Path,
        default=Path("demo-archive"),
        help="where the demo's archive and ledger go (default: ./demo-archive)",
    )
    return parser


def _range_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_date, help="ended on or after DATE (UTC, YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="ended on or before DATE (inclusive)")


def _filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "filters (sent to the API, and checked again on every recording it returns)"
    )
    g.add_argument("--ended-on", type=_date, help="filter[date_ended_at][eq]")
    g.add_argument("--started-on", type=_date, help="filter[date_started_at][eq]")
    g.add_argument("--started-since", type=_date, help="filter[date_started_at][gte]")
    g.add_argument("--started-until", type=_date, help="filter[date_started_at][lte]")
    g.add_argument("--room-id", metavar="UUID", help="filter[room_id]")
    g.add_argument("--participant-id", metavar="UUID", help="filter[participant_id]")
    g.add_argument("--session-id", metavar="UUID", help="filter[session_id]")
    g.add_argument("--status", help="filter[status]: completed or processing")
    g.add_argument("--type", help="filter[type]: audio or video")
    g.add_argument(
        "--duration", type=int, metavar="SECS", help="exactly SECS long (checked locally only)"
    )
    g.add_argument(
        "--min-duration", type=int, metavar="SECS", help="filter[duration_secs] (at least SECS)"
    )
    g.add_argument(
        "--max-duration", type=int, metavar="SECS", help="at most SECS long (checked locally only)"
    )


# Each filter's command-line flag, and the config key of the standing ones.
_FLAGS = {
    "date_ended_at_gte": "--since",
    "date_ended_at_lte": "--until",
    "date_ended_at_eq": "--ended-on",
    "date_started_at_eq": "--started-on",
    "date_started_at_gte": "--started-since",
    "date_started_at_lte": "--started-until",
    "room_id": "--room-id",
    "participant_id": "--participant-id",
    "session_id": "--session-id",
    "status": "--status",
    "type": "--type",
    "duration_secs_eq": "--duration",
    "duration_secs_gte": "--min-duration",
    "duration_secs_lte": "--max-duration",
}
_CONFIG_KEYS = {
    name: f"filters.{name}"
    for name in (
        "room_id",
        "session_id",
        "participant_id",
        "type",
        "duration_secs_gte",
        "duration_secs_lte",
    )
}


def standing_filters(settings: Settings) -> Filters:
    """The config's ``[filters]``, checked as a backfill's flags are (``UsageError`` naming each
    bad key): a service or a reconcile never runs on a filter that cannot be right."""
    filters = Filters.standing(settings.filters)
    problems = filters.problems(_CONFIG_KEYS)
    if problems:
        raise UsageError(problems)
    return filters


def filters_from_args(args: argparse.Namespace, settings: Settings) -> Filters:
    """The filters of a backfill: the config's standing ones, then the flags. Every value is
    checked before any request (``UsageError`` names each bad flag or config key)."""
    given = {
        "date_ended_at_gte": args.since,
        "date_ended_at_lte": args.until,
        "date_ended_at_eq": args.ended_on,
        "date_started_at_eq": args.started_on,
        "date_started_at_gte": args.started_since,
        "date_started_at_lte": args.started_until,
        "room_id": args.room_id,
        "participant_id": args.participant_id,
        "session_id": args.session_id,
        "status": args.status,
        "type": args.type,
        "duration_secs_eq": args.duration,
        "duration_secs_gte": args.min_duration,
        "duration_secs_lte": args.max_duration,
    }
    filters = Filters.standing(settings.filters, **given)
    names = {
        name: flag if given[name] is not None else _CONFIG_KEYS.get(name, flag)
        for name, flag in _FLAGS.items()
    }
    problems = filters.problems(names)
    if problems:
        raise UsageError(problems)
    return filters


# -- running ------------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting the command's own parser speak of what it does not know (its usage,
    not the top level's)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = args._commands.get(args.command, parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "demo":
            from archiver.demo import run_demo

            # Retries are the point of the demo's faults: the summary counts them instead.
            setup_logging(
                fmt=args.log_format or "text",
                level=args.log_level or "error",
                verbose=args.verbose,
            )
            return asyncio.run(run_demo(count=args.count, directory=args.dir.resolve()))
        settings = load_settings(args.config)
        setup_logging(
            fmt=args.log_format or settings.logging.format,
            level=args.log_level or settings.logging.level,
            file=settings.logging.file,
            verbose=args.verbose,
        )
        return asyncio.run(dispatch(args, settings))
    except BrokenPipeError:
        quiet_broken_pipe()
        return EXIT_OK
    except (ConfigError, AuthError, InvalidRequest, PreflightError, LedgerError) as exc:
        print(f"archiver: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ArchiverError as exc:
        print(f"archiver: {redact(str(exc))}", file=sys.stderr)
        return EXIT_OWED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    handler: Handler = args.handler
    try:
        return await handler(args, settings)
    except BaseExceptionGroup as group:
        raise _first_meaningful(group) from group


def _first_meaningful(group: BaseExceptionGroup[Any]) -> BaseException:
    """A TaskGroup wraps the error that stopped the run; surface the one that matters."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_meaningful(exc)
        if isinstance(exc, ArchiverError):
            return exc
    return group.exceptions[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
