"""The blocking file primitives of ``archiver.storage.local``: partial and one-shot temporary files,
locks, fsyncs, and the pool of threads they run in.

Everything here blocks; ``LocalStorage`` calls it through ``in_io_thread``. See ``local`` for the
rules (what is visible when, what is resumed, what cleanup removes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import random
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

from archiver.errors import IntegrityError, StorageError, StorageFull
from archiver.models import StoredObject
from archiver.storage.base import CHUNK_SIZE, CommitRequest, Companion, Digest
from archiver.storage.keys import PARTIAL_SUFFIX
from archiver.threads import Lane

FILE_MODE = 0o640
DIR_MODE = 0o750
# How long cleanup_stale leaves an unlocked one-shot temporary file alone where the filesystem
# cannot lock (some NFS and FUSE mounts: try_lock then reports success and tells nothing); there
# its mtime, fresh from the create and each write, is what keeps cleanup away from a live write,
# and a leftover found by a start less than a minute after the crash waits for a later start.
# Where flock works, an unlocked one-shot file is dead at once: its writer locks it right after
# the create and re-checks it is still its file once locked, so cleanup taking it in between
# only makes the writer create another.
ONE_SHOT_GRACE = 60.0
_ONE_SHOT_NAME = re.compile(r"\..+\.[0-9a-f]{12}" + re.escape(PARTIAL_SUFFIX))

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Filesystems that cannot fsync a directory or lock a file: carry on, as restic does.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK})
OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK

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
_io_lane: Lane | None = None
# The random part of one-shot temporary files' names (seeded from the OS at import).
_names = random.Random()


async def in_io_thread(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    global _io_lane
    if _io_lane is None:
        _io_lane = Lane(_IO_THREADS, "archiver-disk")
    return await _io_lane.run(fn, *args, **kwargs)


def is_one_shot_name(name: str) -> bool:
    """A temporary file that is written in one go and never resumed (see ``TempFile``).

    A resumable partial of a key whose name itself ends in ``.<12 hex>`` looks the same; it then
    loses its resume after ``ONE_SHOT_GRACE`` instead of the caller's age, never its object."""
    return _ONE_SHOT_NAME.fullmatch(name) is not None


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def one_shot_path(target: Path) -> Path:
    # Unique enough for O_EXCL to settle the rare clash (``TempFile._create`` tries again), and
    # no getrandom call per file, as ``secrets`` would make: nothing depends on the name's secrecy.
    return target.with_name(f".{target.name}.{_names.getrandbits(48):012x}{PARTIAL_SUFFIX}")


def storage_error(exc: OSError, key: str, doing: str) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return StorageFull(f"disk full writing {key}: {reason}")
    return StorageError(f"cannot {doing} {key}: {reason}")


def write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


# How a one-shot temporary file gets its bytes. A seam, as restic swaps its tempFile in tests: the
# crash test's helper process replaces it to stop midway through a write and be killed there.
_write_temp_bytes: Callable[[int, bytes], None] = write_all


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def try_lock(fd: int) -> bool:
    """Take an exclusive lock without waiting; False when someone else holds it."""
    return take_lock(fd)[0]


def take_lock(fd: int) -> tuple[bool, bool]:
    """``try_lock``, and whether the filesystem locks at all: (taken, locking works). Where it
    does not, "taken" tells nothing about other writers."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False, True
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        return True, False
    return True, True


def same_file(fd: int, path: Path, held: os.stat_result | None = None) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked or replaced meanwhile);
    ``held``: ``fd``'s fstat, when the caller has it already."""
    try:
        on_disk = os.lstat(path)
    except FileNotFoundError:
        return False
    held = held or os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sha256_of(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(CHUNK_SIZE, size - pos), pos)
        if not chunk:
            break
        digest.update(chunk)
        pos += len(chunk)
    return digest.hexdigest()


