"""archiver against the Telnyx spec: every request it sends passes a strict validating proxy.

``SpecProxy`` is a small aiohttp server between archiver and the simulator's API. It forwards
each request as it came, holds the request to the spec's facts (``tests.spec_room_recordings``:
a query key the spec does not define, a bad value, a bulk delete, a wrong Accept are problems),
and, against the current dialect, the simulator's answer too; room recordings and room
compositions alike. Every test ends with the proxy
clean. The simulator runs in both dialects: the current spec, and the legacy reference page's
(which ignores the one duration filter the current spec has).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from archiver.errors import ApiError, EndlessListing, ServerError
from archiver.filters import Filters
from archiver.health import Health, metrics_app
from archiver.lister import Lister
from archiver.reconcile import reconcile
from archiver.service import backfill, make_engine, open_services
from archiver.simulator import (
    Dialect,
    Faults,
    ScriptedAnswer,
    SimRecording,
    Simulator,
    make_compositions,
    make_recordings,
)
from archiver.telnyx import TelnyxClient
from tests import spec_room_recordings as spec
from tests.conftest import ARCHIVER, cli_env, make_settings, write_config

# Headers of one hop, never forwarded.
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)


class SpecProxy:
    """Between archiver and the simulator's API: forwards, and checks both ways."""

    def __init__(self, sim: Simulator, *, check_answers: bool) -> None:
        self._sim = sim
        self._upstream = URL(sim.api_base_url).origin()
        self.check_answers = check_answers
        self.seen: list[spec.Seen] = []
        self.problems: list[str] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0

    @property
    def api_base_url(self) -> str:  # what write_config and make_settings read
        return f"http://127.0.0.1:{self._port}/v2"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        path = request.path.removeprefix("/v2")
        problems = [] if request.path.startswith("/v2/") else [f"{request.path}: not below /v2"]
        problems += spec.request_problems(
            request.method, path, request.query, request.headers, body
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            URL(str(self._upstream) + request.raw_path, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as resp:
            answer = await resp.read()
            status, answer_headers = resp.status, resp.headers.copy()
        if self.check_answers:
            problems += spec.answer_problems(request.method, path, status, answer_headers, answer)
        self.problems += problems
        self.seen.append(
            spec.Seen(
                method=request.method,
                path=path,
                query={k: request.query.getall(k) for k in request.query},
                headers=dict(request.headers),
                status=status,
                problems=problems,
            )
        )
        out = {k: v for k, v in answer_headers.items() if k.lower() not in _HOP}
        return web.Response(status=status, body=answer, headers=out)

    def lists(self, path: str = "/room_recordings") -> list[spec.Seen]:
        """The list calls seen (``path="/room_compositions"``: the compositions')."""
        return [s for s in self.seen if s.method == "GET" and s.path == path]


Proxied = Callable[..., Any]


@pytest.fixture
async def proxied(sim_factory: Callable[..., Any]) -> AsyncIterator[Proxied]:
    """``await proxied(recordings, faults, dialect=..., compositions=...)`` → (simulator,
    proxy); every proxy must be clean when the test ends."""
    proxies: list[SpecProxy] = []

    async def start(
        recordings: list[SimRecording],
        faults: Faults | None = None,
        *,
        dialect: Dialect = Dialect.CURRENT,
        **kw: Any,
    ) -> tuple[Simulator, SpecProxy]:
        sim: Simulator = await sim_factory(recordings, faults, dialect=dialect, **kw)
        proxy = SpecProxy(sim, check_answers=dialect is Dialect.CURRENT)
        await proxy.start()
        proxies.append(proxy)
        return sim, proxy

    yield start
    for proxy in proxies:
        await proxy.stop()
    assert [p for proxy in proxies for p in proxy.problems] == []


async def run_backfill(settings: Any, filters: Filters) -> Any:
    async with open_services(settings) as services:
        return await backfill(services, filters, make_engine(services))


def archived_ids(root: Path) -> set[str]:
    return {
        p.stem
        for p in (root / "archive").rglob("*")
        if p.is_file() and not p.name.endswith((".json", ".partial"))
    }


def _day(moment: datetime | None) -> date:
    assert moment is not None
    return moment.astimezone(UTC).date()


START = datetime(2026, 3, 1, tzinfo=UTC)


def every_filter(recs: list[SimRecording]) -> tuple[Filters, set[str]]:
    """Filters using every flag at once (a real selection), and the ids they select, worked
    out here independently of archiver's own test of them."""
    room = recs[0].room_id
    assert room is not None
    filters = Filters(
        date_ended_at_gte=date(2026, 3, 2),
        date_ended_at_lte=date(2026, 3, 8),
        date_started_at_gte=date(2026, 3, 1),
        date_started_at_lte=date(2026, 3, 8),
        room_id=room,
        status="completed",
        type="audio",
        duration_secs_gte=10,
        duration_secs_lte=2000,
    )
    expected = {
        r.id
        for r in recs
        if r.room_id == room
        and r.type == "audio"
        and r.status == "completed"
        and 10 <= r.duration_secs <= 2000
        and date(2026, 3, 2) <= _day(r.ended_at) <= date(2026, 3, 8)
        and date(2026, 3, 1) <= _day(r.started_at) <= date(2026, 3, 8)
    }
    return filters, expected


DIALECTS = pytest.mark.parametrize("dialect", list(Dialect), ids=[str(d) for d in Dialect])


# -- every request form ------------------------------------------------------------------------
@DIALECTS
async def test_every_request_is_a_form_the_spec_defines(
    proxied: Proxied, tmp_path: Path, dialect: Dialect
) -> None:
    recs = make_recordings(120, seed=21, start=START, days=10, size=(1_000, 5_000))
    filters, expected = every_filter(recs)
    assert 3 <= len(expected) < 40
    # Expired list URLs: every transfer retrieves its recording first; deletes at the end.
    sim, proxy = await proxied(recs, Faults(expired_first_url_rate=1.0), dialect=dialect)
    settings = make_settings(
        sim,
        tmp_path,
        telnyx__base_url=proxy.api_base_url,
        telnyx__page_size=7,
        source__delete_after_archive=True,
    )
    report = await run_backfill(settings, filters)

    assert report.all_archived and archived_ids(tmp_path) == expected
    assert set(sim.deleted_ids) == expected and len(sim.deleted_ids) == len(expected)
    assert proxy.problems == []
    first = proxy.lists()[0].query
    assert first == {
        "filter[date_ended_at][gte]": ["2026-03-02"],
        "filter[date_ended_at][lte]": ["2026-03-08"],
        "filter[date_started_at][gte]": ["2026-03-01"],
        "filter[date_started_at][lte]": ["2026-03-08"],
        "filter[room_id]": [filters.room_id],
        "filter[status]": ["completed"],
        "filter[type]": ["audio"],
        "filter[duration_secs]": ["10"],  # the minimum; the maximum is checked locally only
        "page[size]": ["7"],
        "page[number]": ["1"],
    }
    kinds = {(s.method, s.path.count("/")) for s in proxy.seen}
    assert kinds == {("GET", 1), ("GET", 2), ("DELETE", 2)}  # list, retrieve, delete one
    deletes = [s for s in proxy.seen if s.method == "DELETE"]
    assert {s.headers["Accept"] for s in deletes} == {"*/*"}  # a 204 has no JSON to accept
    retrieves = [s for s in proxy.seen if s.method == "GET" and s.path.count("/") == 2]
    assert {s.headers["Accept"] for s in retrieves} == {"application/json"}
    if dialect is Dialect.LEGACY:  # the older API ignored the minimum: archiver checked it
        assert "filter[duration_secs]" in sim.ignored_params


async def test_the_proxy_fails_a_request_the_spec_does_not_define(
    proxied: Proxied,
) -> None:
    sim, proxy = await proxied(make_recordings(3, seed=1))
    url = f"{proxy.api_base_url}/room_recordings"
    auth = {"Authorization": f"Bearer {sim.api_key}", "Accept": "application/json"}
    async with aiohttp.ClientSession() as http:
        for params in (
            {"filter[duration_secs][gte]": "5"},  # a legacy form
            {"filter[room_id]": "not-a-uuid"},
            {"page[size]": "251"},
        ):
            async with http.get(url, params=params, headers=auth) as r:
                assert r.status == 422
        async with http.delete(url, headers=auth) as r:  # the bulk delete
            assert r.status == 405
        async with http.delete(f"{url}/{next(iter(sim.recordings))}", headers=auth) as r:
            assert r.status == 204
    assert len(proxy.problems) == 6, proxy.problems
    assert "'filter[duration_secs][gte]' is not defined" in proxy.problems[0]
    assert "'not-a-uuid': not a UUID" in proxy.problems[1]
    assert "page[size]='251': above 250" in proxy.problems[2]
    assert "never call DeleteRoomRecordings" in proxy.problems[3]
    assert "405 is not declared" in proxy.problems[4]  # the simulator's guard, not the spec's
    assert "for an answer without a body" in proxy.problems[5]
    proxy.problems.clear()  # seen failing on purpose


async def test_the_proxy_holds_composition_calls_to_the_spec(proxied: Proxied) -> None:
    comps = make_compositions(30, seed=41, start=START, days=5, enqueued=2, processing=3)
    sim, proxy = await proxied(make_recordings(3, seed=41), compositions=comps)
    url = f"{proxy.api_base_url}/room_compositions"
    auth = {"Authorization": f"Bearer {sim.api_key}", "Accept": "application/json"}
    async with aiohttp.ClientSession() as http:
        for params in (
            {"page[size]": "10", "page[number]": "2"},
            {
                "filter[session_id]": comps[0].session_id,
                "filter[status]": "completed",
                "filter[date_created_at][gte]": "2026-03-02",
                "filter[date_created_at][lte]": "2026-03-04",
            },
        ):
            async with http.get(url, params=params, headers=auth) as r:
                assert r.status == 200 and (await r.json())["data"]
        for comp in comps[:6]:  # enqueued, processing and completed ones
            async with http.get(f"{url}/{comp.id}", headers=auth) as r:
                assert r.status == 200
        bare = {"Authorization": auth["Authorization"]}  # Accept: */* for a 204
        for expected in (204, 404):
            async with http.delete(f"{url}/{comps[5].id}", headers=bare) as r:
                assert r.status == expected
        assert proxy.problems == []  # answers checked too (the current dialect)
        assert [s.status for s in proxy.lists("/room_compositions")] == [200, 200]
        for params in (
            {"filter[room_id]": comps[0].room_id},  # the recordings list's, not this one's
            {"filter[status]": "failed"},
            {"filter[date_created_at][gt]": "2026-03-02"},
        ):
            async with http.get(url, params=params, headers=auth) as r:
                assert r.status == 422
        async with http.get(f"{url}/not-a-uuid", headers=auth) as r:
            assert r.status == 404
    assert sim.deleted_ids == [comps[5].id]
    assert len(proxy.problems) == 4, proxy.problems
    assert "ListRoomCompositions" in proxy.problems[0]
    assert "'filter[room_id]' is not defined" in proxy.problems[0]
    assert "filter[status]='failed': not one of" in proxy.problems[1]
    assert "'filter[date_created_at][gt]' is not defined" in proxy.problems[2]
    assert "ViewRoomComposition" in proxy.problems[3] and "not a UUID" in proxy.problems[3]
    proxy.problems.clear()  # seen failing on purpose


# -- the filters, applied twice ----------------------------------------------------------------
@DIALECTS
async def test_a_server_ignoring_every_filter_gets_nothing_outside_them_archived_or_deleted(
    proxied: Proxied, tmp_path: Path, dialect: Dialect
) -> None:
    recs = make_recordings(120, seed=22, start=START, days=10, size=(1_000, 5_000))
    filters, expected = every_filter(recs)
    assert 3 <= len(expected) < 40
    sim, proxy = await proxied(recs, Faults(ignore_filters=True), dialect=dialect)
    settings = make_settings(
        sim,
        tmp_path,
        telnyx__base_url=proxy.api_base_url,
        telnyx__page_size=25,
        source__delete_after_archive=True,
    )
    report = await run_backfill(settings, filters)

    assert report.all_archived
    assert archived_ids(tmp_path) == expected
    assert set(sim.deleted_ids) == expected
    assert {d.id for d in sim.download_requests} <= expected  # nothing else even fetched
    async with open_services(settings) as services:
        for rec in recs:  # the others were never observed
            assert (await services.ledger.get(rec.id) is None) is (rec.id not in expected)
    # Every entry was listed (the server ignored the filters), most of them out of scope.
    assert sum(1 for s in proxy.lists()) >= len(recs) // 25

    # Reconcile under the same filters: what lies outside them is not "missing".
    async with open_services(settings) as services:
        assert services.api is not None
        check = await reconcile(
            services.api,
            services.ledger,
            services.storage,
            standing=filters,
            since=filters.date_ended_at_gte,
            until=filters.date_ended_at_lte,
        )
    assert check.ok and not check.missing and check.archived == len(expected), check.missing[:3]
    assert check.outside == len(recs) - len(expected)


async def test_an_exact_duration_is_checked_locally(proxied: Proxied, tmp_path: Path) -> None:
    recs = make_recordings(60, seed=23, start=START, days=5, size=(1_000, 2_000))
    wanted = recs[5].duration_secs
    sim, proxy = await proxied(recs)
    settings = make_settings(sim, tmp_path, telnyx__base_url=proxy.api_base_url)
    report = await run_backfill(settings, Filters(duration_secs_eq=wanted))
    assert report.all_archived
    assert archived_ids(tmp_path) == {r.id for r in recs if r.duration_secs == wanted}
    assert all("duration" not in k for s in proxy.lists() for k in s.query)  # nothing to send


async def test_only_get_is_sent_unless_delete_after_archive(
    proxied: Proxied, tmp_path: Path
) -> None:
    recs = make_recordings(12, seed=24, start=START, days=3, size=(1_000, 2_000))
    sim, proxy = await proxied(recs, Faults(expired_first_url_rate=1.0))
    settings = make_settings(sim, tmp_path, telnyx__base_url=proxy.api_base_url)
    report = await run_backfill(settings, Filters())
    assert report.all_archived and archived_ids(tmp_path) == {r.id for r in recs}
    config = write_config(proxy, tmp_path)  # type: ignore[arg-type]
    for args in (["run", "--once"], ["reconcile"], ["purge"], ["verify", "--repair"]):
        code, err = await cli(config, *args)
        assert code in (0, 2), err  # purge refuses: delete_after_archive is off
    assert {s.method for s in proxy.seen} == {"GET"}
    assert sim.deleted_ids == [] and sim.bulk_delete_calls == []
    assert len(proxy.seen) > len(recs)


# -- paging always ends ------------------------------------------------------------------------
async def list_everything(settings: Any, **kw: Any) -> list[int]:
    async with TelnyxClient(settings.telnyx, **kw) as api:
        return [len(page.recordings) async for page in api.iter_pages(Filters())]


@DIALECTS
@pytest.mark.parametrize(
    ("faults", "pages", "requests", "repeated"),
    [
        (Faults(), [20, 20, 5], 3, False),  # meta.total_pages
        (Faults(omit_meta=True), [20, 20, 5, 0], 4, False),  # no meta: the empty page
        (Faults(omit_meta=True, repeat_page=True), [20, 20], 2, True),  # nothing new on page 2
        (Faults(repeat_page=True, total_pages_override=10**9), [20, 20], 2, True),
        (Faults(total_pages_override=10**9), [20, 20, 5, 0], 4, False),
    ],
    ids=["meta", "no-meta", "no-meta-repeating", "billion-pages-repeating", "billion-pages"],
)
async def test_paging_always_ends(
    proxied: Proxied,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dialect: Dialect,
    faults: Faults,
    pages: list[int],
    requests: int,
    repeated: bool,
) -> None:
    sim, proxy = await proxied(make_recordings(45, seed=25), faults, dialect=dialect)
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__page_size=20
    )
    # A cap far above what these need: a listing that does not end fails fast.
    assert await list_everything(settings, max_pages=50) == pages
    assert len(proxy.lists()) == requests
    # Only a repeated page is worth a warning; an empty one is the normal end.
    assert ("brought no recording" in caplog.text) is repeated


async def test_paging_stops_at_the_page_cap_with_a_clear_error(
    proxied: Proxied, tmp_path: Path
) -> None:
    sim, proxy = await proxied(make_recordings(45, seed=26), Faults(omit_meta=True))
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__page_size=10
    )
    with pytest.raises(EndlessListing, match="went past 3 pages of 10"):
        await list_everything(settings, max_pages=3)
    assert len(proxy.lists()) == 3


