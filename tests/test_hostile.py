"""Never archive the wrong bytes, never delete on a bad copy: hostile download hosts, hostile
listings and bad stored copies, end to end.

Each test runs on local storage and on real S3 (SeaweedFS), against the simulator over loopback,
through the real ``archiver`` command in a subprocess (its exit code and output are part of the
promise), with ``[source] delete_after_archive = true`` where it applies. For a hostile answer:
nothing of it is stored (no object, no sidecar, no partial file or multipart upload left), its
ledger row is owed with a sentence saying what was wrong (``archiver status``), no DELETE goes to
the API for it, the backfill exits 1, and the good recordings of the same run are archived and
deleted at the source as usual. The one test run in-process is the one whose failure would fill
the disk: there a listener stops the engine past a byte budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from archiver import layout, simulator
from archiver.config import Settings, load_settings
from archiver.filters import Filters
from archiver.ledger import open_ledger
from archiver.models import LedgerRow, State, StoredObject
from archiver.pipeline import Engine, Listener
from archiver.service import backfill, make_engine, make_ledger, make_storage, open_services
from archiver.simulator import Faults, SimRecording, Simulator, container_header, make_recordings
from archiver.telnyx import TelnyxClient
from tests.conftest import API_KEY, ARCHIVER, KEY_ENV, cli_env
from tests.fixtures_s3 import S3Server

MiB = 1 << 20
# The most one archiver command may take here; a hostile body that holds a run longer fails it.
DEADLINE = 60.0
# `archiver status` and backfill summaries: no line may grow with what a listing sent.
MAX_LINE = 300
# The archive's identity record (``archiver.identity``): the archive's own, not a recording's.
IDENTITY = ".archiver-id.json"


# -- the archive under test: local disk or S3 ----------------------------------------------------


@dataclass
class Site:
    """Where a test's archive and ledger live, and what the archive holds (everything, not only
    committed keys: partial files and multipart uploads count as junk too)."""

    backend: str
    root: Path
    server: S3Server | None = None
    prefix: str = ""

    def storage_keys(self) -> dict[str, Any]:
        if self.server is None:
            return {"storage.backend": "local", "storage.path": str(self.root / "archive")}
        return {
            "storage.backend": "s3",
            "storage.s3.bucket": self.server.bucket,
            "storage.s3.prefix": self.prefix,
            "storage.s3.endpoint_url": self.server.endpoint_url,
            "storage.s3.region": self.server.region,
            # The smallest parts S3 takes: a body past 5 MiB becomes a multipart upload.
            "storage.s3.multipart_threshold": 5 * MiB,
            "storage.s3.part_size": 5 * MiB,
        }

    def stored(self) -> list[str]:
        """Every file under the archive root, or every object version and delete marker under
        the prefix, relative to it."""
        if self.server is None:
            archive = self.root / "archive"
            keys = [str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file()]
        else:
            listing = self.server.client().list_object_versions(
                Bucket=self.server.bucket, Prefix=self.prefix
            )
            entries = [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]
            keys = [str(v["Key"])[len(self.prefix) :] for v in entries]
        return sorted(k for k in keys if k != IDENTITY)

    def unfinished(self) -> list[str]:
        """Multipart uploads started and never completed nor aborted (S3 only)."""
        if self.server is None:
            return []
        uploads = self.server.client().list_multipart_uploads(
            Bucket=self.server.bucket, Prefix=self.prefix
        )
        return [str(u["Key"]) for u in uploads.get("Uploads", [])]

    def read(self, key: str) -> bytes:
        if self.server is None:
            return (self.root / "archive" / key).read_bytes()
        obj = self.server.client().get_object(Bucket=self.server.bucket, Key=self.prefix + key)
        return obj["Body"].read()


@pytest.fixture(params=["local", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    if request.param == "local":
        return Site("local", tmp_path)
    server: S3Server = request.getfixturevalue("s3_server")
    return Site("s3", tmp_path, server, request.getfixturevalue("s3_prefix"))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_config(sim: Simulator, site: Site, name: str = "archiver.toml", **keys: Any) -> Path:
    """A config file for the real CLI (and, read back, for the in-process checks). ``keys``
    are dotted with ``__`` (``workers__read_timeout=1.0``)."""
    values: dict[str, Any] = {
        "telnyx.base_url": sim.api_base_url,
        "telnyx.api_key_env": KEY_ENV,
        "telnyx.max_backoff": 0.05,
        "telnyx.max_attempts": 4,
        "ledger.path": str(site.root / "ledger.db"),
        "backfill.processing_wait": 0.0,
        **site.storage_keys(),
        **{k.replace("__", "."): v for k, v in keys.items()},
    }
    sections: dict[str, list[str]] = {}
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        sections.setdefault(section, []).append(f"{key} = {_toml(value)}")
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items())
    path = site.root / name
    path.write_text(text)
    return path


def settings_of(config: Path) -> Settings:
    return load_settings(str(config), env={KEY_ENV: API_KEY})


async def archiver(config: Path, *args: str, deadline: float = DEADLINE) -> tuple[int, str, str]:
    """The real command, in a subprocess, within ``deadline``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        cwd=config.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), deadline)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"archiver {' '.join(args)} did not finish within {deadline:g} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text, text


