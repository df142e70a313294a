"""The Telnyx room recordings API: auth, filters, pages, retrieve, delete, error mapping.

Every call is retried by the one policy in ``archiver.retry``. The API key is sent only to the
API host: this client's session is never used for download URLs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from datetime import date
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from archiver import metrics
from archiver.config import FilterSettings, TelnyxSettings
from archiver.errors import (
    ApiError,
    AuthError,
    ConfigError,
    MalformedResponse,
    NetworkError,
    NotFound,
    RateLimited,
    ServerError,
)
from archiver.models import _EPHEMERAL_FIELDS, MalformedEntry, Recording
from archiver.netguard import Origin
from archiver.redact import redact, register_secret
from archiver.retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)

# A page of 250 entries is ~150 KB: a response beyond this cap is not a listing.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
# Redirects of a GET followed within the API's origin (another origin is never followed).
MAX_API_REDIRECTS = 3


@dataclass(frozen=True, slots=True)
class Filters:
    """Every filter of ``GET /v2/room_recordings``. Dates are whole UTC days, bounds inclusive."""

    date_ended_at_eq: date | None = None
    date_ended_at_gte: date | None = None
    date_ended_at_lte: date | None = None
    date_started_at_eq: date | None = None
    date_started_at_gte: date | None = None
    date_started_at_lte: date | None = None
    room_id: str | None = None
    participant_id: str | None = None
    session_id: str | None = None
    status: str | None = None
    type: str | None = None
    duration_secs_eq: int | None = None
    duration_secs_lte: int | None = None
    duration_secs_gte: int | None = None

    def to_query(self) -> dict[str, str]:
        """The bracketed query keys the API expects, e.g. ``filter[date_ended_at][gte]``."""
        query: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            field_name, _, op = f.name.rpartition("_")
            if op in ("eq", "gte", "lte"):
                key = f"filter[{field_name}][{op}]"
            else:
                key = f"filter[{f.name}]"
            query[key] = value.isoformat() if isinstance(value, date) else str(value)
        return query

    @classmethod
    def standing(cls, settings: FilterSettings, **overrides: Any) -> Filters:
        """The config's standing filters, with command-line values taking precedence."""
        base: dict[str, Any] = {
            "room_id": settings.room_id,
            "session_id": settings.session_id,
            "participant_id": settings.participant_id,
            "type": settings.type,
            "duration_secs_gte": settings.duration_secs_gte,
            "duration_secs_lte": settings.duration_secs_lte,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass(frozen=True, slots=True)
class Page:
    number: int
    recordings: list[Recording]
    # Entries that could not be read as a recording: (their id, or a stable stand-in, why).
    malformed: list[tuple[str, str]]
    total_pages: int | None
    total_results: int | None


def error_message(status: int, body: str) -> str:
    """One clear sentence from any of the three error shapes the API uses."""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    parts: list[str] = []
    if isinstance(doc, dict):
        errors = doc.get("errors")
        items = errors if isinstance(errors, list) else [doc]
        for item in items:
            if not isinstance(item, dict):
                continue
            code = item.get("code")
            title = item.get("title") or item.get("message")
            detail = item.get("detail")
            text = " - ".join(str(x) for x in (title, detail) if x)
            if code:
                text = f"[{code}] {text}" if text else f"[{code}]"
            if text:
                parts.append(text)
    if not parts:
        snippet = " ".join(body.split())[:200] if body else ""
        parts.append(snippet or "no error details")
    return redact(f"HTTP {status}: " + "; ".join(parts))


def wait_hint(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After`` or ``x-ratelimit-reset`` (whichever is larger)."""
    hints: list[float] = []
    for name in ("Retry-After", "x-ratelimit-reset"):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value > 1e9:  # an absolute Unix time, not a delay
            value -= time.time()
        hints.append(max(value, 0.0))
    return max(hints) if hints else None


def raise_for_api_status(status: int, headers: Any, body: str) -> None:
    if status < 400:
        return
    message = error_message(status, body)
    if status == 401:
        raise AuthError(f"the Telnyx API refused the key ({message}); check TELNYX_API_KEY")
    if status == 429:
        raise RateLimited(message, retry_after=wait_hint(headers))
    if status == 408 or status >= 500:
        raise ServerError(message, retry_after=wait_hint(headers))
    if status == 404:
        raise NotFound(message, status=status)
    raise ApiError(message, status=status)


class TelnyxClient:
    """``async with TelnyxClient(settings) as api:`` … ``api.iter_pages(filters)``."""

    def __init__(self, settings: TelnyxSettings) -> None:
        if settings.api_key is None:
            raise ConfigError(
                f"no Telnyx API key: set ${settings.api_key_env} (or telnyx.api_key_file)"
            )
        register_secret(settings.api_key.reveal())
        self._settings = settings
        self._base = settings.base_url.rstrip("/")
        self._policy = RetryPolicy(
            attempts=settings.max_attempts,
            total_seconds=settings.max_retry_seconds,
            max_backoff=settings.max_backoff,
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        assert self._settings.api_key is not None
        self._session = aiohttp.ClientSession(
            headers={
                "Authorization": f"Bearer {self._settings.api_key.reveal()}",
                "Accept": "application/json",
                "User-Agent": "archiver/0.1",
            },
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, path: str, params: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """One call, redirects handled here: the session's Authorization header must reach
        the API's origin only, so aiohttp never follows one itself. A GET may follow a few
        redirects within that origin; anything else 3xx is an ApiError, its body unread."""
        assert self._session is not None, "use TelnyxClient as an async context manager"
        url = URL(f"{self._base}{path}")
        try:
            for _ in range(MAX_API_REDIRECTS + 1):
                async with self._session.request(
                    method, url, params=params, allow_redirects=False
                ) as resp:
                    metrics.API_RESPONSES.labels(status=str(resp.status)).inc()
                    if 300 <= resp.status < 400:
                        url, params = self._redirect_target(method, path, resp), None
                        continue
                    body = await read_capped(resp, f"{method} {path}")
                    raise_for_api_status(resp.status, resp.headers, body)
                    return resp.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.API_RESPONSES.labels(status="network").inc()
            raise NetworkError(redact(f"{method} {path}: {type(exc).__name__}: {exc}")) from exc
        raise ApiError(
            f"{method} {path}: the API redirected more than {MAX_API_REDIRECTS} times; "
            "check telnyx.base_url"
        )

    def _redirect_target(self, method: str, path: str, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get(aiohttp.hdrs.LOCATION)
        where = f"{method} {path}: the API answered HTTP {resp.status}"
        if location is None:
            raise ApiError(f"{where} without a Location", status=resp.status)
        try:
            target = resp.url.join(URL(location)).with_fragment(None)
        except ValueError as exc:
            raise ApiError(f"{where} with an unreadable Location", status=resp.status) from exc
        ours, theirs = Origin.of(self._base), Origin.of(target)
        if theirs != ours:
            raise ApiError(
                f"{where} redirecting from {ours} to another origin, {theirs}; not followed, "
                "so the API key stays with the API: check telnyx.base_url",
                status=resp.status,
            )
        if method != "GET" or resp.status not in (301, 302, 303, 307, 308):
            raise ApiError(f"{where}; refusing to repeat a {method} elsewhere", status=resp.status)
        return target

    async def _json(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        async def once() -> Any:
            _, body = await self._request(method, path, params)
            try:
                return json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise MalformedResponse(f"{method} {path}: the API answered non-JSON") from exc

        return await call_with_retry(self._policy, f"{method} {path}", once)

    async def list_page(self, filters: Filters, number: int, size: int | None = None) -> Page:
        size = size or self._settings.page_size
        params = {**filters.to_query(), "page[size]": str(size), "page[number]": str(number)}

        async def once() -> Page:
            _, body = await self._request("GET", "/room_recordings", params)
            return parse_page(body, number)

        return await call_with_retry(self._policy, f"list page {number}", once)

    async def iter_pages(self, filters: Filters) -> AsyncIterator[Page]:
        """Every page in order; ends at ``meta.total_pages`` or at an empty page."""
        number = 1
        while True:
            page = await self.list_page(filters, number)
            yield page
            if not page.recordings and not page.malformed:
                return
            if page.total_pages is not None and number >= page.total_pages:
                return
            number += 1

    async def retrieve(self, recording_id: str) -> Recording:
        doc = await self._json("GET", f"/room_recordings/{quote(recording_id, safe='')}")
        data = doc.get("data") if isinstance(doc, dict) else None
        try:
            rec = Recording.from_api(data)
        except MalformedEntry as exc:
            raise MalformedResponse(f"retrieve {recording_id!r}: {exc}") from exc
        if rec.id != recording_id:
            # Trusted, the other recording's bytes would be archived as this one's, and this
            # one deleted at the source on the strength of that copy.
            raise MalformedResponse(
                f"retrieve {recording_id[:80]!r}: the API answered with another recording, "
                f"{rec.id[:80]!r}"
            )
        return rec

    async def delete(self, recording_id: str) -> None:
        """Delete ONE recording at the source. The bulk delete endpoint is never called."""
        if not recording_id:
            raise ValueError("refusing a delete without an id")
        path = f"/room_recordings/{quote(recording_id, safe='')}"

        async def once() -> None:
            await self._request("DELETE", path)

        await call_with_retry(self._policy, f"DELETE {path}", once)


async def read_capped(resp: aiohttp.ClientResponse, what: str) -> str:
    """The body as text, read at most ``MAX_RESPONSE_BYTES`` of it. Beyond that a success is
    refused (``MalformedResponse``) as soon as the cap is passed, never buffered further; an
    error body is cut to its first ``MAX_ERROR_BODY_BYTES`` (only its message is wanted)."""
    success = resp.status < 400
    cap = MAX_RESPONSE_BYTES if success else MAX_ERROR_BODY_BYTES
    too_big = MalformedResponse(
        f"{what}: the API answered more than {MAX_RESPONSE_BYTES // 2**20} MiB for one "
        "response; refusing it"
    )
    if success and resp.content_length is not None and resp.content_length > cap:
        resp.close()
        raise too_big
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > cap:
            resp.close()  # the rest is never read: drop the connection with it
            if success:
                raise too_big
            del body[cap:]
            break
    try:
        return body.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def stand_in_id(entry: Any) -> str:
    """The name an entry that cannot be read as a recording is reported under, the same in
    every listing: its own id when that is usable (the ledger row is then the recording's, and
    is judged again once it is listed in a usable form), else a hash of what it says. The hash
    leaves out the presigned download_url, which differs in every listing: with it, each run
    would add another row owed for good for the same entry."""
    if isinstance(entry, Mapping):
        try:
            return Recording.from_api({"id": entry.get("id")}).id
        except MalformedEntry:
            pass
        entry = {k: v for k, v in entry.items() if k not in _EPHEMERAL_FIELDS}
    canonical = json.dumps(entry, sort_keys=True, default=repr).encode()
    return "malformed-" + hashlib.sha256(canonical).hexdigest()[:16]


def parse_page(body: str, number: int) -> Page:
    """Read one listing page. A body that is not the documented shape is transient (the API is
    having a bad moment); an entry that is not a recording is reported, not fatal."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedResponse(f"list page {number}: the API answered non-JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise MalformedResponse(f"list page {number}: the answer has no 'data' list")
    recordings: list[Recording] = []
    malformed: list[tuple[str, str]] = []
    for entry in doc["data"]:
        try:
            rec = Recording.from_api(entry)
        except MalformedEntry as exc:
            malformed.append((stand_in_id(entry), str(exc)))
            continue
        recordings.append(rec)
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    total_pages = meta.get("total_pages")
    total_results = meta.get("total_results")
    return Page(
        number=number,
        recordings=recordings,
        malformed=malformed,
        total_pages=total_pages if isinstance(total_pages, int) else None,
        total_results=total_results if isinstance(total_results, int) else None,
    )