async def test_a_backfill_over_a_server_repeating_pages_ends(
    proxied: Proxied, tmp_path: Path
) -> None:
    recs = make_recordings(30, seed=27, size=(1_000, 2_000))
    faults = Faults(repeat_page=True, total_pages_override=10**9)
    sim, proxy = await proxied(recs, faults)
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__page_size=10
    )
    report = await asyncio.wait_for(run_backfill(settings, Filters()), 60)
    newest = {r.id for r in sorted(recs, key=lambda r: r.ended_at or START)[-10:]}
    assert archived_ids(tmp_path) == newest  # all the server ever shows
    # Two list calls a pass (the page, its repetition), a few passes (a shift is suspected:
    # total_results says 30), never an endless loop.
    assert len(proxy.lists()) <= 2 * (1 + settings.backfill.max_passes)
    assert report.archived == 10


async def test_the_daemons_first_pass_over_a_repeating_server_ends(
    proxied: Proxied, tmp_path: Path
) -> None:
    _, proxy = await proxied(
        make_recordings(15, seed=28, size=(1_000, 2_000)),
        Faults(repeat_page=True, total_pages_override=10**9),
    )
    config = write_config(proxy, tmp_path)  # type: ignore[arg-type]
    text = config.read_text().replace("[telnyx]\n", "[telnyx]\npage_size = 5\n", 1)
    config.write_text(text)
    done = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        "run",
        "--once",
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err
    assert 2 <= len(proxy.lists()) <= 2 * 4  # the pass and its re-listings (MAX_RELISTS = 3)


