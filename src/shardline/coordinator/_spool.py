# Job spool directories: where shard outputs wait until they are read, and
# how none is left behind.
#
# Each job gets `<root>/shardline-<job id>-<random>`, holding a lock file
# (`.lock`) that the owning coordinator process keeps locked (flock) for the
# job's life.  The lock file says what the directory is for: {"pid",
# "job_id", "reserved_bytes", "resumable", "store"}.  A directory whose lock
# no live process holds was abandoned (its owner was killed, crashed, or
# exited without cleaning up), and `sweep_spools` removes it, unless a
# coordinator may still resume its job: a `resumable` directory is removed
# only by a coordinator of the same `store`, once that one has resumed, and
# so re-locked, every job it knows.
#
# The lock file appears under its name already locked (created under a
# temporary name, locked, then linked into place), so a sweeper can never
# take the lock of a directory that is still being set up.  A directory with
# no lock file at all was not made by this version and is left alone.
#
# Space: a job reserves twice its object's size (outputs rarely outgrow their
# input by more).  `choose_spool_dir` subtracts what live directories have
# reserved and not yet used from the memory spool's free space, so that
# concurrent jobs, in this process or in others, do not all pick a tmpfs
# that can hold only one of them.

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LOCK_FILE", "MEMORY_SPOOL_DIR", "SpoolDir", "choose_spool_dir", "sweep_spools"]

log = logging.getLogger("shardline.coordinator.spool")

#: Memory-backed and usually mounted; writing there skips disk writeback,
#: which costs more than the download itself on slow disks.
MEMORY_SPOOL_DIR = "/dev/shm"
#: Free space a job leaves on the memory spool beyond its reservation.
_HEADROOM_BYTES = 256 * 1024 * 1024
_PREFIX = "shardline-"
LOCK_FILE = ".lock"
#: How long re-taking a job's lock at resume waits for a sweeper that is
#: looking at it (a sweeper holds a lock it does not own for microseconds).
_RELOCK_WAIT_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Claim:
    """What a spool directory's lock file records."""

    job_id: str
    reserved_bytes: int
    resumable: bool
    store: str

    def encode(self) -> bytes:
        fields = {
            "pid": os.getpid(),
            "job_id": self.job_id,
            "reserved_bytes": self.reserved_bytes,
            "resumable": self.resumable,
            "store": self.store,
        }
        return json.dumps(fields).encode()


