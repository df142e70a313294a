"""S3Storage against real S3 servers: what the shared suite cannot see.

Multipart uploads that leave nothing behind, composite checksums, Object Lock, preflight sentences
(and the lifecycle warning), encryption, storage class, memory and the event loop. Tests taking
``any_s3`` run on both dialects (SeaweedFS, then moto's server); those taking ``s3_server`` need
SeaweedFS's AWS-like checks. Unit tests of the pure parts (request parameters, settings, error
translation) come first. Damaged bytes and answers: ``test_s3_integrity``; crashes and resumes:
``test_s3_resume``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from archiver.config import S3Settings
from archiver.errors import (
    ConfigError,
    IntegrityError,
    NetworkError,
    PreflightError,
    ServerError,
    StorageError,
    TransientError,
    TruncatedBody,
)
from archiver.storage import CommitRequest
from archiver.storage.s3 import S3Storage
from archiver.storage.s3.errors import Missing, NoBucket, Refused, translate
from archiver.storage.s3.preflight import LIFECYCLE_RULE, aborts_unfinished_uploads
from archiver.storage.s3.settings import check_settings, object_args, retain_until
from tests.fixtures_s3 import S3Server, s3_settings

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL_PARTS = {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request_for(data: bytes, **kw: Any) -> CommitRequest:
    return CommitRequest(
        sha256=sha(data),
        size=len(data),
        content_type="video/mp4",
        metadata={"sha256": sha(data), "recording-id": "6b61621f-0000-4000-8000-000000000001"},
        **kw,
    )


@asynccontextmanager
async def open_s3(
    server: S3Server, prefix: str, *, locked: bool = False, **kw: Any
) -> AsyncIterator[S3Storage]:
    async with S3Storage(s3_settings(server, prefix, locked=locked, **kw)) as storage:
        yield storage


async def store(storage: S3Storage, key: str, data: bytes, **kw: Any):  # type: ignore[no-untyped-def]
    async with await storage.begin(key) as upload:
        for start in range(0, len(data), MiB):
            await upload.write(data[start : start + MiB])
        return await upload.commit(request_for(data, **kw))


def leftovers(server: S3Server, bucket: str, prefix: str) -> dict[str, list[str]]:
    """Every version, delete marker and unfinished multipart upload under ``prefix``."""
    client = server.client()
    versions = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return {
        "versions": [v["Key"] for v in versions.get("Versions", [])],
        "markers": [m["Key"] for m in versions.get("DeleteMarkers", [])],
        "uploads": [u["Key"] for u in uploads.get("Uploads", [])],
    }


NOTHING: dict[str, list[str]] = {"versions": [], "markers": [], "uploads": []}


async def wait_for(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - polls an attribute another task changes
        await asyncio.sleep(0.001)


def close_to(actual: datetime | None, expected: datetime, seconds: float = 5) -> bool:
    return actual is not None and abs((actual - expected).total_seconds()) <= seconds


# -- pure parts --------------------------------------------------------------------------------


def test_object_args_kms_tags_and_class() -> None:
    settings = S3Settings(
        bucket="b",
        storage_class="GLACIER_IR",
        sse="aws:kms",
        kms_key_id="arn:aws:kms:eu-west-1:111122223333:key/abcd",
        tags={"team": "voice ops", "env": "prod&eu"},
    )
    assert object_args(settings) == {
        "StorageClass": "GLACIER_IR",
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "arn:aws:kms:eu-west-1:111122223333:key/abcd",
        "Tagging": "team=voice%20ops&env=prod%26eu",
    }
    assert object_args(S3Settings(bucket="b", sse="aws:kms")) == {"ServerSideEncryption": "aws:kms"}
    assert object_args(S3Settings(bucket="b", sse="AES256")) == {"ServerSideEncryption": "AES256"}
    assert object_args(S3Settings(bucket="b")) == {}


def test_object_args_lock() -> None:
    settings = S3Settings(
        bucket="b", object_lock_mode="COMPLIANCE", retention_days=30, legal_hold=True
    )
    now = datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    ended = datetime(2025, 3, 5, 8, 0, 0, tzinfo=UTC)
    args = object_args(settings, retain_from=ended, now=now)
    assert args == {
        "ObjectLockMode": "COMPLIANCE",
        "ObjectLockRetainUntilDate": ended + timedelta(days=30),
        "ObjectLockLegalHoldStatus": "ON",
    }
    # An end in the past counts from now, rounded up to a second (S3 keeps whole seconds).
    past = object_args(settings, retain_from=now - timedelta(days=9), now=now)
    assert past["ObjectLockRetainUntilDate"] == datetime(2025, 3, 31, 12, 0, 1, tzinfo=UTC)
    assert "ObjectLockMode" not in object_args(settings, now=now, lock=False)
    assert retain_until(S3Settings(bucket="b"), ended, now) is None


def test_bad_settings_are_all_reported() -> None:
    bad = S3Settings(
        bucket="",
        prefix="../escape",
        part_size=MiB,
        multipart_threshold=0,
        object_lock_mode="compliance",
        sse="aws:kms:dsse",
        kms_key_id="k",
        tags={f"t{i}": "v" for i in range(9)},
    )
    problems = check_settings(bad)
    for key in ("bucket", "prefix", "part_size", "multipart_threshold", "object_lock_mode"):
        assert any(p.startswith(f"storage.s3.{key}:") for p in problems), key
    for key in ("retention_days", "sse", "kms_key_id", "tags"):
        assert any(p.startswith(f"storage.s3.{key}:") for p in problems), key
    with pytest.raises(ConfigError, match="problems"):
        S3Storage(bad)
    assert check_settings(S3Settings(bucket="b", legal_hold=True)) == [
        "storage.s3.legal_hold: needs object_lock_mode (a bucket with Object Lock)"
    ]


def client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # Bytes changed on the way (archiver sends the checksum of the bytes it sends): retried.
        (client_error("BadDigest", 400), NetworkError),
        (client_error("XAmzContentSHA256Mismatch", 400), NetworkError),
        (client_error("IncompleteBody", 400), TruncatedBody),
        (client_error("InvalidDigest", 400), IntegrityError),
        (client_error("SlowDown", 503), ServerError),
        (client_error("InternalError", 500), ServerError),
        (client_error("RequestTimeout", 400), ServerError),
        (client_error("AccessDenied", 403, "Access Denied"), Refused),
        (client_error("NoSuchBucket", 404), NoBucket),
        (client_error("NoSuchKey", 404), Missing),
        (client_error("NoSuchUpload", 404), Missing),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), NetworkError),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), NetworkError),
        (NoCredentialsError(), StorageError),
    ],
)
def test_translate(exc: Exception, kind: type[Exception]) -> None:
    translated = translate(exc, "write k.mp4")
    assert type(translated) is kind
    assert str(translated).startswith("cannot write k.mp4: ")
    transient = (ServerError, NetworkError, TruncatedBody)
    assert isinstance(translated, TransientError) == (kind in transient)
    assert isinstance(translated, StorageError) == (
        kind in (StorageError, Refused, NoBucket, Missing)
    )


# -- the real server -------------------------------------------------------------------------


async def test_single_put_round_trip(any_s3: S3Server, s3_prefix: str) -> None:
    data = os.urandom(3 * MiB + 7)
    async with open_s3(any_s3, s3_prefix) as storage:
        stored = await store(storage, "rooms/r/rec.mp4", data)
        info = await storage.stat("rooms/r/rec.mp4")
        back = b"".join([chunk async for chunk in storage.read("rooms/r/rec.mp4")])
    assert (stored.size, stored.sha256) == (len(data), sha(data))
    assert info is not None and info.sha256 == sha(data) and info.version_id == stored.version_id
    assert back == data
    head = any_s3.client().head_object(
        Bucket=any_s3.bucket, Key=f"{s3_prefix}rooms/r/rec.mp4", ChecksumMode="ENABLED"
    )
    assert head["Metadata"] == {
        "sha256": sha(data),
        "recording-id": "6b61621f-0000-4000-8000-000000000001",
    }
    assert head["ContentType"] == "video/mp4"
    assert "-" not in head["ChecksumSHA256"]  # one PutObject, checked whole by the server


async def test_bodies_signed_by_their_checksum_header(any_s3: S3Server, s3_prefix: str) -> None:
    """Over plain HTTP botocore would hash each body once more to sign it: parts and single PUTs,
    which carry their SHA-256 in a signed header S3 checks, are not; other bodies still are."""
    payloads: dict[str, set[bytes]] = {}

    def seen(request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        payloads.setdefault(operation, set()).add(request.headers["X-Amz-Content-SHA256"])

    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        storage.client.meta.events.register("before-send.s3", seen)
        await store(storage, "big/rec.mp4", os.urandom(11 * MiB))
        await store(storage, "small/rec.mp4", os.urandom(MiB))
    unsigned = {b"UNSIGNED-PAYLOAD"}  # prepared headers are bytes
    assert payloads["UploadPart"] == unsigned and payloads["PutObject"] == unsigned
    assert payloads["CompleteMultipartUpload"] != unsigned


async def test_custom_endpoint_needs_no_aws_endpoint_table(
    any_s3: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS's table of its hosts (about 7 MB once parsed) is not loaded for a store at an
    endpoint of its own with its region given."""
    import botocore.loaders

    from archiver.storage.s3 import backend

    loaded: list[str] = []
    loader = botocore.loaders.create_loader()
    original = loader.load_data_with_path

    def load(name: str) -> Any:
        loaded.append(name)
        return original(name)

    monkeypatch.setattr(loader, "load_data_with_path", load)
    monkeypatch.setattr(backend, "_loader", loader)
    async with open_s3(any_s3, s3_prefix) as storage:
        await store(storage, "rec.mp4", os.urandom(1000))
    assert loaded and "endpoints" not in loaded


