"""Create the daemon's sockets safely (ABI.md section 4).

- Directories the daemon creates (``/run/scoutfs`` and ``<fsid>`` under it)
  are made 0700 and then checked through an ``O_NOFOLLOW`` descriptor: a
  symlink or a directory owned by someone else is refused, never followed.
- Sockets are bound under a restrictive umask, so there is no moment when
  they have a wider mode; ``--socket-group`` then hands one group 0660 (and
  traverse rights on the socket's own directory).
- An existing socket is probed: if a daemon answers, it is never stolen; if
  nobody answers it is stale and replaced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import DaemonError

__all__ = ["Listener", "bind_listener", "prepare_dir"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes including the terminating NUL
SUN_PATH_MAX = 107
BACKLOG = 128


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def prepare_dir(
    path: Path,
    *,
    create: bool,
    mode: int = 0o700,
    gid: int | None = None,
    widen_only: bool = False,
) -> None:
    """Make sure ``path`` is a real directory owned by us, not open to the world.

    Args:
        create: create it (0700) if missing, and set ``mode``/``gid`` on it;
            otherwise only check it (a directory the operator chose).
        widen_only: for a directory shared by several daemons (the run dir):
            keep traverse bits another daemon added for its group, but still
            strip anything beyond ``0o711``.
    """
    if create:
        try:
            with _umask(0o077):
                os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DaemonError(f"{path}: no such directory") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DaemonError(f"{path}: not a directory or a symlink: remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise DaemonError(
                f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}: remove it or fix its owner"
            )
        if create:
            if gid is not None and st.st_gid != gid:
                os.fchown(fd, -1, gid)
            cur = stat.S_IMODE(st.st_mode)
            want = mode
            if widen_only and not cur & ~0o711:
                want = cur | mode
            if cur != want:
                os.fchmod(fd, want)
        elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise DaemonError(f"{path}: writable by others without the sticky bit: use another")
    finally:
        os.close(fd)


def _probe(path: Path) -> bool:
    """True if a live daemon accepts connections on ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        # EPROTOTYPE: something listens there, just not a SEQPACKET daemon
        if exc.errno == errno.EPROTOTYPE:
            return True
        raise
    finally:
        probe.close()
    return True


class Listener:
    """A bound, listening socket and what is needed to remove it safely."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        st = os.lstat(path)
        self._ident = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Close, and unlink the path if it is still ours (not a successor's)."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._ident:
            os.unlink(self.path)


def bind_listener(
    path: Path, *, kind: int = socket.SOCK_SEQPACKET, gid: int | None = None
) -> Listener:
    """Bind and listen on ``path`` with mode 0600 (0660 for ``gid``), non-blocking.

    Raises:
        DaemonError: a live daemon serves ``path``, or it is not a socket.
    """
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise DaemonError(f"{path}: longer than {SUN_PATH_MAX} bytes: choose a shorter --socket")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path}: exists and is not a socket: remove it")
        if _probe(path):
            raise DaemonError(
                f"{path}: a live daemon serves it: stop that one or choose another --socket"
            )
        log.info("replacing stale socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        with _umask(0o177):
            sock.bind(os.fspath(path))
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, 0o660)
        sock.listen(BACKLOG)
        return Listener(sock, path)
    except BaseException:
        sock.close()
        raise