# -- retries -----------------------------------------------------------------------------------
async def first_page(settings: Any) -> int:
    async with TelnyxClient(settings.telnyx) as api:
        return len((await api.list_page(Filters(), 1)).recordings)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retried_statuses(proxied: Proxied, tmp_path: Path, status: int) -> None:
    sim, proxy = await proxied(make_recordings(5, seed=29))
    sim.script(ScriptedAnswer(status), ScriptedAnswer(status))
    settings = make_settings(sim, tmp_path, telnyx__base_url=proxy.api_base_url)
    assert await first_page(settings) == 5
    assert [s.status for s in proxy.lists()] == [status, status, 200]


@pytest.mark.parametrize(
    ("answer", "retried"),
    [
        (ScriptedAnswer(503, {"x-should-retry": "false"}), False),
        (ScriptedAnswer(429, {"x-should-retry": "false"}), False),
        (ScriptedAnswer(400, {"x-should-retry": "true"}), True),
        (ScriptedAnswer(404, {"x-should-retry": "true"}), True),
        (ScriptedAnswer(418), False),
    ],
    ids=["503-false", "429-false", "400-true", "404-true", "418"],
)
async def test_x_should_retry_is_obeyed(
    proxied: Proxied, tmp_path: Path, answer: ScriptedAnswer, retried: bool
) -> None:
    sim, proxy = await proxied(make_recordings(5, seed=30))
    sim.script(answer)
    settings = make_settings(sim, tmp_path, telnyx__base_url=proxy.api_base_url)
    if retried:
        assert await first_page(settings) == 5
        assert [s.status for s in proxy.lists()] == [answer.status, 200]
    else:
        with pytest.raises(ApiError) as refused:
            await first_page(settings)
        assert not refused.value.transient
        assert len(proxy.lists()) == 1


