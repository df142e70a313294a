"""The systemd notify protocol (``sd_notify(3)``), without libsystemd.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with
a leading ``@``); the service sends ``KEY=VALUE`` lines to it. archiver sends ``READY=1`` once
preflight passed, ``STATUS=`` with a one-line summary each pass, ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` while healthy, and ``STOPPING=1`` when a shutdown starts. Outside systemd
every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A STATUS= line is shown by `systemctl status`: keep it to one readable line.
MAX_STATUS = 200


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog = _watchdog_seconds(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None with no watchdog."""
        return None if self._watchdog is None else self._watchdog / 2

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False if it could not be sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise fill the log
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY="1", **({"STATUS": one_line(status)} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=one_line(text))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING="1", **({"STATUS": one_line(status)} if status else {}))


def one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_STATUS else flat[: MAX_STATUS - 1] + "…"


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # An abstract socket: a leading NUL byte in place of the @.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket", value)
    return None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, when it is meant for this process (``$WATCHDOG_PID``)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000
