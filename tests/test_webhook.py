"""The webhook receiver: Telnyx's ed25519 signatures checked, forged and stale deliveries refused
and counted, a signed ``video.room.recording.completed`` archived at once by the real daemon."""

from __future__ import annotations

import base64
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from archiver.errors import ConfigError
from archiver.simulator import Simulator, make_recordings
from archiver.webhook import COMPLETED, MAX_BODY, Refused, load_public_key, parse_event, verify
from tests.test_daemon import (
    Daemon,
    daemon_config,
    free_port,
    http_get,
    in_archive,
    metric_values,
    recent,
    wait_for,
)


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def signed(key: Ed25519PrivateKey, body: bytes, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    signature = key.sign(timestamp.encode() + b"|" + body)
    return {
        "telnyx-timestamp": timestamp,
        "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
        "Content-Type": "application/json",
    }


def event(recording_id: str, event_type: str = COMPLETED, id_field: str = "recording_id") -> bytes:
    doc: dict[str, Any] = {
        "data": {
            "event_type": event_type,
            "id": "0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",
            "occurred_at": datetime.now(UTC).isoformat(),
            "record_type": "event",
            "payload": {
                id_field: recording_id,
                "room_id": "7b61621f-62e0-4aad-ab11-9fd19e272e73",
                "download_urls": {"mp4": "https://example.invalid/x.mp4?Signature=secret"},
                "duration_secs": 12,
                "type": "audio",
            },
        },
        "meta": {"attempt": 1, "delivered_to": "http://127.0.0.1/webhook"},
    }
    return json.dumps(doc).encode()


# -- signature and payload, in-process ---------------------------------------------------------

KEY = Ed25519PrivateKey.generate()
PUBLIC = load_public_key(public_b64(KEY))
RID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def check(headers: dict[str, str], body: bytes, now: float | None = None) -> None:
    verify(
        PUBLIC,
        headers.get("telnyx-signature-ed25519"),
        headers.get("telnyx-timestamp"),
        body,
        tolerance=300,
        now=time.time() if now is None else now,
    )


def refusal(headers: dict[str, str], body: bytes, now: float | None = None) -> tuple[str, int]:
    with pytest.raises(Refused) as info:
        check(headers, body, now)
    return info.value.outcome, info.value.status


def test_a_genuine_signature_verifies() -> None:
    body = event(RID)
    check(signed(KEY, body), body)
    # Within the tolerance either way (clocks drift).
    check(signed(KEY, body, at=time.time() - 250), body)
    check(signed(KEY, body, at=time.time() + 250), body)


def test_forged_unsigned_stale_and_malformed_are_refused() -> None:
    body = event(RID)
    headers = signed(KEY, body)
    assert refusal({}, body) == ("unsigned", 401)
    assert refusal({"telnyx-timestamp": headers["telnyx-timestamp"]}, body) == ("unsigned", 401)
    assert refusal(signed(Ed25519PrivateKey.generate(), body), body) == ("bad_signature", 401)
    assert refusal(headers, body + b" ") == ("bad_signature", 401)  # the body was altered
    replayed = {**headers, "telnyx-timestamp": str(int(headers["telnyx-timestamp"]) + 1)}
    assert refusal(replayed, body) == ("bad_signature", 401)
    assert refusal({**headers, "telnyx-signature-ed25519": "not base64!"}, body)[0] == (
        "bad_signature"
    )
    assert refusal(signed(KEY, body, at=time.time() - 301), body) == ("stale", 401)
    assert refusal(headers, body, now=time.time() + 3600) == ("stale", 401)
    assert refusal({**headers, "telnyx-timestamp": "yesterday"}, body) == ("malformed", 400)


def test_the_payload_names_one_safe_recording() -> None:
    kind, rec = parse_event(event(RID))
    assert kind == COMPLETED and rec is not None
    assert rec.id == RID and rec.status == "completed" and rec.room_id
    # Presigned URLs from the event are never kept: the transfer asks the API for a fresh one.
    assert rec.download_url is None and "download_urls" not in rec.metadata
    _, by_id = parse_event(event(RID, id_field="id"))
    assert by_id is not None and by_id.id == RID
    assert parse_event(event(RID, event_type="video.room.session.ended")) == (
        "video.room.session.ended",
        None,
    )
    for bad in (b"not json", b"[]", b'{"data": {}}', event("../../etc/passwd"), event("")):
        with pytest.raises(Refused) as info:
            parse_event(bad)
        assert (info.value.outcome, info.value.status) == ("malformed", 400)


def test_the_public_key_is_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="webhook_public_key: required"):
        load_public_key(None)
    with pytest.raises(ConfigError, match="not a base64 ed25519"):
        load_public_key("c2hvcnQ=")


