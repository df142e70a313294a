"""Near-real-time archiving: a receiver for Telnyx's ``video.room.recording.completed`` webhook
(and ``video.room.composition.completed`` when compositions are archived).

Opt-in (``daemon.webhook_port``, 0 = off); polling stays the safety net, so a lost or refused
delivery only delays a recording until the next pass.

Telnyx signs ``<telnyx-timestamp>|<raw body>`` with ed25519 and sends the base64 signature in
``telnyx-signature-ed25519``; ``daemon.webhook_public_key`` is the account's base64 public key
(Mission Control portal → Keys & Credentials → Public Key). A request is refused, and counted in
``archiver_webhook_events_total{outcome=...}``, when it is unsigned (401), its signature does not
verify (401), its timestamp is more than ``daemon.webhook_tolerance`` seconds from now (401, a
replay), its body is over 64 KiB (413) or not the documented shape (400). A verified completion
event is observed in the ledger and queued at once; other event types are acknowledged and
ignored.

Endpoint: ``POST /webhook`` (``POST /`` too), on ``daemon.webhook_host:daemon.webhook_port``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archiver import layout, metrics
from archiver.errors import ConfigError, UnsafeValue
from archiver.models import MalformedEntry, Recording
from archiver.sources import RECORDINGS, SOURCES

log = logging.getLogger(__name__)

COMPLETED = SOURCES[RECORDINGS].ready_event
# The event that names a finished item, per source.
_READY = {src.ready_event: src for src in SOURCES.values()}
SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
MAX_BODY = 64 * 1024
# How long a delivery waits for a free queue slot before it is acknowledged anyway (the
# recording is in the ledger by then and is queued as soon as a slot frees).
QUEUE_WAIT = 5.0
# Fields of the payload never kept: presigned URLs. The transfer asks the API for a fresh one.
_DROPPED_FIELDS = frozenset({"download_url", "download_urls", "recording_id", "composition_id"})


class Engine(Protocol):
    stop: asyncio.Event

    async def submit(self, rec: Recording) -> bool: ...


class Refused(Exception):
    def __init__(self, outcome: str, status: int, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.status = status
        self.reason = reason


def load_public_key(text: str | None) -> Ed25519PublicKey:
    """The account's public key from its base64 form (32 raw bytes)."""
    if not text:
        raise ConfigError(
            "daemon.webhook_public_key: required when daemon.webhook_port is set "
            "(unsigned webhooks are never accepted)"
        )
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            "daemon.webhook_public_key: not a base64 ed25519 public key (32 bytes)"
        ) from exc


def verify(
    key: Ed25519PublicKey,
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    *,
    tolerance: float,
    now: float,
) -> None:
    """Raise Refused unless ``signature`` is Telnyx's over ``timestamp|body`` and is fresh."""
    if not signature or not timestamp:
        raise Refused("unsigned", 401, "missing signature or timestamp header")
    try:
        sent_at = int(timestamp.strip())
    except ValueError:
        raise Refused("malformed", 400, "the timestamp is not unix seconds") from None
    try:
        raw_signature = base64.b64decode(signature.strip(), validate=True)
        key.verify(raw_signature, timestamp.encode() + b"|" + body)
    except (binascii.Error, ValueError, InvalidSignature):
        raise Refused("bad_signature", 401, "the signature does not verify") from None
    if abs(now - sent_at) > tolerance:
        raise Refused("stale", 401, f"the timestamp is {now - sent_at:+.0f}s away from now")


def parse_event(
    body: bytes, sources: Sequence[str] = (RECORDINGS,)
) -> tuple[str, Recording | None]:
    """The event type and, for a completion of an item of one of ``sources``, the item it
    names (a recording, or a composition)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise Refused("malformed", 400, "the body is not JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("event_type"), str):
        raise Refused("malformed", 400, "no data.event_type")
    event_type: str = data["event_type"]
    source = _READY.get(event_type)
    if source is None or source.name not in sources:
        return event_type, None
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise Refused("malformed", 400, "no data.payload")
    id_field = f"{source.noun}_id"
    rec_id = payload.get(id_field) or payload.get("id")
    if not isinstance(rec_id, str) or not rec_id:
        raise Refused("malformed", 400, f"the payload has no {id_field}")
    try:
        layout.check_id(rec_id, f"{source.noun} id")
        entry: dict[str, Any] = {k: v for k, v in payload.items() if k not in _DROPPED_FIELDS}
        entry["id"] = rec_id
        entry.setdefault("status", "completed")
        return event_type, Recording.from_api(entry, source.name)
    except (UnsafeValue, MalformedEntry) as exc:
        raise Refused("malformed", 400, str(exc)) from None


class WebhookReceiver:
    def __init__(
        self,
        engine: Engine,
        public_key: Ed25519PublicKey,
        *,
        tolerance: float,
        clock: Callable[[], float] = time.time,
        sources: Sequence[str] = (RECORDINGS,),
    ) -> None:
        self._engine = engine
        self._sources = tuple(sources)
        self._key = public_key
        self._tolerance = tolerance
        self._clock = clock
        self._waiting: set[asyncio.Task[bool]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/webhook", self.handle)
        app.router.add_post("/", self.handle)
        app.on_shutdown.append(self._cancel_waiting)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Refused as refused:
            metrics.WEBHOOK_EVENTS.labels(outcome=refused.outcome).inc()
            log.warning("webhook refused (%s): %s", refused.outcome, refused.reason)
            return web.json_response({"error": refused.reason}, status=refused.status)

    async def _handle(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Refused("too_large", 413, f"the body is over {MAX_BODY} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused("too_large", 413, f"the body is over {MAX_BODY} bytes") from None
        verify(
            self._key,
            request.headers.get(SIGNATURE_HEADER),
            request.headers.get(TIMESTAMP_HEADER),
            body,
            tolerance=self._tolerance,
            now=self._clock(),
        )
        event_type, rec = parse_event(body, self._sources)
        if rec is None:
            return self._answer("ignored", 200, event_type=event_type)
        if self._engine.stop.is_set():
            # Telnyx retries a failed delivery; the next instance or pass picks it up.
            return self._answer("unavailable", 503, recording_id=rec.id)
        task = asyncio.create_task(self._engine.submit(rec))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)
        done, _ = await asyncio.wait({task}, timeout=QUEUE_WAIT)
        if not done:
            # In the ledger already and queued when a worker frees up.
            return self._answer("accepted", 202, recording_id=rec.id, queued=False)
        try:
            queued = task.result()
        except Exception:
            log.exception("webhook: could not take recording %s", rec.id)
            return self._answer("error", 500, recording_id=rec.id)
        if queued:
            log.info("webhook: queued %s", rec.id, extra={"recording_id": rec.id})
            return self._answer("accepted", 200, recording_id=rec.id, queued=True)
        return self._answer("duplicate", 200, recording_id=rec.id, queued=False)

    def _answer(self, outcome: str, status: int, **fields: Any) -> web.Response:
        metrics.WEBHOOK_EVENTS.labels(outcome=outcome).inc()
        return web.json_response({"outcome": outcome, **fields}, status=status)

    async def _cancel_waiting(self, app: web.Application) -> None:
        for task in list(self._waiting):
            task.cancel()
