"""The S3 settings' rules and what follows from them: S3's limits, retention dates, the parameters
every stored object carries. Pure: no boto3, so ``archiver.config`` checks ``[storage.s3]`` through
this module without loading the backend."""

from __future__ import annotations

import mimetypes
import re
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from archiver.errors import UnsafeValue
from archiver.storage.keys import check_key

if TYPE_CHECKING:
    from archiver.config import S3Settings, StorageSettings

MiB = 1 << 20
GiB = 1 << 30
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PUT_SIZE = 5 * GiB
MAX_PARTS = 10_000
# S3 allows 10 tags per object; a multipart object gets sha256 and recording-id as two of them.
MAX_CONFIGURED_TAGS = 8
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
SSE_MODES = ("AES256", "aws:kms")

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def check_storage(storage: StorageSettings, *, chosen: bool) -> list[str]:
    """The problems of ``[storage.s3]`` (a table that is there is checked even when another
    backend is ``chosen``), each naming its key."""
    s3 = storage.s3
    problems: list[str] = []
    if chosen and (s3 is None or not s3.bucket):
        problems.append("storage.s3.bucket: required when storage.backend = 's3'")
    if s3 is not None:
        problems.extend(p for p in check_settings(s3) if not p.startswith("storage.s3.bucket:"))
    return problems


def check_settings(settings: S3Settings) -> list[str]:
    """Every problem with ``storage.s3``, each naming its key (empty when all is well)."""
    p = "storage.s3"
    problems: list[str] = []
    if not settings.bucket:
        problems.append(f"{p}.bucket: required")
    if settings.prefix:
        if settings.prefix.startswith("/"):
            problems.append(f"{p}.prefix: must not start with '/'")
        else:
            try:
                check_key(settings.prefix.rstrip("/"))
            except UnsafeValue as exc:
                problems.append(f"{p}.prefix: {exc}")
    if not MIN_PART_SIZE <= settings.part_size <= MAX_PART_SIZE:
        problems.append(f"{p}.part_size: must be between {MIN_PART_SIZE} (5 MiB) and 5 GiB")
    if not 1 <= settings.multipart_threshold <= MAX_PUT_SIZE:
        problems.append(f"{p}.multipart_threshold: must be between 1 and 5 GiB")
    if not 1 <= settings.max_threads <= 256:
        problems.append(f"{p}.max_threads: must be between 1 and 256")
    if settings.object_lock_mode is not None:
        if settings.object_lock_mode not in LOCK_MODES:
            problems.append(f"{p}.object_lock_mode: must be 'GOVERNANCE' or 'COMPLIANCE'")
        if settings.retention_days is None or settings.retention_days < 1:
            problems.append(f"{p}.retention_days: required (at least 1) with object_lock_mode")
    else:
        if settings.retention_days is not None:
            problems.append(f"{p}.retention_days: has no effect without object_lock_mode")
        if settings.legal_hold:
            problems.append(f"{p}.legal_hold: needs object_lock_mode (a bucket with Object Lock)")
    if settings.sse is not None and settings.sse not in SSE_MODES:
        problems.append(f"{p}.sse: must be 'AES256' or 'aws:kms'")
    if settings.kms_key_id is not None and settings.sse != "aws:kms":
        problems.append(f"{p}.kms_key_id: needs sse = 'aws:kms'")
    if len(settings.tags) > MAX_CONFIGURED_TAGS:
        problems.append(
            f"{p}.tags: at most {MAX_CONFIGURED_TAGS} (S3 allows 10 per object and archiver "
            "adds sha256 and recording-id to multipart objects)"
        )
    for name, value in settings.tags.items():
        if not 1 <= len(name) <= 128 or len(value) > 256:
            problems.append(f"{p}.tags: {name[:40]!r} is too long (keys 128, values 256)")
    return problems


def normalized_prefix(prefix: str) -> str:
    """``archive`` and ``archive/`` both put keys under ``archive/``; empty: the bucket's root."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def aware(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def retain_until(
    settings: S3Settings, retain_from: datetime | None, now: datetime
) -> datetime | None:
    """``max(retain_from, now) + retention_days``, rounded up to a whole second (S3 keeps
    seconds: rounding down would make the retention shorter than asked), or None without a lock."""
    if not settings.object_lock_mode or not settings.retention_days:
        return None
    start = aware(now)
    if retain_from is not None:
        start = max(start, aware(retain_from))
    until = start + timedelta(days=settings.retention_days)
    if until.microsecond:
        until = until.replace(microsecond=0) + timedelta(seconds=1)
    return until


def object_args(
    settings: S3Settings,
    *,
    retain_from: datetime | None = None,
    now: datetime | None = None,
    lock: bool = True,
) -> dict[str, Any]:
    """The parameters every PutObject and CreateMultipartUpload of a stored object carries:
    storage class, encryption, tags and (with ``lock``) Object Lock retention and legal hold."""
    args: dict[str, Any] = {}
    if settings.storage_class:
        args["StorageClass"] = settings.storage_class
    if settings.sse:
        args["ServerSideEncryption"] = settings.sse
        if settings.sse == "aws:kms" and settings.kms_key_id:
            args["SSEKMSKeyId"] = settings.kms_key_id
    if settings.tags:
        args["Tagging"] = urllib.parse.urlencode(dict(settings.tags), quote_via=urllib.parse.quote)
    if lock and settings.object_lock_mode:
        args["ObjectLockMode"] = settings.object_lock_mode
        args["ObjectLockRetainUntilDate"] = retain_until(
            settings, retain_from, now or datetime.now(UTC)
        )
        if settings.legal_hold:
            args["ObjectLockLegalHoldStatus"] = "ON"
    return args


def content_type(key: str, given: str | None) -> str:
    return given or mimetypes.guess_type(key)[0] or "application/octet-stream"


def metadata(key: str, given: dict[str, str], sha256: str) -> dict[str, str]:
    """A single PutObject's metadata: the caller's, and the SHA-256 of the bytes."""
    meta = {**given, "sha256": sha256}
    for name, value in meta.items():
        if not name or not _PRINTABLE_ASCII.fullmatch(name + value):
            raise UnsafeValue(f"{key}: metadata {name[:40]!r} is not printable ASCII")
    return meta
