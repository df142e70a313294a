"""Recordings on a local filesystem, written the way restic's local backend writes them.

An upload goes to a hidden partial file beside its target, ``<dir>/.<name>.partial``, named
deterministically so that a rerun after a crash finds it and continues. Commit fsyncs it, checks its
size, renames it over the target and fsyncs the directory: a key shows nothing, the previous object
or the complete new one, also after a power cut. The partial is ``flock``-ed while an upload holds
it, so two writers of one key (say, a worker whose lease expired and its successor) cannot mix their
bytes, and ``cleanup_stale`` never removes a partial that is being written.

Small files written in one go (a companion sidecar, ``put_bytes``, the preflight probe) use a
temporary file of a unique name instead, ``<dir>/.<name>.<12 hex>.partial``, ``flock``-ed from its
creation to its rename. It is never resumed, so ``cleanup_stale`` removes one as soon as no process
holds it (after ``ONE_SHOT_GRACE``), where a resumable partial waits for the age the caller gives.

A commit with a companion writes and fsyncs the companion's temporary file first, then renames the
object, then the companion, then fsyncs the directory (once, when both share it): a companion that
cannot be rendered or written leaves the key as it was.

All file IO runs in worker threads (a pool of its own), one hop per call, so the event loop never
waits on the disk; the blocking pieces (partial and temporary files, locks, fsyncs) are in
``archiver.storage.localfs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from rich import filesize

from archiver.errors import (
    HeldElsewhere,
    IntegrityError,
    PreflightError,
    StorageError,
    UnsafeValue,
)
from archiver.models import StoredObject
from archiver.storage.base import (
    CHUNK_SIZE,
    Capabilities,
    CommitRequest,
    Companion,
    Digest,
    ObjectInfo,
    PlainCopies,
    ResumeNotes,
    UploadBase,
)
from archiver.storage.keys import check_key, is_partial_name
from archiver.storage.localfs import (
    DIR_MODE,
    DISK_FULL,
    FILE_MODE,
    ONE_SHOT_GRACE,
    OPEN_FLAGS,
    PartialFile,
    TempFile,
    fsync_dir,
    in_io_thread,
    is_one_shot_name,
    one_shot_path,
    partial_path,
    remove_if_stale,
    same_file,
    storage_error,
    try_lock,
    unlink_quietly,
    write_all,
)

log = logging.getLogger(__name__)


class LocalUpload(UploadBase):
    """A write into ``.<name>.partial``; made visible at the key only by ``commit``."""

    def __init__(self, file: PartialFile) -> None:
        super().__init__(file.key)
        self._file = file

    @property
    def offset(self) -> int:
        return self._file.size

    @property
    def partial(self) -> Path:
        """Where the bytes are until commit."""
        return self._file.path

    async def existing(self) -> AsyncIterator[bytes]:
        limit = self._file.size
        pos = 0
        while pos < limit:
            chunk = await in_io_thread(self._file.read_at, pos, min(CHUNK_SIZE, limit - pos))
            if not chunk:
                raise StorageError(f"partial upload of {self.key} shrank while being read")
            pos += len(chunk)
            yield chunk

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        self._check_open()
        if chunk:
            await in_io_thread(self._file.write, chunk, digest)

    async def restart(self) -> None:
        self._check_open()
        await in_io_thread(self._file.truncate)

    async def _store(self, request: CommitRequest) -> StoredObject:
        return await in_io_thread(self._file.commit, request)

    async def _discard(self) -> None:
        if self._file.state == "open":
            await in_io_thread(self._file.abort)

    async def _let_go(self) -> None:
        self._file.release()

    def __del__(self) -> None:
        # Dropped without commit or abort: let go of the file (and its lock) like a killed process
        # would, keeping the partial for a later resume or for cleanup_stale.
        file = getattr(self, "_file", None)
        if file is not None:
            file.release()


def describe_filesystem(path: Path) -> str:
    """Which filesystem ``path`` is on and how much room it has: what an operator checks first
    when an archive lands on the wrong disk."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return "free space unknown"
    free = filesize.decimal(stats.f_bavail * stats.f_frsize)
    total = filesize.decimal(stats.f_blocks * stats.f_frsize)
    mount, fstype = "?", "?"
    with contextlib.suppress(OSError):
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(mount if mount != "?" else ""):
                mount, fstype = point, fields[2]
    return f"on {fstype} mounted at {mount}, {free} free of {total}"