def gap(sim: Simulator) -> float:
    first, second = sim.api_requests[-2:]
    return second.at - first.at


@pytest.mark.parametrize(
    ("headers", "max_backoff", "low", "high"),
    [
        ({"retry-after-ms": "600"}, 5.0, 0.6, 2.0),
        ({"Retry-After": "1"}, 5.0, 1.0, 2.5),
        ({"retry-after-ms": "600", "Retry-After": "30"}, 5.0, 0.6, 2.0),  # ms first
        ({"Retry-After": "30"}, 0.3, 0.0, 0.5),  # capped by telnyx.max_backoff
        ({"retry-after-ms": "30000"}, 0.3, 0.0, 0.5),
    ],
    ids=["ms", "seconds", "ms-first", "capped-seconds", "capped-ms"],
)
async def test_the_servers_wait_is_honoured_and_capped(
    proxied: Proxied,
    tmp_path: Path,
    headers: dict[str, str],
    max_backoff: float,
    low: float,
    high: float,
) -> None:
    sim, proxy = await proxied(make_recordings(5, seed=31))
    sim.script(ScriptedAnswer(503, headers))
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__max_backoff=max_backoff
    )
    assert await first_page(settings) == 5
    assert low <= gap(sim) < high


async def test_retry_after_as_an_http_date(proxied: Proxied, tmp_path: Path) -> None:
    sim, proxy = await proxied(make_recordings(5, seed=32))
    # Whole seconds: "now + 2 s" is between 1 and 2 s away when the answer is read.
    sim.script(ScriptedAnswer(429, {"Retry-After": formatdate(time.time() + 2, usegmt=True)}))
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__max_backoff=10
    )
    assert await first_page(settings) == 5
    assert 0.9 <= gap(sim) < 3.0


