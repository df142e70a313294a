"""The one exception tree of archiver.

Every failure is either *transient* (worth retrying: network trouble, throttling, 5xx, a truncated
body, an expired download URL) or *permanent* (retrying cannot help: a hostile id, a 404, a bad
config). Third-party errors are translated into these once, at the adapter that saw them, and
re-raised ``from`` the original so the cause is kept.

    ArchiverError
    ├── ConfigError                 bad configuration or usage (exit code 2)
    │   └── UsageError              bad command-line values (filters), all of them at once
    ├── TransientError              retry later
    │   ├── RateLimited             429: carries the server's wait hint
    │   ├── ServerError             408 / 409 / 5xx from the API (or any status it says to retry)
    │   ├── NetworkError            connection refused, reset, timeout
    │   ├── MalformedResponse       a 200 whose body is not what the API documents
    │   ├── TruncatedBody           fewer bytes than announced
    │   ├── UrlExpired              the presigned download URL no longer works
    │   ├── WrongContent            the download host sent something other than the recording
    │   ├── RefusedDestination      a download URL the network policy refuses (a fresh one may do)
    │   └── LedgerUnavailable       the ledger cannot be reached right now
    └── PermanentError              retrying cannot help
        ├── AuthError               401: the run stops
        │   └── PermissionDenied    403: the key may not use Video Rooms recordings
        ├── ApiError                other 4xx from the API
        │   ├── NotFound            404 from the API
        │   └── InvalidRequest      400 / 422: the API refused the request's parameters
        ├── EndlessListing          a listing that would not end (past the page cap)
        ├── UnsafeValue             a hostile id, URL or path component
        ├── IntegrityError          the bytes do not match what was promised
        ├── StorageError            the archive refused a write
        │   └── StorageFull         no space left: the run stops instead of failing everything
        ├── ProcessingAtSource      no download yet: picked up by a later pass, not a failure
        ├── HeldElsewhere           another live (or stopped) instance is writing it right now
        ├── LeaseLost               another worker holds the recording now: this one stops
        ├── PreflightError          the archive or source is unusable; nothing started
        └── LedgerError             the ledger is unusable or inconsistent
"""

from __future__ import annotations


class ArchiverError(Exception):
    """Base of every error archiver raises on purpose."""

    transient: bool = False


class ConfigError(ArchiverError):
    """Configuration or usage problems, all of them at once."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"configuration error: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"configuration has {len(self.problems)} problems:\n{lines}"


class UsageError(ConfigError):
    """Command-line values that cannot be right (a filter that is not a UUID, a date range that
    ends before it starts), all of them at once, each naming its flag."""

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problems with the filters:\n{lines}"


class TransientError(ArchiverError):
    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientError):
    pass


class ServerError(TransientError):
    pass


class NetworkError(TransientError):
    pass


class MalformedResponse(TransientError):
    pass


class TruncatedBody(TransientError):
    pass


class UrlExpired(TransientError):
    pass


class WrongContent(TransientError):
    """The bytes offered are not plausibly the recording (an HTML page, an empty or cut-off
    body, a compressed body, the wrong size): never committed; a later attempt may get the real
    ones."""


class RefusedDestination(TransientError):
    """A download URL (or a redirect) leads where archiver never connects: a private,
    loopback, link-local or metadata address, the API host itself, or a URL with credentials."""


class LedgerUnavailable(TransientError):
    pass


class PermanentError(ArchiverError):
    transient = False


class AuthError(PermanentError):
    pass


class ApiError(PermanentError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ApiError):
    pass


class InvalidRequest(ApiError):
    """The API refused the parameters it was sent (400 / 422): a usage problem, not the
    recording's. Filters are checked before any request, so this means the API and archiver
    disagree on what a parameter may be."""


class MisdirectedApi(InvalidRequest):
    """The API redirected to another origin (or too often): ``telnyx.base_url`` points at
    something that is not the API, a configuration problem, not a recording's."""


class PermissionDenied(AuthError):
    """403 from the API: the key is valid but may not use Video Rooms recordings."""


class EndlessListing(PermanentError):
    """A listing went past the page cap: the API keeps answering pages (a loop, or a
    ``total_pages`` no account has)."""


class UnsafeValue(PermanentError):
    pass


class IntegrityError(PermanentError):
    pass


class StorageError(PermanentError):
    pass


class StorageFull(StorageError):
    pass


class ProcessingAtSource(PermanentError):
    """The recording is not downloadable yet (still processing): try on a later pass."""


class HeldElsewhere(PermanentError):
    """Another upload, of a live or a stopped instance, holds the recording's partial copy. Not
    worth retrying within this claim, and no fault of the recording: the row is given back
    without using an attempt, and a later pass takes it again."""


class LeaseLost(PermanentError):
    """Our claim on a recording expired and the ledger gave it to another worker."""


class PreflightError(PermanentError):
    pass


class LedgerError(PermanentError):
    pass


def is_transient(exc: BaseException) -> bool:
    """True when retrying the operation that raised ``exc`` may succeed."""
    return isinstance(exc, ArchiverError) and exc.transient
