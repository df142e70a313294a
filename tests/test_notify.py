"""The systemd notify protocol: the tiny client, the watchdog's health rule, and the messages the
real ``archiver run`` sends to a socket this test listens on."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from archiver.daemon import _watchdog
from archiver.health import Health
from archiver.notify import MAX_STATUS, Notifier, one_line
from archiver.simulator import Simulator
from tests.conftest import cli_env
from tests.test_daemon import Daemon, daemon_config, recent, wait_for


@contextmanager
def datagram_socket(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@asynccontextmanager
async def collecting(sock: socket.socket) -> AsyncIterator[list[str]]:
    """Every datagram that arrives while the block runs, in order."""
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        while True:
            messages.append((await loop.sock_recv(sock, 4096)).decode())

    task = asyncio.create_task(pump())
    try:
        yield messages
    finally:
        task.cancel()


def test_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with datagram_socket(str(path)) as sock:
        notifier = Notifier(env={"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.ready(status="up")
        assert notifier.status("line one\nline two")
        assert notifier.stopping()
        assert received(sock) == ["READY=1\nSTATUS=up", "STATUS=line one line two", "STOPPING=1"]


def test_abstract_socket() -> None:
    name = f"archiver-test-{secrets.token_hex(6)}"
    with datagram_socket(b"\0" + name.encode()) as sock:
        notifier = Notifier(env={"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.watchdog()
        assert received(sock) == ["WATCHDOG=1"]


def test_without_systemd_nothing_is_sent(tmp_path: Path) -> None:
    assert not Notifier(env={}).ready()
    assert not Notifier(env={"NOTIFY_SOCKET": "relative/path"}).enabled
    # A socket that went away is reported once, never raised.
    gone = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert not gone.status("x") and not gone.status("y")


def test_watchdog_interval() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "2000000"}).watchdog_interval == 1.0
    pid = str(os.getpid())
    assert Notifier(env={"WATCHDOG_USEC": "500000", "WATCHDOG_PID": pid}).watchdog_interval == 0.25
    assert Notifier(env={"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier(env={"WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier(env={}).watchdog_interval is None


def test_status_is_one_short_line() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * 1000)) == MAX_STATUS


def test_health_rule() -> None:
    now = [1000.0]
    health = Health(threshold=60, clock=lambda: now[0])
    assert health.healthy()  # the start counts as a success until the first pass ends
    now[0] += 61
    assert not health.healthy()
    health.pass_started()
    assert health.healthy()  # a long first pass that keeps working is healthy
    now[0] += 61
    assert not health.healthy()  # ...until it stops making progress
    health.succeeded()
    assert health.healthy() and health.document()["status"] == "ok"
    now[0] += 30
    health.failed("HTTP 503")
    assert health.healthy()  # one failed pass is not yet a failing daemon
    now[0] += 31
    health.failed("HTTP 503")
    doc = health.document()
    assert doc["status"] == "failing" and doc["consecutive_failures"] == 2
    assert doc["last_error"] == "HTTP 503"


async def test_watchdog_pings_only_while_healthy() -> None:
    name = f"archiver-test-{secrets.token_hex(6)}"
    now = [0.0]
    health = Health(threshold=60, clock=lambda: now[0])
    notifier = Notifier(env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "40000"})
    with datagram_socket(b"\0" + name.encode()) as sock:
        task = asyncio.create_task(_watchdog(notifier, health))
        await asyncio.sleep(0.15)
        assert received(sock).count("WATCHDOG=1") >= 3
        now[0] += 120  # no successful pass for two minutes
        await asyncio.sleep(0.05)
        received(sock)
        await asyncio.sleep(0.15)
        assert received(sock) == []
        health.succeeded()
        await asyncio.sleep(0.1)
        assert "WATCHDOG=1" in received(sock)
        task.cancel()


async def test_the_daemon_notifies_systemd(sim_factory, tmp_path):
    sim: Simulator = await sim_factory(recent(5, seed=31))
    name = f"archiver-test-{secrets.token_hex(6)}"
    env = cli_env()
    env.update(NOTIFY_SOCKET=f"@{name}", WATCHDOG_USEC="200000")
    with datagram_socket(b"\0" + name.encode()) as sock:
        async with collecting(sock) as messages:
            daemon = await Daemon.start(daemon_config(sim, tmp_path), env=env)
            try:

                def passes_and_pings() -> bool:
                    text = "\n".join(messages)
                    return "STATUS=pass 3 ok" in text and text.count("WATCHDOG=1") >= 3

                await wait_for(passes_and_pings, 15, "notify messages", daemon)
                rc, _ = await daemon.stop(signal.SIGTERM)
                await asyncio.sleep(0.05)
            finally:
                await daemon.kill()
    assert rc == 0
    ready = [i for i, m in enumerate(messages) if "READY=1" in m]
    assert len(ready) == 1
    first_status = next(i for i, m in enumerate(messages) if "STATUS=pass 1 ok" in m)
    assert ready[0] < first_status
    assert "5 listed" in messages[first_status]
    stopping = [i for i, m in enumerate(messages) if "STOPPING=1" in m]
    assert len(stopping) == 1 and stopping[0] > first_status
