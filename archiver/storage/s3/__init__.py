"""Recordings in an S3 bucket (AWS, or a compatible store: SeaweedFS, moto, ...), through boto3.

- ``settings``: the rules of ``[storage.s3]`` and what follows from them (pure: ``archiver.config``
  imports it without loading boto3);
- ``errors``: botocore's failures as archiver's, in one table and one context manager;
- ``bucket``: every S3 call archiver makes, on one bucket under the prefix;
- ``multipart``: a multipart upload's parts, its note for a resume, and the checks of its object;
- ``commit``: what a commit does once the bytes are up (checks, lock, tags, companion, leftovers);
- ``preflight``: the checks before any work;
- ``backend``: ``S3Storage`` and its ``S3Upload``.

Every PutObject and UploadPart carries the SHA-256 of its bytes; S3 refuses a mismatch
(``BadDigest``, retried). S3 fixes an object's metadata, content type and Object Lock retention
when a multipart upload *starts*, before the caller's SHA-256 exists: a multipart object takes its
content type from its key's extension and its retention from the moment it starts, extended at
commit to the caller's date, and keeps ``sha256`` / ``recording-id`` as object tags where a single
PutObject carries them as metadata (``x-amz-meta-sha256``). ``stat`` reads either.

A multipart upload is noted in the ledger as it goes (``ResumeNotes``: upload id, parts and their
SHA-256s): whoever claims the recording next lists its parts, continues it with a Range request
to the source from the next byte, and at commit reads the object back to check every part and
compute the whole SHA-256 (``multipart``). An upload it cannot continue is aborted at once;
``cleanup_stale`` aborts the idle ones nobody noted. Credentials come only from boto3's standard
chain (environment, profile, instance role), never from archiver's config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from archiver.storage.s3.backend import S3Storage, S3Upload

__all__ = ["S3Storage", "S3Upload"]

# Loaded on first use: ``archiver.storage.s3.settings`` must not bring boto3 with it.
_LAZY = {"S3Storage": "archiver.storage.s3.backend", "S3Upload": "archiver.storage.s3.backend"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
