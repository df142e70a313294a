"""What a ledger program asks of its ledger, and how a ledger carries one out.

A program (``archiver.ledger.core``) is a generator: it yields requests (``Load`` a row, the
``Clock``; ``Insert``, ``Update``, ``Audit`` to write) and is sent each answer. A ledger answers
them inside one transaction of its own: ``run_sync`` on SQLite's thread, ``run_async`` for
PostgreSQL. ``traced`` notes the state changes a program makes, for the debug log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from archiver.models import State

T = TypeVar("T")


# -- what a program asks of its ledger ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Clock:
    """→ the transaction's current time (PostgreSQL: the database's clock)."""


@dataclass(frozen=True, slots=True)
class Load:
    """→ the row (without metadata), locked until the transaction ends, or None."""

    id: str


@dataclass(frozen=True, slots=True)
class LoadStates:
    """→ {id: state} of the ids the ledger has; unlocked (cheap: what a no-op pass needs)."""

    ids: Sequence[str]


@dataclass(frozen=True, slots=True)
class LoadMany:
    """→ {id: row} (without metadata) of the ids the ledger has, locked in id order."""

    ids: Sequence[str]


@dataclass(frozen=True, slots=True)
class LoadState:
    """→ every row in ``state`` (without metadata), locked."""

    state: State


@dataclass(frozen=True, slots=True)
class Insert:
    """→ how many of ``rows`` were inserted (an id that exists meanwhile is left alone)."""

    rows: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Update:
    """Set columns of existing rows: (id, {column: value}) each."""

    changes: Sequence[tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class Audit:
    """→ the ``AuditEntry`` appended to the chain (see ``chain_entry``); None in a PostgreSQL
    group, which chains its entries at the end (no program reads the answer)."""

    action: str
    recording_id: str | None
    details: Mapping[str, Any]


Op = Clock | Load | LoadStates | LoadMany | LoadState | Insert | Update | Audit
Program = Generator[Op, Any, T]


def run_sync(program: Program[T], answer: Callable[[Op], Any]) -> T:
    """Carry out ``program`` with a synchronous ``answer`` to each of its requests."""
    try:
        request = next(program)
        while True:
            request = program.send(answer(request))
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        program.close()


async def run_async(program: Program[T], answer: Callable[[Op], Awaitable[Any]]) -> T:
    """Carry out ``program`` with an asynchronous ``answer`` to each of its requests."""
    try:
        request = next(program)
        while True:
            request = program.send(await answer(request))
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        program.close()


Move = tuple[str, State | None, State]


def traced(program: Program[T], moves: list[Move]) -> Program[T]:
    """``program`` as it is, noting in ``moves`` each row whose state it sets: (id, the state it
    was loaded in or None, the new state). For the debug log: a ledger traces only then."""
    known: dict[str, State] = {}
    answer: Any = None
    try:
        while True:
            request = program.send(answer)
            answer = yield request
            if isinstance(request, Load) and answer is not None:
                known[request.id] = answer.state
            elif isinstance(request, LoadStates):
                known.update(answer)
            elif isinstance(request, LoadMany):
                known.update({rid: row.state for rid, row in answer.items()})
            elif isinstance(request, LoadState):
                known.update({row.id: row.state for row in answer})
            elif isinstance(request, Update):
                for rid, values in request.changes:
                    if "state" in values:
                        moves.append((rid, known.get(rid), State(values["state"])))
    except StopIteration as done:
        result: T = done.value
        return result
