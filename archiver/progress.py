"""Progress for people: a live display on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Self

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from archiver import logs
from archiver.pipeline import Listener
from archiver.transfer import Outcome, Result

log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    """A size or a rate in decimal units (``rich.filesize``): "999 bytes", "1.5 kB", "12.3 MB"."""
    return filesize.decimal(int(n))


class _Counts(Listener):
    def __init__(self, label: str = "archiving") -> None:
        # Verifying checks copies, it archives nothing: its figures say so.
        self.verb, self.bad = (
            ("checked", "problem(s)")
            if label == "verifying"
            else (
                "archived",
                "failed",
            )
        )
        self.started = time.monotonic()
        self.enqueued_total = 0
        self.done = 0
        self.archived = 0
        self.failed = 0
        self.bytes = 0

    def enqueued(self, count: int) -> None:
        self.enqueued_total += count

    def transferred(self, nbytes: int) -> None:
        self.bytes += nbytes

    def finished(self, outcome: Outcome) -> None:
        self.done += 1
        if outcome.result is Result.ARCHIVED:
            self.archived += 1
        elif outcome.result is Result.FAILED:
            self.failed += 1

    def checked(self, nbytes: int, *, ok: bool) -> None:
        """One copy verified (``archiver verify``)."""
        self.bytes += nbytes
        self.done += 1
        if ok:
            self.archived += 1
        else:
            self.failed += 1

    def eta(self) -> str:
        """Time left at the average pace so far (the queue grows while listing goes on)."""
        remaining = self.enqueued_total - self.done
        elapsed = time.monotonic() - self.started
        if remaining <= 0 or self.done == 0:
            return ""
        seconds = int(remaining * elapsed / self.done)
        return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def rate(self) -> float:
        return self.bytes / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        return (
            f"{self.archived} {self.verb}, {self.failed} {self.bad}, "
            f"{self.enqueued_total - self.done} to go, {human_bytes(self.bytes)} "
            f"at {human_bytes(self.rate())}/s"
        )


class LiveProgress(_Counts):
    """rich's live display: recordings, bytes, rate, ETA and failures."""

    def __init__(self, console: Console, label: str = "archiving") -> None:
        super().__init__(label)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(label, total=None, detail="", eta="")

    def __enter__(self) -> Self:
        self._routing = logs.above(self._progress.console)
        self._routing.__enter__()
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._refresh()
        self._progress.stop()
        self._routing.__exit__(exc_type, exc, tb)

    def _refresh(self) -> None:
        detail = f"{human_bytes(self.bytes)} {human_bytes(self.rate())}/s"
        if self.failed:
            detail += f" [red]{self.failed} {self.bad}[/red]"
        self._progress.update(
            self._task,
            total=self.enqueued_total or None,
            completed=self.done,
            detail=detail,
            eta=self.eta(),
        )

    def enqueued(self, count: int) -> None:
        super().enqueued(count)
        self._refresh()

    def transferred(self, nbytes: int) -> None:
        super().transferred(nbytes)
        self._refresh()

    def finished(self, outcome: Outcome) -> None:
        super().finished(outcome)
        self._refresh()

    def checked(self, nbytes: int, *, ok: bool) -> None:
        super().checked(nbytes, ok=ok)
        self._refresh()


class LogProgress(_Counts):
    """Off a terminal: one progress line every ``interval`` seconds."""

    def __init__(self, interval: float = 15.0, label: str = "archiving") -> None:
        super().__init__(label)
        self._interval = interval
        self._last = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        log.info("progress: %s", self.line())

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            log.info("progress: %s", self.line())

    def transferred(self, nbytes: int) -> None:
        super().transferred(nbytes)
        self._maybe_log()

    def finished(self, outcome: Outcome) -> None:
        super().finished(outcome)
        self._maybe_log()

    def checked(self, nbytes: int, *, ok: bool) -> None:
        super().checked(nbytes, ok=ok)
        self._maybe_log()


def make_progress(label: str = "archiving") -> LiveProgress | LogProgress:
    if sys.stderr.isatty():
        return LiveProgress(Console(stderr=True), label)
    return LogProgress(label=label)