# -- the real daemon ---------------------------------------------------------------------------


async def test_the_daemon_archives_a_signed_completion_at_once(sim_factory, tmp_path):
    fresh = recent(3, seed=41)
    # Ended 30 days ago: outside every polling window, only the webhook can bring it in.
    old = make_recordings(1, seed=42, start=datetime.now(UTC) - timedelta(days=30), days=1)
    sim: Simulator = await sim_factory([*fresh, *old])
    key = Ed25519PrivateKey.generate()
    hook_port, metrics_port = free_port(), free_port()
    config = daemon_config(
        sim,
        tmp_path,
        first_start=7,  # the whole history is the default: list only the last week here
        poll_interval=30.0,
        webhook_port=hook_port,
        webhook_public_key=public_b64(key),
        webhook_tolerance=60.0,
        metrics_port=metrics_port,
    )
    daemon = await Daemon.start(config)
    url = f"http://127.0.0.1:{hook_port}/webhook"
    try:
        await wait_for(in_archive(tmp_path, fresh), 15, "the first pass", daemon)
        await wait_for(lambda: "pass 1 ok" in daemon.text(), 5, "the pass to end", daemon)
        async with aiohttp.ClientSession() as http:

            async def post(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
                async with http.post(url, data=body, headers=headers) as resp:
                    return resp.status, await resp.json(content_type=None)

            body = event(old[0].id)
            began = time.monotonic()
            status, answer = await post(body, signed(key, body))
            assert (status, answer["outcome"], answer["queued"]) == (200, "accepted", True)
            took = await wait_for(in_archive(tmp_path, old), 10, "the webhook's recording", daemon)
            print(f"\nFIGURE webhook delivery to archived = {time.monotonic() - began:.3f}s")
            assert took < 5

            status, answer = await post(body, signed(key, body))  # Telnyx delivers again
            assert (status, answer["outcome"]) == (200, "duplicate")
            forged = signed(Ed25519PrivateKey.generate(), body)
            assert (await post(body, forged))[0] == 401
            assert (await post(body, {"Content-Type": "application/json"}))[0] == 401
            stale = signed(key, body, at=time.time() - 600)
            assert (await post(body, stale))[0] == 401
            assert (await post(b"{not json", signed(key, b"{not json")))[0] == 400
            hostile = event("../../etc/passwd")
            assert (await post(hostile, signed(key, hostile)))[0] == 400
            other = event(old[0].id, event_type="video.room.session.ended")
            assert await post(other, signed(key, other)) == (
                200,
                {"outcome": "ignored", "event_type": "video.room.session.ended"},
            )
            huge = b"x" * (MAX_BODY + 1)
            assert (await post(huge, signed(key, huge)))[0] == 413
            async with http.get(url) as resp:
                assert resp.status == 405

        _, text = await http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        values = metric_values(text)

        def count(outcome: str) -> float:
            return values.get(f'archiver_webhook_events_total{{outcome="{outcome}"}}', 0)

        assert count("accepted") == 1 and count("duplicate") == 1 and count("ignored") == 1
        assert count("bad_signature") == 1 and count("unsigned") == 1 and count("stale") == 1
        assert count("malformed") == 2 and count("too_large") == 1
        rc, _ = await daemon.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        await daemon.kill()
    # The presigned URL in the event never reached a log.
    assert "Signature=secret" not in daemon.text()
    assert sum(sim.download_completions[r.id] for r in old) == 1


async def test_a_webhook_port_without_a_key_is_a_config_error(sim_factory, tmp_path):
    sim: Simulator = await sim_factory(recent(1, seed=43))
    config = daemon_config(sim, tmp_path, webhook_port=free_port())
    daemon = await Daemon.start(config)
    rc = await daemon.proc.wait()
    assert rc == 2
    assert "daemon.webhook_public_key: required" in daemon.text()
    assert not (tmp_path / "ledger.db").exists()  # refused before anything was opened