async def rows(settings: Settings, ids: list[str]) -> dict[str, LedgerRow]:
    async with open_ledger(path=settings.ledger.path) as ledger:
        found = {rid: await ledger.get(rid) for rid in ids}
    return {rid: row for rid, row in found.items() if row is not None}


def deletes(sim: Simulator) -> list[str]:
    """The paths of every DELETE the API received."""
    return sorted(r.path for r in sim.api_requests if r.method == "DELETE")


def expected_deletes(ids: list[str]) -> list[str]:
    return sorted(f"/v2/room_recordings/{rid}" for rid in ids)


async def check_good_ones_archived_and_deleted(
    sim: Simulator, site: Site, settings: Settings, good: list[SimRecording]
) -> set[str]:
    """The good recordings of a run: archived with the right bytes, deleted at the source once
    each. Returns their keys and sidecar keys."""
    found = await rows(settings, [g.id for g in good])
    keys: set[str] = set()
    for rec in good:
        row = found[rec.id]
        assert row.state is State.ARCHIVED, (rec.id, row.state, row.last_error)
        assert row.sha256 == sim.expected_sha256(rec.id)
        assert row.deleted_at_source is not None
        assert row.storage_key is not None
        assert hashlib.sha256(site.read(row.storage_key)).hexdigest() == row.sha256
        keys |= {row.storage_key, layout.sidecar_key(row.storage_key)}
    assert sorted(sim.deleted_ids) == sorted(g.id for g in good)
    return keys


# -- hostile download hosts and URLs -------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    # What the ledger's reason (and `archiver status`) must say.
    says: str
    fault: str | None = None  # SimRecording.download_fault
    url: Callable[[Simulator, SimRecording], str] | None = None  # the entry's download_url
    size: int = 300_000
    faults: Mapping[str, Any] = field(default_factory=dict)
    keys: Mapping[str, Any] = field(default_factory=dict)
    deadline: float = DEADLINE  # for the backfill


def _with_credentials(sim: Simulator, rec: SimRecording) -> str:
    # The real signed URL (it would serve the real bytes), with userinfo before the host.
    return sim.download_url(rec.id).replace("http://", "http://user:pass@", 1)


