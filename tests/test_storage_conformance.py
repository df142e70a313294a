"""The storage conformance suite: every backend passes the same tests.

A new backend joins by adding one entry to ``BACKENDS``. Tests that depend on a filesystem (paths,
symlinks, crash recovery, a full disk) follow the shared suite and use ``LocalStorage`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from archiver.errors import (
    HeldElsewhere,
    IntegrityError,
    PreflightError,
    StorageError,
    UnsafeValue,
)
from archiver.models import StoredObject, utcnow
from archiver.storage import (
    CommitRequest,
    LocalStorage,
    MemoryStorage,
    StorageBackend,
    local,
    localfs,
)
from archiver.storage.base import Companion

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A factory gets the test's request, to reach fixtures of its own (a server, say), and tmp_path.
BackendFactory = Callable[[pytest.FixtureRequest, Path], Awaitable[StorageBackend]]


async def _local(request: pytest.FixtureRequest, tmp_path: Path) -> StorageBackend:
    # verify_on_commit so that a wrong SHA-256 is caught as it is by backends that hash themselves.
    return LocalStorage(tmp_path / "archive", verify_on_commit=True)


async def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> StorageBackend:
    return MemoryStorage()


def _s3(server_fixture: str) -> BackendFactory:
    async def make(request: pytest.FixtureRequest, tmp_path: Path) -> StorageBackend:
        from archiver.storage.s3 import S3Storage
        from tests.fixtures_s3 import s3_settings

        server = request.getfixturevalue(server_fixture)
        prefix = request.getfixturevalue("s3_prefix")
        # A low threshold, so that the 20 MiB test goes through a multipart upload.
        settings = s3_settings(server, prefix, multipart_threshold=8 * MiB, part_size=5 * MiB)
        return S3Storage(settings)

    return make


# Two S3 dialects: SeaweedFS (checks checksums and retention as AWS does) and moto's server.
BACKENDS: dict[str, BackendFactory] = {
    "local": _local,
    "memory": _memory,
    "s3-seaweedfs": _s3("seaweedfs_server"),
    "s3-moto": _s3("moto_server"),
}


@pytest.fixture(params=list(BACKENDS))
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    backend = await BACKENDS[request.param](request, tmp_path)
    async with backend:
        await backend.preflight()
        yield backend


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request_for(data: bytes) -> CommitRequest:
    return CommitRequest(sha256=sha(data), size=len(data), content_type="video/mp4")


async def store(
    storage: StorageBackend, key: str, data: bytes, chunk: int = 64 * 1024
) -> StoredObject:
    async with await storage.begin(key, resume=False) as upload:
        for start in range(0, len(data), chunk):
            await upload.write(data[start : start + chunk])
        return await upload.commit(request_for(data))


def same_object(stored: StoredObject, expected: StoredObject) -> bool:
    """Equal but for the version id a versioned bucket adds."""
    return dataclasses.replace(stored, version_id=None) == expected


async def read_all(storage: StorageBackend, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


async def assert_absent(storage: StorageBackend, key: str) -> None:
    assert await storage.stat(key) is None
    with pytest.raises(StorageError):
        await read_all(storage, key)


# The shared suite.


async def test_capabilities_name_the_backend(storage: StorageBackend) -> None:
    assert storage.capabilities.name
    assert storage.capabilities.name in {name.split("-")[0] for name in BACKENDS}


async def test_round_trip(storage: StorageBackend) -> None:
    data = b"recording bytes " * 10_000
    stored = await store(storage, "rooms/r1/rec-1.mp4", data)

    assert same_object(stored, StoredObject("rooms/r1/rec-1.mp4", size=len(data), sha256=sha(data)))
    info = await storage.stat("rooms/r1/rec-1.mp4")
    assert info is not None
    assert (info.key, info.size) == ("rooms/r1/rec-1.mp4", len(data))
    assert info.sha256 in (None, sha(data))
    assert await read_all(storage, "rooms/r1/rec-1.mp4") == data


async def test_empty_object(storage: StorageBackend) -> None:
    stored = await store(storage, "empty.mp4", b"")
    assert stored.size == 0
    assert stored.sha256 == sha(b"")
    info = await storage.stat("empty.mp4")
    assert info is not None and info.size == 0
    assert await read_all(storage, "empty.mp4") == b""


async def test_nothing_visible_before_commit_or_after_abort(storage: StorageBackend) -> None:
    upload = await storage.begin("a/b.mp4")
    try:
        await upload.write(b"half a recording")
        assert upload.offset == len(b"half a recording")
        await assert_absent(storage, "a/b.mp4")
    finally:
        await upload.abort()
    await assert_absent(storage, "a/b.mp4")
    # The aborted bytes are gone, not waiting to be resumed.
    async with await storage.begin("a/b.mp4", resume=True) as again:
        assert again.offset == 0
        assert [chunk async for chunk in again.existing()] == []


async def test_abort_is_idempotent_and_harmless_after_commit(storage: StorageBackend) -> None:
    upload = await storage.begin("k.mp4")
    await upload.write(b"data")
    await upload.commit(request_for(b"data"))
    await upload.abort()
    await upload.abort()
    assert await read_all(storage, "k.mp4") == b"data"

    other = await storage.begin("other.mp4")
    await other.write(b"x")
    await other.abort()
    await other.abort()
    await assert_absent(storage, "other.mp4")


@pytest.mark.parametrize("wrong", ["size", "sha256"])
async def test_commit_with_wrong_size_or_hash_stores_nothing(
    storage: StorageBackend, wrong: str
) -> None:
    data = b"the real bytes" * 1000
    good = request_for(data)
    bad = (
        CommitRequest(sha256=good.sha256, size=good.size + 1)
        if wrong == "size"
        else CommitRequest(sha256=sha(b"other bytes"), size=good.size)
    )
    async with await storage.begin("x/y.mp4") as upload:
        await upload.write(data)
        with pytest.raises(IntegrityError):
            await upload.commit(bad)
        with pytest.raises(StorageError):
            await upload.write(b"more")
    await assert_absent(storage, "x/y.mp4")
    async with await storage.begin("x/y.mp4", resume=True) as retry:
        assert retry.offset == 0


async def test_commit_with_wrong_hash_keeps_the_previous_object(storage: StorageBackend) -> None:
    await store(storage, "keep.mp4", b"version one")
    async with await storage.begin("keep.mp4") as upload:
        await upload.write(b"version two")
        with pytest.raises(IntegrityError):
            await upload.commit(CommitRequest(sha256=sha(b"nope"), size=len(b"version two")))
    assert await read_all(storage, "keep.mp4") == b"version one"


async def test_restart_drops_written_bytes(storage: StorageBackend) -> None:
    async with await storage.begin("r.mp4") as upload:
        await upload.write(b"garbage from a broken download")
        await upload.restart()
        assert upload.offset == 0
        assert [chunk async for chunk in upload.existing()] == []
        await upload.write(b"good")
        stored = await upload.commit(request_for(b"good"))
    assert stored.size == 4
    assert await read_all(storage, "r.mp4") == b"good"


async def test_large_object_in_many_chunks(storage: StorageBackend) -> None:
    data = os.urandom(20 * MiB + 12345)
    stored = await store(storage, "big/rec.mp4", data, chunk=MiB)
    assert stored.size == len(data)
    assert stored.sha256 == sha(data)

    digest = hashlib.sha256()
    size = 0
    async for chunk in storage.read("big/rec.mp4"):
        assert 0 < len(chunk) <= MiB
        digest.update(chunk)
        size += len(chunk)
    assert (size, digest.hexdigest()) == (len(data), sha(data))


async def test_overwrite_replaces_only_at_commit(storage: StorageBackend) -> None:
    await store(storage, "same.mp4", b"old" * 1000)
    async with await storage.begin("same.mp4", resume=False) as upload:
        assert upload.offset == 0
        await upload.write(b"new" * 500)
        assert await read_all(storage, "same.mp4") == b"old" * 1000
        info = await storage.stat("same.mp4")
        assert info is not None and info.size == 3000
        await upload.commit(request_for(b"new" * 500))
    assert await read_all(storage, "same.mp4") == b"new" * 500
    info = await storage.stat("same.mp4")
    assert info is not None and info.size == 1500


async def test_put_bytes(storage: StorageBackend) -> None:
    body = b'{"id": "rec-1", "status": "completed"}'
    stored = await storage.put_bytes("meta/rec-1.json", body, content_type="application/json")
    assert same_object(stored, StoredObject("meta/rec-1.json", size=len(body), sha256=sha(body)))
    assert await read_all(storage, "meta/rec-1.json") == body

    again = await storage.put_bytes("meta/rec-1.json", b"{}", content_type="application/json")
    assert again.size == 2
    assert await read_all(storage, "meta/rec-1.json") == b"{}"


async def test_put_whole_stores_hashed_with_its_companion(storage: StorageBackend) -> None:
    data = b"small recording" * 70
    request = CommitRequest(sha256=None, size=len(data), content_type="audio/ogg")
    stored = await storage.put_whole(
        "rooms/r1/small.ogg", data, with_companion_request(request, "rooms/r1/small.ogg.json")
    )
    assert same_object(stored, StoredObject("rooms/r1/small.ogg", size=len(data), sha256=sha(data)))
    assert await read_all(storage, "rooms/r1/small.ogg") == data
    assert await read_all(storage, "rooms/r1/small.ogg.json") == (
        f'{{"sha256": "{sha(data)}"}}'.encode()
    )


async def test_put_whole_with_a_wrong_size_or_hash_stores_nothing(
    storage: StorageBackend,
) -> None:
    data = b"small recording"
    wrong_size = CommitRequest(sha256=None, size=len(data) + 1)
    wrong_hash = CommitRequest(sha256=sha(b"other bytes"), size=len(data))
    for request in (wrong_size, wrong_hash):
        with pytest.raises(IntegrityError):
            await storage.put_whole(
                "rooms/r1/bad.ogg", data, with_companion_request(request, "rooms/r1/bad.ogg.json")
            )
        await assert_absent(storage, "rooms/r1/bad.ogg")
        await assert_absent(storage, "rooms/r1/bad.ogg.json")


def with_companion_request(request: CommitRequest, key: str) -> CommitRequest:
    return dataclasses.replace(request, companion=sidecar_for(key))


async def test_digest_is_fed_exactly_the_bytes_written(storage: StorageBackend) -> None:
    data = os.urandom(3 * MiB + 777)
    digest = hashlib.sha256()
    async with await storage.begin("fed/rec.mp4", resume=False) as upload:
        for start in range(0, len(data), MiB):
            await upload.write(data[start : start + MiB], digest=digest)
        await upload.write(b"", digest=digest)  # nothing written, nothing fed
        assert digest.hexdigest() == sha(data)
        stored = await upload.commit(request_for(data))
    assert stored.sha256 == sha(data)
    assert await read_all(storage, "fed/rec.mp4") == data


async def test_commit_stores_the_companion_with_the_object(storage: StorageBackend) -> None:
    data = b"media" * 1000
    seen: list[StoredObject] = []

    def render(stored: StoredObject) -> bytes:
        seen.append(stored)
        return f'{{"sha256": "{stored.sha256}"}}'.encode()

    companion = Companion(key="rooms/r1/rec.mp4.json", render=render)
    async with await storage.begin("rooms/r1/rec.mp4", resume=False) as upload:
        await upload.write(data)
        stored = await upload.commit(dataclasses.replace(request_for(data), companion=companion))
    assert seen == [stored]
    assert await read_all(storage, "rooms/r1/rec.mp4") == data
    assert await read_all(storage, companion.key) == f'{{"sha256": "{sha(data)}"}}'.encode()


def with_companion(data: bytes, companion: Companion) -> CommitRequest:
    return dataclasses.replace(request_for(data), companion=companion)


def sidecar_for(key: str) -> Companion:
    return Companion(key=key, render=lambda stored: f'{{"sha256": "{stored.sha256}"}}'.encode())


class RenderFailed(Exception):
    pass


def failing_render(stored: StoredObject) -> bytes:
    raise RenderFailed(f"cannot describe {stored.key}")


@pytest.mark.parametrize("size", [5000, 9 * MiB], ids=["small", "multipart"])
@pytest.mark.parametrize("before", ["empty", "old-object"])
async def test_a_companion_whose_render_raises_stores_nothing(
    storage: StorageBackend, before: str, size: int
) -> None:
    key, sidecar = "rooms/r1/rec.mp4", "rooms/r1/rec.mp4.json"
    if before == "old-object":
        async with await storage.begin(key, resume=False) as first:
            await first.write(b"old")
            await first.commit(with_companion(b"old", sidecar_for(sidecar)))
        old_sidecar = await read_all(storage, sidecar)
    data = os.urandom(size)
    async with await storage.begin(key, resume=False) as upload:
        for start in range(0, size, MiB):
            await upload.write(data[start : start + MiB])
        with pytest.raises(RenderFailed):
            await upload.commit(with_companion(data, Companion(key=sidecar, render=failing_render)))
        with pytest.raises(StorageError):
            await upload.write(b"more")  # the upload is over
    if before == "old-object":
        assert await read_all(storage, key) == b"old"
        assert await read_all(storage, sidecar) == old_sidecar
    else:
        await assert_absent(storage, key)
        await assert_absent(storage, sidecar)
    async with await storage.begin(key, resume=True) as again:
        assert again.offset == 0


async def test_a_companion_that_cannot_be_stored_fails_the_commit_and_stores_nothing(
    storage: StorageBackend,
) -> None:
    await store(storage, "rooms/r2/rec.mp4", b"old")
    data = b"media" * 1000
    # A key no backend accepts: the companion cannot be stored.
    companion = Companion(key="rooms/../escape.json", render=lambda stored: b"{}")
    async with await storage.begin("rooms/r2/rec.mp4", resume=False) as upload:
        await upload.write(data)
        with pytest.raises(UnsafeValue):
            await upload.commit(with_companion(data, companion))
    assert await read_all(storage, "rooms/r2/rec.mp4") == b"old"
    await assert_absent(storage, "escape.json")


async def test_delete(storage: StorageBackend) -> None:
    await store(storage, "d/gone.mp4", b"bytes")
    await store(storage, "d/kept.mp4", b"other")
    await storage.delete("d/gone.mp4")
    await assert_absent(storage, "d/gone.mp4")
    assert await read_all(storage, "d/kept.mp4") == b"other"
    await storage.delete("d/gone.mp4")  # deleting what is not there is not an error


async def test_remove_copy_deletes_every_version_at_its_keys_and_only_those(
    storage: StorageBackend,
) -> None:
    await store(storage, "x/rec.mp4", b"first")
    await store(storage, "x/rec.mp4", b"second")  # a second version, where a store keeps them
    await storage.put_bytes("x/rec.mp4.json", b"{}", content_type="application/json")
    await store(storage, "x/rec.mp4.bak", b"a neighbour whose key starts the same")
    removal = await storage.remove_copy(["x/rec.mp4", "x/rec.mp4.json", "x/none.mp4"], utcnow())
    assert removal.refused is None
    keys = [copy["key"] for copy in removal.removed]
    assert set(keys) == {"x/rec.mp4", "x/rec.mp4.json"}
    if storage.capabilities.name == "s3":
        assert keys.count("x/rec.mp4") == 2  # both versions, not a delete marker over them
    await assert_absent(storage, "x/rec.mp4")
    await assert_absent(storage, "x/rec.mp4.json")
    assert await storage.describe_missing("x/rec.mp4") is None  # no hidden version left
    assert await read_all(storage, "x/rec.mp4.bak") == b"a neighbour whose key starts the same"
    again = await storage.remove_copy(["x/rec.mp4"], utcnow())
    assert again.removed == () and again.refused is None


async def test_async_with_aborts_on_exception(storage: StorageBackend) -> None:
    with pytest.raises(RuntimeError, match="download broke"):
        async with await storage.begin("boom.mp4") as upload:
            await upload.write(b"some bytes")
            raise RuntimeError("download broke")
    await assert_absent(storage, "boom.mp4")
    async with await storage.begin("boom.mp4", resume=True) as again:
        assert again.offset == 0


async def test_async_with_aborts_when_not_committed(storage: StorageBackend) -> None:
    async with await storage.begin("forgot.mp4") as upload:
        await upload.write(b"some bytes")
    await assert_absent(storage, "forgot.mp4")
    with pytest.raises(StorageError):
        await upload.write(b"after the end")


async def test_abort_after_a_cancelled_write(storage: StorageBackend) -> None:
    upload = await storage.begin("cancel.mp4")
    write = asyncio.create_task(upload.write(os.urandom(8 * MiB)))
    await asyncio.sleep(0)
    write.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await write
    await upload.abort()
    await assert_absent(storage, "cancel.mp4")
    async with await storage.begin("cancel.mp4", resume=True) as again:
        assert again.offset == 0


async def test_committed_upload_refuses_more(storage: StorageBackend) -> None:
    async with await storage.begin("done.mp4") as upload:
        await upload.write(b"abc")
        await upload.commit(request_for(b"abc"))
        with pytest.raises(StorageError):
            await upload.write(b"d")
        with pytest.raises(StorageError):
            await upload.commit(request_for(b"abc"))
    assert await read_all(storage, "done.mp4") == b"abc"


# A process that writes its stdin to the partial upload of a key and is killed (SIGKILL) before
# it commits or aborts.
KILLED_WRITER = """
import asyncio, os, signal, sys
from pathlib import Path
from archiver.storage.local import LocalStorage

