"""A multipart upload into S3 continues across a crash, on both S3 dialects.

The real thing end to end: the archiver CLI in a subprocess, SIGKILLed once the source (the
simulator's download host, behind a relay that counts its bytes) has sent half of a 300 MB
recording into an Object Lock COMPLIANCE bucket; then a rerun. The rerun continues the upload the
ledger noted (list_parts, a Range request from the next byte), reads the object back once to check
every part and compute its SHA-256, and leaves no unfinished upload behind.

Then the ways continuing is impossible, each of which aborts the old upload at once: it is gone,
it is of another key, the source ignores Range.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Faults, SimRecording, Simulator, make_recordings
from archiver.storage import CommitRequest
from archiver.storage.s3 import S3Storage
from tests.conftest import ARCHIVER, KEY_ENV, cli_env, make_settings
from tests.fixtures_s3 import S3Server, s3_settings
from tests.relays import ByteRelay
from tests.test_backfill import run
from tests.test_backfill_s3 import s3_overrides

MiB = 1 << 20
SIZE = 300_000_000
# Killed once the source sent half: the rerun asks only for what the note does not hold. The
# parts fetched but still going up when the process died are lost with it (up to
# ``max_threads`` of them; more of them lag on a loaded host), so well under the whole
# recording, not exactly half.
RESENT_AT_MOST = 0.7
# S3's smallest parts: a crash costs the part that was filling (and what the network held).
PARTS = "multipart_threshold = 5242880\npart_size = 5242880\n"


def relayed_url(sim: Simulator, rec: SimRecording, relay: ByteRelay) -> str:
    """A long-lived signed download URL for ``rec`` that goes through ``relay``."""
    url = urlsplit(sim.download_url(rec.id, expires=int(time.time()) + 3600))
    return urlunsplit(url._replace(netloc=f"127.0.0.1:{relay.port}"))


def config(sim: Simulator, root: Path, server: S3Server, prefix: str, extra_s3: str = "") -> Path:
    path = root / "archiver.toml"
    path.write_text(
        f'[telnyx]\nbase_url = "{sim.api_base_url}"\napi_key_env = "{KEY_ENV}"\n'
        "max_backoff = 0.05\n"
        f'[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "{server.locked_bucket}"\n'
        f'prefix = "{prefix}"\nendpoint_url = "{server.endpoint_url}"\n'
        f'region = "{server.region}"\nobject_lock_mode = "COMPLIANCE"\nretention_days = 1\n'
        f"{extra_s3}"
        f'[ledger]\npath = "{root / "ledger.db"}"\n'
        "[workers]\nconcurrency = 1\n"
    )
    return path


async def archiver(config: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "--log-format",
        "text",
        "--log-level",
        "info",
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def unfinished(server: S3Server, prefix: str) -> list[dict[str, Any]]:
    answer = server.client().list_multipart_uploads(Bucket=server.locked_bucket, Prefix=prefix)
    return list(answer.get("Uploads", []))


def noted_bytes(upload: Mapping[str, Any]) -> int:
    """The bytes of the parts an upload's note lists as sent."""
    return sum(size for size, _, _ in upload.get("parts", []))


