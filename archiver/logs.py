"""Logging: one line per event, text for people, JSON for journald and log shippers.

Every record passes through ``archiver.redact`` on its way out, exceptions included, so the API
key and presigned-URL signatures never reach a log whatever code logged them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path
from typing import Any, TextIO, cast

from rich.console import Console
from rich.logging import RichHandler

from archiver.redact import redact

# Fields a record may carry in ``extra=`` that belong in the structured output.
EVENT_FIELDS = (
    "recording_id",
    "room_id",
    "bytes",
    "duration",
    "attempt",
    "key",
    "permanent",
    "pass_number",
)


class RedactingFormatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self._json = json_lines

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        fields = {k: getattr(record, k) for k in EVENT_FIELDS if hasattr(record, k)}
        error = redact(self.formatException(record.exc_info)) if record.exc_info else None
        if self._json:
            doc: dict[str, Any] = {
                "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
                **fields,
            }
            if error:
                doc["error"] = error
            return json.dumps(doc, default=str)
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        tail = " ".join(f"{k}={v}" for k, v in fields.items() if k != "recording_id")
        line = f"{stamp} {record.levelname:<7} {message}" + (f"  {tail}" if tail else "")
        return line + (f"\n{error}" if error else "")


class PrivateFileHandler(logging.FileHandler):
    """A FileHandler whose file, when it creates one, is 0600 (less the umask): log lines carry
    recording and room ids. An existing file keeps the mode it has (logrotate's ``create``, say)."""

    def _open(self) -> TextIOWrapper:
        stream = open(  # noqa: SIM115 - the handler owns the stream and closes it
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=_open_private,
        )
        return cast(TextIOWrapper, stream)


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


_handler: logging.Handler | None = None
_verbose = False


def setup_logging(
    *,
    fmt: str = "auto",
    level: str = "info",
    file: Path | None = None,
    stream: TextIO | None = None,
    verbose: bool = False,
) -> None:
    """Configure the root logger; calling again replaces the handler (SIGHUP reopens the file).

    ``auto`` is JSON under systemd's journal (``$JOURNAL_STREAM``), text elsewhere. ``verbose``:
    while a live display runs in a terminal, per-recording lines are shown too (``above``).
    """
    global _handler, _verbose
    _verbose = verbose
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and "JOURNAL_STREAM" in os.environ)
    handler: logging.Handler
    if file is not None:
        handler = PrivateFileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(json_lines=use_json))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries' own chatter stays at warning.
    for noisy in ("aiohttp.access", "botocore", "boto3", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _handler = handler


@contextlib.contextmanager
def above(console: Console) -> Iterator[None]:
    """While a live display holds the terminal, log lines go through its console, printed
    above the display instead of through it; only warnings and errors unless ``verbose`` (a
    line per recording would scroll the display away). A log file is left as it is."""
    global _handler
    current = _handler
    if current is None or isinstance(current, logging.FileHandler):
        yield
        return
    live = RichHandler(
        console=console,
        show_time=False,
        show_level=False,
        show_path=False,
        markup=False,
        rich_tracebacks=False,
    )
    live.setFormatter(RedactingFormatter(json_lines=False))
    live.setLevel(logging.NOTSET if _verbose else logging.WARNING)
    root = logging.getLogger()
    root.removeHandler(current)
    root.addHandler(live)
    _handler = live
    try:
        yield
    finally:
        root.removeHandler(live)
        root.addHandler(current)
        _handler = current