async def test_retries_give_up_within_their_caps(proxied: Proxied, tmp_path: Path) -> None:
    sim, proxy = await proxied(make_recordings(5, seed=33))
    sim.script(*[ScriptedAnswer(409)] * 20)
    settings = make_settings(
        sim, tmp_path, telnyx__base_url=proxy.api_base_url, telnyx__max_attempts=3
    )
    with pytest.raises(ServerError):
        await first_page(settings)
    assert len(proxy.lists()) == 3


# -- the command line --------------------------------------------------------------------------
async def cli(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *ARCHIVER,
        "--config",
        str(config),
        *args,
        env=cli_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_bad_filter_values_exit_2_naming_the_flag_before_any_request(
    proxied: Proxied, tmp_path: Path
) -> None:
    sim, proxy = await proxied(make_recordings(3, seed=34))
    config = write_config(proxy, tmp_path)  # type: ignore[arg-type]
    bad_config = tmp_path / "bad" / "archiver.toml"
    bad_config.parent.mkdir()
    bad_config.write_text(config.read_text() + '\n[filters]\ntype = "vidoe"\n')
    cases: list[tuple[Path, list[str], str]] = [
        (config, ["--type", "vidoe"], "--type: 'vidoe' is not a recording type (audio or video)"),
        (config, ["--status", "done"], "--status: 'done' is not a recording status"),
        (config, ["--room-id", "not-a-uuid"], "--room-id: 'not-a-uuid' is not a UUID"),
        (config, ["--session-id", "x"], "--session-id"),
        (config, ["--participant-id", "x"], "--participant-id"),
        (config, ["--min-duration", "-1"], "--min-duration: -1 is negative"),
        (config, ["--duration", "-1"], "--duration: -1 is negative"),
        (
            config,
            ["--since", "2026-11-30", "--ended-on", "2026-11-01"],
            "--ended-on (2026-11-01) is before --since (2026-11-30)",
        ),
        (config, ["--since", "2026-11-30", "--until", "2026-11-01"], "--since (2026-11-30)"),
        (
            config,
            ["--min-duration", "10", "--max-duration", "5"],
            "--min-duration (10) is after --max-duration (5)",
        ),
        (
            config,
            ["--started-since", "2026-11-30", "--until", "2026-11-01"],
            "no recording ends before it starts",
        ),
        (bad_config, [], "filters.type: 'vidoe' is not a recording type"),
    ]
    results = await asyncio.gather(
        *(cli(path, "backfill", *args) for path, args, _ in cases),
        cli(config, "backfill", "--dry-run", "--type", "vidoe"),
        # The service and reconcile check the config's filters before any request too.
        cli(bad_config, "run", "--once"),
        cli(bad_config, "reconcile"),
    )
    for (_, args, why), (code, err) in zip(cases, results, strict=False):
        assert code == 2, (args, err)
        assert why in err, (args, err)
    assert results[len(cases)][0] == 2
    for code, err in results[len(cases) + 1 :]:
        assert code == 2 and "filters.type: 'vidoe' is not a recording type" in err, err
    assert proxy.seen == [] and sim.api_requests == []


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (ScriptedAnswer(403, route="list"), "lacks permission for Video Rooms recordings"),
        (ScriptedAnswer(422, route="list"), "refused the request's parameters"),
        (ScriptedAnswer(401, route="list"), "check TELNYX_API_KEY"),
    ],
    ids=["403", "422", "401"],
)
async def test_api_refusals_exit_2_saying_why(
    proxied: Proxied, tmp_path: Path, answer: ScriptedAnswer, message: str
) -> None:
    sim, proxy = await proxied(make_recordings(3, seed=35))
    sim.script(answer)
    config = write_config(proxy, tmp_path)  # type: ignore[arg-type]
    code, err = await cli(config, "backfill", "--type", "audio")
    assert code == 2, err
    assert message in err
    if answer.status == 422:
        assert "sent filter[type]=audio" in err
    assert len(proxy.lists()) == 1 and sim.download_requests == []