class LocalStorage(PlainCopies):
    """Recordings as files under ``root``, keys being ``/``-separated paths below it."""

    def __init__(
        self, root: Path, *, verify_on_commit: bool = False, create_parents: bool = True
    ) -> None:
        self._root = Path(root).absolute()
        self._create_parents = create_parents
        self._resolved_root: Path | None = None
        # Re-read and re-hash every upload at commit instead of trusting the caller's running hash.
        self._verify = verify_on_commit
        self._capabilities = Capabilities(name="local", resumes_after_crash=True, puts_whole=True)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def preflight(self) -> None:
        await in_io_thread(self._preflight)

    async def begin(
        self, key: str, *, resume: bool = True, notes: ResumeNotes | None = None
    ) -> LocalUpload:
        # A partial is found by its key (``notes`` is not needed) and flock-ed while in use.
        parts = check_key(key)
        return await in_io_thread(self._begin, key, parts, resume)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        parts = check_key(key)
        return await in_io_thread(self._put_bytes, key, parts, data)

    async def put_whole(self, key: str, data: bytes, request: CommitRequest) -> StoredObject:
        parts = check_key(key)
        return await in_io_thread(self._put_whole, key, parts, data, request)

    async def stat(self, key: str) -> ObjectInfo | None:
        parts = check_key(key)
        return await in_io_thread(self._stat, key, parts)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        parts = check_key(key)
        fd = await in_io_thread(self._open_for_reading, key, parts)
        try:
            while chunk := await in_io_thread(self._read_chunk, key, fd):
                yield chunk
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        parts = check_key(key)
        await in_io_thread(self._delete, key, parts)

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        return await in_io_thread(self._cleanup_stale, time.time() - older_than_seconds)

    def locate(self, key: str) -> str:
        return str(self._root.joinpath(*check_key(key)))

    async def describe_missing(self, key: str) -> str | None:
        return None

    async def iter_keys(self) -> AsyncIterator[str]:
        # One directory per thread hop: a large tree is walked without holding it all.
        walk = os.walk(self._root, followlinks=False)
        while (here := await in_io_thread(next, walk, None)) is not None:
            dirpath, dirnames, filenames = here
            dirnames.sort()
            base = Path(dirpath).relative_to(self._root)
            for name in sorted(filenames):
                if not is_partial_name(name):
                    yield (base / name).as_posix()

    # The methods below run in a worker thread.

    def _real_root(self) -> Path:
        """The root with its own symlinks resolved; looked up once it exists."""
        if self._resolved_root is not None:
            return self._resolved_root
        try:
            root = self._root.resolve()
        except OSError as exc:
            raise StorageError(f"cannot look up the archive root {self._root}: {exc}") from exc
        if root.is_dir():
            self._resolved_root = root
        return root

    def _resolve(self, key: str, parts: list[str]) -> Path:
        """The key's path, its existing symlinks followed, refused unless it stays inside root."""
        return self._walk(key, parts)[0]

    def _walk(self, key: str, parts: list[str]) -> tuple[Path, bool]:
        """``_resolve``, and whether that showed the key's directory to exist (a real directory,
        no symlink on the way), so that a writer need not look again."""
        root = self._real_root()
        # One lstat per component while none is a symlink (the usual case); a symlink, or a
        # file where a directory should be, takes the thorough path.
        here = root
        last = len(parts) - 1
        for i, part in enumerate(parts):
            here = here / part
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                # Nothing exists from here on, so nothing to follow. When only the last part is
                # missing below a component just seen, its directory is there (the lstat inside
                # it would have failed otherwise); the root itself may not be.
                return root.joinpath(*parts), 0 < i == last
            except NotADirectoryError:
                return self._resolve_following(key, parts, root), False
            except OSError as exc:
                raise storage_error(exc, key, "look up") from exc
            if stat.S_ISLNK(mode):
                return self._resolve_following(key, parts, root), False
        return here, True

    def _resolve_following(self, key: str, parts: list[str], root: Path) -> Path:
        try:
            parent = root.joinpath(*parts[:-1]).resolve()
            target = parent / parts[-1]
            seen = target.resolve() if target.is_symlink() else target
        except RuntimeError as exc:  # a symlink loop (Python < 3.13)
            raise UnsafeValue(f"storage key {key!r} runs into a symbolic link loop") from exc
        except OSError as exc:
            raise storage_error(exc, key, "look up") from exc
        if not seen.is_relative_to(root):
            raise UnsafeValue(
                f"storage key {key!r} leads outside the archive root through a symbolic link"
            )
        return target

    def _make_parents(self, key: str, parts: list[str]) -> Path:
        # Refuse a symlink out of root before creating anything.
        target, parent_found = self._walk(key, parts)
        if parent_found or target.parent.is_dir():
            return target  # the usual case: nothing to create, so nothing to resolve again
        root = self._real_root()
        try:
            if not root.is_dir():
                root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                fsync_dir(root.parent)
            here = root
            for part in parts[:-1]:
                below = here / part
                try:
                    os.mkdir(below, DIR_MODE)
                except FileExistsError:
                    pass
                else:
                    fsync_dir(here)
                here = below
        except OSError as exc:
            raise storage_error(exc, key, "create the directory of") from exc
        # Resolve again: a symlink swapped in while the directories were made is refused here.
        return self._resolve(key, parts)

    def _begin(self, key: str, parts: list[str], resume: bool) -> LocalUpload:
        return LocalUpload(self._open_partial(key, parts, resume))

    def _put_whole(
        self, key: str, parts: list[str], data: bytes, request: CommitRequest
    ) -> StoredObject:
        # The same partial file, lock and commit as begin/write/commit, in one thread hop.
        file = self._open_partial(key, parts, resume=False)
        try:
            sha256 = hashlib.sha256(data).hexdigest()
            if request.sha256 is not None and request.sha256.lower() != sha256:
                raise IntegrityError(f"{key}: SHA-256 is {sha256}, {request.sha256} expected")
            file.write(data, None)
        except BaseException:
            file.abort()
            raise
        return file.commit(dataclasses.replace(request, sha256=sha256))  # discards if it fails

    def _open_partial(self, key: str, parts: list[str], resume: bool) -> PartialFile:
        target = self._make_parents(key, parts)
        partial = partial_path(target)
        for _ in range(3):
            try:
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | OPEN_FLAGS, FILE_MODE)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeValue(
                        f"the partial upload of {key!r} is a symbolic link; refusing to follow it"
                    ) from exc
                raise storage_error(exc, key, "start writing") from exc
            try:
                # One fstat, once locked, for its type, its size and its identity: each call
                # here waits for the event loop's thread to hand back the interpreter.
                locked = try_lock(fd)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise UnsafeValue(f"the partial upload of {key!r} is not a regular file")
                if not locked:
                    raise HeldElsewhere(
                        f"{key} is being written by another upload right now (another "
                        "instance, alive or stopped, holds its partial copy)"
                    )
                # cleanup_stale may have removed the file between our open and our lock.
                if same_file(fd, partial, info):
                    size = info.st_size
                    if not resume and size:
                        os.ftruncate(fd, 0)
                        size = 0
                    return PartialFile(
                        key,
                        target,
                        fd,
                        size=size,
                        verify=self._verify,
                        prepare_companion=self._prepare_companion,
                    )
            except OSError as exc:
                os.close(fd)
                raise storage_error(exc, key, "start writing") from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise StorageError(f"cannot start writing {key}: its partial upload keeps disappearing")

    def _put_bytes(self, key: str, parts: list[str], data: bytes) -> StoredObject:
        temp = TempFile.create(key, self._make_parents(key, parts), data)
        temp.install()
        try:
            fsync_dir(temp.target.parent)
        except OSError as exc:
            unlink_quietly(temp.target)
            raise storage_error(exc, key, "write") from exc
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _prepare_companion(
        self, companion: Companion, stored: StoredObject, beside: Path
    ) -> TempFile:
        """The companion written durably to a temporary file; ``beside`` is where the object
        itself goes, resolved a moment ago: a companion in the same directory (a sidecar) is put
        there without looking its directories up again."""
        parts = check_key(companion.key)
        data = companion.body_for(stored)
        if parts[:-1] == check_key(stored.key)[:-1]:
            target = beside.with_name(parts[-1])
        else:
            target = self._make_parents(companion.key, parts)
        return TempFile.create(companion.key, target, data)

    def _stat(self, key: str, parts: list[str]) -> ObjectInfo | None:
        target = self._resolve(key, parts)
        try:
            info = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise storage_error(exc, key, "stat") from exc
        if not stat.S_ISREG(info.st_mode):
            return None
        return ObjectInfo(key=key, size=info.st_size)

    def _open_for_reading(self, key: str, parts: list[str]) -> int:
        target = self._resolve(key, parts)
        try:
            # _resolve vetted a final symlink, so this open may follow it.
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise StorageError(f"nothing is stored at {key}") from exc
        except OSError as exc:
            raise storage_error(exc, key, "read") from exc
        try:
            is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        if not is_file:
            os.close(fd)
            raise StorageError(f"nothing is stored at {key}: it is not a regular file")
        return fd

    @staticmethod
    def _read_chunk(key: str, fd: int) -> bytes:
        try:
            return os.read(fd, CHUNK_SIZE)
        except OSError as exc:
            raise storage_error(exc, key, "read") from exc

    def _delete(self, key: str, parts: list[str]) -> None:
        target = self._resolve(key, parts)
        try:
            os.unlink(target)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise storage_error(exc, key, "delete") from exc
        try:
            fsync_dir(target.parent)
        except OSError as exc:
            raise storage_error(exc, key, "delete") from exc

    def _preflight(self) -> None:
        root = self._root
        if not self._create_parents and not root.exists() and not root.parent.is_dir():
            raise PreflightError(
                f"archive root {root} does not exist, nor does {root.parent}: a typo, or a "
                "disk that is not mounted? Create it, or set storage.create_parents = true"
            )
        try:
            # Like the directories below it; missing parents get the usual mode (as `mkdir -p`).
            root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise PreflightError(f"archive root {root} exists but is not a directory") from exc
        except NotADirectoryError as exc:
            raise PreflightError(
                f"archive root {root} cannot be created: part of its path is a file"
            ) from exc
        except OSError as exc:
            raise PreflightError(f"archive root {root} cannot be created: {exc.strerror}") from exc
        if not root.is_dir():
            raise PreflightError(f"archive root {root} is not a directory")
        # A one-shot temporary file, locked while it lives, so that cleanup_stale removes it
        # should we die right here.
        probe = one_shot_path(root / "preflight")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, FILE_MODE)
            try:
                try_lock(fd)
                write_all(fd, b"archiver preflight probe\n")
                os.fsync(fd)
                # Another instance's cleanup may have taken it before our lock: written all
                # the same.
                unlink_quietly(probe)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a read-only disk refuses this too
                unlink_quietly(probe)
            if exc.errno in DISK_FULL:
                raise PreflightError(f"archive root {root} is full: {exc.strerror}") from exc
            raise PreflightError(f"archive root {root} is not writable: {exc.strerror}") from exc
        log.info("archive root %s: %s", root, describe_filesystem(root))

    def _cleanup_stale(self, cutoff: float) -> int:
        # A one-shot temporary file is never resumed: once no process holds it, it is only waste.
        one_shot_cutoff = time.time() - ONE_SHOT_GRACE
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self._root, followlinks=False):
            for name in filenames:
                if not is_partial_name(name):
                    continue
                one_shot = is_one_shot_name(name)
                limit = one_shot_cutoff if one_shot else cutoff
                if remove_if_stale(Path(dirpath, name), limit, dead_when_unlocked=one_shot):
                    removed += 1
        return removed
