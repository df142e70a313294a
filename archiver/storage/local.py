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
waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import re
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, ParamSpec, Self, TypeVar

from archiver.errors import (
    HeldElsewhere,
    IntegrityError,
    PreflightError,
    StorageError,
    StorageFull,
    UnsafeValue,
)
from archiver.models import StoredObject
from archiver.storage.base import Capabilities, CommitRequest, Companion, Digest, ObjectInfo

CHUNK_SIZE = 1 << 20
FILE_MODE = 0o640
DIR_MODE = 0o750
PARTIAL_SUFFIX = ".partial"
# How long cleanup_stale leaves an unlocked one-shot temporary file alone. Such a file lives for
# milliseconds, but it exists (unlocked) between its create and its flock, and where flock is
# unsupported (some NFS and FUSE mounts: _try_lock then reports success) the lock tells nothing at
# all; there, its mtime, fresh from the create and each write, is what keeps cleanup away from a
# live write. A minute is far beyond any create-to-rename even on a loaded host, and costs only
# this: a leftover found by a start less than a minute after the crash waits for a later start.
# (A writer re-checks its file once locked, so not even a clock step can make it write a file
# that cleanup removed.)
ONE_SHOT_GRACE = 60.0
_ONE_SHOT_NAME = re.compile(r"\..+\.[0-9a-f]{12}" + re.escape(PARTIAL_SUFFIX))

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Filesystems that cannot fsync a directory or lock a file: carry on, as restic does.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK})
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK

# Whole blocks written at a block-aligned offset skip the page cache (O_DIRECT): the kernel then
# neither copies the bytes into cache pages nor writes those back at fsync, about a third of the
# CPU a large download costs. Everything else (a resumed partial's odd tail, a recording's last
# bytes, small files) goes through the page cache as before; fsync makes both durable.
_DIRECT_ALIGN = 4096
_DIRECT_MIN = 64 * 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)

_P = ParamSpec("_P")
_T = TypeVar("_T")
# The threads for file IO wait on the disk (write-back, fsync) far more than they use a CPU, so
# there are more of them than in asyncio's default executor (cores + 4): a write never queues
# behind the hashing that runs there, and concurrent fsyncs reach the journal together.
_IO_THREADS = 32
_io_pool: ThreadPoolExecutor | None = None


async def _in_io_thread(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    global _io_pool
    if _io_pool is None:
        _io_pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="archiver-disk")
    call = functools.partial(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_io_pool, call)


def check_key(key: str) -> list[str]:
    """Split a storage key into its path components; raise UnsafeValue for anything hostile."""
    if not isinstance(key, str) or not key:
        raise UnsafeValue("storage key is empty")
    shown = f"{key!r:.120}"
    # Printable ASCII (every key archiver makes) has neither; only others need the slow look.
    plain = key.isascii() and key.isprintable()
    if not plain and any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        raise UnsafeValue(f"storage key {shown} contains a control character")
    if "\\" in key:
        raise UnsafeValue(f"storage key {shown} contains a backslash")
    if key.startswith("/"):
        raise UnsafeValue(f"storage key {shown} is absolute; keys are relative to the archive")
    parts = key.split("/")
    for part in parts:
        if not part:
            raise UnsafeValue(f"storage key {shown} has an empty path component")
        if part in (".", ".."):
            raise UnsafeValue(f"storage key {shown} has a {part!r} path component")
    if is_partial_name(parts[-1]):
        raise UnsafeValue(f"storage key {shown} has the name of a partial upload")
    return parts


def is_partial_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def is_one_shot_name(name: str) -> bool:
    """A temporary file that is written in one go and never resumed (see ``_TempFile``).

    A resumable partial of a key whose name itself ends in ``.<12 hex>`` looks the same; it then
    loses its resume after ``ONE_SHOT_GRACE`` instead of the caller's age, never its object."""
    return _ONE_SHOT_NAME.fullmatch(name) is not None


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def _one_shot_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")


def _storage_error(exc: OSError, key: str, doing: str) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        return StorageFull(f"disk full writing {key}: {reason}")
    return StorageError(f"cannot {doing} {key}: {reason}")


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