async def main():
    upload = await LocalStorage(Path(sys.argv[1])).begin(sys.argv[2])
    while chunk := sys.stdin.buffer.read(1 << 20):
        await upload.write(chunk)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def leave_partial(root: Path, key: str, data: bytes) -> None:
    """Leave ``data`` in the partial upload of ``key`` under ``root``, as a killed process does."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        str(root),
        key,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate(data)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()


async def test_cleanup_stale(storage: StorageBackend) -> None:
    await store(storage, "c/committed.mp4", b"safe")
    if isinstance(storage, LocalStorage):
        await leave_partial(storage.root, "c/crashed.mp4", b"left behind by a killed process")
    else:
        # Let go of as a killed process would: for S3, after its first parts went up (the
        # conformance backends start multipart uploads at 8 MiB); in memory, nothing stays.
        crashed = await storage.begin("c/crashed.mp4")
        for _ in range(12):
            await crashed.write(os.urandom(MiB))
        await crashed.release()
        with pytest.raises(StorageError):
            await crashed.write(b"after letting go")

    assert await storage.cleanup_stale(3600) == 0
    removed = await storage.cleanup_stale(0)
    assert removed == (1 if storage.capabilities.resumes_after_crash else 0)

    async with await storage.begin("c/crashed.mp4", resume=True) as again:
        assert again.offset == 0
    assert await read_all(storage, "c/committed.mp4") == b"safe"
    assert await storage.cleanup_stale(0) == 0


LEXICALLY_HOSTILE_KEYS = [
    "",
    ".",
    "..",
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    "x/.y.mp4.partial",
]


@pytest.mark.parametrize("key", LEXICALLY_HOSTILE_KEYS)
async def test_hostile_keys_are_refused(storage: StorageBackend, key: str) -> None:
    with pytest.raises(UnsafeValue):
        await storage.begin(key)
    with pytest.raises(UnsafeValue):
        await storage.put_bytes(key, b"x", content_type="text/plain")
    with pytest.raises(UnsafeValue):
        await storage.stat(key)
    with pytest.raises(UnsafeValue):
        await read_all(storage, key)
    with pytest.raises(UnsafeValue):
        await storage.delete(key)


# LocalStorage only: paths, symlinks, crash recovery, durability, a full disk.


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "a/../../b", "a//b", "a\\b", "a\x00b", ".", "../outside/x"]
)
async def test_local_hostile_keys_write_nothing(tmp_path: Path, key: str) -> None:
    root = tmp_path / "archive"
    (tmp_path / "outside").mkdir()
    storage = LocalStorage(root)
    await storage.preflight()
    before = files_under(tmp_path)

    with pytest.raises(UnsafeValue, match="storage key"):
        await storage.begin(key)
    with pytest.raises(UnsafeValue):
        await storage.put_bytes(key, b"x", content_type="text/plain")
    assert files_under(tmp_path) == before


async def test_local_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    (root / "file.mp4").symlink_to(outside / "victim.mp4")
    (outside / "victim.mp4").write_bytes(b"not yours")
    storage = LocalStorage(root)

    for key in ["escape/x.mp4", "escape/deeper/x.mp4", "dangling/x.mp4"]:
        with pytest.raises(UnsafeValue, match="outside the archive root"):
            await storage.begin(key)
        with pytest.raises(UnsafeValue):
            await storage.put_bytes(key, b"x", content_type="text/plain")
        with pytest.raises(UnsafeValue):
            await storage.stat(key)
    with pytest.raises(UnsafeValue):
        await read_all(storage, "file.mp4")
    with pytest.raises(UnsafeValue):
        await storage.delete("file.mp4")

    assert files_under(outside) == ["victim.mp4"]
    assert (outside / "victim.mp4").read_bytes() == b"not yours"
    assert not (tmp_path / "nowhere").exists()


async def test_local_symlink_inside_root_is_allowed(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real")
    storage = LocalStorage(root)
    await store(storage, "alias/x.mp4", b"data")
    assert (root / "real" / "x.mp4").read_bytes() == b"data"


async def test_local_planted_partial_symlink_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / ".rec.mp4.partial").symlink_to(outside / "victim")
    storage = LocalStorage(root)

    with pytest.raises(UnsafeValue, match="symbolic link"):
        await storage.begin("rec.mp4")
    assert files_under(outside) == []


async def test_local_partial_is_hidden_beside_target(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    async with await storage.begin("room/2024/rec.mp4") as upload:
        await upload.write(b"bytes")
        assert files_under(tmp_path) == ["room/2024/.rec.mp4.partial"]
        await upload.commit(request_for(b"bytes"))
    assert files_under(tmp_path) == ["room/2024/rec.mp4"]


async def test_local_resume_after_crash(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, verify_on_commit=True)
    data = os.urandom(3 * MiB + 17)
    await leave_partial(tmp_path, "r/rec.mp4", data[: 2 * MiB + 5])

    assert await storage.stat("r/rec.mp4") is None
    async with await storage.begin("r/rec.mp4", resume=True) as upload:
        assert upload.offset == 2 * MiB + 5
        held = [chunk async for chunk in upload.existing()]
        assert all(len(chunk) <= MiB for chunk in held)
        assert b"".join(held) == data[: 2 * MiB + 5]
        await upload.write(data[upload.offset :])
        stored = await upload.commit(request_for(data))
    assert stored.sha256 == sha(data)
    assert (tmp_path / "r" / "rec.mp4").read_bytes() == data
    assert files_under(tmp_path) == ["r/rec.mp4"]


async def test_local_resume_after_sigkill(tmp_path: Path) -> None:
    """A real killed process: its partial is found, continued and committed by the next run."""
    script = (
        "import asyncio, os, signal, sys\n"
        "from pathlib import Path\n"
        "from archiver.storage.local import LocalStorage\n"
        "async def main():\n"
        "    upload = await LocalStorage(Path(sys.argv[1])).begin('rec.mp4')\n"
        "    await upload.write(b'a' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path), env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()

    storage = LocalStorage(tmp_path)
    async with await storage.begin("rec.mp4") as upload:
        assert upload.offset == 1000
        await upload.write(b"b" * 24)
        await upload.commit(request_for(b"a" * 1000 + b"b" * 24))
    assert (tmp_path / "rec.mp4").read_bytes() == b"a" * 1000 + b"b" * 24


async def test_local_begin_without_resume_truncates(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await leave_partial(tmp_path, "rec.mp4", b"stale bytes")

    async with await storage.begin("rec.mp4", resume=False) as upload:
        assert upload.offset == 0
        await upload.write(b"fresh")
        await upload.commit(request_for(b"fresh"))
    assert (tmp_path / "rec.mp4").read_bytes() == b"fresh"


async def test_local_one_writer_per_key(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    async with await storage.begin("rec.mp4") as upload:
        await upload.write(b"mine")
        # Another writer (a live or a stopped instance) holds it: no fault of the recording.
        with pytest.raises(HeldElsewhere, match="another upload"):
            await storage.begin("rec.mp4")
        assert await storage.cleanup_stale(0) == 0  # a live upload's partial is never removed
        await upload.commit(request_for(b"mine"))
    assert (tmp_path / "rec.mp4").read_bytes() == b"mine"


async def test_local_put_whole_is_refused_while_another_upload_holds_the_key(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path)
    request = CommitRequest(sha256=None, size=5)
    async with await storage.begin("rec.mp4") as upload:
        await upload.write(b"mine")
        with pytest.raises(HeldElsewhere, match="another upload"):
            await storage.put_whole("rec.mp4", b"yours", request)
    # A partial a stopped process left is replaced, and leaves nothing behind.
    (tmp_path / ".rec.mp4.partial").write_bytes(b"stale")
    await storage.put_whole("rec.mp4", b"whole", request)
    assert sorted(os.listdir(tmp_path)) == ["rec.mp4"]
    assert (tmp_path / "rec.mp4").read_bytes() == b"whole"


async def test_local_committed_files_are_durable_and_private(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await store(storage, "deep/er/rec.mp4", b"video")
    await storage.put_bytes("deep/er/rec.json", b"{}", content_type="application/json")

    umask = os.umask(0)
    os.umask(umask)
    for name in ["rec.mp4", "rec.json"]:
        path = tmp_path / "deep" / "er" / name
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 & ~umask
    assert files_under(tmp_path) == ["deep/er/rec.json", "deep/er/rec.mp4"]


async def test_local_verify_on_commit_off_still_checks_size(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    async with await storage.begin("rec.mp4") as upload:
        await upload.write(b"12345")
        with pytest.raises(IntegrityError, match="5 bytes written, 6 expected"):
            await upload.commit(CommitRequest(sha256=sha(b"123456"), size=6))
    assert files_under(tmp_path) == []


async def test_local_stat_and_read_ignore_directories(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await store(storage, "dir/rec.mp4", b"x")
    assert await storage.stat("dir") is None
    with pytest.raises(StorageError):
        await read_all(storage, "dir")
    assert await storage.stat("dir/rec.mp4/under-a-file") is None


async def test_local_cleanup_stale_respects_age(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for key in ["old/a.mp4", "new/b.mp4"]:
        await leave_partial(tmp_path, key, b"partial")
    old = tmp_path / "old" / ".a.mp4.partial"
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    (tmp_path / "old" / ".not-a-partial").write_bytes(b"left alone")

    assert await storage.cleanup_stale(3600) == 1
    assert files_under(tmp_path) == ["new/.b.mp4.partial", "old/.not-a-partial"]


async def test_local_preflight_creates_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    await LocalStorage(root).preflight()
    assert root.is_dir()
    assert files_under(root) == []


async def test_local_preflight_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(PreflightError, match="part of its path is a file"):
        await LocalStorage(tmp_path / "plain-file" / "archive").preflight()
    with pytest.raises(PreflightError, match="not a directory"):
        await LocalStorage(tmp_path / "plain-file").preflight()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to run out of space for real. Needs root (or CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not installed")
    proc = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run([umount, str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run([umount, "-l", str(mount_point)], check=True)


async def test_local_disk_full(tiny_fs: Path) -> None:
    storage = LocalStorage(tiny_fs)
    await storage.preflight()
    chunk = b"\x00" * (256 * 1024)
    with pytest.raises(StorageError, match=r"disk full writing rooms/rec\.mp4"):
        async with await storage.begin("rooms/rec.mp4") as upload:
            for _ in range(8):
                await upload.write(chunk)
            await upload.commit(CommitRequest(sha256=sha(chunk * 8), size=len(chunk) * 8))
    assert files_under(tiny_fs) == []
    assert await storage.stat("rooms/rec.mp4") is None

    with pytest.raises(StorageError, match=r"disk full writing meta\.json"):
        await storage.put_bytes("meta.json", b"x" * (2 * MiB), content_type="application/json")
    assert files_under(tiny_fs) == []

    # The space came back: a small object fits again.
    await store(storage, "rooms/small.mp4", b"fits")
    assert files_under(tiny_fs) == ["rooms/small.mp4"]


async def test_local_full_disk_for_the_sidecar_shows_nothing(tiny_fs: Path) -> None:
    storage = LocalStorage(tiny_fs)
    await storage.preflight()
    media = b"\x01" * (MiB - 64 * 1024)  # fits in the 1 MiB tmpfs, with 64 KiB to spare
    sidecar = Companion(key="rooms/rec.mp4.json", render=lambda stored: b" " * (128 * 1024))
    async with await storage.begin("rooms/rec.mp4") as upload:
        await upload.write(media)
        with pytest.raises(StorageError, match=r"disk full writing rooms/rec\.mp4\.json"):
            await upload.commit(with_companion(media, sidecar))
    assert await storage.stat("rooms/rec.mp4") is None
    assert await storage.stat("rooms/rec.mp4.json") is None
    # The partial went too: its room is free again, for the retry to store both.
    assert files_under(tiny_fs) == []
    async with await storage.begin("rooms/rec.mp4") as retry:
        await retry.write(media)
        await retry.commit(with_companion(media, sidecar_for("rooms/rec.mp4.json")))
    assert files_under(tiny_fs) == ["rooms/rec.mp4", "rooms/rec.mp4.json"]


async def test_local_companion_rename_failure_takes_the_object_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    # A directory where the sidecar goes: its temp file is written, its rename fails (EISDIR)
    # after the media's.
    (tmp_path / "rooms" / "rec.mp4.json").mkdir(parents=True)
    async with await storage.begin("rooms/rec.mp4") as upload:
        await upload.write(b"media")
        with pytest.raises(StorageError, match=r"rooms/rec\.mp4\.json"):
            await upload.commit(with_companion(b"media", sidecar_for("rooms/rec.mp4.json")))
    assert await storage.stat("rooms/rec.mp4") is None
    assert files_under(tmp_path) == []


async def test_local_object_rename_failure_stores_no_companion(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    # A directory at the key: the companion's temp file is ready when the media's rename fails.
    (tmp_path / "rooms" / "rec.mp4").mkdir(parents=True)
    async with await storage.begin("rooms/rec.mp4") as upload:
        await upload.write(b"media")
        with pytest.raises(StorageError, match=r"cannot commit rooms/rec\.mp4"):
            await upload.commit(with_companion(b"media", sidecar_for("rooms/rec.mp4.json")))
    assert await storage.stat("rooms/rec.mp4.json") is None
    assert files_under(tmp_path) == []


async def test_local_commit_with_companion_leaves_only_the_two_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    async with await storage.begin("rooms/rec.mp4") as upload:
        await upload.write(b"media")
        await upload.commit(with_companion(b"media", sidecar_for("meta/rec.mp4.json")))
    assert files_under(tmp_path) == ["meta/rec.mp4.json", "rooms/rec.mp4"]
    assert (
        tmp_path / "meta" / "rec.mp4.json"
    ).read_bytes() == f'{{"sha256": "{sha(b"media")}"}}'.encode()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_local_cleanup_removes_dead_one_shot_temps_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-shot temp nobody holds goes at once where the filesystem locks (its writer holds
    it from its creation), after a short grace where locks tell nothing; one a live writer
    holds stays; a resumable partial keeps the age rule."""
    storage = LocalStorage(tmp_path)
    (tmp_path / "rooms").mkdir()
    dead = tmp_path / "rooms" / ".rec.mp4.json.0123456789ab.partial"
    fresh = tmp_path / "rooms" / ".rec2.mp4.json.ba9876543210.partial"
    held = tmp_path / "rooms" / ".rec3.mp4.json.aaaaaaaaaaaa.partial"
    probe = tmp_path / ".preflight.00112233aabb.partial"
    for path in (dead, fresh, held, probe):
        path.write_bytes(b'{"half a sidecar')
    await leave_partial(tmp_path, "rooms/rec.mp4", b"resumable")
    age(dead, 61)
    age(tmp_path / "rooms" / ".rec.mp4.partial", 61)
    writer = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live writer holds its temp
        assert await storage.cleanup_stale(24 * 3600) == 3
        assert files_under(tmp_path) == [
            "rooms/.rec.mp4.partial",
            "rooms/.rec3.mp4.json.aaaaaaaaaaaa.partial",
        ]
    finally:
        os.close(writer)
    async with await storage.begin("rooms/rec.mp4") as again:
        assert again.offset == len(b"resumable")

    # Where the filesystem cannot lock, a just-written temp may be a live write: it waits out
    # the grace; an older one goes.
    monkeypatch.setattr(localfs, "take_lock", lambda fd: (True, False))
    fresh.write_bytes(b"{")
    dead.write_bytes(b"{")
    age(dead, 61)
    assert await storage.cleanup_stale(24 * 3600) == 1
    assert files_under(tmp_path) == [  # (the resumable partial went with the aborted upload)
        "rooms/.rec2.mp4.json.ba9876543210.partial",
        "rooms/.rec3.mp4.json.aaaaaaaaaaaa.partial",
    ]


