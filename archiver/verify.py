"""Re-read the archive against the ledger.

Quick: every archived row's object exists with the recorded size (and, where the backend keeps
one, the recorded SHA-256), and its sidecar exists. Deep: also re-read and re-hash every byte,
and judge the copy by the checks a download passes (``archiver.media``: it starts like a media
container, its size fits the API's ``size_mb``), so a copy an older version archived without
them is reported too. A hash only proves the bytes are the ones that were stored.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from archiver import layout, media
from archiver.errors import ArchiverError
from archiver.ledger.base import Ledger
from archiver.models import LedgerRow
from archiver.storage.base import StorageBackend

PARALLEL = 4


@dataclass(frozen=True, slots=True)
class Problem:
    recording_id: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.recording_id} ({self.key}): {self.what}"


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_archive(
    ledger: Ledger,
    storage: StorageBackend,
    *,
    deep: bool,
    sidecars: bool,
    on_checked: Callable[[LedgerRow, Problem | None], None] | None = None,
) -> VerifyReport:
    """Check every archived row; ``on_checked(row, problem)`` follows each one (progress)."""
    report = VerifyReport()
    limit = asyncio.Semaphore(PARALLEL)

    async def check(row: LedgerRow) -> None:
        try:
            async with limit:
                problem = await check_row(row, storage, deep=deep, sidecars=sidecars)
        except ArchiverError as exc:
            problem = Problem(row.id, row.storage_key, f"could not be checked: {exc}")
        report.checked += 1
        report.bytes += row.size or 0
        if problem is not None:
            report.problems.append(problem)
        if on_checked is not None:
            on_checked(row, problem)

    batch: list[LedgerRow] = []
    async for row in ledger.iter_archived():
        batch.append(row)
        if len(batch) >= 64:
            await asyncio.gather(*(check(r) for r in batch))
            batch = []
    await asyncio.gather(*(check(r) for r in batch))
    return report


async def check_row(
    row: LedgerRow, storage: StorageBackend, *, deep: bool, sidecars: bool
) -> Problem | None:
    key = row.storage_key
    if not key or row.size is None or not row.sha256:
        return Problem(row.id, key, "ledger row is archived but lacks key, size or hash")
    info = await storage.stat(key)
    if info is None:
        hidden = await storage.describe_missing(key)
        return Problem(row.id, key, "missing from the archive" + (f" ({hidden})" if hidden else ""))
    if info.size != row.size:
        return Problem(row.id, key, f"size is {info.size}, ledger says {row.size}")
    if info.sha256 is not None and info.sha256 != row.sha256:
        return Problem(row.id, key, "stored SHA-256 differs from the ledger's")
    if sidecars and await storage.stat(layout.sidecar_key(key)) is None:
        return Problem(row.id, key, "metadata sidecar is missing")
    if deep:
        hasher = hashlib.sha256()
        size = 0
        head = b""
        async for chunk in storage.read(key):
            hasher.update(chunk)
            if len(head) < media.HEAD_BYTES:
                head += chunk[: media.HEAD_BYTES - len(head)]
            size += len(chunk)
        if size != row.size:
            return Problem(row.id, key, f"read {size} bytes, ledger says {row.size}")
        if hasher.hexdigest() != row.sha256:
            return Problem(row.id, key, "content changed: SHA-256 does not match the ledger")
        size_mb = row.metadata.get("size_mb")
        wrong = media.check_copy(
            head, size, size_mb=size_mb if isinstance(size_mb, int | float) else None
        )
        if wrong is not None:
            return Problem(row.id, key, wrong)
    return None