ATTACKS = [
    # Half of the body, no Content-Length, a clean end: only size_mb shows it is cut short.
    Attack("half_no_length", "150,000 bytes, but the API's size_mb 0.3", fault="half_no_length"),
    Attack("html", "an HTML page (Content-Type: text/html", fault="html"),
    Attack("empty", "an empty body", fault="empty"),
    Attack(
        "redirect_elsewhere", "a text body (Content-Type: text/plain", fault="redirect_elsewhere"
    ),
    Attack(
        "wrong_type_binary", "does not start like any media container", fault="wrong_type_binary"
    ),
    Attack("gzip", "a gzip-encoded body (Content-Encoding: gzip)", fault="gzip"),
    Attack("oversize", "5,300,000 bytes, but the API's size_mb 0.3", fault="oversize"),
    # 6 MB: past the 5 MiB multipart threshold on S3, so an upload is under way when it is cut
    # off, at size_mb 6.0's most: 6.05 MiB.
    Attack("endless", "sends more than the 6,343,884 bytes", fault="endless", size=6_000_000),
    Attack(
        "drip",
        "slower than workers.min_throughput",
        fault="drip",
        faults={"drip_interval": 0.05},
        keys={"workers__read_timeout": 1.0},
        # Four tries of about a second each (read_timeout, then the floor), not 4 hours.
        deadline=20.0,
    ),
    Attack(
        "metadata",
        "169.254.169.254 is a cloud metadata address, where archiver never connects",
        url=lambda sim, rec: "http://169.254.169.254/latest/meta-data/",
    ),
    Attack("api_echo", "the Telnyx API's own origin", url=lambda sim, rec: sim.echo_url),
    # Another origin by name, the API's address and port once resolved.
    Attack(
        "api_echo_by_name",
        "is the Telnyx API itself",
        url=lambda sim, rec: sim.echo_url.replace("//127.0.0.1:", "//localhost:"),
    ),
    Attack("userinfo", "carries credentials", url=_with_credentials),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
async def test_a_hostile_answer_is_never_archived_nor_deleted_at_the_source(
    attack: Attack, site: Site, sim_factory: Any
) -> None:
    recs = make_recordings(3, seed=61, size=200_000)
    bad, good = recs[0], recs[1:]
    bad.size = attack.size
    bad.download_fault = attack.fault
    sim: Simulator = await sim_factory(recs, Faults(**attack.faults))
    if attack.url is not None:
        sim.point_download_url(bad.id, attack.url(sim, bad))
    config = write_config(
        sim,
        site,
        source__delete_after_archive=True,
        # Two claims of two attempts each: every try gets the same hostile answer.
        workers__transfer_attempts=2,
        workers__max_attempts=2,
        **attack.keys,
    )

    code, out, err = await archiver(config, "backfill", deadline=attack.deadline)
    assert code == 1, out + err
    no_traceback(out, err)
    assert lines_with(out, bad.id), out

    code, status, err = await archiver(config, "status")
    assert code == 0, err
    said = lines_with(status, bad.id)
    assert len(said) == 1 and attack.says in said[0], status
    assert all(len(line) <= MAX_LINE for line in status.splitlines()), status

    settings = settings_of(config)
    row = (await rows(settings, [bad.id]))[bad.id]
    assert row.state is State.FAILED and row.storage_key is None and row.sha256 is None
    assert row.last_error is not None and attack.says in row.last_error
    async with open_ledger(path=settings.ledger.path) as ledger:
        assert (await ledger.tally([bad.id])).owed == 1

    keys = await check_good_ones_archived_and_deleted(sim, site, settings, good)
    assert site.stored() == sorted(keys), "something of the hostile answer was stored"
    assert site.unfinished() == []
    assert bad.id not in sim.deleted_ids
    assert deletes(sim) == expected_deletes([g.id for g in good])
    assert sim.bulk_delete_calls == []

    # Credentials of no kind went to a download host, nor anything to the API's /echo.
    for req in sim.download_requests:
        assert "Authorization" not in req.headers and API_KEY not in req.raw_path
    assert not [r for r in sim.api_requests if r.path.startswith("/echo")]
    if attack.url is not None:
        # Refused before any request: none of these URLs leads to the download host's files.
        assert not [r for r in sim.download_requests if r.id == bad.id]
    else:
        assert sim.injected[f"download:{attack.fault}"] > 0


# -- bodies whose length nothing announces (open bugs in archiver/transfer.py) ------------------


def _without_size_mb(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "size_mb"}


@pytest.mark.parametrize("listed", ["small", "no_size_mb"])
async def test_a_body_cut_short_where_size_mb_cannot_tell_is_neither_archived_nor_deleted(
    listed: str, site: Site, sim_factory: Any
) -> None:
    # 40 kB is listed as size_mb 0.0, and 20 kB fits that; without size_mb anything fits.
    recs = make_recordings(3, seed=67, size=40_000 if listed == "small" else 300_000)
    bad, good = recs[0], recs[1:]
    bad.download_fault = "half_no_length"
    if listed == "no_size_mb":
        bad.entry_hook = _without_size_mb
    sim: Simulator = await sim_factory(recs)
    config = write_config(
        sim,
        site,
        source__delete_after_archive=True,
        workers__transfer_attempts=2,
        workers__max_attempts=2,
    )

    code, out, err = await archiver(config, "backfill")

    assert bad.id not in sim.deleted_ids, "half of the recording was archived, the rest deleted"
    assert deletes(sim) == expected_deletes([g.id for g in good])
    assert code == 1, out + err
    settings = settings_of(config)
    row = (await rows(settings, [bad.id]))[bad.id]
    assert row.state is not State.ARCHIVED and row.last_error
    keys = await check_good_ones_archived_and_deleted(sim, site, settings, good)
    assert site.stored() == sorted(keys) and site.unfinished() == []


class StopPast(Listener):
    """Stops the engine once a run has received more than ``limit`` bytes: the bound that keeps
    an unbounded transfer from filling the disk while its test fails."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.engine: Engine | None = None

    def transferred(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received > self.limit and self.engine is not None:
            self.engine.stop.set()


async def test_an_endless_body_without_size_mb_is_cut_off(site: Site, sim_factory: Any) -> None:
    recs = make_recordings(3, seed=68, size=50_000)
    bad, good = recs[0], recs[1:]
    bad.download_fault = "endless"
    bad.entry_hook = _without_size_mb
    bad.duration_secs = 2  # even 25 MB a second would be 50 MB
    sim: Simulator = await sim_factory(recs)
    config = write_config(
        sim,
        site,
        source__delete_after_archive=True,
        workers__transfer_attempts=1,
        workers__max_attempts=1,
        daemon__shutdown_grace=0.0,
    )
    settings = settings_of(config)
    guard = StopPast(128 * MiB)

    async with open_services(settings) as services:
        engine = guard.engine = make_engine(services, [guard])
        result = await asyncio.wait_for(backfill(services, Filters(), engine), DEADLINE)

    assert not result.stopped, f"still reading the endless body after {guard.received:,} bytes"
    assert result.exit_code == 1
    row = (await rows(settings, [bad.id]))[bad.id]
    assert row.state is State.FAILED and row.last_error
    keys = await check_good_ones_archived_and_deleted(sim, site, settings, good)
    assert site.stored() == sorted(keys) and site.unfinished() == []


# -- a listing from somewhere else ---------------------------------------------------------------


@dataclass
class Decoy:
    """A second loopback server answering any GET with a listing of its own."""

    listing: dict[str, Any]
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        return web.json_response(self.listing)


@pytest.fixture
async def decoy() -> AsyncIterator[Decoy]:
    server = Decoy(listing={})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        server.url = f"http://127.0.0.1:{port}/v2/room_recordings"
        yield server
    finally:
        await runner.cleanup()


async def test_a_listing_redirected_to_another_origin_is_not_followed(
    site: Site, sim_factory: Any, decoy: Decoy
) -> None:
    recs = make_recordings(3, seed=62, size=50_000)
    sim: Simulator = await sim_factory(recs)
    # What the other origin would list: the real recordings with working download URLs, and
    # one it made up. Trusted, they would be archived and then deleted at the source.
    entries: list[dict[str, Any]] = [
        {
            "id": rec.id,
            "record_type": "room_recording",
            "status": "completed",
            "download_url": sim.download_url(rec.id),
            "size_mb": round(rec.size / 1e6, 1),
            "room_id": rec.room_id,
            "ended_at": "2025-01-02T00:00:00Z",
        }
        for rec in recs
    ]
    entries.append({**entries[0], "id": "0000aaaa-0000-4000-8000-000000000000"})
    decoy.listing = {"data": entries, "meta": {"total_pages": 1, "total_results": len(entries)}}
    sim.faults.list_redirect_to = decoy.url
    config = write_config(sim, site, source__delete_after_archive=True)

    code, out, err = await archiver(config, "backfill")

    assert code == 2, out + err  # telnyx.base_url is wrong: a configuration error
    no_traceback(out, err)
    said = lines_with(err, "another origin")
    assert len(said) == 1 and "check telnyx.base_url" in said[0], err
    assert API_KEY not in out + err
    assert decoy.requests == []  # not followed, so the key never went there
    assert sim.injected["list:redirect"] > 0
    assert sim.download_requests == [] and sim.deleted_ids == [] and deletes(sim) == []
    assert site.stored() == [] and site.unfinished() == []
    settings = settings_of(config)
    assert await rows(settings, [e["id"] for e in entries]) == {}


# -- an absurd listing entry ---------------------------------------------------------------------


async def test_absurd_entries_are_rejected_without_being_kept(site: Site, sim_factory: Any) -> None:
    recs = make_recordings(3, seed=65, size=50_000)
    long_id, long_url, good = recs
    long_id.entry_hook = lambda e: {**e, "id": "a" * 250}
    long_url.entry_hook = lambda e: {**e, "download_url": e["download_url"] + "&pad=" + "b" * 9000}
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, site, source__delete_after_archive=True)

    code, out, err = await archiver(config, "backfill")
    assert code == 1, out + err
    no_traceback(out, err)
    code, status, err = await archiver(config, "status")
    assert code == 0, err
    for text in (out, status):
        assert all(len(line) <= MAX_LINE for line in text.splitlines()), text
    assert "a" * 100 not in out + status and "b" * 100 not in out + status
    assert len(lines_with(status, "malformed entry")) == 2, status

    # Nothing the ledger holds for them is more than a few hundred bytes, audit entries included.
    settings = settings_of(config)
    others, audit = ledger_dump(settings, good.id)
    assert len(others) == 2
    for record in [*others, *audit]:
        for value in record.values():
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            if isinstance(value, str):
                assert len(value) <= 400, record
                assert "a" * 200 not in value and "b" * 200 not in value, record
    # The one with a usable id is owed under it; the other under a stand-in.
    ids = sorted(str(r["id"]) for r in others)
    assert ids[0] == long_url.id and ids[1].startswith("malformed-"), ids

    # Their (working) URLs were never fetched; the good one went its usual way.
    assert {r.id for r in sim.download_requests} == {good.id}
    await check_good_ones_archived_and_deleted(sim, site, settings, [good])
    assert deletes(sim) == expected_deletes([good.id])

    # Listed again later (every signed URL differs: a new Expires), they are the same two rows,
    # not two more owed for good on every run.
    sim.url_ttl += 100
    code, out, err = await archiver(config, "backfill")
    assert code == 1, out + err
    assert sorted(str(r["id"]) for r in ledger_dump(settings, good.id)[0]) == ids

    # Listed in a usable form, the recording is archived and deleted like any other.
    long_url.entry_hook = None
    code, out, err = await archiver(config, "backfill")
    assert code == 1, out + err  # the stand-in is still owed: nothing says what it was
    await check_good_ones_archived_and_deleted(sim, site, settings, [good, long_url])
    assert [str(r["id"]) for r in ledger_dump(settings, good.id, long_url.id)[0]] == ids[1:]


def ledger_dump(
    settings: Settings, *leave_out: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The SQLite ledger's recording rows and audit entries, but those of ``leave_out``."""
    marks = ", ".join("?" * len(leave_out))
    with sqlite3.connect(settings.ledger.path) as db:
        db.row_factory = sqlite3.Row
        found = db.execute(f"SELECT * FROM recordings WHERE id NOT IN ({marks})", leave_out)
        recordings = [dict(r) for r in found.fetchall()]
        found = db.execute(
            f"SELECT * FROM audit WHERE coalesce(recording_id, '') NOT IN ({marks})", leave_out
        )
        audit = [dict(r) for r in found.fetchall()]
    db.close()
    return recordings, audit


# -- an API answer about another recording -------------------------------------------------------


async def test_a_retrieve_answering_for_another_recording_is_not_trusted(
    site: Site, sim_factory: Any
) -> None:
    recs = make_recordings(3, seed=69, size=50_000)
    asked, other, good = recs
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, site, source__delete_after_archive=True, workers__max_attempts=2)
    settings = settings_of(config)
    # The ledger owes ``asked`` from an earlier listing; now the API answers for it (in lists
    # and retrieves) with the entry of another recording, working download URL and all.
    async with TelnyxClient(settings.telnyx) as api:
        listed = await api.retrieve(asked.id)
    async with make_ledger(settings, exclusive=False) as ledger:
        assert asked.id in await ledger.observe([listed])
    asked.entry_hook = lambda e: {**e, "id": other.id, "download_url": sim.download_url(other.id)}

    code, out, err = await archiver(config, "backfill")

    assert asked.id not in sim.deleted_ids, "deleted at the source for a copy of another one"
    assert code == 1, out + err
    no_traceback(out, err)
    row = (await rows(settings, [asked.id]))[asked.id]
    assert row.state is not State.ARCHIVED and row.storage_key is None, row
    assert row.last_error is not None and "answered with another recording" in row.last_error
    keys = await check_good_ones_archived_and_deleted(sim, site, settings, [other, good])
    assert site.stored() == sorted(keys)


