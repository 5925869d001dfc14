"""The shim's directories in the run dir: ``shim-<hash>/shim.stats``, one per mount point.

A shim stopped by a signal it can catch removes its socket and its directory; one
that was SIGKILLed (or lost its machine's power) leaves both behind.  Its next
start on the same mount point reuses them (:func:`notifyd.listen.prepare_dir`
takes the directory back, :func:`notifyd.listen.bind_listener` replaces the
stale socket).  Any start also removes what shims of other mount points left,
so that ``/run/scoutfs`` does not fill with them: only a directory a shim would
make itself (``shim-`` and 16 hex digits, a real directory of ours, mode 0700)
holding nothing or one socket no one listens on.

Starts are serialized by ``flock`` on the run dir itself (no file is added to
it): a starting shim makes its directory and binds its socket under the lock,
so a sweep never sees a directory between those two steps; a live shim's socket
accepts connections, so a sweep never takes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from notifyd.listen import listened

__all__ = ["STATS_NAME", "locked", "sweep"]

log = logging.getLogger(__name__)

STATS_NAME = "shim.stats"
_DIR_NAME = re.compile(r"shim-[0-9a-f]{16}")
_DIR_MODE = 0o700
PROBE_TIMEOUT = 1.0


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``run_dir`` (a directory already checked)."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _listened(path: Path) -> bool:
    """True unless nobody listens on the stream socket ``path``."""
    try:
        return listened(path, socket.SOCK_STREAM, PROBE_TIMEOUT)
    except OSError:
        # anything unexpected (EACCES...): keep it
        return True


def _stale(d: Path) -> bool:
    """``d`` is a shim's directory that no live shim uses."""
    if not _DIR_NAME.fullmatch(d.name):
        return False
    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        if stat.S_IMODE(st.st_mode) != _DIR_MODE:
            return False
        names = os.listdir(d)
        if not names:
            return True
        if names != [STATS_NAME]:
            return False
        sock = d / STATS_NAME
        sst = os.lstat(sock)
    except OSError:
        return False
    return stat.S_ISSOCK(sst.st_mode) and sst.st_uid == os.geteuid() and not _listened(sock)


def sweep(run_dir: Path, keep: Path) -> list[Path]:
    """Remove the stale shim directories in ``run_dir`` but ``keep``; the removed ones.

    Call it holding :func:`locked` on ``run_dir``.
    """
    removed: list[Path] = []
    try:
        entries = sorted(run_dir.iterdir())
    except OSError as exc:
        log.warning("cannot look for stale shim directories in %s: %s", run_dir, exc.strerror)
        return removed
    for d in entries:
        if d == keep or not _stale(d):
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / STATS_NAME)
            os.rmdir(d)
        except OSError as exc:
            # a shim of that mount point stopping or starting by itself: its business
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                log.warning("cannot remove the stale shim directory %s: %s", d, exc.strerror)
            continue
        log.info("removed %s, left by a shim that was killed", d)
        removed.append(d)
    return removed
