"""Scrub secrets from any text that may reach a log, an error or a file.

Two kinds: values registered at start-up (the API key, a database password) and presigned-URL
query strings (signatures and expiries), which are cut from every URL.
"""

from __future__ import annotations

import re
import threading

_URL_QUERY = re.compile(r"(?P<base>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s\"'<>]*")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never print this value again. Short values are ignored: they would mangle ordinary text."""
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    # The patterns scan every position; most lines hold neither a URL nor a token.
    if "://" in text:
        text = _URL_QUERY.sub(r"\g<base>?[REDACTED]", text)
        text = _USERINFO.sub(r"\g<scheme>[REDACTED]@", text)
    if "bearer" in text.lower():
        text = _BEARER.sub(r"\1[REDACTED]", text)
    return text


def safe_url(url: str) -> str:
    """A URL fit for logs and errors: scheme, host and path only."""
    return redact(url)