class SpoolDir:
    """A job's spool directory, locked by this process until `release()`."""

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, root: str, *, job_id: str, reserved_bytes: int, resumable: bool, store: str = "") -> SpoolDir:
        """A new directory under `root` (created if missing), locked, with its claim."""
        os.makedirs(root, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f"{_PREFIX}{job_id}-", dir=root)
        claim = _Claim(job_id=job_id, reserved_bytes=reserved_bytes, resumable=resumable, store=store)
        try:
            fd = _new_lock(path, claim)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        assert fd is not None  # the directory is new: nobody else has a lock file there
        return cls(path, fd)

    @classmethod
    def relock(
        cls, path: str, *, job_id: str, reserved_bytes: int, resumable: bool, store: str = ""
    ) -> SpoolDir | None:
        """Take the lock of a resumed job's directory (created if missing), or
        None while another live process holds it (it owns the job)."""
        os.makedirs(path, exist_ok=True)
        claim = _Claim(job_id=job_id, reserved_bytes=reserved_bytes, resumable=resumable, store=store)
        deadline = time.monotonic() + _RELOCK_WAIT_S
        while True:
            fd = _open_lock(path)
            if fd is None:
                fd = _new_lock(path, claim)
                if fd is not None:
                    return cls(path, fd)
            elif _try_lock(fd):
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, claim.encode(), 0)
                return cls(path, fd)
            else:
                os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def release(self) -> None:
        """Unlock (the directory stays, for a coordinator that resumes it); idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def remove(self) -> None:
        """Delete the directory and everything in it, then unlock; idempotent."""
        if self._lock_fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()


def _new_lock(path: str, claim: _Claim) -> int | None:
    """Create `path`/.lock already locked; None if one exists already."""
    temporary = os.path.join(path, f"{LOCK_FILE}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        os.write(fd, claim.encode())
        os.link(temporary, os.path.join(path, LOCK_FILE))  # fails if one exists: never replaces
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return fd


def _open_lock(path: str) -> int | None:
    try:
        return os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_claim(fd: int) -> dict[str, object]:
    try:
        claim = json.loads(os.pread(fd, 64 * 1024, 0))
    except (OSError, ValueError):
        return {}
    return claim if isinstance(claim, dict) else {}


def _own_spools(root: str) -> Iterable[str]:
    """Spool directories under `root` that belong to this user (never a symlink)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        if not entry.name.startswith(_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            yield entry.path


# -- sweeping ------------------------------------------------------------------------


def sweep_spools(roots: Iterable[str], *, store: str | None = None) -> list[str]:
    """Remove the abandoned spool directories under `roots`; returns their paths.

    Resumable ones are removed only when `store` names the store they
    belong to (call it after resuming every job of that store).
    """
    removed = []
    for root in dict.fromkeys(roots):
        for path in _own_spools(root):
            try:
                if _remove_if_abandoned(path, store):
                    removed.append(path)
            except OSError as exc:
                log.warning("cannot sweep spool directory %s: %s", path, exc)
    if removed:
        log.info(
            "removed %d abandoned spool director%s: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            ", ".join(removed),
        )
    return removed


def _remove_if_abandoned(path: str, store: str | None) -> bool:
    fd = _open_lock(path)
    if fd is None:
        return False  # not ours to judge (no lock file: made by an older version)
    try:
        if not _try_lock(fd):
            return False  # its owner lives
        claim = _read_claim(fd)
        if claim.get("resumable") is not False and (store is None or claim.get("store") != store):
            return False  # a coordinator of its store may still resume it
        # Removed while we hold the lock: another sweeper cannot take it meanwhile.
        shutil.rmtree(path)
        return True
    finally:
        os.close(fd)


# -- choosing where a job's spool goes ----------------------------------------------------


def choose_spool_dir(
    object_size: int, *, memory_dir: str = MEMORY_SPOOL_DIR, memory_limit_bytes: int | None = None
) -> str:
    """The memory spool when it can hold the job's reservation (twice
    `object_size`) on top of what live jobs have reserved there and not used
    yet, plus headroom, and within `memory_limit_bytes` of spool space in all;
    else the system temp dir."""
    fallback = tempfile.gettempdir()
    try:
        st = os.statvfs(memory_dir)
    except OSError:
        return fallback
    if not os.access(memory_dir, os.W_OK):
        return fallback
    reserving = 2 * object_size
    promised, claimed = _live_usage(memory_dir)
    free = st.f_bavail * st.f_frsize
    if free - promised < reserving + _HEADROOM_BYTES:
        return fallback
    if memory_limit_bytes is not None and claimed + reserving > memory_limit_bytes:
        return fallback
    return memory_dir


def _live_usage(root: str) -> tuple[int, int]:
    """Over the live spool directories under `root`: bytes reserved and not
    used yet, and bytes claimed (the larger of reserved and used)."""
    promised = claimed = 0
    for path in _own_spools(root):
        fd = _open_lock(path)
        if fd is None:
            continue
        try:
            if _try_lock(fd):
                continue  # abandoned: what it holds is already out of the free space
            reserved = _read_claim(fd).get("reserved_bytes")
        finally:
            os.close(fd)  # also releases a lock we took
        reserved = reserved if isinstance(reserved, int) else 0
        used = _used_bytes(path)
        promised += max(0, reserved - used)
        claimed += max(reserved, used)
    return promised, claimed


def _used_bytes(path: str) -> int:
    total = 0
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total
