"""S3 integrity on every dialect, with a real server behind a real relay (``tests.relays``) that
damages bytes or answers on the way, as a network or another store does.

- Bytes damaged on the way to S3 (BadDigest) or a part cut short are transient: sent again.
- A store that reports no checksum has what it holds read back, every part checked; on a store
  that neither checks nor reports (moto behind a relay), the read-back is what catches damage.
- A copy that fails its checks after it became visible and that Object Lock keeps is a leftover:
  the transfer records it in the ledger (quarantine), stores the recording again as a new
  version, and ``archiver status`` and ``archiver verify`` report it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from archiver.errors import NetworkError, ServerError, StorageError, TransientError
from archiver.ledger import open_ledger
from archiver.models import State
from archiver.simulator import Simulator, make_recordings
from archiver.storage import CommitRequest
from archiver.storage.s3 import S3Storage
from tests.conftest import ARCHIVER, cli_env, make_settings
from tests.fixtures_s3 import S3Server, s3_settings
from tests.relays import S3Relay
from tests.test_backfill import run
from tests.test_backfill_s3 import s3_overrides

MiB = 1 << 20
PARTS = {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB}
LOCK = {"object_lock_mode": "COMPLIANCE", "retention_days": 1}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def relayed(server: S3Server, **faults: Any) -> AsyncIterator[S3Relay]:
    relay = S3Relay(server.endpoint_url, **faults)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


def versions(server: S3Server, bucket: str, prefix: str) -> list[dict[str, Any]]:
    listing = server.client().list_object_versions(Bucket=bucket, Prefix=prefix)
    return list(listing.get("Versions", []))


def uploads(server: S3Server, bucket: str, prefix: str) -> list[str]:
    answer = server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in answer.get("Uploads", [])]


# -- bytes changed on the way: retried ----------------------------------------------------------


async def test_a_part_damaged_on_the_way_is_refused_and_sent_again(
    s3_server: S3Server, s3_prefix: str
) -> None:
    data = os.urandom(12 * MiB + 5)
    digest = hashlib.sha256()
    async with relayed(s3_server, damage_uploads=1) as relay:
        settings = s3_settings(s3_server, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            failures = 0
            for start in range(0, len(data), MiB):
                chunk = data[start : start + MiB]
                try:
                    await upload.write(chunk, digest=digest)
                except TransientError as exc:
                    # SeaweedFS checked the part against the SHA-256 sent with it.
                    assert isinstance(exc, NetworkError)
                    assert re.search(r"BadDigest|XAmzContentSHA256Mismatch", str(exc)), exc
                    failures += 1
                    await upload.write(chunk, digest=digest)  # the same bytes again
            assert failures == 1 and relay.damaged
            # The failed write fed neither the upload nor the digest.
            assert upload.offset == len(data) and digest.hexdigest() == sha(data)
            stored = await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
        async with S3Storage(s3_settings(s3_server, s3_prefix)) as storage:
            back = b"".join([c async for c in storage.read("rec.mp4")])
    assert stored.sha256 == sha(data) and back == data


async def test_a_single_put_damaged_on_the_way_is_refused_and_nothing_stays(
    s3_server: S3Server, s3_prefix: str
) -> None:
    data = os.urandom(64 * 1024)
    async with relayed(s3_server, damage_uploads=1) as relay:
        settings = s3_settings(s3_server, s3_prefix, endpoint_url=relay.url)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            await upload.write(data)
            with pytest.raises(NetworkError, match=r"BadDigest|XAmzContentSHA256Mismatch"):
                await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
            assert upload.leftovers == ()
    assert versions(s3_server, s3_server.bucket, s3_prefix) == []


async def test_a_part_cut_short_is_transient(s3_server: S3Server, s3_prefix: str) -> None:
    data = os.urandom(11 * MiB)
    async with relayed(s3_server, cut_uploads=1) as relay:
        settings = s3_settings(s3_server, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            failures = 0
            for start in range(0, len(data), MiB):
                chunk = data[start : start + MiB]
                try:
                    await upload.write(chunk)
                except TransientError:
                    failures += 1
                    await upload.write(chunk)
            assert failures == 1 and relay.damaged
            stored = await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
    assert stored.size == len(data)
    assert uploads(s3_server, s3_server.bucket, s3_prefix) == []


# -- a store that reports no checksum: read back --------------------------------------------------


async def test_a_store_that_reports_no_checksum_is_read_back(
    any_s3: S3Server, s3_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    big, small = os.urandom(40 * MiB + 3), os.urandom(100_000)
    async with relayed(any_s3, strip_checksums=True) as relay:
        settings = s3_settings(any_s3, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage:
            started = time.monotonic()
            async with await storage.begin("big.mp4") as upload:
                for start in range(0, len(big), MiB):
                    await upload.write(big[start : start + MiB])
                with caplog.at_level(logging.INFO, logger="archiver.storage.s3.commit"):
                    stored = await upload.commit(CommitRequest(sha256=sha(big), size=len(big)))
            took = time.monotonic() - started
            async with await storage.begin("small.mp4") as upload:
                await upload.write(small)
                single = await upload.commit(CommitRequest(sha256=sha(small), size=len(small)))
    assert (stored.sha256, single.sha256) == (sha(big), sha(small))
    [line] = [r.getMessage() for r in caplog.records if "back to check it" in r.getMessage()]
    seconds = float(re.search(r"in ([0-9.]+) s", line).group(1))  # type: ignore[union-attr]
    print(
        f"\n{any_s3.name}, no checksum reported: 40 MiB read back in {seconds:.2f} s "
        f"({len(big) / MiB / max(seconds, 1e-3):.0f} MiB/s), the whole commit cycle {took:.2f} s"
    )


async def test_a_store_that_neither_checks_nor_reports_is_caught_by_the_read_back(
    moto_server: S3Server, s3_prefix: str
) -> None:
    """moto accepts a part whose bytes changed on the way; with no checksum reported, only the
    read-back against the SHA-256 each part was sent with can tell."""
    data = os.urandom(12 * MiB)
    async with relayed(moto_server, strip_checksums=True, damage_uploads=1) as relay:
        settings = s3_settings(moto_server, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            for start in range(0, len(data), MiB):
                await upload.write(data[start : start + MiB])  # moto takes the damaged part
            with pytest.raises(ServerError, match=r"part 1 reads back with SHA-256"):
                await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
            assert upload.leftovers == ()  # not locked: deleted again
    assert relay.damaged
    assert versions(moto_server, moto_server.bucket, s3_prefix) == []
    assert uploads(moto_server, moto_server.bucket, s3_prefix) == []


# -- nothing locked is forgotten ----------------------------------------------------------------


async def test_a_locked_copy_that_fails_its_check_is_a_leftover(
    s3_server: S3Server, s3_prefix: str
) -> None:
    data = os.urandom(12 * MiB)
    async with relayed(s3_server, damage_checksums=1) as relay:
        settings = s3_settings(
            s3_server, s3_prefix, locked=True, endpoint_url=relay.url, **LOCK, **PARTS
        )
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            for start in range(0, len(data), MiB):
                await upload.write(data[start : start + MiB])
            with pytest.raises(ServerError, match=r"reports checksum .* it stays at rec\.mp4"):
                await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
            [left] = upload.leftovers
    [held] = versions(s3_server, s3_server.locked_bucket, s3_prefix)
    assert left.key == "rec.mp4" and left.version_id == held["VersionId"]
    assert left.retain_until is not None and "reports checksum" in left.reason


async def test_backfill_quarantines_a_locked_copy_and_stores_the_recording_again(
    sim_factory: Any, tmp_path: Any, s3_server: S3Server, s3_prefix: str
) -> None:
    recs = make_recordings(1, seed=61, size=11_000_000)
    sim: Simulator = await sim_factory(recs)
    async with relayed(s3_server, damage_checksums=1, damage_answers_to=("POST",)) as relay:
        overrides = s3_overrides(
            s3_server,
            s3_prefix,
            storage__s3__endpoint_url=relay.url,
            storage__s3__retention_days=1,
            storage__s3__multipart_threshold=5 * MiB,
            storage__s3__part_size=5 * MiB,
        )
        settings = make_settings(sim, tmp_path, **overrides)
        report = await run(settings)
    assert report.all_archived and relay.damaged == ["checksum"]
    rid = recs[0].id
    async with open_ledger(path=settings.ledger.path) as ledger:
        row = await ledger.get(rid)
        audit = [e.action async for e in ledger.iter_audit() if e.recording_id == rid]
    assert row is not None and row.state is State.ARCHIVED and row.storage_key is not None
    assert row.sha256 == sim.expected_sha256(rid)
    [copy] = row.quarantined["copies"]
    # An examiner sees both versions: the quarantined one and the archived one.
    held = [
        v["VersionId"]
        for v in versions(s3_server, s3_server.locked_bucket, s3_prefix + row.storage_key)
        if v["Key"] == s3_prefix + row.storage_key
    ]
    assert sorted(held) == sorted([copy["version_id"], row.version_id])
    assert copy["key"] == row.storage_key and "reports checksum" in copy["reason"]
    assert "quarantined" in audit and audit.index("quarantined") < audit.index("archived")

    # status and verify (the CLI, as an operator runs it) report it.
    config = tmp_path / "archiver.toml"
    config.write_text(
        f'[telnyx]\nbase_url = "{sim.api_base_url}"\napi_key_env = "ARCHIVER_TEST_KEY"\n'
        f'[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "{s3_server.locked_bucket}"\n'
        f'prefix = "{s3_prefix}"\nendpoint_url = "{s3_server.endpoint_url}"\n'
        f'region = "{s3_server.region}"\nobject_lock_mode = "COMPLIANCE"\nretention_days = 1\n'
        f'[ledger]\npath = "{settings.ledger.path}"\n'
    )
    code, out = await _cli(config, "status", "--json")
    assert code == 0, out
    [reported] = json.loads(out)["quarantined"]
    assert (reported["id"], reported["version_id"]) == (rid, copy["version_id"])
    code, out = await _cli(config, "status")
    assert "quarantined: 1 stored copy" in out and copy["version_id"] in out
    code, out = await _cli(config, "verify")
    assert code == 0, out
    assert f"QUARANTINED {rid} ({row.storage_key}, version {copy['version_id']}" in out
    assert "1 copies in quarantine" in out


async def _cli(config: Any, *args: str) -> tuple[int, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_failed_commit_of_an_unlocked_copy_leaves_nothing(
    any_s3: S3Server, s3_prefix: str
) -> None:
    data = os.urandom(11 * MiB)
    async with relayed(any_s3, damage_checksums=1) as relay:
        settings = s3_settings(any_s3, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            for start in range(0, len(data), MiB):
                await upload.write(data[start : start + MiB])
            with pytest.raises(ServerError, match="reports checksum"):
                await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
            assert upload.leftovers == ()
            with pytest.raises(StorageError):
                await upload.write(b"more")
    assert versions(any_s3, any_s3.bucket, s3_prefix) == []


async def test_a_locked_copy_stored_after_another_worker_archived_is_quarantined(
    sim_factory: Any, tmp_path: Any, s3_server: S3Server, s3_prefix: str
) -> None:
    """Two workers stored the same recording (the first one's lease had expired): the ledger
    keeps one; the other copy, locked beside it, is recorded too."""
    import dataclasses

    from archiver.filters import Filters
    from archiver.service import make_engine, open_services

    recs = make_recordings(1, seed=63, size=200_000)
    sim: Simulator = await sim_factory(recs)
    overrides = s3_overrides(s3_server, s3_prefix, storage__s3__retention_days=1)
    settings = make_settings(sim, tmp_path, **overrides)
    async with open_services(settings) as services:
        real = services.ledger

        class Racing:
            """The real ledger, where another worker completes first."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            async def complete(self, recording_id: str, *, owner: str, stored: Any) -> bool:
                other = dataclasses.replace(stored, version_id="the-other-workers-version")
                assert await real.complete(recording_id, owner="other/1", stored=other)
                return bool(await real.complete(recording_id, owner=owner, stored=stored))

        racing = dataclasses.replace(services, ledger=Racing())
        from archiver.service import backfill

        await backfill(racing, Filters(), make_engine(racing))  # type: ignore[arg-type]
        row = await real.get(recs[0].id)
    assert row is not None and row.version_id == "the-other-workers-version"
    [copy] = row.quarantined["copies"]
    key = s3_prefix + (row.storage_key or "-")
    [held] = [v for v in versions(s3_server, s3_server.locked_bucket, key) if v["Key"] == key]
    assert copy["version_id"] == held["VersionId"] and "another worker" in copy["reason"]


async def test_a_copy_that_cannot_be_checked_goes(any_s3: S3Server, s3_prefix: str) -> None:
    """S3 cannot say what it holds right after a commit (503): the copy is taken back, the
    failure stays transient, and nothing unchecked stays in the bucket."""
    data = os.urandom(11 * MiB)
    async with relayed(any_s3, fail_heads=1) as relay:
        settings = s3_settings(any_s3, s3_prefix, endpoint_url=relay.url, **PARTS)
        async with S3Storage(settings) as storage, await storage.begin("rec.mp4") as upload:
            for start in range(0, len(data), MiB):
                await upload.write(data[start : start + MiB])
            with pytest.raises(ServerError, match=r"cannot look up rec\.mp4"):
                await upload.commit(CommitRequest(sha256=sha(data), size=len(data)))
            assert upload.leftovers == ()
    assert len(relay.damaged) == 1
    assert versions(any_s3, any_s3.bucket, s3_prefix) == []
