"""The part of every ledger that is the same for all of them: each protocol method, in terms of
a few primitives a ledger module provides in its dialect (``_carry_out`` a program of
``archiver.ledger.core`` in a transaction, read rows, read the clock).

A ledger module subclasses ``SharedLedger`` and keeps only what is its own: SQL, transactions,
schema, and (SQLite) group commit or (PostgreSQL) idempotency tokens; retries are
``archiver.ledger.retrying``'s.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from archiver.ledger import core, ops, reads
from archiver.ledger.base import OWED_STATES, Budget, Tally
from archiver.models import LedgerRow, Recording, State, StoredObject

T = TypeVar("T")

log = logging.getLogger(__name__)


class SharedLedger:
    """The rules carried out the same way by every ledger; see ``WorkLedger``/``RecordsLedger``
    for what each method promises."""

    budget: Budget

    # -- what a ledger module provides ----------------------------------------------------------
    async def _carry_out(
        self,
        what: str,
        make: Callable[[], ops.Program[T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> T:
        """Run the program ``make()`` builds in one transaction. ``grouped``: it may share a
        transaction with others issued at the same moment (group commit); ``durable=False``: its
        loss in a power cut is harmless (a sighting, a claim, a heartbeat)."""
        raise NotImplementedError

    async def _carry_out_dry(self, make: Callable[[], ops.Program[T]]) -> T:
        """Run the program reading as usual, locking and writing nothing."""
        raise NotImplementedError

    def _iter_rows(
        self, states: tuple[State, ...], since: datetime | None, until: datetime | None
    ) -> AsyncIterator[LedgerRow]:
        """Rows in ``states`` ordered by (ended_at, id), metadata included, in keyset pages;
        without bounds rows with no known end come first, a bound excludes them."""
        raise NotImplementedError

    async def _brief_rows(self, ids: list[str]) -> dict[str, LedgerRow]:
        """The rows of these ids (without metadata), unlocked."""
        raise NotImplementedError

    async def _states_of(self, ids: list[str]) -> dict[str, State]:
        """The state of each of these ids the ledger has, unlocked."""
        raise NotImplementedError

    async def _rows_where(self, where: str, order: str, limit: int) -> list[LedgerRow]:
        """Rows (metadata included) meeting ``where`` (SQL both dialects read alike), in
        ``order``, at most ``limit``; unlocked."""
        raise NotImplementedError

    async def _clock(self) -> datetime:
        """Now, on the clock leases run on."""
        raise NotImplementedError

    # -- transitions ----------------------------------------------------------------------------
    async def _transition(
        self,
        what: str,
        make: Callable[[], ops.Program[T]],
        *,
        grouped: bool = False,
        durable: bool = True,
    ) -> T:
        """``_carry_out``; at debug level each row whose state it set is logged once committed."""
        if not log.isEnabledFor(logging.DEBUG):
            return await self._carry_out(what, make, grouped=grouped, durable=durable)
        moves: list[ops.Move] = []

        def traced() -> ops.Program[T]:
            moves.clear()  # made again when a transaction is tried again
            return ops.traced(make(), moves)

        result = await self._carry_out(what, traced, grouped=grouped, durable=durable)
        for rid, before, after in moves:
            was = before.value if before is not None else "?"
            log.debug("ledger %s: %s %s -> %s", what, rid, was, after.value)
        return result

    async def observe(self, recordings: Sequence[Recording]) -> set[str]:
        if not recordings:
            return set()
        page = list(recordings)
        return await self._transition(
            "observe", lambda: core.observe(page, self.budget), durable=False
        )

    async def would_observe(self, recordings: Sequence[Recording]) -> set[str]:
        if not recordings:
            return set()
        page = list(recordings)
        return await self._carry_out_dry(lambda: core.observe(page, self.budget))

    async def claim(self, recording_id: str, *, owner: str, lease_seconds: float) -> int | None:
        return await self._transition(
            "claim",
            lambda: core.claim(
                recording_id, owner=owner, lease_seconds=lease_seconds, budget=self.budget
            ),
            grouped=True,
            durable=False,
        )

    async def heartbeat(self, recording_id: str, *, owner: str, lease_seconds: float) -> bool:
        return await self._transition(
            "heartbeat",
            lambda: core.heartbeat(recording_id, owner=owner, lease_seconds=lease_seconds),
            grouped=True,
            durable=False,
        )

    async def complete(self, recording_id: str, *, owner: str, stored: StoredObject) -> bool:
        return await self._transition(
            "complete",
            lambda: core.complete(recording_id, owner=owner, stored=stored),
            grouped=True,
        )

    async def note_upload(
        self, recording_id: str, *, owner: str, upload: Mapping[str, Any]
    ) -> bool:
        return await self._transition(
            "note_upload",
            lambda: core.note_upload(recording_id, owner=owner, upload=upload),
            grouped=True,
            durable=False,
        )

    async def quarantine(
        self, recording_id: str, *, key: str, version_id: str | None, reason: str
    ) -> None:
        await self._transition(
            "quarantine",
            lambda: core.quarantine(recording_id, key=key, version_id=version_id, reason=reason),
        )

    async def fail(self, recording_id: str, *, owner: str, error: str, permanent: bool) -> None:
        await self._transition(
            "fail",
            lambda: core.fail(
                recording_id, owner=owner, error=error, permanent=permanent, budget=self.budget
            ),
        )

    async def release(self, recording_id: str, *, owner: str, note: str | None = None) -> None:
        await self._transition(
            "release", lambda: core.release(recording_id, owner=owner, note=note)
        )

    async def reject(
        self, recording_id: str, *, reason: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        await self._transition(
            "reject", lambda: core.reject(recording_id, reason=reason, metadata=metadata)
        )

    async def mark_deleted_at_source(self, recording_id: str) -> None:
        await self._transition(
            "mark_deleted_at_source", lambda: core.mark_deleted_at_source(recording_id)
        )

    async def retry(self, recording_ids: Sequence[str] | None = None) -> list[str]:
        ids = None if recording_ids is None else list(recording_ids)
        return await self._transition("retry", lambda: core.retry(ids))

    async def give_up(self, recording_id: str, *, reason: str) -> bool:
        return await self._transition("give_up", lambda: core.give_up(recording_id, reason=reason))

    async def reopen(self, recording_id: str, *, reason: str) -> bool:
        return await self._transition("reopen", lambda: core.reopen(recording_id, reason=reason))

    async def expire(
        self, recording_id: str, *, rule: str, removed: Sequence[Mapping[str, Any]]
    ) -> bool:
        copies = [dict(copy) for copy in removed]
        return await self._transition(
            "expire", lambda: core.expire(recording_id, rule=rule, removed=copies)
        )

    async def hold(self, recording_id: str, *, on: bool, reason: str) -> bool:
        return await self._transition("hold", lambda: core.hold(recording_id, on=on, reason=reason))

    # -- reads ----------------------------------------------------------------------------------
    async def failures(self, limit: int = 100) -> list[LedgerRow]:
        return await self._rows_where("state = 'failed'", "updated_at DESC, id", limit)

    async def holds(self, limit: int = 100) -> list[LedgerRow]:
        # The partial index recordings_held has this very predicate.
        return await self._rows_where("legal_hold = TRUE", "updated_at DESC, id", limit)

    async def with_quarantine(self, limit: int = 1000) -> list[LedgerRow]:
        # The partial index recordings_quarantined has this very predicate.
        return await self._rows_where("quarantined <> '{}'", "id", limit)

    async def states(self, recording_ids: Sequence[str]) -> dict[str, State]:
        if not recording_ids:
            return {}
        return await self._states_of(list(dict.fromkeys(recording_ids)))

    async def tally(self, recording_ids: Sequence[str]) -> Tally:
        ids = list(dict.fromkeys(recording_ids))
        states = await self._states_of(ids) if ids else {}
        # Settled rows are counted by state; only the others are read in full (a backfill's
        # scope is mostly archived).
        unsettled = [rid for rid, state in states.items() if state not in core.SETTLED]
        rows = await self._brief_rows(unsettled) if unsettled else {}
        return reads.tally(ids, rows, await self._clock(), self.budget, states)

    def iter_archived(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        include_expired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        states = (State.ARCHIVED, State.EXPIRED) if include_expired else (State.ARCHIVED,)
        return self._iter_rows(states, since, until)

    def iter_expired(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        return self._iter_rows((State.EXPIRED,), since, until)

    def iter_owed(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        return self._iter_rows(tuple(sorted(OWED_STATES)), since, until)

    async def iter_claimable(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[LedgerRow]:
        now = await self._clock()
        async for row in self.iter_owed(since=since, until=until):
            if core.claimable(row, now, self.budget):
                yield row
