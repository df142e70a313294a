"""One bucket under a prefix, as the backend uses it: every object and multipart call archiver
makes, blocking (run them in the backend's threads), each failure mapped once
(``errors.boto_errors``). Methods take storage keys (the prefix is added here), but for the few
that name an ``object_key`` (the full key in the bucket: an upload another key's note left)."""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from archiver.errors import NetworkError, StorageError
from archiver.redact import safe_url
from archiver.storage.base import CHUNK_SIZE, Removal
from archiver.storage.s3.errors import Missing, Refused, boto_errors, code_of
from archiver.storage.s3.settings import (
    aware,
    content_type,
    normalized_prefix,
    object_args,
)

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadOutputTypeDef,
        HeadObjectOutputTypeDef,
        PartTypeDef,
        PutObjectOutputTypeDef,
    )

    from archiver.config import S3Settings

log = logging.getLogger(__name__)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _version(version: str | None) -> dict[str, Any]:
    # "null" is the version of every object in an unversioned bucket: naming it is the same as
    # naming none, which every store understands (moto refuses versionId=null).
    return {"VersionId": version} if version and version != "null" else {}


class Bucket:
    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings
        self.name = settings.bucket
        self.prefix = normalized_prefix(settings.prefix)

    def full_key(self, key: str) -> str:
        """The object key in the bucket for a storage key."""
        return self.prefix + key

    def where(self) -> str:
        return f"endpoint {safe_url(self.client.meta.endpoint_url)}"

    # -- objects ---------------------------------------------------------------------------

    def head(
        self, key: str, version: str | None = None, *, checksum: bool = False
    ) -> HeadObjectOutputTypeDef | None:
        """What S3 holds at ``key`` (that version), or None."""
        kwargs = _version(version)
        if checksum:
            kwargs["ChecksumMode"] = "ENABLED"
        with (
            contextlib.suppress(Missing),
            boto_errors(f"look up {key} in S3 bucket {self.name!r}"),
        ):
            return self.client.head_object(Bucket=self.name, Key=self.full_key(key), **kwargs)
        return None

    def hidden_version(self, key: str) -> str | None:
        """When the current version of ``key`` is a delete marker, the newest real version it
        hides, said as a sentence (with its retention: a locked one is still the copy)."""
        full = self.full_key(key)
        with boto_errors(f"list the versions of {key} in S3 bucket {self.name!r}"):
            listing = self.client.list_object_versions(Bucket=self.name, Prefix=full, MaxKeys=50)
        markers = [m for m in listing.get("DeleteMarkers", []) if m.get("Key") == full]
        versions = [v for v in listing.get("Versions", []) if v.get("Key") == full]
        if not markers or not versions:
            return None
        newest = max(versions, key=lambda v: v["LastModified"])
        version = newest.get("VersionId")
        head = self.head(key, version)
        until = head.get("ObjectLockRetainUntilDate") if head else None
        locked = f", locked until {until:%Y-%m-%d}" if until is not None else ""
        return (
            f"a delete marker hides it: version {version} ({newest.get('Size', '?')} bytes"
            f"{locked}) still holds the copy; remove the marker to restore it"
        )

    def put(
        self,
        key: str,
        body: bytes | bytearray,
        *,
        digest: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None,
        retain_from: datetime | None,
        now: datetime | None = None,
        lock: bool = True,
    ) -> PutObjectOutputTypeDef:
        args = object_args(self.settings, retain_from=retain_from, now=now, lock=lock)
        if metadata is not None:
            args["Metadata"] = dict(metadata)
        with boto_errors(f"write {key} to S3 bucket {self.name!r}"):
            return self.client.put_object(
                Bucket=self.name,
                Key=self.full_key(key),
                # botocore sends a bytearray as it is; bytes() would copy it.
                Body=cast("bytes", body),
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=b64(digest),
                **args,
            )

    def open(self, key: str, version: str | None = None) -> StreamingBody:
        try:
            with boto_errors(f"read {key} from S3 bucket {self.name!r}"):
                return self.client.get_object(
                    Bucket=self.name, Key=self.full_key(key), **_version(version)
                )["Body"]
        except Missing as exc:
            raise StorageError(f"nothing is stored at {key}") from exc

    def read_chunk(self, key: str, body: StreamingBody, size: int = CHUNK_SIZE) -> bytes:
        with boto_errors(f"read {key} from S3 bucket {self.name!r}"):
            return body.read(size)

    def delete(self, key: str, version: str | None) -> None:
        """Delete the object (a version of it, for good). Nothing there is no error."""
        what = f"version {version} of {key}" if version else key
        try:
            with boto_errors(f"delete {what} from S3 bucket {self.name!r}"):
                self.client.delete_object(
                    Bucket=self.name, Key=self.full_key(key), **_version(version)
                )
        except Missing:
            return
        except Refused as exc:
            raise Refused(
                f"S3 refused to delete {what} ({code_of(exc)}): it is under "
                "Object Lock retention or a legal hold, or the credentials may not delete it"
            ) from exc.__cause__

    def put_retention(self, key: str, version: str | None, until: datetime) -> None:
        mode = self.settings.object_lock_mode
        with boto_errors(f"set the retention of {key}"):
            self.client.put_object_retention(
                Bucket=self.name,
                Key=self.full_key(key),
                Retention={"Mode": cast(Any, mode), "RetainUntilDate": until},
                **_version(version),
            )

    def put_legal_hold(self, key: str, version: str | None, *, on: bool = True) -> None:
        with boto_errors(f"{'put' if on else 'release'} a legal hold on {key}"):
            self.client.put_object_legal_hold(
                Bucket=self.name,
                Key=self.full_key(key),
                LegalHold={"Status": "ON" if on else "OFF"},
                **_version(version),
            )

    def versions_of(self, key: str) -> tuple[list[str], list[str]]:
        """Every version id stored at ``key`` exactly, and every delete marker's."""
        full = self.full_key(key)
        versions: list[str] = []
        markers: list[str] = []
        paginator = self.client.get_paginator("list_object_versions")
        with boto_errors(f"list the versions of {key} in S3 bucket {self.name!r}"):
            for page in paginator.paginate(Bucket=self.name, Prefix=full):
                versions += [v["VersionId"] for v in page.get("Versions", []) if v["Key"] == full]
                markers += [
                    m["VersionId"] for m in page.get("DeleteMarkers", []) if m["Key"] == full
                ]
        return versions, markers

    def remove_versions(self, keys: Sequence[str], now: datetime) -> Removal:
        """``StorageBackend.remove_copy``: all checked, then all deleted, markers too."""
        found = [(key, self.versions_of(key)) for key in keys]
        for key, (versions, _) in found:
            for version in versions:
                head = self.head(key, version)
                if head is None:
                    continue
                if head.get("ObjectLockLegalHoldStatus") == "ON":
                    return Removal(refused=f"version {version} of {key} is under a legal hold")
                until = head.get("ObjectLockRetainUntilDate")
                if until is not None and aware(until) > now:
                    return Removal(
                        refused=f"version {version} of {key} is under Object Lock retention "
                        f"until {aware(until):%Y-%m-%d %H:%M} UTC"
                    )
        removed: list[Mapping[str, str | None]] = []
        for key, (versions, markers) in found:
            for version in [*versions, *markers]:
                self.delete(key, version)
                removed.append({"key": key, "version_id": version})
        return Removal(tuple(removed))

    def tag(self, key: str, version: str | None, tags: Mapping[str, str]) -> None:
        with boto_errors(f"tag {key}"):
            self.client.put_object_tagging(
                Bucket=self.name,
                Key=self.full_key(key),
                Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]},
                **_version(version),
            )

    def tags(self, key: str, version: str | None) -> dict[str, str] | None:
        """The object's tags; None when they cannot be read (no s3:GetObjectTagging)."""
        try:
            with boto_errors(f"read the tags of {key}"):
                answer = self.client.get_object_tagging(
                    Bucket=self.name, Key=self.full_key(key), **_version(version)
                )
        except StorageError as exc:
            log.debug("no tags for %s: %s", key, exc)
            return None
        return {t["Key"]: t["Value"] for t in answer["TagSet"]}

    def list_page(self, token: str | None) -> tuple[list[str], str | None]:
        """One page of storage keys under the prefix, and the token of the next (None: last)."""
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": self.prefix, "MaxKeys": 1000}
        if token is not None:
            kwargs["ContinuationToken"] = token
        with boto_errors(f"list the objects in S3 bucket {self.name!r}"):
            page = self.client.list_objects_v2(**kwargs)
        keys = [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
        following = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return keys, following

    # -- multipart uploads -------------------------------------------------------------------

    def create_multipart(self, key: str, now: datetime) -> str:
        # The caller's retain_from only comes at commit: retain from now, extended at commit.
        args = object_args(self.settings, now=now)
        with boto_errors(f"start the upload of {key}"):
            answer = self.client.create_multipart_upload(
                Bucket=self.name,
                Key=self.full_key(key),
                ContentType=content_type(key, None),
                ChecksumAlgorithm="SHA256",
                **args,
            )
        return answer["UploadId"]

    def upload_part(
        self, key: str, upload_id: str, number: int, data: bytearray, digest: bytes
    ) -> str:
        """Send one part with the SHA-256 of its bytes; return its ETag."""
        with boto_errors(f"upload part {number} of {key}"):
            answer = self.client.upload_part(
                Bucket=self.name,
                Key=self.full_key(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=cast("bytes", data),
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=b64(digest),
            )
        returned = answer.get("ChecksumSHA256")
        if returned is not None and returned != b64(digest):
            # S3 took other bytes than were sent without refusing them: sent again.
            raise NetworkError(f"{key}: S3 received part {number} with another checksum")
        return answer["ETag"]

    def list_parts(self, object_key: str, upload_id: str) -> list[PartTypeDef] | None:
        """Every part S3 holds of an unfinished upload, by number; None when it is gone."""
        parts: list[PartTypeDef] = []
        try:
            with boto_errors(f"list the parts of the upload of {object_key}"):
                pages = self.client.get_paginator("list_parts").paginate(
                    Bucket=self.name, Key=object_key, UploadId=upload_id
                )
                for page in pages:
                    parts.extend(page.get("Parts", []))
        except Missing:
            return None
        return sorted(parts, key=lambda p: p["PartNumber"])

    def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef]
    ) -> CompleteMultipartUploadOutputTypeDef:
        with boto_errors(f"complete the upload of {key}"):
            return self.client.complete_multipart_upload(
                Bucket=self.name,
                Key=self.full_key(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

    def abort_multipart(self, object_key: str, upload_id: str) -> None:
        """Abort an unfinished upload; one already gone (aborted, completed) is no error."""
        with (
            contextlib.suppress(Missing),
            boto_errors(f"abort the upload of {object_key[len(self.prefix) :]}"),
        ):
            self.client.abort_multipart_upload(Bucket=self.name, Key=object_key, UploadId=upload_id)

    def list_uploads(self) -> list[tuple[str, str, datetime]]:
        """Every unfinished upload under the prefix: (object key, upload id, initiated)."""
        with boto_errors(f"list the unfinished uploads in S3 bucket {self.name!r}"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.name, Prefix=self.prefix
            )
            return [
                (
                    upload["Key"],
                    upload["UploadId"],
                    aware(upload.get("Initiated") or datetime.now(UTC)),
                )
                for page in pages
                for upload in page.get("Uploads", [])
            ]

    def last_activity(
        self, object_key: str, upload_id: str, initiated: datetime
    ) -> datetime | None:
        """When an unfinished upload last received a part (or started); None when it is gone.
        Some stores report no real start time (moto: 2010), so the parts' times count too."""
        parts = self.list_parts(object_key, upload_id)
        if parts is None:
            return None
        times = [aware(p["LastModified"]) for p in parts if "LastModified" in p]
        return max([initiated, *times])
