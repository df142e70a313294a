"""Fast unit tests of the pure pieces: error parsing, retry waits, layout, redaction, config."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from email.utils import formatdate
from pathlib import Path

import pytest

from archiver import layout
from archiver.config import Secret, load_settings
from archiver.errors import (
    ApiError,
    AuthError,
    ConfigError,
    InvalidRequest,
    MalformedResponse,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UnsafeValue,
)
from archiver.filters import Filters
from archiver.health import Health
from archiver.models import LedgerRow, Recording, State
from archiver.redact import redact, register_secret
from archiver.retry import RetryPolicy, backoff_seconds
from archiver.scope import Facts, Scope, admits
from archiver.telnyx import error_message, parse_page, raise_for_api_status, wait_hint

ROOT = Path(__file__).resolve().parent.parent


# -- API errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        '{"errors":[{"code":"10011","title":"Too many requests","detail":"slow down"}]}',
        '{"code":"10011","title":"Too many requests","detail":"slow down"}',
        '{"message":"Too many requests"}',
    ],
)
def test_every_error_shape_reads_as_one_sentence(body: str) -> None:
    message = error_message(429, body)
    assert message.startswith("HTTP 429: ")
    assert "Too many requests" in message


def test_error_message_of_non_json_body() -> None:
    assert error_message(502, "<html>Bad gateway</html>") == "HTTP 502: <html>Bad gateway</html>"
    assert error_message(500, "") == "HTTP 500: no error details"


def test_status_mapping() -> None:
    with pytest.raises(AuthError, match="check TELNYX_API_KEY"):
        raise_for_api_status(401, {}, "{}")
    with pytest.raises(RateLimited) as throttled:
        raise_for_api_status(429, {"x-ratelimit-reset": "7"}, "{}")
    assert throttled.value.retry_after == 7
    for status in (408, 409, 500, 502, 503):  # as the SDK: timeouts, lock conflicts, 5xx
        with pytest.raises(ServerError):
            raise_for_api_status(status, {}, "{}")
    with pytest.raises(NotFound):
        raise_for_api_status(404, {}, "{}")
    with pytest.raises(PermissionDenied, match="lacks permission for Video Rooms recordings"):
        raise_for_api_status(403, {}, '{"message": "Forbidden", "success": false}')
    for status in (400, 422):
        with pytest.raises(InvalidRequest, match=r"sent filter\[type\]=x") as refused:
            raise_for_api_status(status, {}, '{"message":"Error"}', sent="filter[type]=x")
        assert not refused.value.transient
    with pytest.raises(ApiError) as other:
        raise_for_api_status(418, {}, "{}")
    assert not other.value.transient
    raise_for_api_status(200, {}, "{}")


def test_x_should_retry_is_obeyed_both_ways() -> None:
    for status in (400, 404, 418, 422):
        with pytest.raises(ServerError) as retried:
            raise_for_api_status(status, {"x-should-retry": "true", "retry-after-ms": "20"}, "")
        assert retried.value.transient and retried.value.retry_after == 0.02
    for status in (408, 409, 429, 500, 503):
        with pytest.raises(ApiError) as final:
            raise_for_api_status(status, {"x-should-retry": "false"}, "")
        assert not final.value.transient and "not to retry" in str(final.value)
    with pytest.raises(ServerError):  # anything else is no verdict
        raise_for_api_status(503, {"x-should-retry": "maybe"}, "")


def test_wait_hint_takes_the_larger_and_reads_epochs() -> None:
    assert wait_hint({"Retry-After": "2", "x-ratelimit-reset": "5"}) == 5
    assert wait_hint({"Retry-After": "soon"}) is None
    assert wait_hint({"Retry-After": "nan"}) is None
    epoch = wait_hint({"x-ratelimit-reset": str(int(time.time()) + 30)})
    assert epoch is not None and 25 <= epoch <= 31


def test_wait_hint_reads_milliseconds_and_http_dates() -> None:
    now = 1_780_000_000.0
    # retry-after-ms first (the SDK's order), more precise than Retry-After.
    assert wait_hint({"retry-after-ms": "1500", "Retry-After": "9"}, now) == 1.5
    assert wait_hint({"retry-after-ms": "x", "Retry-After": "2.5"}, now) == 2.5
    http_date = formatdate(now + 42, usegmt=True)  # e.g. "Tue, 28 May 2026 08:00:42 GMT"
    assert wait_hint({"Retry-After": http_date}, now) == 42
    assert wait_hint({"Retry-After": formatdate(now - 100, usegmt=True)}, now) == 0
    assert wait_hint({"Retry-After": "Tue, 99 Foo 2026 08:00:42 GMT"}, now) is None


def test_backoff_honours_hint_and_caps() -> None:
    policy = RetryPolicy(attempts=5, total_seconds=60, initial_backoff=0.5, max_backoff=10)
    assert 3 <= backoff_seconds(policy, 1, RateLimited("x", retry_after=3)) <= 3.25
    assert backoff_seconds(policy, 1, RateLimited("x", retry_after=3600)) == 10
    for attempt in range(1, 10):
        assert 0 < backoff_seconds(policy, attempt, ServerError("x")) <= 10


def test_parse_page_reports_unusable_entries() -> None:
    body = json.dumps(
        {
            "data": [
                {"id": "6b61621f-62e0-4aad-ab11-9fd19e272e73", "status": "completed"},
                {"status": "completed"},
                {"id": 12345},
                "text",
                None,
            ],
            "meta": {"total_pages": 3, "total_results": 55},
        }
    )
    page = parse_page(body, 1)
    assert [r.id for r in page.recordings] == ["6b61621f-62e0-4aad-ab11-9fd19e272e73"]
    assert len(page.malformed) == 4
    assert all(stand_in.startswith("malformed-") for stand_in, _ in page.malformed)
    assert len({stand_in for stand_in, _ in page.malformed}) == 4
    assert page.total_pages == 3 and page.total_results == 55
    for bad in ("not json", '{"data": {}}', "[]", '{"meta": {}}'):
        with pytest.raises(MalformedResponse):
            parse_page(bad, 2)


def test_filters_encode_as_the_current_spec_defines() -> None:
    query = Filters(
        date_ended_at_gte=date(2024, 5, 1), duration_secs_lte=60, room_id="r", duration_secs_eq=9
    ).to_query()
    # The maximum and the exact duration have no form in the spec: checked locally only.
    assert query == {"filter[date_ended_at][gte]": "2024-05-01", "filter[room_id]": "r"}
    assert Filters(duration_secs_gte=30).to_query() == {"filter[duration_secs]": "30"}
    label = Filters(duration_secs_gte=30, duration_secs_lte=60).label()
    assert label == "filter[duration_secs]=30 duration_secs[lte]=60(local)"
    assert Filters().label() == "all"


UUID_A = "7b61621f-5fe4-4aad-ab11-9fd19e272e73"


@pytest.mark.parametrize(
    ("filters", "problem"),
    [
        (Filters(room_id="not-a-uuid"), "room_id: 'not-a-uuid' is not a UUID"),
        (Filters(session_id=UUID_A + "0"), "session_id"),
        (Filters(participant_id="{" + UUID_A + "}"), "participant_id"),
        (Filters(status="done"), "'done' is not a recording status (completed or processing)"),
        (Filters(type="vidoe"), "'vidoe' is not a recording type (audio or video)"),
        (Filters(duration_secs_gte=-1), "duration_secs_gte: -1 is negative"),
        (Filters(duration_secs_eq=-5), "duration_secs_eq: -5 is negative"),
        (Filters(duration_secs_gte=10, duration_secs_lte=5), "duration_secs_gte (10) is after"),
        (Filters(duration_secs_eq=3, duration_secs_gte=10), "duration_secs_eq (3) is before"),
        (
            Filters(date_ended_at_gte=date(2026, 11, 30), date_ended_at_eq=date(2026, 11, 1)),
            "date_ended_at_eq (2026-11-01) is before date_ended_at_gte (2026-11-30)",
        ),
        (
            Filters(date_started_at_eq=date(2026, 3, 2), date_started_at_lte=date(2026, 3, 1)),
            "date_started_at_eq (2026-03-02) is after date_started_at_lte",
        ),
        (
            Filters(date_started_at_gte=date(2026, 3, 2), date_ended_at_lte=date(2026, 3, 1)),
            "no recording ends before it starts",
        ),
    ],
)
def test_filter_values_are_checked(filters: Filters, problem: str) -> None:
    problems = filters.problems()
    assert len(problems) == 1 and problem in problems[0], problems
    named = filters.problems({name: f"--{name}" for name in Filters.__dataclass_fields__})
    assert named[0].startswith("--") or " --" in named[0]


def test_usable_filters_have_no_problems() -> None:
    good = Filters(
        date_ended_at_eq=date(2026, 3, 2),
        date_ended_at_gte=date(2026, 3, 1),
        date_ended_at_lte=date(2026, 3, 2),
        date_started_at_gte=date(2026, 3, 2),
        room_id=UUID_A.upper(),
        status="processing",
        type="audio",
        duration_secs_eq=0,
        duration_secs_gte=0,
        duration_secs_lte=0,
    )
    assert good.problems() == []


def _rec(**fields: object) -> Recording:
    base: dict[str, object] = {
        "id": "6b61621f-62e0-4aad-ab11-9fd19e272e73",
        "room_id": UUID_A,
        "status": "completed",
        "type": "video",
        "duration_secs": 60,
        "started_at": "2026-03-01T23:59:00Z",
        "ended_at": "2026-03-02T00:01:00Z",
    }
    return Recording.from_api({**base, **fields})


def _row(rec: Recording) -> LedgerRow:
    """The row the ledger keeps of ``rec`` (as ``ledger.core`` writes it)."""
    return LedgerRow(
        id=rec.id,
        state=State.PENDING,
        source_status=rec.status,
        room_id=rec.room_id,
        session_id=rec.session_id,
        participant_id=rec.participant_id,
        started_at=rec.started_at,
        ended_at=rec.ended_at,
        metadata=rec.metadata,
    )


@pytest.mark.parametrize(
    ("filters", "entry", "admitted"),
    [
        (Filters(), {}, True),
        (Filters(room_id=UUID_A.upper()), {}, True),  # UUIDs in either case
        (Filters(room_id="8b61621f-5fe4-4aad-ab11-9fd19e272e73"), {}, False),
        (Filters(session_id=UUID_A), {}, False),  # unknown: fails any filter on it
        (Filters(type="audio"), {}, False),
        (Filters(status="completed"), {"status": "processing"}, False),
        (Filters(duration_secs_eq=60), {}, True),
        (Filters(duration_secs_eq=61), {}, False),
        (Filters(duration_secs_gte=61), {}, False),
        (Filters(duration_secs_lte=59), {}, False),
        (Filters(duration_secs_lte=59), {"duration_secs": None}, False),
        (Filters(date_ended_at_eq=date(2026, 3, 2)), {}, True),
        (Filters(date_ended_at_lte=date(2026, 3, 1)), {}, False),
        (Filters(date_started_at_eq=date(2026, 3, 1)), {}, True),
        (Filters(date_started_at_gte=date(2026, 3, 2)), {}, False),
        (
            Filters(date_started_at_gte=date(2026, 3, 2)),
            {"started_at": "2026-03-02T01:00+02:00"},
            False,
        ),
        (Filters(date_ended_at_gte=date(2026, 3, 1)), {"ended_at": None}, False),
    ],
)
def test_one_filter_test_for_entries_and_ledger_rows(
    filters: Filters, entry: dict[str, object], admitted: bool
) -> None:
    rec = _rec(**entry)
    assert admits(filters, Facts.of_recording(rec)) is admitted
    assert Scope.of(filters).match(_row(rec)) is admitted
    # An entry that is not a recording (no usable id) is tested by its fields the same way.
    raw = {k: v for k, v in rec.metadata.items() if k != "id"}
    assert admits(filters, Facts.of_entry(raw)) is admitted
    assert admits(filters, Facts.of_entry("not an object")) is (filters == Filters())


def test_recording_tolerates_missing_and_wrong_fields() -> None:
    rec = Recording.from_api(
        {
            "id": "abc",
            "size_mb": "big",
            "duration_secs": True,
            "ended_at": "yesterday",
            "started_at": "2021-04-16T09:24:55.962200Z",
            "download_url": "https://x/y?Signature=s",
        }
    )
    assert rec.size_mb is None and rec.duration_secs is None and rec.ended_at is None
    assert rec.started_at == datetime(2021, 4, 16, 9, 24, 55, 962200, tzinfo=UTC)
    assert "download_url" not in rec.metadata
    assert "Signature" not in repr(rec)


# -- layout ----------------------------------------------------------------------------------
GOOD = {
    "id": "6b61621f-62e0-4aad-ab11-9fd19e272e73",
    "room_id": "7b61621f-5fe4-4aad-ab11-9fd19e272e73",
    "ended_at": "2024-05-01T10:24:55Z",
    "type": "video",
    "codec": "h264",
}
TEMPLATE = "{ended:%Y/%m/%d}/{room_id}/{id}.{ext}"


def test_default_layout() -> None:
    rec = Recording.from_api(GOOD)
    key = layout.render_key(TEMPLATE, rec, "mp4")
    assert key == f"2024/05/01/{GOOD['room_id']}/{GOOD['id']}.mp4"
    assert layout.sidecar_key(key) == key + ".json"


@pytest.mark.parametrize(
    "field,value",
    [
        ("id", "../../etc/passwd"),
        ("id", "a/b"),
        ("id", ".."),
        ("id", "x\x00y"),
        ("id", "späce"),
        ("room_id", "../up"),
        ("type", "a/b"),
        ("codec", "../x"),
    ],
)
def test_hostile_values_are_refused(field: str, value: str) -> None:
    rec = Recording.from_api({**GOOD, field: value})
    with pytest.raises(UnsafeValue):
        layout.render_key(TEMPLATE, rec, "mp4")


def test_template_cannot_produce_an_escaping_key() -> None:
    rec = Recording.from_api(GOOD)
    for template in ("/abs/{id}", "{id}/../../x", "a//{id}", "{ended:%Y/../%m}/{id}"):
        with pytest.raises(UnsafeValue):
            layout.render_key(template, rec, "mp4")


def test_missing_values_have_safe_stand_ins() -> None:
    rec = Recording.from_api({"id": GOOD["id"]})
    assert layout.render_key(TEMPLATE, rec, "bin") == f"undated/unknown/{GOOD['id']}.bin"


@pytest.mark.parametrize(
    "content_type,url,expected",
    [
        ("video/mp4", None, "mp4"),
        ("audio/ogg; codecs=opus", None, "ogg"),
        ("application/octet-stream", "https://h/p/rec.webm?sig=1", "webm"),
        (None, "https://h/p/rec", "mp4"),  # from type=video
        (None, "https://h/p/rec.toolongext", "mp4"),
    ],
)
def test_extension(content_type: str | None, url: str | None, expected: str) -> None:
    assert layout.extension(content_type, url, Recording.from_api(GOOD)) == expected


def test_download_url_scheme_is_checked() -> None:
    for url in ("file:///etc/passwd", "ftp://h/x", "javascript:alert(1)", "http:///nohost"):
        with pytest.raises(UnsafeValue):
            layout.check_download_url(url)
    assert layout.check_download_url("https://h/x?y=1")


# -- redaction -------------------------------------------------------------------------------
def test_redaction_of_keys_signatures_and_passwords() -> None:
    register_secret("SUPERSECRETKEY123")
    text = (
        "key SUPERSECRETKEY123 url https://dl.example/rec.mp4?X-Amz-Signature=abc&Expires=1 "
        "db postgresql://user:pw@host/db auth Bearer abc.def"
    )
    out = redact(text)
    for secret in ("SUPERSECRETKEY123", "X-Amz-Signature=abc", "user:pw", "abc.def"):
        assert secret not in out
    assert "https://dl.example/rec.mp4?[REDACTED]" in out
    assert repr(Secret("hunter2")) == "Secret('********')"


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("Authorization: BEARER tok.en-1", "tok.en-1"),
        ("auth bEaReR\tsecret_t0ken", "secret_t0ken"),
        ("GET s3://bucket/key?X-Amz-Credential=AKIA", "AKIA"),
        ("redis://admin:pw@cache:6379", "admin:pw"),
        ("a line without either", None),
    ],
)
def test_redaction_finds_each_kind_alone_in_any_case(text: str, gone: str | None) -> None:
    out = redact(text)
    if gone is None:
        assert out == text
    else:
        assert gone not in out and "[REDACTED]" in out


# -- config ----------------------------------------------------------------------------------
def test_example_config_is_valid_and_documents_every_key() -> None:
    settings = load_settings(str(ROOT / "config.example.toml"), env={})
    assert settings.telnyx.api_key_env == "TELNYX_API_KEY"
    example = (ROOT / "config.example.toml").read_text()
    for key in (
        "base_url",
        "api_key_env",
        "page_size",
        "backend",
        "path",
        "concurrency",
        "poll_interval",
        "delete_after_archive",
        "delete_after_days",
    ):
        assert f"{key} =" in example or f"# {key} =" in example


def test_key_comes_from_env_file_or_credentials(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("FROMFILE\n")
    assert load_settings(env={"TELNYX_API_KEY": "ENV"}, read_files=False).telnyx.api_key == Secret(
        "ENV"
    )
    from_file = load_settings(
        env={}, overrides={"telnyx.api_key_file": str(key_file)}, read_files=False
    )
    assert from_file.telnyx.api_key == Secret("FROMFILE")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "telnyx_api_key").write_text("FROMCRED")
    assert load_settings(
        env={"CREDENTIALS_DIRECTORY": str(creds)}, read_files=False
    ).telnyx.api_key == Secret("FROMCRED")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(
            env={}, overrides={"telnyx.api_key_file": str(tmp_path / "no")}, read_files=False
        )


def test_config_reports_all_problems(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[telnyx]\npage_size = 0\n[nope]\nx = 1\n[workers]\nconcurrency = -1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(config), env={})
    problems = err.value.problems
    assert any("telnyx.page_size" in p for p in problems)
    assert any("nope" in p for p in problems)
    assert any("workers.concurrency" in p for p in problems)
    config.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(str(config), env={})
    with pytest.raises(ConfigError, match="password"):
        load_settings(env={}, overrides={"ledger.url": "postgresql://u:pw@h/db"}, read_files=False)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sub" / "c.toml"
    config.parent.mkdir()
    config.write_text('[storage]\npath = "arch"\n[ledger]\npath = "l.db"\n')
    settings = load_settings(str(config), env={})
    assert settings.storage.path == config.parent / "arch"
    assert settings.ledger.path == config.parent / "l.db"


def test_example_s3_block_is_valid_and_s3_values_are_checked(tmp_path: Path) -> None:
    import re

    text = (ROOT / "config.example.toml").read_text()
    start = text.index("# [storage.s3]")
    end = text.index("\n\n", start)
    block = re.sub(r"^# ([a-z_]+ =)", r"\1", text[start:end], flags=re.M)
    block = block.replace("# [storage.s3]", "[storage.s3]")
    config = tmp_path / "s3.toml"
    config.write_text(block)
    s3 = load_settings(str(config), env={}).storage.s3
    assert s3 is not None and s3.bucket == "recordings-archive"
    assert s3.object_lock_mode == "COMPLIANCE" and s3.tags["source"] == "telnyx"
    with pytest.raises(ConfigError) as err:
        load_settings(
            env={},
            overrides={
                "storage.backend": "s3",
                "storage.s3.bucket": "b",
                "storage.s3.sse": "rot13",
                "storage.s3.object_lock_mode": "FOREVER",
                "storage.s3.part_size": 1024,
            },
            read_files=False,
        )
    text = str(err.value)
    for key in ("storage.s3.sse", "storage.s3.object_lock_mode", "part_size"):
        assert key in text


# -- health ----------------------------------------------------------------------------------
def test_a_pass_running_far_longer_than_expected_is_unhealthy() -> None:
    now = [1000.0]
    health = Health(threshold=60, clock=lambda: now[0], first_pass_limit=3600)
    health.pass_started()
    for _ in range(59):  # a first pass that keeps working stays healthy within its limit...
        now[0] += 60
        health.touch()
        assert health.healthy()
    now[0] += 61
    health.touch()
    assert health.overdue() and not health.healthy()  # ...however busy it looks past it
    doc = health.document()
    assert doc["status"] == "failing" and doc["pass_overdue"] and doc["pass_limit_seconds"] == 3600
    health.succeeded()  # 3601 s: the longest pass yet
    assert health.healthy() and health.pass_limit() == 36010
    for _ in range(20):  # twenty quick passes: the long first one is history
        health.pass_started()
        now[0] += 2
        health.succeeded()
    assert health.pass_limit() == 60  # ten times 2 s, but never below the threshold
    health.pass_started()
    now[0] += 59
    health.touch()
    assert health.healthy()
    now[0] += 2
    health.touch()
    assert not health.healthy() and health.document()["pass_seconds"] == 61
