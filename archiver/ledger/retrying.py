"""Any ledger, retried: the one place a ledger call is tried again.

As restic wraps a backend in its retry (``internal/backend/retry``), ``RetryingLedger(inner,
policy)`` is a ``Ledger`` whose every call is ``inner``'s, tried again by the one policy
(``archiver.retry``) while it raises ``LedgerUnavailable`` (the server away, the connection
lost, a serialization failure or a deadlock). A ledger never loops on its own: it raises, this
decides. ``open_ledger`` wraps a PostgreSQL ledger, so an instance rides out a database restart.

A call is retried whole: a transaction that did not commit is simply run again. A call whose
commit went through but whose answer was lost is applied once all the same:

- a transition names its transfer (``owner``) and finds its own commit (``archiver.ledger.core``);
- ``append_audit``, ``record_pass`` and ``advance_meta`` carry a token, made here once per call
  and handed to each of its attempts, by which the ledger recognises what it wrote already;
- sightings, rejections, settings and the mark of a deletion at the source change nothing the
  second time; an operator's ``retry``, ``give_up`` or ``reopen`` then finds nothing left to change
  (and says so in its answer).

The iterators are listings in the order ``archiver.ledger.base`` documents. One cut short is
started again and what it yielded already is skipped by that order (restic's ``List`` does the
same), so nothing is yielded twice. ``export_records`` and ``import_records`` are not retried: a
stream cannot be replayed, and each is one transaction that can simply be run again.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

from archiver.ledger.base import AuditEntry, Ledger, PassRecord, Summary, Tally
from archiver.models import LedgerRow, Recording, State, StoredObject
from archiver.retry import RetryPolicy, call_with_retry

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class _Seen(Protocol[T_contra]):
    """What a listing yielded so far, told by the order it yields in."""

    def seen(self, item: T_contra) -> bool: ...

    def note(self, item: T_contra) -> None: ...


class _End(enum.Enum):
    END = enum.auto()


class _RowsSeen:
    """What a listing of rows yielded, by its order: rows with no known end first, then by
    ``ended_at``. Only the rows of the latest end time are kept by id (their order among
    themselves is the database's collation, not Python's)."""

    def __init__(self) -> None:
        self._last: tuple[bool, datetime | None] | None = None
        self._tied: set[str] = set()

    def seen(self, row: LedgerRow) -> bool:
        if self._last is None:
            return False
        here = (row.ended_at is not None, row.ended_at)
        if here == self._last:
            return row.id in self._tied
        return _before(here, self._last)

    def note(self, row: LedgerRow) -> None:
        here = (row.ended_at is not None, row.ended_at)
        if here != self._last:
            self._last, self._tied = here, set()
        self._tied.add(row.id)


def _before(a: tuple[bool, datetime | None], b: tuple[bool, datetime | None]) -> bool:
    if a[0] != b[0]:
        return not a[0]  # no known end comes first
    return a[1] is not None and b[1] is not None and a[1] < b[1]


class _AuditSeen:
    """What a listing of the audit chain yielded: entries come in ``seq`` order."""

    def __init__(self) -> None:
        self._last = 0

    def seen(self, entry: AuditEntry) -> bool:
        return entry.seq <= self._last

    def note(self, entry: AuditEntry) -> None:
        self._last = entry.seq


class _Listing(Generic[T]):
    """One listing that outlives the iterators under it: each item is fetched under the policy,
    a dead iterator is opened again and what was yielded before is skipped."""

    def __init__(self, open_items: Callable[[], AsyncIterator[T]], seen: _Seen[T]) -> None:
        self._open = open_items
        self._seen = seen
        self._items: AsyncIterator[T] | None = None

    async def next(self) -> T | Literal[_End.END]:
        """The next item not yielded before, or ``_End.END``."""
        if self._items is None:
            self._items = self._open()
        try:
            while True:
                item = await anext(self._items)
                if not self._seen.seen(item):
                    break
        except StopAsyncIteration:
            return _End.END
        except BaseException:
            await self.close()
            raise
        self._seen.note(item)
        return item

    async def close(self) -> None:
        items, self._items = self._items, None
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


class RetryingLedger:
    """``inner`` with every call retried by ``policy`` (see the module's docstring)."""

    def __init__(self, inner: Ledger, policy: RetryPolicy) -> None:
        self.inner = inner
        self.policy = policy

    def __repr__(self) -> str:
        return repr(self.inner)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retry(self.policy, f"ledger {what}", call)

    async def _list(
        self, what: str, open_items: Callable[[], AsyncIterator[T]], seen: _Seen[T]
    ) -> AsyncIterator[T]:
        listing = _Listing(open_items, seen)
        try:
            while (item := await self._call(what, listing.next)) is not _End.END:
                yield item
        finally:
            await listing.close()

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._call("open", self.inner.__aenter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    # -- WorkLedger ----------------------------------------------------------------------------
    async def observe(self, recordings: Sequence[Recording]) -> set[str]:
        return await self._call("observe", lambda: self.inner.observe(recordings))

    async def would_observe(self, recordings: Sequence[Recording]) -> set[str]:
        return await self._call("would_observe", lambda: self.inner.would_observe(recordings))

    async def claim(self, recording_id: str, *, owner: str, lease_seconds: float) -> int | None:
        return await self._call(
            "claim",
            lambda: self.inner.claim(recording_id, owner=owner, lease_seconds=lease_seconds),
        )

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool:
        return await self._call(
            "heartbeat",
            lambda: self.inner.heartbeat(recording_id, owner=owner, lease_seconds=lease_seconds),
        )

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool:
        return await self._call(
            "complete", lambda: self.inner.complete(recording_id, owner=owner, stored=stored)
        )

    async def note_upload(
        self, recording_id: str, *, owner: str, upload: Mapping[str, Any]
    ) -> bool:
        return await self._call(
            "note_upload", lambda: self.inner.note_upload(recording_id, owner=owner, upload=upload)
        )

    async def quarantine(
        self, recording_id: str, *, key: str, version_id: str | None, reason: str
    ) -> None:
        await self._call(
            "quarantine",
            lambda: self.inner.quarantine(
                recording_id, key=key, version_id=version_id, reason=reason
            ),
        )

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None:
        await self._call(
            "fail",
            lambda: self.inner.fail(recording_id, owner=owner, error=error, permanent=permanent),
        )

    async def release(self, recording_id: str, *, owner: str, note: str | None = None) -> None:
        await self._call(
            "release", lambda: self.inner.release(recording_id, owner=owner, note=note)
        )

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        await self._call(
            "reject", lambda: self.inner.reject(recording_id, reason=reason, metadata=metadata)
        )

    def iter_owed(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        return self._list(
            "iter_owed", lambda: self.inner.iter_owed(since=since, until=until), _RowsSeen()
        )

    def iter_claimable(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        return self._list(
            "iter_claimable",
            lambda: self.inner.iter_claimable(since=since, until=until),
            _RowsSeen(),
        )

    async def tally(self, recording_ids: Sequence[str]) -> Tally:
        return await self._call("tally", lambda: self.inner.tally(recording_ids))

    # -- RecordsLedger -------------------------------------------------------------------------
    async def get(self, recording_id: str) -> LedgerRow | None:
        return await self._call("get", lambda: self.inner.get(recording_id))

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        return await self._call("states", lambda: self.inner.states(recording_ids))

    async def summary(self) -> Summary:
        return await self._call("summary", self.inner.summary)

    async def failures(self, limit: int = 100) -> list[LedgerRow]:
        return await self._call("failures", lambda: self.inner.failures(limit))

    async def holds(self, limit: int = 100) -> list[LedgerRow]:
        return await self._call("holds", lambda: self.inner.holds(limit))

    async def with_quarantine(self, limit: int = 1000) -> list[LedgerRow]:
        return await self._call("with_quarantine", lambda: self.inner.with_quarantine(limit))

    def iter_archived(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        include_expired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        return self._list(
            "iter_archived",
            lambda: self.inner.iter_archived(
                since=since, until=until, include_expired=include_expired
            ),
            _RowsSeen(),
        )

    async def mark_deleted_at_source(self, recording_id: str) -> None:
        await self._call(
            "mark_deleted_at_source", lambda: self.inner.mark_deleted_at_source(recording_id)
        )

    async def retry(self, recording_ids: Sequence[str] | None = None) -> list[str]:
        return await self._call("retry", lambda: self.inner.retry(recording_ids))

    async def give_up(self, recording_id: str, *, reason: str) -> bool:
        return await self._call("give_up", lambda: self.inner.give_up(recording_id, reason=reason))

    async def reopen(self, recording_id: str, *, reason: str) -> bool:
        return await self._call("reopen", lambda: self.inner.reopen(recording_id, reason=reason))

    async def expire(
        self, recording_id: str, *, rule: str, removed: Sequence[Mapping[str, Any]]
    ) -> bool:
        return await self._call(
            "expire", lambda: self.inner.expire(recording_id, rule=rule, removed=removed)
        )

    async def hold(self, recording_id: str, *, on: bool, reason: str) -> bool:
        return await self._call("hold", lambda: self.inner.hold(recording_id, on=on, reason=reason))

    def iter_expired(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        return self._list(
            "iter_expired", lambda: self.inner.iter_expired(since=since, until=until), _RowsSeen()
        )

    async def append_audit(
        self,
        action: str,
        recording_id: str | None,
        details: Mapping[str, Any],
        *,
        token: str | None = None,
    ) -> AuditEntry:
        once = token or secrets.token_hex(8)  # one per call, the same in each of its attempts
        return await self._call(
            "append_audit",
            lambda: self.inner.append_audit(action, recording_id, details, token=once),
        )

    def iter_audit(self) -> AsyncIterator[AuditEntry]:
        return self._list("iter_audit", self.inner.iter_audit, _AuditSeen())

    async def record_pass(self, record: PassRecord, *, token: str | None = None) -> None:
        once = token or secrets.token_hex(8)
        await self._call("record_pass", lambda: self.inner.record_pass(record, token=once))

    async def last_passes(self, limit: int = 10) -> list[PassRecord]:
        return await self._call("last_passes", lambda: self.inner.last_passes(limit))

    async def get_meta(self, key: str) -> str | None:
        return await self._call("get_meta", lambda: self.inner.get_meta(key))

    async def set_meta(self, key: str, value: str) -> None:
        await self._call("set_meta", lambda: self.inner.set_meta(key, value))

    async def advance_meta(
        self, key: str, expected: str | None, new: str, *, token: str | None = None
    ) -> bool:
        once = token or secrets.token_hex(8)
        return await self._call(
            "advance_meta", lambda: self.inner.advance_meta(key, expected, new, token=once)
        )

    async def migrate(self) -> int:
        return await self._call("migrate", self.inner.migrate)

    def export_records(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        return self.inner.export_records()

    async def import_records(
        self, records: AsyncIterable[tuple[str, Mapping[str, Any]]], *, replace: bool = False
    ) -> None:
        await self.inner.import_records(records, replace=replace)
