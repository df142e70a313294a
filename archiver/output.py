"""Printing for people and for programs: one place for JSON output and a closed stdout."""

from __future__ import annotations

import json
import os
import sys
from datetime import date, datetime
from typing import Any


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def quiet_broken_pipe() -> None:
    """stdout closed by a reader that had enough (``| head``): end quietly, as ``git log`` does.
    Python would print a traceback while flushing at exit; point stdout at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
