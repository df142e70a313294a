"""Fast unit tests of the pure pieces: error parsing, retry waits, layout, redaction, config."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from archiver import layout
from archiver.config import Secret, load_settings
from archiver.errors import (
    ApiError,
    AuthError,
    ConfigError,
    MalformedResponse,
    NotFound,
    RateLimited,
    ServerError,
    UnsafeValue,
)
from archiver.models import Recording
from archiver.redact import redact, register_secret
from archiver.retry import RetryPolicy, backoff_seconds
from archiver.telnyx import Filters, error_message, parse_page, raise_for_api_status, wait_hint

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
    for status in (408, 500, 502, 503):
        with pytest.raises(ServerError):
            raise_for_api_status(status, {}, "{}")
    with pytest.raises(NotFound):
        raise_for_api_status(404, {}, "{}")
    for status in (403, 422):
        with pytest.raises(ApiError) as refused:
            raise_for_api_status(status, {}, "{}")
        assert not refused.value.transient
    raise_for_api_status(200, {}, "{}")


def test_wait_hint_takes_the_larger_and_reads_epochs() -> None:
    assert wait_hint({"Retry-After": "2", "x-ratelimit-reset": "5"}) == 5
    assert wait_hint({"Retry-After": "soon"}) is None
    epoch = wait_hint({"x-ratelimit-reset": str(int(time.time()) + 30)})
    assert epoch is not None and 25 <= epoch <= 31


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


def test_filters_encode_as_bracketed_keys() -> None:
    query = Filters(
        date_ended_at_gte=date(2024, 5, 1), duration_secs_lte=60, room_id="r"
    ).to_query()
    assert query == {
        "filter[date_ended_at][gte]": "2024-05-01",
        "filter[duration_secs][lte]": "60",
        "filter[room_id]": "r",
    }


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