def pending_bytes(upload: Mapping[str, Any]) -> int:
    """The bytes of the part that was going up when the note was written (0: none)."""
    return int(upload["pending"][0]) if upload.get("pending") else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_a_killed_multipart_upload_is_continued_by_the_rerun(
    sim_factory: Any, tmp_path: Path, any_s3: S3Server, s3_prefix: str, sig: signal.Signals
) -> None:
    """SIGKILL, or a stop (SIGTERM with no grace left): either way the rerun continues the
    upload the ledger notes, never a new one from zero."""
    [rec] = make_recordings(1, seed=71, size=SIZE)
    sim: Simulator = await sim_factory([rec], content_cache=tmp_path / "content")
    sim.warm_content_cache()
    relay = ByteRelay("127.0.0.1", int(urlsplit(sim.download_base_url).port or 0))
    await relay.start()
    rec.download_url_override = relayed_url(sim, rec, relay)
    cfg = config(sim, tmp_path, any_s3, s3_prefix, extra_s3=PARTS)
    cfg.write_text(cfg.read_text() + "[daemon]\nshutdown_grace = 0.0\n")
    try:
        first = await archiver(cfg, "backfill")
        relay.when(SIZE // 2, lambda: first.send_signal(sig))
        _, err = await first.communicate()
        # A stopped backfill exits 3 (interrupted, still owed) and gives its lease back.
        assert first.returncode == (-sig if sig == signal.SIGKILL else 3), err.decode()[-3000:]
        sent_first = relay.sent

        # What the process left: one unfinished upload, noted in the ledger.
        [left] = unfinished(any_s3, s3_prefix)
        async with open_ledger(path=tmp_path / "ledger.db") as ledger:
            row = await ledger.get(rec.id)
        held = State.IN_PROGRESS if sig == signal.SIGKILL else State.PENDING
        assert row is not None and row.state is held
        assert row.upload["upload_id"] == left["UploadId"]
        noted, pending = noted_bytes(row.upload), pending_bytes(row.upload)
        assert noted > SIZE // 3

        relay.reset()
        asked = len(sim.download_requests)
        started = time.monotonic()
        rerun = await archiver(cfg, "backfill")
        out, err = await rerun.communicate()
        took = time.monotonic() - started
        assert rerun.returncode == 0, (out.decode(), err.decode()[-3000:])
        resent = relay.sent
        # Right after the rerun: nothing unfinished in the bucket.
        assert unfinished(any_s3, s3_prefix) == []
    finally:
        await relay.close()
    log = err.decode()
    read_back = re.search(r"read \S+ back to check it: (\d+) bytes in ([0-9.]+) s", log)
    assert read_back is not None, log[-3000:]
    resumed = re.search(rf"resuming {rec.id} from byte (\d+)", log)
    assert resumed is not None, log[-3000:]
    # After the parts noted as sent, and the one that was going up if it had landed.
    kept = int(resumed.group(1))
    assert kept in (noted, noted + pending)
    print(
        f"\n{any_s3.name}: killed after the source sent {sent_first / SIZE:.1%} of {SIZE:,} "
        f"bytes; the rerun continued after {kept / SIZE:.1%} and had the source send "
        f"{resent:,} bytes ({resent / SIZE:.1%}) and took {took:.1f} s, reading the object back "
        f"in {float(read_back.group(2)):.2f} s"
    )
    assert resent <= RESENT_AT_MOST * SIZE
    # One request, for the rest only: the noted upload was taken up before asking the source.
    assert [r.range for r in sim.download_requests[asked:]] == [f"bytes={kept}-"]

    # Complete, verified, locked, and the ledger says so.
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        row = await ledger.get(rec.id)
    assert row is not None and row.state is State.ARCHIVED and row.upload == {}
    assert row.sha256 == sim.expected_sha256(rec.id) and row.size == SIZE
    assert row.claims == 2
    assert row.storage_key is not None
    head = any_s3.client().head_object(
        Bucket=any_s3.locked_bucket, Key=s3_prefix + row.storage_key, ChecksumMode="ENABLED"
    )
    assert head["ContentLength"] == SIZE and head["ObjectLockMode"] == "COMPLIANCE"
    assert head["VersionId"] == row.version_id
    verify = await archiver(cfg, "verify")
    out, err = await verify.communicate()
    assert verify.returncode == 0, (out.decode(), err.decode())
    assert "1 recordings checked" in out.decode() and "0 problem(s)" in out.decode()


# -- continuing is impossible: the old upload is aborted at once ------------------------------


class Notes:
    """A ledger stand-in for one upload's notes (the storage's side of ``ResumeNotes``)."""

    def __init__(self, previous: Mapping[str, Any] | None = None) -> None:
        self.previous: Mapping[str, Any] = previous or {}
        self.last: Mapping[str, Any] = {}

    async def note(self, state: Mapping[str, Any]) -> None:
        self.last = state


async def leave_upload(server: S3Server, prefix: str, key: str, data: bytes) -> Mapping[str, Any]:
    """Upload the start of ``data`` as a killed process would (its parts noted); the note."""
    notes = Notes()
    settings = s3_settings(server, prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)
    async with S3Storage(settings) as storage:
        upload = await storage.begin(key, notes=notes)
        for start in range(0, len(data), MiB):
            await upload.write(data[start : start + MiB])
        await upload.release()
    assert notes.last["parts"], notes.last
    return notes.last


async def test_an_upload_is_continued_from_its_note(any_s3: S3Server, s3_prefix: str) -> None:
    data = os.urandom(23 * MiB + 11)
    note = await leave_upload(any_s3, s3_prefix, "rec.mp4", data[: 16 * MiB])
    settings = s3_settings(any_s3, s3_prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)
    async with S3Storage(settings) as storage:
        upload = await storage.begin("rec.mp4", notes=Notes(note))
        assert upload.offset == 15 * MiB and not upload.existing_readable
        with pytest.raises(Exception, match="cannot be read back"):
            _ = [c async for c in upload.existing()]
        for start in range(upload.offset, len(data), MiB):
            await upload.write(data[start : start + MiB])
        stored = await upload.commit(CommitRequest(sha256=None, size=len(data)))
        info = await storage.stat("rec.mp4")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert info is not None and info.sha256 == stored.sha256  # the tag carries the read-back hash
    assert (
        any_s3.client()
        .list_multipart_uploads(Bucket=any_s3.bucket, Prefix=s3_prefix)
        .get("Uploads", [])
        == []
    )


async def test_a_note_of_a_part_s3_holds_otherwise_continues_before_it(
    s3_server: S3Server, s3_prefix: str
) -> None:
    """Only the parts the note and S3 agree on count; a part noted otherwise is sent again."""
    data = os.urandom(21 * MiB)
    note = dict(await leave_upload(s3_server, s3_prefix, "rec.mp4", data[: 16 * MiB]))
    parts = [list(p) for p in note["parts"]]
    parts[1][2] = '"0123456789abcdef0123456789abcdef"'  # part 2's ETag: not what S3 holds
    note["parts"] = parts
    settings = s3_settings(s3_server, s3_prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)
    async with S3Storage(settings) as storage:
        upload = await storage.begin("rec.mp4", notes=Notes(note))
        assert upload.offset == 5 * MiB
        for start in range(upload.offset, len(data), MiB):
            await upload.write(data[start : start + MiB])
        stored = await upload.commit(CommitRequest(sha256=None, size=len(data)))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


async def test_a_note_of_an_upload_that_is_gone_starts_over(
    any_s3: S3Server, s3_prefix: str
) -> None:
    note = await leave_upload(any_s3, s3_prefix, "rec.mp4", os.urandom(12 * MiB))
    any_s3.client().abort_multipart_upload(
        Bucket=any_s3.bucket, Key=s3_prefix + "rec.mp4", UploadId=note["upload_id"]
    )
    async with S3Storage(s3_settings(any_s3, s3_prefix)) as storage:
        upload = await storage.begin("rec.mp4", notes=Notes(note))
        assert upload.offset == 0 and upload.existing_readable
        await upload.abort()


async def test_a_note_of_another_key_is_aborted_at_once(any_s3: S3Server, s3_prefix: str) -> None:
    note = await leave_upload(any_s3, s3_prefix, "old.mp4", os.urandom(12 * MiB))
    assert [u["Key"] for u in unfinished_in(any_s3, s3_prefix)] == [s3_prefix + "old.mp4"]
    async with S3Storage(s3_settings(any_s3, s3_prefix)) as storage:
        upload = await storage.begin("new.mp4", notes=Notes(note))
        assert upload.offset == 0
        assert unfinished_in(any_s3, s3_prefix) == []
        await upload.abort()


def unfinished_in(server: S3Server, prefix: str) -> list[dict[str, Any]]:
    answer = server.client().list_multipart_uploads(Bucket=server.bucket, Prefix=prefix)
    return list(answer.get("Uploads", []))


async def test_a_source_that_ignores_range_aborts_the_noted_upload_and_starts_over(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str
) -> None:
    size = 30_000_000
    [rec] = make_recordings(1, seed=73, size=size)
    sim: Simulator = await sim_factory([rec])
    relay = ByteRelay("127.0.0.1", int(urlsplit(sim.download_base_url).port or 0))
    await relay.start()
    rec.download_url_override = relayed_url(sim, rec, relay)
    cfg = config(sim, tmp_path, s3_server, s3_prefix, extra_s3=PARTS)
    try:
        first = await archiver(cfg, "backfill")
        relay.when(size * 4 // 5, lambda: first.send_signal(signal.SIGKILL))
        _, err = await first.communicate()
        assert first.returncode == -signal.SIGKILL, err.decode()[-3000:]
        async with open_ledger(path=tmp_path / "ledger.db") as ledger:
            row = await ledger.get(rec.id)
        assert row is not None and noted_bytes(row.upload) > 0, row.upload
        [left] = unfinished(s3_server, s3_prefix)

        sim.faults.ignore_range = True
        sim.download_requests.clear()
        relay.reset()
        rerun = await archiver(cfg, "backfill")
        out, err = await rerun.communicate()
        assert rerun.returncode == 0, (out.decode(), err.decode()[-3000:])
    finally:
        await relay.close()
    # Asked for the rest, the source sent everything: the old upload went at once, and the
    # recording was uploaded from its first byte.
    held = noted_bytes(row.upload)
    assert sim.download_requests[0].range in (
        f"bytes={held}-",
        f"bytes={held + pending_bytes(row.upload)}-",
    )
    assert relay.sent >= size
    assert unfinished(s3_server, s3_prefix) == []
    assert "server ignored Range; starting over" in err.decode()
    async with open_ledger(path=tmp_path / "ledger.db") as ledger:
        done = await ledger.get(rec.id)
    assert done is not None and done.state is State.ARCHIVED
    assert done.sha256 == sim.expected_sha256(rec.id)
    assert left["UploadId"] != (done.upload or {}).get("upload_id")


async def test_a_lost_lease_leaves_the_upload_to_the_new_owner(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str
) -> None:
    """Whoever holds the recording now may be continuing this very upload: it is not aborted."""
    import sqlite3

    [rec] = make_recordings(1, seed=75, size=16_000_000)
    sim: Simulator = await sim_factory([rec], Faults(slow_chunk_delay=0.02))
    overrides = s3_overrides(
        s3_server,
        s3_prefix,
        storage__s3__retention_days=1,
        storage__s3__multipart_threshold=5 * MiB,
        storage__s3__part_size=5 * MiB,
        workers__lease_seconds=0.3,
    )
    settings = make_settings(sim, tmp_path, **overrides)

    async def steal() -> None:
        # Once a part is noted, the row passes to another instance (its lease expired).
        while True:
            await asyncio.sleep(0.05)
            if not settings.ledger.path.exists():
                continue  # connecting would create it
            try:
                with sqlite3.connect(settings.ledger.path) as db:
                    moved = db.execute(
                        "UPDATE recordings SET lease_owner = 'thief', "
                        "lease_expires = '2999-01-01T00:00:00.000000+00:00' "
                        "WHERE id = ? AND state = 'in_progress' AND upload LIKE '%upload_id%'",
                        (rec.id,),
                    ).rowcount
            except sqlite3.OperationalError:
                continue  # the schema is not there yet, or the ledger is busy
            if moved:
                return

    thief = asyncio.create_task(steal())
    report = await run(settings)
    await thief
    assert report.archived == 0
    [left] = unfinished(s3_server, s3_prefix)
    async with open_ledger(path=settings.ledger.path) as ledger:
        row = await ledger.get(rec.id)
    assert row is not None and row.lease_owner == "thief"
    assert row.upload["upload_id"] == left["UploadId"]  # the new owner's to continue
