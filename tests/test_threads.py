"""The lane of threads behind file IO and the SQLite ledger keeps an executor's promises."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from archiver.threads import Lane


async def test_a_call_runs_on_a_lane_thread_and_its_answer_or_error_comes_back() -> None:
    lane = Lane(2, "test-lane")
    try:
        name = await lane.run(lambda: threading.current_thread().name)
        assert name.startswith("test-lane_")
        assert await lane.run(divmod, 7, 2) == (3, 1)
        assert await lane.run(int, "ff", base=16) == 255
        with pytest.raises(ZeroDivisionError):
            await lane.run(divmod, 1, 0)

        def stop() -> None:
            raise StopIteration

        with pytest.raises(RuntimeError, match="StopIteration"):
            await lane.run(stop)
    finally:
        lane.close(wait=True)


async def test_threads_start_as_calls_wait_and_never_beyond_the_bound() -> None:
    lane = Lane(3, "test-lane")
    release, entered = threading.Event(), threading.Semaphore(0)
    names: set[str] = set()
    lock = threading.Lock()

    def held() -> None:
        with lock:
            names.add(threading.current_thread().name)
        entered.release()
        release.wait()

    try:
        assert await lane.run(lambda: 1) == 1
        assert len(lane._threads) == 1  # one call at a time needs one thread
        calls = [lane.submit(held) for _ in range(6)]
        assert len(lane._threads) == 3
        for _ in range(3):  # three calls held at once, each on a thread of its own
            await asyncio.to_thread(entered.acquire)
        assert len(names) == 3
        release.set()
        await asyncio.gather(*calls)
        assert len(lane._threads) == 3
    finally:
        release.set()
        lane.close(wait=True)


async def test_a_call_cancelled_before_it_began_never_runs_and_a_begun_one_finishes() -> None:
    lane = Lane(1, "test-lane")
    began, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def first() -> None:
        began.set()
        release.wait()
        ran.append("first")

    try:
        running = lane.submit(first)
        queued = lane.submit(ran.append, "second")
        await asyncio.to_thread(began.wait)
        running.cancel()
        queued.cancel()
        release.set()
        assert await lane.run(lambda: "after") == "after"
        assert ran == ["first"]
        assert running.cancelled()
    finally:
        release.set()
        lane.close(wait=True)


async def test_close_lets_the_queued_calls_run_and_refuses_new_ones() -> None:
    lane = Lane(2, "test-lane")
    release = threading.Event()
    done: list[int] = []
    calls = [lane.submit(lambda i=i: (release.wait(), done.append(i))) for i in range(5)]
    lane.close()
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(print)
    release.set()
    await asyncio.gather(*calls)
    lane.close(wait=True)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert not any(t.is_alive() for t in lane._threads)


def test_calls_given_before_the_interpreter_exits_are_carried_out(tmp_path: Path) -> None:
    # A commit handed to a thread whose await was then dropped (a cancelled worker) must still
    # end, as with an executor, although the lane's threads are daemons.
    script = textwrap.dedent(
        f"""
        import asyncio, os, threading
        from archiver.threads import Lane

        started = threading.Event()

        def commit():
            started.set()
            for i in range(300):
                with open(os.path.join({str(tmp_path)!r}, f"f{{i}}"), "wb") as f:
                    f.write(b"x")
                    os.fsync(f.fileno())

        async def main():
            lane = Lane(1, "exit-lane")
            lane.submit(commit)
            await asyncio.to_thread(started.wait)

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert len(list(tmp_path.iterdir())) == 300
