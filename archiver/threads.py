"""Threads for blocking calls (file IO, SQLite), each call's answer handed back to its event loop.

``loop.run_in_executor`` with a ``ThreadPoolExecutor`` costs, per call, a concurrent future
chained to an asyncio one, a semaphore and a condition taken by both threads; for a 1 KB
recording that was a tenth of the time the event loop held the GIL. A ``Lane`` is a few threads
reading one queue, and each answer goes back by one ``call_soon_threadsafe``.

The same promises as an executor: a call whose await was cancelled before a thread took it
never runs; one a thread has begun runs to its end (its answer is dropped), and so do the calls
queued before ``close`` or before the interpreter exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class Lane:
    """Up to ``threads`` threads (started as calls come) taking blocking calls in the order they
    were given."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("a lane needs at least one thread")
        self._max = threads
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0  # calls queued or running, under _lock
        self._lock = threading.Lock()
        self._closed = False
        _open_lanes.add(self)

    async def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)`` on one of the lane's threads."""
        return await self.submit(fn, *args, **kwargs)

    def submit(
        self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> asyncio.Future[_T]:
        """The future of ``fn(*args, **kwargs)``, queued at once (``run`` without the await)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        call = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self._name} threads are closed")
            self._busy += 1
            if self._busy > len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            self._calls.put((loop, future, call))
        return future

    def close(self, *, wait: bool = False) -> None:
        """No more calls; the threads end once the calls queued so far have run (``wait``: this
        returns only then)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._calls.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, future, call = item
            try:
                if future.cancelled():  # nobody waits any more, and it has not begun
                    continue
                try:
                    result = call()
                except BaseException as exc:  # handed to the caller, who decides
                    _answer(loop, future, None, exc)
                else:
                    _answer(loop, future, result, None)
            finally:
                with self._lock:
                    self._busy -= 1


def _answer(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    # A closed loop has nobody left to tell.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    elif isinstance(exc, StopIteration):  # a future cannot hold one
        future.set_exception(RuntimeError(f"StopIteration raised in a thread: {exc}"))
    else:
        future.set_exception(exc)


# The threads are daemons, so that an idle lane never holds the interpreter open; at exit every
# lane still open finishes what it was given first (a commit half done would be a crash's).
_open_lanes: weakref.WeakSet[Lane] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for lane in list(_open_lanes):
        lane.close(wait=True)