# -- health ------------------------------------------------------------------------------------
async def test_healthz_fails_a_pass_that_runs_far_longer_than_expected() -> None:
    now = [0.0]
    health = Health(threshold=60, clock=lambda: now[0], first_pass_limit=600)
    runner = web.AppRunner(metrics_app(health), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/healthz"
        async with aiohttp.ClientSession() as http:

            async def status() -> tuple[int, Any]:
                async with http.get(url) as r:
                    return r.status, await r.json()

            health.pass_started()
            for _ in range(10):  # a first pass listing page after page: busy, so healthy
                now[0] += 59
                health.touch()
                assert (await status())[0] == 200
            now[0] += 11
            health.touch()
            code, doc = await status()
            assert code == 503 and doc["pass_overdue"] and doc["pass_seconds"] == 601
    finally:
        await runner.cleanup()


# -- the lister's count of what is outside the filters -----------------------------------------
async def test_the_lister_counts_entries_outside_the_filters_apart(
    proxied: Proxied, tmp_path: Path
) -> None:
    recs = make_recordings(40, seed=36, start=START, days=4)
    # Two entries without an id (never recordings): one a video, one not.
    video = next(r for r in recs if r.type == "video")
    audio = next(r for r in recs if r.type == "audio")
    for rec in (video, audio):
        rec.entry_hook = lambda e: {k: v for k, v in e.items() if k != "id"}
    sim, proxy = await proxied(recs, Faults(ignore_filters=True))
    settings = make_settings(sim, tmp_path, telnyx__base_url=proxy.api_base_url)
    queued: list[str] = []

    async def enqueue(rec: Any) -> None:
        queued.append(rec.id)

    filters = Filters(type="video")
    async with open_services(settings) as services:
        assert services.api is not None
        lister = Lister(
            source=services.api,
            ledger=services.ledger,
            enqueue=enqueue,
            in_flight=set(),
            stop=asyncio.Event(),
        )
        stats = await lister.list_pass(filters)
        rejected = [stand_in for stand_in in stats.rejected_ids]
        assert len(rejected) == 1  # the video without an id, refused; the audio one ignored
        row = await services.ledger.get(rejected[0])
        assert row is not None and "malformed" in (row.last_error or "")
    videos = {r.id for r in recs if r.type == "video"} - {video.id}
    assert set(queued) == videos
    assert stats.seen == videos | set(rejected)
    assert stats.outside == len(recs) - len(videos) - 1 and stats.listed == len(recs)
    assert not stats.shift_suspected  # 40 listed, 40 accounted for
    assert {k for s in proxy.lists() for k in s.query} == {
        "filter[type]",
        "page[size]",
        "page[number]",
    }


async def test_archiver_asks_for_compositions_in_the_lists_own_forms(
    proxied: Proxied, tmp_path: Path
) -> None:
    recs = make_recordings(20, seed=42, start=START, days=10, size=(1_000, 5_000))
    comps = make_compositions(15, seed=42, start=START, days=10, size=(1_000, 5_000))
    sim, proxy = await proxied(recs, Faults(ignore_filters=True), compositions=comps)
    session = comps[0].session_id
    settings = make_settings(
        sim,
        tmp_path,
        telnyx__base_url=proxy.api_base_url,
        telnyx__page_size=10,
        sources__room_compositions=True,
        source__delete_after_archive=True,
    )
    # Every filter the recordings list has: the compositions list is sent only its own, and
    # what it ignores (here: everything) is checked on each entry.
    report = await run_backfill(
        settings, Filters(session_id=session, date_ended_at_gte=START.date())
    )
    assert report.all_archived
    wanted = {c.id for c in comps if c.session_id == session} | {
        r.id for r in recs if r.session_id == session
    }
    assert archived_ids(tmp_path) == wanted and set(sim.deleted_ids) == wanted
    asked = {k for s in proxy.lists("/room_compositions") for k in s.query}
    assert "filter[session_id]" in asked and "filter[date_created_at][gte]" in asked
    assert not any(k.startswith("filter[date_ended_at]") for k in asked)