# -- a bad copy archived before these checks existed ---------------------------------------------

PORTAL_PAGE = b"<!doctype html><html><head><title>Sign in</title></head><body>Hi</body></html>\n"


async def test_a_bad_copy_an_older_version_archived_is_reported_and_kept_at_the_source(
    site: Site, sim_factory: Any
) -> None:
    recs = make_recordings(2, seed=63, size=50_000)
    older, good = recs
    sim: Simulator = await sim_factory(recs)
    keep = write_config(sim, site, "keep.toml")
    purge = write_config(sim, site, "purge.toml", source__delete_after_archive=True)
    settings = settings_of(keep)

    # What a version without the content checks stored: a portal page, hashed and recorded as
    # the recording, through the ledger's own transitions.
    async with TelnyxClient(settings.telnyx) as api:
        rec = await api.retrieve(older.id)
    key = layout.render_key(settings.storage.key_template, rec, "ogg")
    async with (
        make_ledger(settings, exclusive=False) as ledger,
        make_storage(settings) as storage,
    ):
        assert older.id in await ledger.observe([rec])
        owner = "archiver-0.0.1/1"
        assert await ledger.claim(older.id, owner=owner, lease_seconds=60) == 1
        put = await storage.put_bytes(key, PORTAL_PAGE, content_type="audio/ogg")
        sidecar = json.dumps({"recording": dict(rec.metadata)}).encode()
        await storage.put_bytes(layout.sidecar_key(key), sidecar, content_type="application/json")
        stored = StoredObject(
            key=key,
            size=len(PORTAL_PAGE),
            sha256=hashlib.sha256(PORTAL_PAGE).hexdigest(),
            version_id=put.version_id,
        )
        assert await ledger.complete(older.id, owner=owner, stored=stored)

    code, out, err = await archiver(keep, "backfill")
    assert code == 0, out + err  # the good one is archived; the older row counts as archived

    code, out, err = await archiver(keep, "verify", "--deep")
    assert code == 1, out + err
    no_traceback(out, err)
    problems = lines_with(out, "PROBLEM")
    assert len(problems) == 1 and older.id in problems[0], out
    assert "an HTML page" in problems[0]

    code, out, err = await archiver(purge, "purge")
    assert code == 1, out + err
    no_traceback(out, err)
    kept = lines_with(out, f"kept at source {older.id}")
    assert len(kept) == 1 and "an HTML page" in kept[0], out
    assert sim.deleted_ids == [good.id]
    assert deletes(sim) == expected_deletes([good.id])
    found = await rows(settings, [older.id, good.id])
    assert found[older.id].deleted_at_source is None
    assert found[good.id].deleted_at_source is not None
    assert site.read(key) == PORTAL_PAGE  # reported, not touched


