"""The Telnyx room recordings API: auth, filters, pages, retrieve, delete, error mapping.

``TelnyxApi`` is the adapter: one attempt per call, never a loop of its own. ``TelnyxClient``
wraps it (as restic wraps a backend), each call retried once, there, by the one policy
(``archiver.retry``); a caller with a retry loop of its own (a transfer) uses the single attempt,
``retrieve_once``. The API key is sent only to the API host, never to download URLs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from archiver import metrics
from archiver.config import TelnyxSettings
from archiver.errors import (
    ApiError,
    AuthError,
    ConfigError,
    EndlessListing,
    InvalidRequest,
    MalformedResponse,
    MisdirectedApi,
    NetworkError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
)
from archiver.filters import Filters
from archiver.models import _EPHEMERAL_FIELDS, MalformedEntry, Recording
from archiver.netguard import Origin
from archiver.redact import redact, register_secret
from archiver.retry import RetryPolicy, call_with_retry
from archiver.sources import RECORDINGS, SOURCES

log = logging.getLogger(__name__)

# A page of 250 entries is ~150 KB: a response beyond this cap is not a listing.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
# Redirects of a GET followed within the API's origin (another origin is never followed).
MAX_API_REDIRECTS = 3
# One listing ends with an error past this many entries' worth of pages (see max_pages_for).
MAX_LISTED = 25_000_000


@dataclass(frozen=True, slots=True)
class Page:
    number: int
    recordings: list[Recording]
    # Entries that could not be read as a recording: (their id, or a stable stand-in, why).
    malformed: list[tuple[str, str]]
    total_pages: int | None
    total_results: int | None
    # Each malformed entry as received, by stand-in: its fields are still tested by the filters.
    malformed_entries: dict[str, Any] = field(default_factory=dict)


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


def wait_hint(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asks to wait, or None: ``retry-after-ms`` (milliseconds), else
    ``Retry-After`` (seconds, or an HTTP date), and ``x-ratelimit-reset`` (seconds, or a Unix
    time); the larger of the two when both are given. The retry policy caps it."""
    now = time.time() if now is None else now
    hints: list[float] = []
    retry_after = _seconds(headers.get("retry-after-ms"))
    if retry_after is not None:
        retry_after /= 1000
    else:
        raw = headers.get("Retry-After")
        retry_after = _seconds(raw)
        if retry_after is None and raw:
            retry_after = _http_date_delay(raw, now)
    if retry_after is not None:
        hints.append(retry_after)
    reset = _seconds(headers.get("x-ratelimit-reset"))
    if reset is not None:
        hints.append(reset - now if reset > 1e9 else reset)  # a Unix time, not a delay
    return max(max(hints), 0.0) if hints else None