# How a one-shot temporary file gets its bytes. A seam, as restic swaps its tempFile in tests: the
# crash test's helper process replaces it to stop midway through a write and be killed there.
_write_temp_bytes: Callable[[int, bytes], None] = _write_all


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock without waiting; False when someone else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked or replaced meanwhile)."""
    try:
        on_disk = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sha256_of(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(CHUNK_SIZE, size - pos), pos)
        if not chunk:
            break
        digest.update(chunk)
        pos += len(chunk)
    return digest.hexdigest()


class _TempFile:
    """A one-shot temporary file beside ``target``, locked from its creation until it is renamed
    over ``target`` or discarded. Its methods block; they run in worker threads."""

    def __init__(self, key: str, target: Path, path: Path, fd: int) -> None:
        self.key = key
        self.target = target
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, key: str, target: Path, data: bytes) -> _TempFile:
        """Write ``data`` to a new temporary file beside ``target`` and fsync it."""
        temp = cls._create(key, target)
        try:
            _write_temp_bytes(temp._fd, data)
            os.fsync(temp._fd)
        except OSError as exc:
            temp.discard()
            raise _storage_error(exc, key, "write") from exc
        except BaseException:
            temp.discard()
            raise
        return temp

    @classmethod
    def _create(cls, key: str, target: Path) -> _TempFile:
        while True:
            # A unique name: these writes are not resumed, and two writers must not share a file.
            path = _one_shot_path(target)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, FILE_MODE)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _storage_error(exc, key, "write") from exc
            try:
                # cleanup_stale may have taken the file between our open and our lock (only
                # after a clock step, see ONE_SHOT_GRACE): then it is not ours any more.
                if _try_lock(fd) and _same_file(fd, path):
                    return cls(key, target, path, fd)
            except OSError as exc:
                os.close(fd)
                raise _storage_error(exc, key, "write") from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def install(self) -> None:
        """Rename the file over its target (the caller fsyncs the directory), then unlock it."""
        try:
            os.replace(self.path, self.target)
        except OSError as exc:
            self.discard()
            raise _storage_error(exc, self.key, "write") from exc
        self._close()

    def discard(self) -> None:
        try:
            _unlink_quietly(self.path)
        finally:
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class _PartialFile:
    """The open partial file behind a LocalUpload. Its methods block; they run in worker threads.

    Kept apart from LocalUpload so that a worker thread, which briefly outlives the await it served,
    never keeps the upload itself alive: dropping an upload releases the file at once.
    """

    def __init__(
        self,
        key: str,
        target: Path,
        fd: int,
        *,
        verify: bool,
        prepare_companion: Callable[[Companion, StoredObject], _TempFile],
    ) -> None:
        self.key = key
        self.target = target
        self.path = partial_path(target)
        self.size = os.fstat(fd).st_size
        self.state: Literal["open", "committed", "aborted"] = "open"
        self._fd = fd
        self._verify = verify
        # Renders a companion and writes it, durably, to a temporary file beside its key.
        self._prepare_companion = prepare_companion
        # The same open file without the page cache, and a page-aligned buffer for it (see
        # _write_direct); opened on the first big write, None once found unusable.
        self._direct: int | None = None
        self._direct_usable = _O_DIRECT != 0
        self._aligned: mmap.mmap | None = None
        # Held around every use of the fd: a write that outlives a cancelled await finishes before
        # abort closes the fd (whose number could otherwise be reused by another file meanwhile).
        self._lock = threading.Lock()

    def check_open(self) -> None:
        if self.state != "open":
            raise StorageError(f"upload of {self.key} is already {self.state}")

    def read_at(self, pos: int, length: int) -> bytes:
        with self._lock:
            self.check_open()
            try:
                return os.pread(self._fd, length, pos)
            except OSError as exc:
                raise _storage_error(exc, self.key, "read the partial upload of") from exc

    def write(self, chunk: bytes, digest: Digest | None) -> None:
        with self._lock:
            self.check_open()
            if digest is not None:
                digest.update(chunk)
            try:
                with memoryview(chunk) as view:
                    done = self._write_direct(view)
                    while done < len(view):
                        written = os.write(self._fd, view[done:])
                        done += written
                        self.size += written
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    # Keeping the partial would only hold on to the space that ran out.
                    self._discard()
                raise _storage_error(exc, self.key, "write") from exc

    def _write_direct(self, view: memoryview) -> int:
        """Write the whole blocks at the head of ``view`` past the page cache, when the file ends
        on a block boundary; return how many bytes that was (0: the caller uses the cache)."""
        length = len(view) - len(view) % _DIRECT_ALIGN
        if not self._direct_usable or length < _DIRECT_MIN or self.size % _DIRECT_ALIGN:
            return 0
        if self._direct is None:
            try:
                # Through /proc: the very file behind our fd, whatever its path names by now.
                self._direct = os.open(
                    f"/proc/self/fd/{self._fd}", os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC
                )
            except OSError:  # no direct IO here (tmpfs), or no /proc
                self._direct_usable = False
                return 0
        if self._aligned is None or len(self._aligned) < length:
            if self._aligned is not None:
                self._aligned.close()
            self._aligned = mmap.mmap(-1, length)  # page-aligned, as direct IO requires
        self._aligned[:length] = view[:length]
        with memoryview(self._aligned) as buffer:
            try:
                written = os.pwrite(self._direct, buffer[:length], self.size)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_usable = False  # an alignment this device refuses
                return 0
        self.size += written
        return written

    def truncate(self) -> None:
        with self._lock:
            self.check_open()
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:
                raise _storage_error(exc, self.key, "truncate the partial upload of") from exc
            self.size = 0

    def commit(self, request: CommitRequest) -> StoredObject:
        with self._lock:
            self.check_open()
            expected = request.sha256.lower()
            companion: _TempFile | None = None
            try:
                os.fsync(self._fd)
                size = os.fstat(self._fd).st_size
                if size != request.size:
                    raise IntegrityError(
                        f"{self.key}: {size} bytes written, {request.size} expected"
                    )
                if self._verify and (actual := _sha256_of(self._fd, size)) != expected:
                    raise IntegrityError(
                        f"{self.key}: SHA-256 on disk is {actual}, {expected} expected"
                    )
                stored = StoredObject(key=self.key, size=size, sha256=expected)
                if request.companion is not None:
                    # Complete on disk before the object shows: a companion that fails (a full
                    # disk, a render that raises) leaves the key as it was.
                    companion = self._prepare_companion(request.companion, stored)
                # The fd stays open (and locked) across the rename: no second writer can slip in.
                os.replace(self.path, self.target)
            except BaseException as exc:
                # The partial goes too, as after any failed commit: the caller's retry starts
                # afresh, and a disk that ran out of room for the companion gets that room back.
                if companion is not None:
                    companion.discard()
                self._discard()
                if isinstance(exc, OSError):
                    raise _storage_error(exc, self.key, "commit") from exc
                raise
            # The companion's rename shares the directory fsync below when it sits beside us.
            synced = {self.target.parent}
            if companion is not None:
                try:
                    companion.install()
                except StorageError:
                    self._take_back()
                    raise
                synced.add(companion.target.parent)
            try:
                for directory in synced:
                    _fsync_dir(directory)
            except OSError as exc:
                # The renames might not survive a crash; a failed commit leaves nothing behind.
                _unlink_quietly(self.target)
                if companion is not None:
                    _unlink_quietly(companion.target)
                self._close("aborted")
                raise _storage_error(exc, self.key, "commit") from exc
            self._close("committed")
            return stored

    def _take_back(self) -> None:
        """Remove the object just renamed into place, whose companion could not follow it."""
        self._close("aborted")
        try:
            _unlink_quietly(self.target)
            _fsync_dir(self.target.parent)
        except OSError as exc:
            raise StorageError(
                f"{self.key} could not be removed again after its companion failed "
                f"({exc.strerror}): it stays without one"
            ) from exc

    def abort(self) -> None:
        with self._lock:
            if self.state == "open":
                self._discard()

    def release(self) -> None:
        """Close without removing the partial, as a killed process would; unless a thread is busy
        with the file, in which case the file closes when that thread lets go of it."""
        if self._lock.acquire(blocking=False):
            try:
                self._close_fd()
            finally:
                self._lock.release()

    def __del__(self) -> None:
        self._close_fd()

    def _discard(self) -> None:
        self._close("aborted")
        try:
            _unlink_quietly(self.path)
        except OSError as exc:
            raise _storage_error(exc, self.key, "remove the partial upload of") from exc

    def _close(self, state: Literal["committed", "aborted"]) -> None:
        self.state = state
        self._close_fd()

    def _close_fd(self) -> None:
        direct, self._direct = getattr(self, "_direct", None), None
        if direct is not None:
            os.close(direct)
        aligned, self._aligned = getattr(self, "_aligned", None), None
        if aligned is not None:
            aligned.close()
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)


class LocalUpload:
    """A write into ``.<name>.partial``; made visible at the key only by ``commit``."""

    def __init__(self, file: _PartialFile) -> None:
        self._file = file

    @property
    def key(self) -> str:
        return self._file.key

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
            chunk = await _in_io_thread(self._file.read_at, pos, min(CHUNK_SIZE, limit - pos))
            if not chunk:
                raise StorageError(f"partial upload of {self.key} shrank while being read")
            pos += len(chunk)
            yield chunk

    async def write(self, chunk: bytes, *, digest: Digest | None = None) -> None:
        self._file.check_open()
        if chunk:
            await _in_io_thread(self._file.write, chunk, digest)

    async def restart(self) -> None:
        self._file.check_open()
        await _in_io_thread(self._file.truncate)

    async def commit(self, request: CommitRequest) -> StoredObject:
        self._file.check_open()
        return await _in_io_thread(self._file.commit, request)

    async def abort(self) -> None:
        if self._file.state == "open":
            await _in_io_thread(self._file.abort)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.abort()

    def __del__(self) -> None:
        # Dropped without commit or abort: let go of the file (and its lock) like a killed process
        # would, keeping the partial for a later resume or for cleanup_stale.
        file = getattr(self, "_file", None)
        if file is not None:
            file.release()


class LocalStorage:
    """Recordings as files under ``root``, keys being ``/``-separated paths below it."""

    def __init__(self, root: Path, *, verify_on_commit: bool = False) -> None:
        self._root = Path(root).absolute()
        self._resolved_root: Path | None = None
        # Re-read and re-hash every upload at commit instead of trusting the caller's running hash.
        self._verify = verify_on_commit
        self._capabilities = Capabilities(name="local", resumes_after_crash=True)

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
        await _in_io_thread(self._preflight)

    async def begin(self, key: str, *, resume: bool = True) -> LocalUpload:
        parts = check_key(key)
        return await _in_io_thread(self._begin, key, parts, resume)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, retain_from: datetime | None = None
    ) -> StoredObject:
        parts = check_key(key)
        return await _in_io_thread(self._put_bytes, key, parts, data)

    async def stat(self, key: str) -> ObjectInfo | None:
        parts = check_key(key)
        return await _in_io_thread(self._stat, key, parts)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        parts = check_key(key)
        fd = await _in_io_thread(self._open_for_reading, key, parts)
        try:
            while chunk := await _in_io_thread(self._read_chunk, key, fd):
                yield chunk
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        parts = check_key(key)
        await _in_io_thread(self._delete, key, parts)

    async def cleanup_stale(self, older_than_seconds: float) -> int:
        return await _in_io_thread(self._cleanup_stale, time.time() - older_than_seconds)

    async def iter_keys(self) -> AsyncIterator[str]:
        # One directory per thread hop: a large tree is walked without holding it all.
        walk = os.walk(self._root, followlinks=False)
        while (here := await _in_io_thread(next, walk, None)) is not None:
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
        root = self._real_root()
        # One lstat per component while none is a symlink (the usual case); a symlink, or a
        # file where a directory should be, takes the thorough path.
        here = root
        for part in parts:
            here = here / part
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                return root.joinpath(*parts)  # nothing exists from here on, so nothing to follow
            except NotADirectoryError:
                return self._resolve_following(key, parts, root)
            except OSError as exc:
                raise _storage_error(exc, key, "look up") from exc
            if stat.S_ISLNK(mode):
                return self._resolve_following(key, parts, root)
        return here

    def _resolve_following(self, key: str, parts: list[str], root: Path) -> Path:
        try:
            parent = root.joinpath(*parts[:-1]).resolve()
            target = parent / parts[-1]
            seen = target.resolve() if target.is_symlink() else target
        except RuntimeError as exc:  # a symlink loop (Python < 3.13)
            raise UnsafeValue(f"storage key {key!r} runs into a symbolic link loop") from exc
        except OSError as exc:
            raise _storage_error(exc, key, "look up") from exc
        if not seen.is_relative_to(root):
            raise UnsafeValue(
                f"storage key {key!r} leads outside the archive root through a symbolic link"
            )
        return target

    def _make_parents(self, key: str, parts: list[str]) -> Path:
        # Refuse a symlink out of root before creating anything.
        target = self._resolve(key, parts)
        if target.parent.is_dir():
            return target  # the usual case: nothing to create, so nothing to resolve again
        root = self._real_root()
        try:
            if not root.is_dir():
                root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                _fsync_dir(root.parent)
            here = root
            for part in parts[:-1]:
                below = here / part
                try:
                    os.mkdir(below, DIR_MODE)
                except FileExistsError:
                    pass
                else:
                    _fsync_dir(here)
                here = below
        except OSError as exc:
            raise _storage_error(exc, key, "create the directory of") from exc
        # Resolve again: a symlink swapped in while the directories were made is refused here.
        return self._resolve(key, parts)

    def _begin(self, key: str, parts: list[str], resume: bool) -> LocalUpload:
        target = self._make_parents(key, parts)
        partial = partial_path(target)
        for _ in range(3):
            try:
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | _OPEN_FLAGS, FILE_MODE)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeValue(
                        f"the partial upload of {key!r} is a symbolic link; refusing to follow it"
                    ) from exc
                raise _storage_error(exc, key, "start writing") from exc
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UnsafeValue(f"the partial upload of {key!r} is not a regular file")
                if not _try_lock(fd):
                    raise HeldElsewhere(
                        f"{key} is being written by another upload right now (another "
                        "instance, alive or stopped, holds its partial copy)"
                    )
                # cleanup_stale may have removed the file between our open and our lock.
                if _same_file(fd, partial):
                    if not resume:
                        os.ftruncate(fd, 0)
                    file = _PartialFile(
                        key,
                        target,
                        fd,
                        verify=self._verify,
                        prepare_companion=self._prepare_companion,
                    )
                    return LocalUpload(file)
            except OSError as exc:
                os.close(fd)
                raise _storage_error(exc, key, "start writing") from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise StorageError(f"cannot start writing {key}: its partial upload keeps disappearing")

    def _put_bytes(self, key: str, parts: list[str], data: bytes) -> StoredObject:
        temp = _TempFile.create(key, self._make_parents(key, parts), data)
        temp.install()
        try:
            _fsync_dir(temp.target.parent)
        except OSError as exc:
            _unlink_quietly(temp.target)
            raise _storage_error(exc, key, "write") from exc
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _prepare_companion(self, companion: Companion, stored: StoredObject) -> _TempFile:
        parts = check_key(companion.key)
        data = companion.render(stored)
        return _TempFile.create(companion.key, self._make_parents(companion.key, parts), data)

    def _stat(self, key: str, parts: list[str]) -> ObjectInfo | None:
        target = self._resolve(key, parts)
        try:
            info = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _storage_error(exc, key, "stat") from exc
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
            raise _storage_error(exc, key, "read") from exc
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
            raise _storage_error(exc, key, "read") from exc

    def _delete(self, key: str, parts: list[str]) -> None:
        target = self._resolve(key, parts)
        try:
            os.unlink(target)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _storage_error(exc, key, "delete") from exc
        try:
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _storage_error(exc, key, "delete") from exc

    def _preflight(self) -> None:
        root = self._root
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
        probe = _one_shot_path(root / "preflight")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, FILE_MODE)
            try:
                _try_lock(fd)
                _write_all(fd, b"archiver preflight probe\n")
                os.fsync(fd)
                os.unlink(probe)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(probe)
            if exc.errno in _DISK_FULL:
                raise PreflightError(f"archive root {root} is full: {exc.strerror}") from exc
            raise PreflightError(f"archive root {root} is not writable: {exc.strerror}") from exc

    def _cleanup_stale(self, cutoff: float) -> int:
        # A one-shot temporary file is never resumed: once no process holds it, it is only waste.
        one_shot_cutoff = time.time() - ONE_SHOT_GRACE
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self._root, followlinks=False):
            for name in filenames:
                if not is_partial_name(name):
                    continue
                limit = one_shot_cutoff if is_one_shot_name(name) else cutoff
                if _remove_if_stale(Path(dirpath, name), limit):
                    removed += 1
        return removed


def _remove_if_stale(path: Path, cutoff: float) -> bool:
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_mtime > cutoff:
            return False
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot clean up {path.name}: {exc.strerror}") from exc
    try:
        # A locked file belongs to a live writer, however long it has been idle.
        if not _try_lock(fd) or not _same_file(fd, path) or os.fstat(fd).st_mtime > cutoff:
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot clean up {path.name}: {exc.strerror}") from exc
    finally:
        os.close(fd)
