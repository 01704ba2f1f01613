# SPDX-License-Identifier: Apache-2.0
"""Folders written whole or not at all, and one clear stop when the disk fills.

Every folder the project writes for a later reader (checkpoints, final/ exports, teacher and reference caches,
generation-state caches, expanded models) is built in `.tmp_<name>_<pid>` beside its place and renamed into it
(`writing_dir`). When a write fails with an I/O error (no space, quota, read-only or failing storage), the
partial folder is removed and `WriteFailed` says, in one line, which file, how many bytes were needed if known,
how much is free, and which earlier result is still good; the CLI prints it and exits with status 3.

A `.tmp_*_<pid>` left by a process that no longer exists (killed mid-write) is removed the next time anything
writes beside it (`sweep_stale`); one whose process is alive is another writer's and is left alone.
"""
import errno
import logging
import os
import re
import shutil
from contextlib import contextmanager

log = logging.getLogger(__name__)

IO_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
STALE = re.compile(r"^\.tmp_.+_(\d+)$")
EXIT_STATUS = 3


class WriteFailed(Exception):
    """Storage refused a write (full, quota, read-only, I/O error); the message names the file and what survives."""


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path or ".")
    return st.f_bavail * st.f_frsize


def folder_bytes(path: str) -> int:
    total = 0
    for top, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(top, f)).st_size
            except OSError:
                pass
    return total


def tmp_path_for(final: str, pid: int = None) -> str:
    """The folder process `pid` (default this one) builds `final` in."""
    parent, name = os.path.split(os.path.abspath(final).rstrip("/"))
    return os.path.join(parent, f".tmp_{name}_{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: str) -> list:
    """Remove `.tmp_*_<pid>` folders in `parent` whose writer process is gone; returns the removed paths."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = STALE.match(name)
        path = os.path.join(parent, name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left half-written by process %s, which no longer runs", path, m.group(1))
            removed.append(path)
    return removed


def write_failed(e: OSError, what: str, target: str, need: int = None, last_good: str = None) -> WriteFailed:
    """The one-line WriteFailed for an OSError met while writing `what` to `target`."""
    where = e.filename or target
    parts = [f"{what}: cannot write {where}: {e.strerror or e}"]
    space = f"{human(free_bytes(target))} free"
    parts.append(f"{human(need)} needed, {space}" if need else space)
    parts.append(f"the last good one is {last_good}, unchanged" if last_good else "nothing earlier was changed")
    return WriteFailed("; ".join(parts) + "; the partial write was removed")


def check_space(target: str, need: int, what: str, last_good: str = None):
    """Refuse before writing when `need` bytes (e.g. the previous checkpoint's size) are not free."""
    if need and free_bytes(target) < need:
        raise WriteFailed(f"{what}: not enough space to write {target}: {human(need)} needed (the size of "
                          f"{last_good or 'the previous one'}), {human(free_bytes(target))} free; "
                          + (f"the last good one is {last_good}, unchanged" if last_good else "nothing was written"))


@contextmanager
def writing_dir(final: str, what: str, need: int = None, last_good: str = None, replace: bool = True):
    """Yield a fresh `.tmp_<name>_<pid>` beside `final`; rename it into place when the block ends.

    An I/O error inside the block (or during the rename) removes the partial folder and raises WriteFailed;
    any other exception removes it too and propagates. replace=False keeps an existing `final` (several ranks
    building the same cache: the first rename wins, the others drop theirs)."""
    parent = os.path.dirname(os.path.abspath(final).rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    sweep_stale(parent)
    check_space(final, need, what, last_good)
    tmp = tmp_path_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.exists(final):
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in IO_ERRORS or e.errno is None:    # None: a library's short write ("N requested and M written")
            raise write_failed(e, what, final, need, last_good) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
