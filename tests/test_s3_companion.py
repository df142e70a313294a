"""S3Storage: a companion that cannot be stored takes its object's new version back with it,
unless Object Lock keeps that version; what the shared suite cannot see from ``stat``."""

from __future__ import annotations

import hashlib
import os

import pytest

from archiver.errors import StorageError
from archiver.models import StoredObject
from archiver.storage import CommitRequest
from archiver.storage.base import Companion
from archiver.storage.s3 import S3Storage
from tests.fixtures_s3 import S3Server, s3_settings

MiB = 1 << 20


class RenderFailed(Exception):
    pass


def failing_render(stored: StoredObject) -> bytes:
    raise RenderFailed(f"cannot describe {stored.key} (version {stored.version_id})")


def request_with(data: bytes, companion: Companion) -> CommitRequest:
    sha256 = hashlib.sha256(data).hexdigest()
    return CommitRequest(sha256=sha256, size=len(data), companion=companion)


def versions(server: S3Server, bucket: str, prefix: str) -> dict[str, list[str]]:
    client = server.client()
    listing = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return {
        "versions": sorted(v["Key"][len(prefix) :] for v in listing.get("Versions", [])),
        "markers": sorted(m["Key"][len(prefix) :] for m in listing.get("DeleteMarkers", [])),
    }


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["put", "multipart"])
async def test_failed_companion_deletes_the_new_version(
    s3_server: S3Server, s3_prefix: str, size: int
) -> None:
    settings = s3_settings(s3_server, s3_prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)
    async with S3Storage(settings) as storage:
        data = os.urandom(size)
        async with await storage.begin("rec.mp4") as upload:
            await upload.write(data)
            with pytest.raises(RenderFailed):
                await upload.commit(request_with(data, Companion("rec.mp4.json", failing_render)))
    # The version itself is gone: no delete marker hides it, nothing is left at all.
    assert versions(s3_server, s3_server.bucket, s3_prefix) == {"versions": [], "markers": []}


async def test_failed_companion_of_a_locked_object_says_where_it_stays(
    s3_server: S3Server, s3_prefix: str
) -> None:
    settings = s3_settings(
        s3_server, s3_prefix, locked=True, object_lock_mode="COMPLIANCE", retention_days=1
    )
    async with S3Storage(settings) as storage:
        async with await storage.begin("rec.mp4") as upload:
            await upload.write(b"locked media")
            with pytest.raises(StorageError) as caught:
                await upload.commit(
                    request_with(b"locked media", Companion("rec.mp4.json", failing_render))
                )
        info = await storage.stat("rec.mp4")
    assert info is not None and info.version_id is not None
    message = str(caught.value)
    assert f"it stays locked at rec.mp4, version {info.version_id} until " in message
    assert "rec.mp4.json could not be stored (cannot describe rec.mp4" in message
    assert isinstance(caught.value.__cause__, RenderFailed)
    assert versions(s3_server, s3_server.locked_bucket, s3_prefix) == {
        "versions": ["rec.mp4"],
        "markers": [],
    }
