"""The S3 preflight: before any work, the bucket exists and is reachable, has versioning and
Object Lock when a mode is configured, and can be written; each failure one sentence
(``PreflightError``). A bucket without a lifecycle rule that aborts unfinished multipart uploads
under the prefix gets a warning: archiver aborts what it knows of, but only such a rule catches an
upload whose process died before the ledger heard of it, when archiver itself no longer runs."""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

from archiver.errors import ArchiverError, PreflightError, StorageError
from archiver.redact import redact, safe_url
from archiver.storage.s3.bucket import Bucket
from archiver.storage.s3.errors import Missing, NoBucket, Refused, boto_errors, code_of, reason

log = logging.getLogger(__name__)

# What README and config.example.toml show.
LIFECYCLE_RULE = {
    "ID": "abort-unfinished-uploads",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2},
}


def preflight(bucket: Bucket) -> None:
    """Raise PreflightError when the bucket cannot hold the archive; warn what should change."""
    settings = bucket.settings
    name = f"S3 bucket {bucket.name!r}"
    try:
        with boto_errors(f"look up {name}"):
            bucket.client.head_bucket(Bucket=bucket.name)
    except (Missing, NoBucket) as exc:
        raise PreflightError(f"{name} does not exist ({bucket.where()})") from exc
    except Refused as exc:
        raise PreflightError(
            f"access to {name} is denied ({bucket.where()}): check the credentials "
            "and the bucket policy"
        ) from exc
    except ArchiverError as exc:
        raise _unusable(bucket, name, exc) from exc
    if settings.object_lock_mode:
        setting = f"storage.s3.object_lock_mode = {settings.object_lock_mode}"
        enabled = None
        try:
            with boto_errors(f"read the Object Lock configuration of {name}"):
                answer = bucket.client.get_object_lock_configuration(Bucket=bucket.name)
            enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ArchiverError as exc:
            if code_of(exc) != "ObjectLockConfigurationNotFoundError":
                raise _unusable(bucket, name, exc) from exc
        if enabled != "Enabled":
            raise PreflightError(f"{name} has Object Lock disabled but {setting}")
        try:
            with boto_errors(f"read the versioning of {name}"):
                versioning = bucket.client.get_bucket_versioning(Bucket=bucket.name).get("Status")
        except ArchiverError as exc:
            raise _unusable(bucket, name, exc) from exc
        if versioning != "Enabled":
            raise PreflightError(f"{name} has versioning disabled but {setting} needs it")
    _probe(bucket, name)
    _check_lifecycle(bucket, name)


def aborts_unfinished_uploads(rules: list[Any], prefix: str) -> bool:
    """Whether an enabled lifecycle rule aborts the unfinished multipart uploads of every key
    under ``prefix``."""
    for rule in rules:
        if rule.get("Status") != "Enabled" or "AbortIncompleteMultipartUpload" not in rule:
            continue
        where = rule.get("Filter", {})
        if "And" in where:
            if where["And"].get("Tags"):
                continue  # only tagged uploads: not all of ours
            where = where["And"]
        if where.get("Tag") or where.get("ObjectSizeGreaterThan"):
            continue
        covered = where.get("Prefix", rule.get("Prefix", ""))
        if prefix.startswith(covered):
            return True
    return False


def _check_lifecycle(bucket: Bucket, name: str) -> None:
    where = f"under {bucket.prefix!r}" if bucket.prefix else "in it"
    try:
        with boto_errors(f"read the lifecycle rules of {name}"):
            rules = bucket.client.get_bucket_lifecycle_configuration(Bucket=bucket.name)["Rules"]
    except ArchiverError as exc:
        if code_of(exc) != "NoSuchLifecycleConfiguration":
            log.warning(
                "%s: cannot read its lifecycle rules (%s); make sure one aborts unfinished "
                "multipart uploads %s (see README, S3)",
                name,
                exc,
                where,
            )
            return
        rules = []
    if not aborts_unfinished_uploads(list(rules), bucket.prefix):
        log.warning(
            "%s has no lifecycle rule aborting unfinished multipart uploads %s: the parts of an "
            "upload whose process died before noting it stay (and are billed) until archiver "
            "runs again a day later; add one (AbortIncompleteMultipartUpload, see README, S3)",
            name,
            where,
        )


def _probe(bucket: Bucket, name: str) -> None:
    # Named like a partial upload: no storage key can ever collide with it.
    key = f".preflight-{secrets.token_hex(6)}.partial"
    body = b"archiver preflight probe\n"
    try:
        # Without retention: a locked probe could never be removed.
        answer = bucket.put(
            key,
            body,
            digest=hashlib.sha256(body).digest(),
            content_type="text/plain",
            metadata=None,
            retain_from=None,
            lock=False,
        )
    except Refused as exc:
        raise PreflightError(f"cannot write to {name}: {code_of(exc)}") from exc
    except StorageError as exc:
        cause = exc.__cause__
        detail = reason(cause) if isinstance(cause, Exception) else str(exc)
        raise PreflightError(f"cannot write to {name}: {redact(detail)}") from exc
    except ArchiverError as exc:
        raise _unusable(bucket, name, exc) from exc
    try:
        bucket.delete(key, answer.get("VersionId"))
    except ArchiverError as exc:
        # archiver never deletes from the archive, so this does not stop it.
        log.warning("could not remove the preflight probe %s: %s", key, exc)


def _unusable(bucket: Bucket, name: str, exc: ArchiverError) -> PreflightError:
    cause = exc.__cause__
    if isinstance(cause, BotoConnectionError | HTTPClientError):
        endpoint = safe_url(bucket.client.meta.endpoint_url)
        return PreflightError(f"S3 endpoint {endpoint} cannot be reached: {type(cause).__name__}")
    detail = reason(cause) if isinstance(cause, Exception) else str(exc)
    return PreflightError(f"{name} cannot be used ({bucket.where()}): {detail}")