async def test_local_preflight_passes_when_another_instance_cleans_its_probe_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another instance's cleanup_stale may take the probe between its create and its lock
    (unlocked one-shot temps are dead at once): the root was writable all the same."""
    storage = LocalStorage(tmp_path)
    lock = local.try_lock

    def cleaned_first(fd: int) -> bool:
        # The seam: what the other instance's cleanup does in the gap, for real.
        assert localfs.remove_if_stale(
            next(tmp_path.glob(".preflight.*.partial")), 0.0, dead_when_unlocked=True
        )
        return lock(fd)

    monkeypatch.setattr(local, "try_lock", cleaned_first)
    await storage.preflight()
    assert files_under(tmp_path) == []


# The helper process: it commits a recording with a sidecar, and stops midway through writing the
# sidecar's temp file (through the seam localfs._write_temp_bytes), says so on stdout, and waits on
# stdin, which the test never writes to: it is killed there.
SIDECAR_WRITER = """
import asyncio, hashlib, os, sys
from pathlib import Path
from archiver.storage import local, localfs
from archiver.storage.base import CommitRequest, Companion

def stop_midway(fd, data):
    os.write(fd, data[: len(data) // 2])
    sys.stdout.write("paused\\n")
    sys.stdout.flush()
    sys.stdin.read()

async def main():
    localfs._write_temp_bytes = stop_midway
    upload = await local.LocalStorage(Path(sys.argv[1])).begin("rooms/rec.mp4")
    await upload.write(b"media")
    sidecar = Companion(key="rooms/rec.mp4.json", render=lambda stored: b"{" + b" " * 9998 + b"}")
    sha = hashlib.sha256(b"media").hexdigest()
    await upload.commit(CommitRequest(sha256=sha, size=5, companion=sidecar))

asyncio.run(main())
"""


async def test_local_sidecar_temp_of_a_killed_writer_is_cleaned_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIDECAR_WRITER,
        str(tmp_path),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    storage = LocalStorage(tmp_path)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await proc.stdout.readline()
        assert line == b"paused\n", (await proc.stderr.read()).decode()
        temps = list((tmp_path / "rooms").glob(".rec.mp4.json.*.partial"))
        assert len(temps) == 1
        temp = temps[0]
        assert temp.stat().st_size == 5000  # half written
        # A live writer's temp file is never removed, however old it looks.
        age(temp, 3600)
        assert await storage.cleanup_stale(0) == 0
        assert temp.exists()
    finally:
        proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert await storage.cleanup_stale(24 * 3600) == 1
    # The media partial keeps the age rule: the next run resumes it.
    assert files_under(tmp_path) == ["rooms/.rec.mp4.partial"]
    assert await storage.stat("rooms/rec.mp4") is None
