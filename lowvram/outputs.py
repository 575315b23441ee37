"""Output files that a failure never destroys, and that two processes never write at once.

A run streams its video into `NAME.partial.mp4` beside the target and renames it over `NAME.mp4` only when it
finished: a crash, a full disk or Ctrl-C leaves the previous `NAME.mp4` as it was and the partial file playable
under its own name. `hold_lock` takes an exclusive lock file (flock) for the duration of a run or a
quantization; a second process asking for the same lock is refused with one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lowvram.errors import InputError

LOCK_SUFFIX = ".lock"


def partial_path(target: Path) -> Path:
    """Where a file is written until it is finished: `talk.mp4` -> `talk.partial.mp4` (players still open it)."""
    target = Path(target)
    return target.with_name(f"{target.stem}.partial{target.suffix}")


def lock_path_for(target: Path) -> Path:
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


def publish(partial: Path, target: Path) -> bool:
    """Rename the finished file over the target (atomic on one file system); True when it replaced a file."""
    replaced = Path(target).exists()
    os.replace(partial, target)
    return replaced


@contextlib.contextmanager
def hold_lock(lock_file: Path, what: str):
    """Hold an exclusive lock on `lock_file` while the block runs; refuse if another process holds it.

    `what` names the thing being written, for the message ("--output talk.mp4"). The lock file is removed on
    release; a process that opened it just before then finds a removed file and tries again.
    """
    lock_file = Path(lock_file)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise InputError(f"{what}: another lowvram process{holder} is writing it; wait for it to finish or "
                             f"choose another path (remove {lock_file} if no such process is running)")
        if _same_file(fd, lock_file):
            break
        os.close(fd)  # removed by the previous holder between our open and our lock
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, AttributeError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