# -- real media and its duration (source.media_check) --------------------------------------------


@pytest.fixture(scope="module")
def opus_3s(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Three seconds of a 440 Hz tone as Ogg/Opus, made by ffmpeg."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None or shutil.which("ffprobe") is None:
        pytest.fail("ffmpeg and ffprobe are needed (Debian package ffmpeg)")
    out = tmp_path_factory.mktemp("media") / "tone.ogg"
    tone = ("-f", "lavfi", "-i", "sine=frequency=440:duration=3")
    opus = ("-c:a", "libopus", "-b:a", "24k")
    subprocess.run(
        [ffmpeg, "-v", "error", *tone, *opus, str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out.read_bytes()


async def test_media_check_deletes_only_a_copy_as_long_as_the_api_says(
    site: Site, sim_factory: Any, opus_3s: bytes
) -> None:
    recs = make_recordings(2, seed=64)
    right, wrong = recs
    for rec, seconds in ((right, 3), (wrong, 30)):
        rec.body = opus_3s
        rec.content_type, rec.type, rec.codec = "audio/ogg", "audio", "opus"
        rec.duration_secs = seconds
    sim: Simulator = await sim_factory(recs)
    config = write_config(sim, site, source__delete_after_archive=True, source__media_check=True)

    code, out, err = await archiver(config, "backfill")

    assert code == 0, out + err  # both archived; keeping one at the source is no failure
    no_traceback(out, err)
    kept = lines_with(out, f"kept at source {wrong.id}")
    assert len(kept) == 1 and "but the API says 30 s" in kept[0], out
    assert sim.deleted_ids == [right.id]
    assert deletes(sim) == expected_deletes([right.id])
    found = await rows(settings_of(config), [right.id, wrong.id])
    for rec in recs:
        assert found[rec.id].state is State.ARCHIVED
        assert found[rec.id].sha256 == hashlib.sha256(opus_3s).hexdigest()
    assert found[right.id].deleted_at_source is not None
    assert found[wrong.id].deleted_at_source is None


# -- no false refusal ----------------------------------------------------------------------------

# Every content type the simulator gives a container header (``simulator.container_header``).
CONTENT_TYPES = sorted(simulator._HEADERS)
# At the edges of what the listed size_mb allows (1,050,000 and 1,150,000 are both listed as
# 1.1, 150,001 as 0.2), a tiny one, and one that becomes a multipart upload on S3.
SIZES = [1_000, 49_999, 150_001, 1_050_000, 1_150_000, 6_000_000]


def test_every_content_type_the_simulator_serves_starts_like_a_container() -> None:
    assert len(CONTENT_TYPES) >= 10
    assert all(container_header(ct, 10_000) for ct in CONTENT_TYPES)


async def test_good_recordings_of_every_kind_archive_with_default_settings(
    site: Site, sim_factory: Any
) -> None:
    recs = make_recordings(len(CONTENT_TYPES), seed=66)
    for i, (rec, content_type) in enumerate(zip(recs, CONTENT_TYPES, strict=True)):
        rec.content_type = content_type
        rec.size = SIZES[i % len(SIZES)]
    sim: Simulator = await sim_factory(recs)
    keep = write_config(sim, site, "keep.toml")

    code, out, err = await archiver(keep, "backfill")

    assert code == 0, out + err
    no_traceback(out, err)
    assert f"{len(recs)} archived" in out
    # And each copy passes the checks that stand before a deletion at the source.
    purge = write_config(sim, site, "purge.toml", source__delete_after_archive=True)
    code, out, err = await archiver(purge, "purge")
    assert code == 0, out + err
    assert sorted(sim.deleted_ids) == sorted(r.id for r in recs)
    found = await rows(settings_of(keep), [r.id for r in recs])
    for rec in recs:
        assert found[rec.id].sha256 == sim.expected_sha256(rec.id), rec.content_type