class TempFile:
    """A one-shot temporary file beside ``target``, locked from its creation until it is renamed
    over ``target`` or discarded. Its methods block; they run in worker threads."""

    def __init__(self, key: str, target: Path, path: Path, fd: int) -> None:
        self.key = key
        self.target = target
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, key: str, target: Path, data: bytes) -> TempFile:
        """Write ``data`` to a new temporary file beside ``target`` and fsync it."""
        temp = cls._create(key, target)
        try:
            _write_temp_bytes(temp._fd, data)
            os.fsync(temp._fd)
        except OSError as exc:
            temp.discard()
            raise storage_error(exc, key, "write") from exc
        except BaseException:
            temp.discard()
            raise
        return temp

    @classmethod
    def _create(cls, key: str, target: Path) -> TempFile:
        while True:
            # A unique name: these writes are not resumed, and two writers must not share a file.
            path = one_shot_path(target)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, FILE_MODE)
            except FileExistsError:
                continue
            except OSError as exc:
                raise storage_error(exc, key, "write") from exc
            try:
                # cleanup_stale may have taken the file between our open and our lock (only
                # after a clock step, see ONE_SHOT_GRACE): then it is not ours any more.
                if try_lock(fd) and same_file(fd, path):
                    return cls(key, target, path, fd)
            except OSError as exc:
                os.close(fd)
                raise storage_error(exc, key, "write") from exc
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
            raise storage_error(exc, self.key, "write") from exc
        self._close()

    def discard(self) -> None:
        try:
            unlink_quietly(self.path)
        finally:
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class PartialFile:
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
        size: int,
        verify: bool,
        prepare_companion: Callable[[Companion, StoredObject, Path], TempFile],
    ) -> None:
        self.key = key
        self.target = target
        self.path = partial_path(target)
        self.size = size  # of the file at ``fd``, as the caller found it once locked
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
                raise storage_error(exc, self.key, "read the partial upload of") from exc

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
                if exc.errno in DISK_FULL:
                    # Keeping the partial would only hold on to the space that ran out.
                    self._discard()
                raise storage_error(exc, self.key, "write") from exc

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
                raise storage_error(exc, self.key, "truncate the partial upload of") from exc
            self.size = 0

    def commit(self, request: CommitRequest) -> StoredObject:
        with self._lock:
            self.check_open()
            companion: TempFile | None = None
            try:
                os.fsync(self._fd)
                size = os.fstat(self._fd).st_size
                if size != request.size:
                    raise IntegrityError(
                        f"{self.key}: {size} bytes written, {request.size} expected"
                    )
                # No hash from the caller: the file itself says what it holds.
                expected = request.sha256.lower() if request.sha256 else sha256_of(self._fd, size)
                if self._verify and (actual := sha256_of(self._fd, size)) != expected:
                    raise IntegrityError(
                        f"{self.key}: SHA-256 on disk is {actual}, {expected} expected"
                    )
                stored = StoredObject(key=self.key, size=size, sha256=expected)
                if request.companion is not None:
                    # Complete on disk before the object shows: a companion that fails (a full
                    # disk, a render that raises) leaves the key as it was.
                    companion = self._prepare_companion(request.companion, stored, self.target)
                # The fd stays open (and locked) across the rename: no second writer can slip in.
                os.replace(self.path, self.target)
            except BaseException as exc:
                # The partial goes too, as after any failed commit: the caller's retry starts
                # afresh, and a disk that ran out of room for the companion gets that room back.
                if companion is not None:
                    companion.discard()
                self._discard()
                if isinstance(exc, OSError):
                    raise storage_error(exc, self.key, "commit") from exc
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
                    fsync_dir(directory)
            except OSError as exc:
                # The renames might not survive a crash; a failed commit leaves nothing behind.
                unlink_quietly(self.target)
                if companion is not None:
                    unlink_quietly(companion.target)
                self._close("aborted")
                raise storage_error(exc, self.key, "commit") from exc
            self._close("committed")
            return stored

    def _take_back(self) -> None:
        """Remove the object just renamed into place, whose companion could not follow it."""
        self._close("aborted")
        try:
            unlink_quietly(self.target)
            fsync_dir(self.target.parent)
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
            unlink_quietly(self.path)
        except OSError as exc:
            raise storage_error(exc, self.key, "remove the partial upload of") from exc

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


def remove_if_stale(path: Path, cutoff: float, *, dead_when_unlocked: bool = False) -> bool:
    """Remove ``path`` when no process holds it and it is older than ``cutoff``.
    ``dead_when_unlocked`` (a one-shot temporary file, never resumed): where the filesystem
    locks, unlocked is enough whatever its age (its writer holds the lock from its creation and
    re-checks the file once locked); the age counts only where locks tell nothing."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or (info.st_mtime > cutoff and not dead_when_unlocked):
            return False
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot clean up {path.name}: {exc.strerror}") from exc
    try:
        # A locked file belongs to a live writer, however long it has been idle.
        taken, locking = take_lock(fd)
        if not taken or not same_file(fd, path):
            return False
        if os.fstat(fd).st_mtime > cutoff and not (dead_when_unlocked and locking):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot clean up {path.name}: {exc.strerror}") from exc
    finally:
        os.close(fd)
