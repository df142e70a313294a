"""A real S3 server (SeaweedFS ``weed mini``) on loopback for the tests that need one.

One server per test session (``tests/seaweedfs.py`` starts and kills it), with two shared
buckets: ``plain`` (versioned) and ``locked`` (Object Lock enabled). Tests keep apart through their
own key prefix (``s3_prefix``).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from archiver.config import S3Settings
from tests.seaweedfs import WeedError, log_tail, weed_mini

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

ACCESS_KEY = "archiver-test-key"
SECRET_KEY = "archiver-test-secret-0123456789"
REGION = "us-east-1"
START_TIMEOUT = 60.0


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
    with contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(
                weed_mini(run, access_key=ACCESS_KEY, secret_key=SECRET_KEY, timeout=START_TIMEOUT)
            )
        except WeedError as exc:
            pytest.fail(str(exc))
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
                pytest.fail(f"cannot create the test buckets: {exc}\n{log_tail(run / 'weed.log')}")
            yield server


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the shared buckets."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return f"t/{name}-{secrets.token_hex(4)}/"