@pytest.mark.timeout(30)  # the old, serial way would wait here for ever: part 1 never lands
async def test_the_next_part_fills_while_one_goes_up(
    any_s3: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 1 is held in its thread until the writes that fill most of part 2 have returned:
    they do not wait for it. The part after waits (two part buffers at most), and the object is
    whole."""
    data = os.urandom(12 * MiB + 5)
    filled = threading.Event()
    landed: list[int] = []
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        send = storage.api.upload_part

        def upload_part(key: str, upload_id: str, number: int, part: Any, digest: bytes) -> str:
            if number == 1:
                filled.wait()
            etag = send(key, upload_id, number, part, digest)
            landed.append(number)
            return etag

        monkeypatch.setattr(storage.api, "upload_part", upload_part)
        async with await storage.begin("rec.mp4") as upload:
            # Part 1 goes up with the sixth chunk; chunks 6-9 fill part 2 meanwhile.
            for start in range(0, 9 * MiB, MiB):
                await upload.write(data[start : start + MiB])
            assert landed == []
            filled.set()
            for start in range(9 * MiB, len(data), MiB):
                await upload.write(data[start : start + MiB])
            stored = await upload.commit(request_for(data))
    assert landed == [1, 2, 3] and stored.sha256 == sha(data)
    assert (
        any_s3.client().get_object(Bucket=any_s3.bucket, Key=f"{s3_prefix}rec.mp4")["Body"].read()
        == data
    )


async def test_a_part_that_failed_going_up_is_sent_again_by_the_retried_write(
    any_s3: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 1 fails in the background: the write that needs its buffer raises, having taken
    nothing; the same write again sends part 1 first, and the object is whole."""
    data = os.urandom(12 * MiB + 5)
    failures = [NetworkError("connection reset")]
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        send = storage.api.upload_part

        def upload_part(key: str, upload_id: str, number: int, part: Any, digest: bytes) -> str:
            if number == 1 and failures:
                raise failures.pop()
            return send(key, upload_id, number, part, digest)

        monkeypatch.setattr(storage.api, "upload_part", upload_part)
        async with await storage.begin("rec.mp4") as upload:
            chunks = [data[start : start + MiB] for start in range(0, len(data), MiB)]
            raised = 0
            for chunk in chunks:
                try:
                    await upload.write(chunk)
                except NetworkError:
                    raised += 1
                    assert upload.offset == 9 * MiB  # chunks 6-9 filled part 2 meanwhile
                    await upload.write(chunk)
            stored = await upload.commit(request_for(data))
    assert raised == 1 and stored.sha256 == sha(data)


async def test_multipart_round_trip(any_s3: S3Server, s3_prefix: str) -> None:
    data = os.urandom(20 * MiB + 123)
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        stored = await store(storage, "big/rec.mp4", data)
        info = await storage.stat("big/rec.mp4")
        back = b"".join([chunk async for chunk in storage.read("big/rec.mp4")])
    assert (stored.size, stored.sha256) == (len(data), sha(data))
    assert info is not None and info.sha256 == sha(data) and info.size == len(data)
    assert back == data
    client = any_s3.client()
    key = f"{s3_prefix}big/rec.mp4"
    head = client.head_object(Bucket=any_s3.bucket, Key=key, ChecksumMode="ENABLED")
    # The composite checksum: the SHA-256 of the five parts' SHA-256s (each part checked), with
    # "-5" (AWS, SeaweedFS) or without it (moto).
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    composite = base64.b64encode(
        hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    ).decode()
    assert head["ChecksumSHA256"] in (f"{composite}-5", composite)
    if any_s3.verifies:
        assert head["ChecksumSHA256"] == f"{composite}-5"
    assert head["ContentType"] == "video/mp4"  # from the key: S3 wants it when the upload starts
    tags = {
        t["Key"]: t["Value"]
        for t in client.get_object_tagging(Bucket=any_s3.bucket, Key=key)["TagSet"]
    }
    assert tags == {"sha256": sha(data), "recording-id": "6b61621f-0000-4000-8000-000000000001"}
    assert leftovers(any_s3, any_s3.bucket, s3_prefix)["uploads"] == []


async def test_a_wrong_sha256_is_refused_before_anything_is_sent(
    any_s3: S3Server, s3_prefix: str
) -> None:
    """The caller's SHA-256 is checked against the bytes here, so that a SHA-256 S3 refuses
    (BadDigest, retried: ``test_s3_integrity``) can only mean bytes changed on the way."""
    data = b"the real bytes" * 1000
    async with open_s3(any_s3, s3_prefix) as storage:
        upload = await storage.begin("bad.mp4")
        await upload.write(data)
        with pytest.raises(IntegrityError, match="SHA-256 of the bytes written"):
            await upload.commit(CommitRequest(sha256=sha(b"other"), size=len(data)))
        assert await storage.stat("bad.mp4") is None
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


@pytest.mark.parametrize("wrong", ["sha256", "size"])
async def test_wrong_checksum_of_a_multipart_upload(
    any_s3: S3Server, s3_prefix: str, wrong: str
) -> None:
    data = os.urandom(11 * MiB)
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        upload = await storage.begin("bad.mp4")
        for start in range(0, len(data), MiB):
            await upload.write(data[start : start + MiB])
        assert leftovers(any_s3, any_s3.bucket, s3_prefix)["uploads"] == [f"{s3_prefix}bad.mp4"]
        if wrong == "sha256":
            request, match = CommitRequest(sha256=sha(b"other"), size=len(data)), "SHA-256 of"
        else:
            request, match = CommitRequest(sha256=sha(data), size=len(data) + 1), "bytes written"
        with pytest.raises(IntegrityError, match=match):
            await upload.commit(request)
        # The failed commit aborted the upload at once.
        assert leftovers(any_s3, any_s3.bucket, s3_prefix)["uploads"] == []
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


async def test_cancelled_write_leaves_nothing(any_s3: S3Server, s3_prefix: str) -> None:
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        upload = await storage.begin("cancel.mp4")
        chunk = os.urandom(MiB)

        async def writer() -> None:
            for _ in range(40):
                await upload.write(chunk)

        task = asyncio.create_task(writer())
        await wait_for(lambda: upload.offset >= 12 * MiB)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with pytest.raises(StorageError, match=r"interrupted|aborted"):
            await upload.write(chunk)
        await upload.abort()
        assert await storage.stat("cancel.mp4") is None
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


async def test_cancelled_task_aborts_on_the_way_out(any_s3: S3Server, s3_prefix: str) -> None:
    """``async with`` in a task that is cancelled: the abort runs although the task is cancelled."""
    started = asyncio.Event()
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:

        async def transfer() -> None:
            async with await storage.begin("cancel.mp4") as upload:
                for _ in range(40):
                    await upload.write(os.urandom(MiB))
                    if upload.offset > 11 * MiB:
                        started.set()

        task = asyncio.create_task(transfer())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Closing the storage waited for the abort's thread.
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


async def test_abandoned_upload_is_cleaned_up(any_s3: S3Server, s3_prefix: str) -> None:
    async with open_s3(any_s3, s3_prefix, **SMALL_PARTS) as storage:
        upload = await storage.begin("crashed.mp4")
        for _ in range(11):
            await upload.write(b"c" * MiB)
        # The last full part goes up while the next fills: let it land, as a killed process's
        # last part had (an abort racing a part still going up: a 500 from moto).
        await upload._settle()
        del upload  # neither committed nor aborted, as if the process had been killed
        assert len(leftovers(any_s3, any_s3.bucket, s3_prefix)["uploads"]) == 1
        assert await storage.cleanup_stale(3600) == 0
        assert await storage.cleanup_stale(0) == 1
        assert await storage.cleanup_stale(0) == 0
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


KILLED = """
import asyncio, json, os, signal, sys
from archiver.config import S3Settings
from archiver.storage.s3 import S3Storage

async def main():
    async with S3Storage(S3Settings(**json.loads(sys.argv[1]))) as storage:
        upload = await storage.begin("killed.mp4")
        for _ in range(12):
            await upload.write(b"k" * (1 << 20))
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}


async def test_killed_process_upload_is_aborted_by_the_next_run(
    any_s3: S3Server, s3_prefix: str
) -> None:
    settings = s3_settings(any_s3, s3_prefix, **SMALL_PARTS)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED,
        json.dumps(asdict(settings)),
        env=child_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert leftovers(any_s3, any_s3.bucket, s3_prefix)["uploads"] == [f"{s3_prefix}killed.mp4"]
    async with S3Storage(settings) as storage:
        assert await storage.cleanup_stale(3600) == 0  # too young for the start-up limit
        await asyncio.sleep(1.2)
        assert await storage.cleanup_stale(1) == 1
        assert await storage.stat("killed.mp4") is None
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


async def test_object_lock_compliance(any_s3: S3Server, s3_prefix: str) -> None:
    lock = {"object_lock_mode": "COMPLIANCE", "retention_days": 30, "legal_hold": True}
    async with open_s3(any_s3, s3_prefix, locked=True, **lock, **SMALL_PARTS) as storage:
        assert storage.capabilities.object_lock
        await storage.preflight()
        # Ended long ago: retained from now. Ended "later" (a clock ahead): from its end.
        now = datetime.now(UTC)
        old = await store(storage, "old.mp4", b"o" * 1000, retain_from=now - timedelta(days=5))
        ahead = now + timedelta(days=3)
        big = await store(storage, "big.mp4", os.urandom(12 * MiB), retain_from=ahead)
        sidecar = await storage.put_bytes(
            "big.mp4.json", b"{}", content_type="application/json", retain_from=ahead
        )
        assert close_to(old.retain_until, now + timedelta(days=30))
        # The multipart upload started with "now + 30 d"; commit extended it to the caller's date.
        assert close_to(big.retain_until, ahead + timedelta(days=30))
        assert close_to(sidecar.retain_until, ahead + timedelta(days=30))
        for key, stored in [("old.mp4", old), ("big.mp4", big), ("big.mp4.json", sidecar)]:
            info = await storage.stat(key)
            assert info is not None and info.legal_hold is True
            assert info.retain_until == stored.retain_until
            assert stored.version_id is not None
            with pytest.raises(StorageError, match="Object Lock"):
                await storage.delete_version(key, stored.version_id)
        # A plain delete of a versioned object only hides it behind a delete marker.
        await storage.delete("old.mp4")
        assert await storage.stat("old.mp4") is None
    left = leftovers(any_s3, any_s3.locked_bucket, s3_prefix)
    assert sorted(left["versions"]) == [
        f"{s3_prefix}{k}" for k in ("big.mp4", "big.mp4.json", "old.mp4")
    ]
    assert left["markers"] == [f"{s3_prefix}old.mp4"]
    assert left["uploads"] == []
    head = any_s3.client().head_object(
        Bucket=any_s3.locked_bucket, Key=f"{s3_prefix}big.mp4", VersionId=big.version_id
    )
    assert head["ObjectLockMode"] == "COMPLIANCE"


async def test_object_lock_without_legal_hold(any_s3: S3Server, s3_prefix: str) -> None:
    lock = {"object_lock_mode": "COMPLIANCE", "retention_days": 30}
    async with open_s3(any_s3, s3_prefix, locked=True, **lock) as storage:
        stored = await store(storage, "rec.mp4", b"r" * 100)
        info = await storage.stat("rec.mp4")
    assert info is not None and not info.legal_hold
    assert close_to(info.retain_until, datetime.now(UTC) + timedelta(days=30))
    assert stored.retain_until == info.retain_until


async def test_preflight_passes_and_leaves_no_probe(any_s3: S3Server, s3_prefix: str) -> None:
    lock = {"object_lock_mode": "COMPLIANCE", "retention_days": 30, "legal_hold": True}
    async with open_s3(any_s3, s3_prefix, locked=True, **lock) as storage:
        await storage.preflight()
    async with open_s3(any_s3, s3_prefix) as storage:
        await storage.preflight()
    assert leftovers(any_s3, any_s3.locked_bucket, s3_prefix) == NOTHING
    assert leftovers(any_s3, any_s3.bucket, s3_prefix) == NOTHING


async def test_preflight_missing_bucket(any_s3: S3Server, s3_prefix: str) -> None:
    settings = s3_settings(any_s3, s3_prefix, bucket="no-such-bucket")
    async with S3Storage(settings) as storage:
        with pytest.raises(PreflightError) as caught:
            await storage.preflight()
    assert str(caught.value) == (
        f"S3 bucket 'no-such-bucket' does not exist (endpoint {any_s3.endpoint_url})"
    )


async def test_preflight_bucket_without_object_lock(any_s3: S3Server, s3_prefix: str) -> None:
    lock = {"object_lock_mode": "COMPLIANCE", "retention_days": 30}
    async with open_s3(any_s3, s3_prefix, **lock) as storage:
        with pytest.raises(PreflightError) as caught:
            await storage.preflight()
    assert str(caught.value) == (
        "S3 bucket 'plain' has Object Lock disabled but storage.s3.object_lock_mode = COMPLIANCE"
    )


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_endpoint(s3_server: S3Server, s3_prefix: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    settings = s3_settings(s3_server, s3_prefix, endpoint_url=endpoint)
    async with S3Storage(settings) as storage:
        with pytest.raises(PreflightError) as caught:
            await storage.preflight()
        assert str(caught.value) == (
            f"S3 endpoint {endpoint} cannot be reached: EndpointConnectionError"
        )
        # In a transfer the same failure is transient: archiver's retry policy takes it, boto3
        # does not retry on its own.
        with pytest.raises(NetworkError):
            await storage.stat("rec.mp4")
        assert storage.client.meta.config.retries == {"total_max_attempts": 1, "mode": "standard"}


async def test_wrong_credentials(
    s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-4242")
    async with open_s3(s3_server, s3_prefix) as storage:
        with pytest.raises(
            PreflightError, match=r"^access to S3 bucket 'plain' is denied"
        ) as caught:
            await storage.preflight()
        with pytest.raises(StorageError, match="SignatureDoesNotMatch") as denied:
            await storage.put_bytes("x.json", b"{}", content_type="application/json")
    for message in (str(caught.value), str(denied.value)):
        assert "wrong-secret-value-4242" not in message and s3_server.access_key not in message


async def test_encryption_storage_class_and_tags(any_s3: S3Server, s3_prefix: str) -> None:
    extra = {"sse": "AES256", "storage_class": "STANDARD_IA", "tags": {"team": "voice ops"}}
    async with open_s3(any_s3, s3_prefix, **extra, **SMALL_PARTS) as storage:
        await storage.preflight()
        small = b"s" * 1000
        big = os.urandom(6 * MiB)
        await store(storage, "small.ogg", small)
        await store(storage, "big.ogg", big)
    client = any_s3.client()
    for key in ("small.ogg", "big.ogg"):
        head = client.head_object(Bucket=any_s3.bucket, Key=f"{s3_prefix}{key}")
        assert head["ServerSideEncryption"] == "AES256"
        assert head["StorageClass"] == "STANDARD_IA"
        tagging = client.get_object_tagging(Bucket=any_s3.bucket, Key=f"{s3_prefix}{key}")
        tags = {t["Key"]: t["Value"] for t in tagging["TagSet"]}
        assert tags["team"] == "voice ops"
    assert tags["sha256"] == sha(big)  # the multipart one keeps its hash in a tag


async def test_prefix_is_a_folder(any_s3: S3Server, s3_prefix: str) -> None:
    async with open_s3(any_s3, s3_prefix.rstrip("/")) as storage:
        await storage.put_bytes("a/b.json", b"{}", content_type="application/json")
    assert leftovers(any_s3, any_s3.bucket, s3_prefix)["versions"] == [f"{s3_prefix}a/b.json"]


async def test_closed_storage_refuses_work(s3_server: S3Server, s3_prefix: str) -> None:
    storage = S3Storage(s3_settings(s3_server, s3_prefix))
    with pytest.raises(StorageError, match="not open"):
        await storage.begin("rec.mp4")
    with pytest.raises(StorageError, match="not open"):
        await storage.stat("rec.mp4")


async def test_event_loop_keeps_running_during_uploads(s3_server: S3Server, s3_prefix: str) -> None:
    """S3 calls and hashing happen in threads: the loop never waits for S3. One 16 MiB part sent
    from the loop would stall it for 0.4 s here (SeaweedFS takes ~40 MB/s on this machine); the
    stalls left are the scheduler's, with weed and the upload threads on the same few cores."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    data = os.urandom(32 * MiB)
    request = request_for(data)
    parts = {"multipart_threshold": 16 * MiB, "part_size": 16 * MiB}

    async def upload(key: str) -> None:
        async with await storage.begin(key) as upload:
            for start in range(0, len(data), MiB):
                await upload.write(data[start : start + MiB])
            await upload.commit(request)

    async with open_s3(s3_server, s3_prefix, max_threads=4, **parts) as storage:
        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        await asyncio.gather(upload("a.mp4"), upload("b.mp4"))
        took = time.monotonic() - started
        stop.set()
        await tick
    print(
        f"\nlongest event-loop stall during 2 concurrent uploads: {max(gaps) * 1000:.0f} ms "
        f"of {took * 1000:.0f} ms"
    )
    # A call that blocked the loop would stall it for most of the uploads; the scheduler of a
    # busy shared host stalls it for a slice of them at most.
    assert max(gaps) < max(0.2, took / 3), (max(gaps), took)


# ru_maxrss survives exec: a child of pytest starts with pytest's peak. A fork gets a fresh count,
# so the upload runs in a grandchild forked before anything is imported.
MEMORY = """
import os, sys
pid = os.fork()
if pid:
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

import asyncio, hashlib, json, resource
from archiver.config import S3Settings
from archiver.storage import CommitRequest
from archiver.storage.s3 import S3Storage

MiB = 1 << 20

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def current_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB

async def main():
    async with S3Storage(S3Settings(**json.loads(sys.argv[1]))) as storage:
        await storage.put_bytes("warm-up.json", b"{}", content_type="application/json")
        chunk = os.urandom(MiB)
        before = {"peak": peak_mb(), "current": current_mb()}
        digest = hashlib.sha256()
        async with await storage.begin("big.bin") as upload:
            for _ in range(300):
                await upload.write(chunk)
                digest.update(chunk)
            await upload.commit(CommitRequest(sha256=digest.hexdigest(), size=300 * MiB))
        print(json.dumps({**before, "after": peak_mb()}))

asyncio.run(main())
"""


async def test_memory_stays_bounded(s3_server: S3Server, s3_prefix: str) -> None:
    """A 300 MiB upload in 1 MiB chunks, alone in a process, with the default 16 MiB parts."""
    settings = s3_settings(s3_server, s3_prefix)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MEMORY,
        json.dumps(asdict(settings)),
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    figures = json.loads(stdout)
    # Against the RSS in use just before the upload, not the earlier peak: the stricter measure.
    growth = figures["after"] - figures["current"]
    print(
        f"\n300 MiB upload in 1 MiB chunks, 16 MiB parts: RSS {figures['current']:.0f} MB before "
        f"(peak {figures['peak']:.0f} MB), peak {figures['after']:.0f} MB after: "
        f"growth {growth:.1f} MB"
    )
    assert growth < 100


# -- the lifecycle rule for unfinished uploads --------------------------------------------------


async def test_preflight_warns_without_a_lifecycle_rule_for_unfinished_uploads(
    any_s3: S3Server, s3_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = any_s3.client()
    bucket = f"nolifecycle-{any_s3.name}"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    settings = s3_settings(any_s3, s3_prefix, bucket=bucket)
    with caplog.at_level(logging.WARNING, logger="archiver.storage.s3.preflight"):
        async with S3Storage(settings) as storage:
            await storage.preflight()
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"S3 bucket '{bucket}' has no lifecycle rule aborting unfinished multipart" in warning
    assert "AbortIncompleteMultipartUpload" in warning
    caplog.clear()
    # The rule README shows (and a rule for the prefix alone) takes the warning away.
    for prefix in ("", s3_prefix):
        rule = {**LIFECYCLE_RULE, "Filter": {"Prefix": prefix}}
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
        )
        with caplog.at_level(logging.WARNING, logger="archiver.storage.s3.preflight"):
            async with S3Storage(settings) as storage:
                await storage.preflight()
        assert caplog.records == [], prefix


def test_which_lifecycle_rules_cover_the_prefix() -> None:
    rule = {"Status": "Enabled", "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}
    assert aborts_unfinished_uploads([{**rule, "Filter": {"Prefix": ""}}], "archive/")
    assert aborts_unfinished_uploads([{**rule, "Filter": {"Prefix": "arch"}}], "archive/")
    assert aborts_unfinished_uploads([{**rule, "Prefix": ""}], "archive/")  # the old form
    assert aborts_unfinished_uploads([{**rule, "Filter": {"And": {"Prefix": "a"}}}], "archive/")
    assert not aborts_unfinished_uploads([{**rule, "Filter": {"Prefix": "other/"}}], "archive/")
    assert not aborts_unfinished_uploads([{**rule, "Status": "Disabled"}], "archive/")
    assert not aborts_unfinished_uploads([{"Status": "Enabled", "Filter": {}}], "archive/")
    tagged = {**rule, "Filter": {"And": {"Prefix": "", "Tags": [{"Key": "k", "Value": "v"}]}}}
    assert not aborts_unfinished_uploads([tagged], "archive/")
    assert not aborts_unfinished_uploads([], "")


async def test_an_unversioned_bucket(any_s3: S3Server, s3_prefix: str) -> None:
    """Every object of an unversioned bucket has the version "null" (moto refuses to be asked
    for it by that name)."""
    client = any_s3.client()
    bucket = f"unversioned-{any_s3.name}"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    data = os.urandom(11 * MiB)
    async with open_s3(any_s3, s3_prefix, bucket=bucket, **SMALL_PARTS) as storage:
        big = await store(storage, "big.mp4", data)
        small = await store(storage, "small.mp4", b"s" * 1000)
        assert (big.sha256, small.sha256) == (sha(data), sha(b"s" * 1000))
        await storage.delete("small.mp4")
        assert await storage.stat("small.mp4") is None
        info = await storage.stat("big.mp4")
    assert info is not None and info.sha256 == sha(data)
