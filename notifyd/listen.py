"""Create the daemon's sockets safely (docs/ABI.md section 4).

- Directories the daemon creates (``/run/scoutfs`` and ``<fsid>`` under it)
  are made 0700 and then checked through an ``O_NOFOLLOW`` descriptor: a
  symlink or a directory owned by someone else is refused, never followed.
- Sockets are bound under a restrictive umask, so there is no moment when
  they have a wider mode; ``--socket-group`` then hands one group 0660 (and
  traverse rights on the socket's own directory).  They are bound and
  listening under a temporary name before being renamed into place, so a
  socket path that exists always accepts connections.
- An existing socket is probed: if a daemon answers, it is never stolen; if
  nobody answers it is stale and replaced.  The notify socket's daemon also
  holds an flock on ``<socket>.lock`` for its whole life, so two daemons
  starting at once cannot both find the socket stale and unlink each
  other's.  The lock file stays (removing it would reopen that race).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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


def _live(path: Path) -> DaemonError:
    return DaemonError(f"{path}: a live daemon serves it: stop that one or choose another --socket")


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DaemonError(f"{lock_path}: a symlink: remove it") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _live(path) from None
    return fd


class Listener:
    """A bound, listening socket and what is needed to remove it safely."""

    def __init__(self, sock: socket.socket, path: Path, lock_fd: int = -1) -> None:
        self.sock = sock
        self.path = path
        self._lock_fd = lock_fd
        st = os.lstat(path)
        self._ident = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Close, and unlink the path if it is still ours (not a successor's)."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def bind_listener(
    path: Path, *, kind: int = socket.SOCK_SEQPACKET, gid: int | None = None, lock: bool = False
) -> Listener:
    """Bind and listen on ``path`` with mode 0600 (0660 for ``gid``), non-blocking.

    Args:
        lock: hold ``<path>.lock`` until :meth:`Listener.close`.

    Raises:
        DaemonError: a live daemon serves ``path``, or it is not a socket.
    """
    # bound as .NAME.new first (see _bind)
    if len(os.fsencode(path)) + len(".new.") > SUN_PATH_MAX:
        raise DaemonError(f"{path}: too long for a socket path: choose a shorter --socket")
    lock_fd = _lock(path) if lock else -1
    try:
        return _bind(path, kind, gid, lock_fd)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        raise


def _bind(path: Path, kind: int, gid: int | None, lock_fd: int) -> Listener:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path}: exists and is not a socket: remove it")
        if _probe(path):
            raise _live(path)
        log.info("replacing stale socket %s", path)
    # Bound and listening under a temporary name, then renamed into place:
    # the path never names a socket that refuses connections, and a stale one
    # is replaced in one step.
    tmp = path.with_name(f".{path.name}.new")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(tmp).st_mode):
            raise DaemonError(f"{tmp}: exists and is not a socket: remove it")
        os.unlink(tmp)  # left by a daemon that died while starting
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    bound = False
    try:
        with _umask(0o177):
            sock.bind(os.fspath(tmp))
        bound = True
        if gid is not None:
            os.chown(tmp, -1, gid, follow_symlinks=False)
            os.chmod(tmp, 0o660)
        sock.listen(BACKLOG)
        os.rename(tmp, path)
        bound = False
        return Listener(sock, path, lock_fd)
    except BaseException:
        sock.close()
        if bound:
            os.unlink(tmp)
        raise
