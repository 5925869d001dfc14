"""Create the daemon's sockets safely (docs/ABI.md section 4).

- Directories the daemon creates (``/run/scoutfs`` and ``<fsid>`` under it)
  are made 0700 and then checked through an ``O_NOFOLLOW`` descriptor: a
  symlink or a directory owned by someone else is refused, never followed.
  A directory another user may write (sticky ``/tmp`` included), or below
  one they could replace, is refused: they could take the socket's name
  first and feed forged records to root's clients.  A run dir the daemon
  did not create keeps its mode.
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

__all__ = ["Listener", "bind_listener", "check_ancestors", "listened", "prepare_dir"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes including the terminating NUL
SUN_PATH_MAX = 107
# Connections the kernel queues before the daemon accepts them.  A burst of
# connect/close cycles fills this queue with connections already closed;
# once it is full, a client's non-blocking connect (any socket with a
# timeout) fails with EAGAIN.  The kernel caps it at net.core.somaxconn.
BACKLOG = socket.SOMAXCONN


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_ancestors(path: Path) -> None:
    """Refuse a path whose ancestors let another user replace what lies below.

    Every ancestor must belong to root or to us, and one that others may
    write must be sticky (``/tmp``): there they cannot rename or remove our
    entries.  Symlinks in the path are resolved first; their targets are
    checked like the rest.
    """
    real = Path(os.path.realpath(path))
    me = os.geteuid()
    for parent in real.parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue  # the caller's own open says what is missing
        if st.st_uid not in (0, me):
            raise DaemonError(
                f"{path}: its ancestor {parent} belongs to uid {st.st_uid}, who could replace "
                "it: use a directory under root's own"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise DaemonError(
                f"{path}: its ancestor {parent} is writable by others (mode {_mode(st)}) without "
                "the sticky bit, so they could replace it: use another directory"
            )


def prepare_dir(
    path: Path,
    *,
    create: bool,
    mode: int = 0o700,
    gid: int | None = None,
    shared: bool = False,
) -> None:
    """Make sure ``path`` is a real directory owned by us that no one else may write.

    Args:
        create: create it (0700) if missing.  A directory this call creates,
            or one that is the daemon's own (the per-filesystem directory,
            inside a run dir only root may write), gets ``mode`` (and the
            group ``gid``, unless ``shared``).
        shared: the run dir, which may be the operator's (``--run-dir``):
            its mode is never changed unless this call created it; one that
            others may write is refused, and so is one that ``gid``'s
            members could not traverse.
    Otherwise (``create`` false, the directory of ``--socket``) it is only
    checked: one that other users may write, sticky ``/tmp`` included, is
    refused, since anyone there could take the socket's name first.
    """
    check_ancestors(path)
    created = False
    if create:
        try:
            with _umask(0o077):
                os.mkdir(path, 0o700)
            created = True
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
        if create and (created or not shared):
            if gid is not None and not shared and st.st_gid != gid:
                os.fchown(fd, -1, gid)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            return
        if st.st_mode & 0o022:
            raise DaemonError(
                f"{path}: writable by other users (mode {_mode(st)}), who could take the "
                "socket's name first: use a directory only root can write"
            )
        if shared and gid is not None and not st.st_mode & 0o001:
            raise DaemonError(
                f"{path}: others may not traverse it (mode {_mode(st)}), so --socket-group "
                "members cannot reach the socket: chmod o+x it, or remove it and let the "
                "daemon create it"
            )
    finally:
        os.close(fd)


def listened(path: Path, kind: int = socket.SOCK_SEQPACKET, timeout: float = 1.0) -> bool:
    """Whether something listens on the Unix socket ``path``.

    False only when nobody does (the connection refused, or no such file).
    True when a connection of type ``kind`` is made, when a socket of
    another type listens there (EPROTOTYPE), and when its backlog is full
    (EAGAIN, or ``timeout``): a live listener, only busy.  Any other error
    is raised.
    """
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(timeout)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True
    except OSError as exc:
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

    def __init__(
        self,
        sock: socket.socket,
        path: Path,
        lock_fd: int = -1,
        *,
        kind: int = socket.SOCK_SEQPACKET,
        gid: int | None = None,
    ) -> None:
        self.sock = sock
        self.path = path
        self.kind = kind
        self.gid = gid
        self._lock_fd = lock_fd
        st = os.lstat(path)
        self._ident = (st.st_dev, st.st_ino)

    def present(self) -> bool:
        """Whether ``path`` still names this listener's socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def rebind(self) -> socket.socket:
        """Serve ``path`` again after it was removed: bind a fresh socket there.

        Returns the old socket; the caller closes it once nothing waits on it
        (clients it accepted are not affected).  A lock file removed with the
        socket is taken again, so a second daemon still cannot start here.

        Raises:
            DaemonError: something else now holds the path, or it cannot be bound.
        """
        if self._lock_fd >= 0 and not _same_file(self._lock_path(), self._lock_fd):
            fd = _lock(self.path)
            os.close(self._lock_fd)
            self._lock_fd = fd
        new = _bind_socket(self.path, self.kind, self.gid)
        old, self.sock = self.sock, new
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        return old

    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

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


_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
}


def _not_a_socket(path: Path, st: os.stat_result) -> str:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a socket")
    if stat.S_ISDIR(st.st_mode):
        return f"{path}: is a directory: give the socket's own path, e.g. {path / 'notify.sock'}"
    return f"{path}: exists and is {kind}, not a socket: choose another --socket"


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _bind(path: Path, kind: int, gid: int | None, lock_fd: int) -> Listener:
    return Listener(_bind_socket(path, kind, gid), path, lock_fd, kind=kind, gid=gid)


def _bind_socket(path: Path, kind: int, gid: int | None) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(_not_a_socket(path, st))
        if listened(path):
            raise _live(path)
        log.info("replacing stale socket %s", path)
    # Bound and listening under a temporary name, then renamed into place:
    # the path never names a socket that refuses connections, and a stale one
    # is replaced in one step.
    tmp = path.with_name(f".{path.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp_st = os.lstat(tmp)
        if not stat.S_ISSOCK(tmp_st.st_mode):
            raise DaemonError(_not_a_socket(tmp, tmp_st))
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
        return sock
    except BaseException:
        sock.close()
        if bound:
            os.unlink(tmp)
        raise