def _seconds(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _http_date_delay(raw: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110: an HTTP date is GMT
        return None
    return when.timestamp() - now


def should_retry_header(headers: Any) -> bool | None:
    """The API's own verdict (``x-should-retry: true|false``), obeyed over the status code."""
    raw = headers.get("x-should-retry")
    value = raw.strip().lower() if isinstance(raw, str) else None
    return {"true": True, "false": False}.get(value or "")


def raise_for_api_status(status: int, headers: Any, body: str, *, sent: str = "") -> None:
    """Map an API answer to the exception tree. Retried (transient): 408, 409, 429, 5xx, or any
    status with ``x-should-retry: true``; never retried: anything else, or any status with
    ``x-should-retry: false``. ``sent`` (the query, for a listing) is named when the API
    refuses the request's parameters."""
    if status < 400:
        return
    message = error_message(status, body)
    verdict = should_retry_header(headers)
    if verdict is True:
        raise ServerError(f"{message} (the API asks for a retry)", retry_after=wait_hint(headers))
    if status == 401:
        raise AuthError(f"the Telnyx API refused the key ({message}); check TELNYX_API_KEY")
    if status == 403:
        raise PermissionDenied(
            f"the Telnyx API key lacks permission for Video Rooms recordings ({message}); "
            "give the key access to Video (room recordings) or use another key"
        )
    if status == 404:
        raise NotFound(message, status=status)
    if status in (400, 422):
        where = f"; sent {sent}" if sent else ""
        raise InvalidRequest(
            f"the Telnyx API refused the request's parameters ({message}){where}", status=status
        )
    if verdict is False:
        raise ApiError(f"{message} (the API says not to retry)", status=status)
    if status == 429:
        raise RateLimited(message, retry_after=wait_hint(headers))
    if status in (408, 409) or status >= 500:
        raise ServerError(message, retry_after=wait_hint(headers))
    raise ApiError(message, status=status)


def max_pages_for(page_size: int) -> int:
    """The page cap of one listing: far past any account (25 million recordings)."""
    return max(math.ceil(MAX_LISTED / max(page_size, 1)), 1)


class TelnyxApi:
    """``async with TelnyxApi(settings) as api:``: each call one attempt (a few redirects within
    the API's origin aside), raising what the answer means; nothing here retries."""

    def __init__(self, settings: TelnyxSettings) -> None:
        if settings.api_key is None:
            raise ConfigError(
                f"no Telnyx API key: set ${settings.api_key_env} (or telnyx.api_key_file)"
            )
        register_secret(settings.api_key.reveal())
        self._settings = settings
        self._base = settings.base_url.rstrip("/")
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
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """One call, redirects handled here: the session's Authorization header must reach
        the API's origin only, so aiohttp never follows one itself. A GET may follow a few
        redirects within that origin; anything else 3xx is an ApiError, its body unread."""
        assert self._session is not None, "use TelnyxApi as an async context manager"
        url = URL(f"{self._base}{path}")
        sent = " ".join(f"{k}={v}" for k, v in (params or {}).items() if k.startswith("filter["))
        try:
            for _ in range(MAX_API_REDIRECTS + 1):
                async with self._session.request(
                    method, url, params=params, headers=headers, allow_redirects=False
                ) as resp:
                    metrics.API_RESPONSES.labels(status=str(resp.status)).inc()
                    log.debug("API %s %s: HTTP %d", method, resp.url.path_qs, resp.status)
                    if 300 <= resp.status < 400:
                        url, params = self._redirect_target(method, path, resp), None
                        continue
                    body = await read_capped(resp, f"{method} {path}")
                    raise_for_api_status(resp.status, resp.headers, body, sent=sent)
                    return resp.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.API_RESPONSES.labels(status="network").inc()
            raise NetworkError(redact(f"{method} {path}: {type(exc).__name__}: {exc}")) from exc
        raise MisdirectedApi(
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
            raise MisdirectedApi(
                f"{where} redirecting from {ours} to another origin, {theirs}; not followed, "
                "so the API key stays with the API: check telnyx.base_url",
                status=resp.status,
            )
        if method != "GET" or resp.status not in (301, 302, 303, 307, 308):
            raise ApiError(f"{where}; refusing to repeat a {method} elsewhere", status=resp.status)
        return target

    async def list_page(
        self, filters: Filters, number: int, size: int | None = None, source: str = RECORDINGS
    ) -> Page:
        size = size or self._settings.page_size
        params = {
            **filters.to_query(source),
            "page[size]": str(size),
            "page[number]": str(number),
        }
        _, body = await self._request("GET", SOURCES[source].path, params)
        return parse_page(body, number, source)

    async def retrieve(self, recording_id: str, source: str = RECORDINGS) -> Recording:
        path = item_path(source, recording_id)
        _, body = await self._request("GET", path)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise MalformedResponse(f"GET {path}: the API answered non-JSON") from exc
        data = doc.get("data") if isinstance(doc, dict) else None
        try:
            rec = Recording.from_api(data, source)
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

    async def delete(self, recording_id: str, source: str = RECORDINGS) -> None:
        """Delete ONE recording at the source. The bulk delete endpoint is never called."""
        if not recording_id:
            raise ValueError("refusing a delete without an id")
        path = item_path(source, recording_id)
        # The answer is a 204 without a body: asking for JSON only would be wrong.
        await self._request("DELETE", path, headers={"Accept": "*/*"})


class TelnyxClient:
    """``async with TelnyxClient(settings) as api:`` … ``api.iter_pages(filters)``: the API
    (``TelnyxApi``, kept as ``once``) with every call retried by the one policy. Only here is an
    API call retried; ``retrieve_once`` is the single attempt for a caller that retries itself."""

    def __init__(
        self,
        settings: TelnyxSettings,
        *,
        max_pages: int | None = None,
        sources: Sequence[str] = (RECORDINGS,),
    ) -> None:
        """``max_pages``: the page cap of one listing (default ``max_pages_for(page_size)``);
        ``sources``: what ``iter_pages`` lists, one after the other (``archiver.sources``)."""
        self.once = TelnyxApi(settings)
        self._sources = tuple(sources)
        self._page_size = settings.page_size
        self._policy = RetryPolicy(
            attempts=settings.max_attempts,
            total_seconds=settings.max_retry_seconds,
            max_backoff=settings.max_backoff,
        )
        self._max_pages = max_pages or max_pages_for(settings.page_size)

    async def __aenter__(self) -> Self:
        await self.once.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.once.__aexit__(exc_type, exc, tb)

    async def list_page(
        self, filters: Filters, number: int, size: int | None = None, source: str = RECORDINGS
    ) -> Page:
        what = f"list page {number}" + ("" if source == RECORDINGS else f" of {source}")
        return await call_with_retry(
            self._policy, what, lambda: self.once.list_page(filters, number, size, source)
        )

    async def iter_pages(self, filters: Filters) -> AsyncIterator[Page]:
        """Every page of every source this client lists, one source after the other."""
        for source in self._sources:
            async for page in self._iter_source(filters, source):
                yield page

    async def _iter_source(self, filters: Filters, source: str) -> AsyncIterator[Page]:
        """Every page of one source in order. The listing ends at an empty page, at
        ``meta.total_pages``, or at a page that brings no entry this listing has not seen
        already (an API repeating a page, with ``meta`` or without): ``meta`` is optional in
        the spec, and a page shift that repeats a whole page is caught by the next pass. Past
        the page cap it raises ``EndlessListing``."""
        seen: set[str] = set()
        number = 1
        total_pages: int | None = None
        while True:
            if number > self._max_pages:
                raise EndlessListing(
                    f"the listing went past {self._max_pages} pages of "
                    f"{self._page_size} (meta.total_pages: {total_pages}) without "
                    "ending; stopped: the API keeps answering pages, check telnyx.base_url"
                )
            page = await self.list_page(filters, number, source=source)
            total_pages = page.total_pages
            yield page
            ids = {rec.id for rec in page.recordings} | {stand_in for stand_in, _ in page.malformed}
            if not ids:
                return
            if page.total_pages is not None and number >= page.total_pages:
                return
            if ids <= seen:
                log.warning(
                    "list page %d brought no recording the pages before it had not: the listing "
                    "ends here (the API repeats a page, or a page shift; the next pass lists "
                    "again)",
                    number,
                )
                return
            seen |= ids
            number += 1

    async def retrieve(self, recording_id: str, source: str = RECORDINGS) -> Recording:
        return await call_with_retry(
            self._policy,
            f"GET {item_path(source, recording_id)}",
            lambda: self.once.retrieve(recording_id, source),
        )

    async def retrieve_once(self, recording_id: str, source: str = RECORDINGS) -> Recording:
        """One attempt at ``retrieve``: for a caller whose own loop is the retry."""
        return await self.once.retrieve(recording_id, source)

    async def delete(self, recording_id: str, source: str = RECORDINGS) -> None:
        await call_with_retry(
            self._policy,
            f"DELETE {item_path(source, recording_id)}",
            lambda: self.once.delete(recording_id, source),
        )


def item_path(source: str, item_id: str) -> str:
    """The API path of one item of ``source`` (its id quoted: it is never trusted as a path)."""
    return f"{SOURCES[source].path}/{quote(item_id, safe='')}"


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


def parse_page(body: str, number: int, source: str = RECORDINGS) -> Page:
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
    malformed_entries: dict[str, Any] = {}
    for entry in doc["data"]:
        try:
            rec = Recording.from_api(entry, source)
        except MalformedEntry as exc:
            stand_in = stand_in_id(entry)
            malformed.append((stand_in, str(exc)))
            malformed_entries[stand_in] = entry
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
        malformed_entries=malformed_entries,
    )
