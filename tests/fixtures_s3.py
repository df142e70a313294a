"""Real S3 servers on loopback for the tests that need one: SeaweedFS ``weed mini`` and moto's
server, two dialects of S3.

SeaweedFS is the evidence for checksums and retention: it refuses a wrong checksum (BadDigest) and
enforces COMPLIANCE retention as AWS does. moto is a second dialect, as a user's store may be: a
multipart object's composite checksum comes back without its ``-N``, CompleteMultipartUpload
returns none, a multipart upload's Object Lock parameters are ignored until set on the object,
every unfinished upload claims to have started in 2010, and wrong checksums are accepted.

One server of each per test session (started on first use), each with two shared buckets:
``plain`` (versioned) and ``locked`` (Object Lock enabled), both with the lifecycle rule the README
recommends. Tests keep apart through their own key prefix (``s3_prefix``). ``s3_server`` is
SeaweedFS; ``any_s3`` runs a test once on each server.
"""

from __future__ import annotations

import contextlib
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
from archiver.storage.s3.preflight import LIFECYCLE_RULE
from tests.seaweedfs import WeedError, log_tail, weed_mini

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

ACCESS_KEY = "archiver-test-key"
SECRET_KEY = "archiver-test-secret-0123456789"
REGION = "us-east-1"
START_TIMEOUT = 60.0
SERVERS = ("seaweedfs", "moto")


@dataclass(frozen=True, slots=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str  # versioned, no Object Lock
    locked_bucket: str  # Object Lock enabled (so versioned too)
    region: str = REGION
    name: str = "seaweedfs"

    @property
    def verifies(self) -> bool:
        """Whether the server checks the checksums it is sent and enforces retention as AWS
        does (SeaweedFS); moto accepts wrong checksums and shortened retention."""
        return self.name == "seaweedfs"

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
                s3={"addressing_style": "path"},
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


def _create_buckets(server: S3Server, deadline: float) -> None:
    client = server.client()
    rules = {"Rules": [LIFECYCLE_RULE]}
    steps = [
        lambda: client.create_bucket(Bucket=server.bucket),
        lambda: client.put_bucket_versioning(
            Bucket=server.bucket, VersioningConfiguration={"Status": "Enabled"}
        ),
        lambda: client.create_bucket(Bucket=server.locked_bucket, ObjectLockEnabledForBucket=True),
        lambda: client.put_bucket_lifecycle_configuration(
            Bucket=server.bucket, LifecycleConfiguration=rules
        ),
        lambda: client.put_bucket_lifecycle_configuration(
            Bucket=server.locked_bucket, LifecycleConfiguration=rules
        ),
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
def aws_env() -> Iterator[None]:
    """boto3's standard chain finds these, as it would in production."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory, aws_env: None) -> Iterator[S3Server]:
    run = tmp_path_factory.mktemp("weed")
    deadline = time.monotonic() + START_TIMEOUT
    with contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(
                weed_mini(run, access_key=ACCESS_KEY, secret_key=SECRET_KEY, timeout=START_TIMEOUT)
            )
        except WeedError as exc:
            pytest.fail(str(exc))
        server = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, "plain", "locked", name="seaweedfs")
        try:
            _create_buckets(server, deadline)
        except Exception as exc:
            pytest.fail(f"cannot create the test buckets: {exc}\n{log_tail(run / 'weed.log')}")
        yield server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any answer: the server is up
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory, aws_env: None) -> Iterator[S3Server]:
    """moto's server (``moto[server]``) in its own process, on a free loopback port."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.fail(
            f"moto_server is not installed next to {sys.executable} (pip install -e .[dev])"
        )
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(f"{endpoint}/moto-api/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start:\n{log_tail(log)}")
            time.sleep(0.1)
        server = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, "plain", "locked", name="moto")
        _create_buckets(server, deadline)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(seaweedfs_server: S3Server) -> S3Server:
    """SeaweedFS: the server that proves checksums and retention."""
    return seaweedfs_server


@pytest.fixture(params=SERVERS)
def any_s3(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 dialect in turn: SeaweedFS, then moto."""
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the shared buckets."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return f"t/{name}-{secrets.token_hex(4)}/"
