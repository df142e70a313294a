"""botocore's failures as archiver's: one table, one context manager (as httpx's
``map_httpcore_exceptions``). Every boto3 call of the backend runs inside ``boto_errors``.

What is transient (``archiver.errors``): throttling, 5xx and 408, connection trouble, and bytes
damaged on the way (``BadDigest``, ``XAmzContentSHA256Mismatch``: archiver computes every
checksum it sends from the very bytes it sends, so the server seeing others means the network
changed them; ``IncompleteBody``: a part cut short). Everything else is permanent. Two kinds are
the backend's own business and never leave it unhandled: ``Missing`` (no such key, version or
upload: often an answer, not an error), ``Refused`` (403: Object Lock, or the credentials) and
``NoBucket``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from archiver.errors import (
    ArchiverError,
    IntegrityError,
    NetworkError,
    ServerError,
    StorageError,
    TruncatedBody,
)
from archiver.redact import redact


class Missing(StorageError):
    """S3 has no such key, version or multipart upload (a missing bucket is not this)."""


class Refused(StorageError):
    """S3 answered 403: Object Lock retention or a legal hold, or the credentials may not."""


class NoBucket(StorageError):
    """The bucket itself does not exist."""


# The S3 error codes that decide the kind, before the HTTP status does.
_CODES: dict[str, type[ArchiverError]] = {
    **dict.fromkeys(("BadDigest", "XAmzContentSHA256Mismatch"), NetworkError),
    "IncompleteBody": TruncatedBody,
    # A checksum header S3 cannot read: archiver's mistake, not the network's.
    "InvalidDigest": IntegrityError,
    **dict.fromkeys(
        (
            "SlowDown",
            "RequestTimeout",
            "InternalError",
            "ServiceUnavailable",
            "Throttling",
            "ThrottlingException",
            "TooManyRequests",
            "RequestLimitExceeded",
            "OperationAborted",
        ),
        ServerError,
    ),
    **dict.fromkeys(("NoSuchKey", "NotFound", "NoSuchVersion", "NoSuchUpload", "404"), Missing),
    "NoSuchBucket": NoBucket,
    **dict.fromkeys(("AccessDenied", "403"), Refused),
}
_DAMAGED = frozenset(c for c, kind in _CODES.items() if kind in (NetworkError, TruncatedBody))


def client_error(exc: ClientError) -> tuple[str, int | None, str]:
    """(code, HTTP status, message) of an S3 error answer."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or status or "error")
    return code, status, str(error.get("Message") or "")


def code_of(exc: ArchiverError) -> str:
    """The S3 error code behind a translated error (or the botocore error's name)."""
    cause = exc.__cause__
    return client_error(cause)[0] if isinstance(cause, ClientError) else type(cause).__name__


def kind_of(exc: Exception) -> type[ArchiverError]:
    if isinstance(exc, ClientError):
        code, status, _ = client_error(exc)
        if code in _CODES:
            return _CODES[code]
        if status is not None and (status >= 500 or status == 408):
            return ServerError
        if status == 404:
            return Missing
        if status == 403:
            return Refused
        return StorageError
    if isinstance(
        exc, FlexibleChecksumError | BotoConnectionError | HTTPClientError | IncompleteReadError
    ):
        return NetworkError
    return StorageError


def translate(exc: Exception, doing: str) -> ArchiverError:
    """One botocore failure as an archiver error; ``doing`` completes the sentence "cannot …"."""
    if isinstance(exc, ArchiverError):
        return exc
    kind = kind_of(exc)
    if isinstance(exc, ClientError) and (code := client_error(exc)[0]) in _DAMAGED:
        return kind(f"cannot {doing}: S3 received other bytes than were sent ({code})")
    return kind(f"cannot {doing}: {reason(exc)}")


def reason(exc: Exception) -> str:
    """What went wrong, in a few words fit for an error message (never a credential)."""
    if isinstance(exc, ClientError):
        code, _, message = client_error(exc)
        return redact(f"{code} ({message})" if message and message != code else code)
    if isinstance(exc, FlexibleChecksumError):
        return "the bytes S3 sent differ from their checksum"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            "no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run with an instance role)"
        )
    return f"{type(exc).__name__}: {redact(str(exc))}"


@contextlib.contextmanager
def boto_errors(doing: str) -> Iterator[None]:
    """Run boto3 calls, raising what fails as archiver's error for "cannot ``doing``"."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise translate(exc, doing) from exc
