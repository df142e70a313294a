"""Group commit's queue, shared by both ledgers: the transitions that arrive while one group is
being written form the next, so N workers finishing together cost one transaction.

What a group is and how it is written is the ledger's (``sqlite_file``, ``postgres_group``);
this is only the waiting: one writer task at a time, each caller answered with its own result
or error. A caller whose await is cancelled leaves its transition in the group (the change
stands); cancelling the writer cancels every caller still waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

_Item = TypeVar("_Item")


@dataclass(slots=True)
class _Waiting(Generic[_Item]):
    item: _Item
    waiter: asyncio.Future[Any]


class Groups(Generic[_Item]):
    """``write(items)`` returns each item's result, or the ``Exception`` to raise to its caller;
    an exception ``write`` raises goes to every caller of that group."""

    def __init__(self, write: Callable[[list[_Item]], Awaitable[list[Any]]]) -> None:
        self._write = write
        self._pending: list[_Waiting[_Item]] = []
        self._writer: asyncio.Task[None] | None = None

    async def join(self, item: _Item) -> Any:
        """``item`` in the next group; what ``write`` answered for it."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Waiting(item, waiter))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups())
        return await waiter

    async def _write_groups(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                results: list[Any]
                try:
                    results = await self._write([waiting.item for waiting in batch])
                except asyncio.CancelledError:
                    for waiting in batch + self._pending:
                        waiting.waiter.cancel()
                    self._pending = []
                    raise
                except Exception as exc:
                    results = [exc] * len(batch)
                for waiting, result in zip(batch, results, strict=True):
                    if waiting.waiter.done():  # its caller was cancelled; the change stands
                        continue
                    if isinstance(result, Exception):
                        waiting.waiter.set_exception(result)
                    else:
                        waiting.waiter.set_result(result)
        finally:
            self._writer = None
