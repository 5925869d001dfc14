"""The passthrough overlay: BACKING served through file descriptors, with the caller's rights.

The shape follows pyfuse3's ``examples/passthroughfs.py`` (private tables,
lookup counts released by ``forget``, one error mapping) and the way BACKING
is reached follows libfuse's ``example/passthrough_hp.cc``:

- Every inode the kernel knows holds an ``O_PATH|O_NOFOLLOW`` fd on BACKING
  and is identified by ``(st_dev, st_ino)``.  Every operation is made
  relative to those fds (``openat``, ``mkdirat``, ``unlinkat``,
  ``renameat2``, ``fchownat``...) on one name component, never through a
  path string from BACKING's root, and no component is followed as a
  symlink: a name swapped for a symlink on BACKING after a lookup leads
  nowhere.  Files are (re)opened through ``/proc/self/fd/N`` of the inode's
  own fd, so an open reaches the very inode the kernel asked about.
- Mounts nested under BACKING are not crossed: their entries are left out
  of listings and a lookup of one fails with EOPNOTSUPP, so an inode number
  from another filesystem can never alias one of BACKING's.
- A request made by a non-root caller runs with that caller's fsuid, fsgid
  and supplementary groups (per thread: see :class:`_Creds`), so BACKING
  itself checks it at the moment of the call.  The kernel checks too
  (``default_permissions``, with attributes cached for ``timeout``
  seconds): a permission is granted only when both agree, so one removed on
  BACKING takes effect at once.
- Any exception in a handler becomes an errno reply and a log line
  (:func:`fuse_handler`): no call can end pyfuse3's session.
- Nothing that may wait for long runs on pyfuse3's one serving thread:
  directory reads, file data BACKING does not have in memory, writes,
  changes of size (opens with O_TRUNC among them) and fsyncs run in
  worker threads, a few per user at once; opens that wait for a lease's
  holder too.  Such calls hold fewer of pyfuse3's request tasks, all users
  together, than it has (:data:`REQUEST_TASKS`), some kept for root: the
  calls that never wait are always served.  A caller killed while its call
  waits is answered EINTR at once, as on BACKING it would die at once
  (:mod:`.killable`; pyfuse3 takes no FUSE_INTERRUPT).

Synthetic opens made by the replay threads (:mod:`.replay`) are recognised
by the caller's thread id (:meth:`Overlay._replay_open`), never touch a
file's data and are served one byte with ``direct_io``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import errno
import functools
import logging
import os
import queue
import resource
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from notifyd import libc

from .killable import Caller, Hold, KillableCalls, thread
from .replay import ReplayThreads

__all__ = ["REQUEST_TASKS", "Overlay", "fuse_handler"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Synthetic handles live far above any fd number, so read/release (which get
# no request context) can tell them from the backing fds real handles carry.
_REPLAY_FH_BASE = 1 << 48

# One byte is enough for the kernel to raise IN_ACCESS (even on an empty file)
_SYNTHETIC_BYTE = b"\0"

# How an inode is held: it names that inode only, and never follows a symlink.
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

# Extended attributes the overlay does not pass on (EOPNOTSUPP).  security.*
# belongs to BACKING's security modules and file capabilities: the overlay's
# own inodes get their labels from the FUSE mount, and its nosuid mount ignores
# capabilities.  The answer also tells `ls -l` the overlay has none, so it stops
# asking for every file (it remembers ENOTSUP per device), where each question
# is a round trip to this one-threaded server.
_HIDDEN_XATTRS = (b"security.",)
_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

# Deepest chain of fd-less directories reopened for one call.
_MAX_DEPTH = 4096

# Open files the overlay asks for: an O_PATH fd for each inode the kernel
# holds, so this bounds how many it may hold at once.
_FD_LIMIT = 1 << 20
# ... and of the limit that is, what inode fds leave free: a quarter, at least
# this many (the synthetic opens held at once, and some)
_FD_RESERVE_SHARE = 4
_FD_RESERVE_MIN = 640

# Requests pyfuse3.main serves at once (its max_tasks: a trio task each,
# started as needed, ended once idle).  A call that may wait (in a worker
# thread on BACKING, for a thread, or for a lease's holder) holds its task
# until it ends: were every task held so, no one would read /dev/fuse again
# and every user's calls, root's too, would wait with them.
REQUEST_TASKS = 128
# ... of which calls that may wait hold at most this many, all users together
# (past it they answer EAGAIN): the others are left to the calls that never
# wait (lookups, getattr, opens, reads BACKING has in memory, releases,
# forgets), which end in one step on the serving thread.
_MAX_WAITING_CALLS = REQUEST_TASKS - 32
# ... and of those, users other than root hold at most all but these: a few
# users whose calls never end cannot leave root (the admin, its services)
# EAGAIN on every read that must wait
_ROOT_WAITING_CALLS = 16

# Opens that wait for a lease's holder (in a thread) at once; past this they
# answer EAGAIN.  A user with many leases must not take every waiting call.
_MAX_LEASE_WAITS = 16

# Bytes of a directory read from BACKING at once: a few READDIRPLUS replies' worth
_LISTING_BATCH = 16384
# Directory reads in threads at once, and per user (root counts as one);
# a user's reads past this many pending answer EAGAIN
_LISTING_THREADS = 8
_USER_LISTINGS = 4
_MAX_PENDING_LISTINGS = 24
# Open directories that keep entries read but not yet sent (one batch each)
_MAX_READ_AHEAD = 256

# Calls on a file's data that may wait (reads BACKING cannot answer from
# memory, writes, truncates, fsyncs) run in threads: these many at once (more than
# listings: a call on data never staged may hold its thread for good, and a
# few users must not hold them all), and per user (the opener, or the
# caller; root counts as one); a user's calls past this many pending answer
# EAGAIN, so that none takes every waiting call (_MAX_WAITING_CALLS) with
# calls that never end
_DATA_THREADS = 32
_USER_DATA_CALLS = 4
_MAX_PENDING_DATA_CALLS = 24

# Closes of users' files run in a thread per user (a close may wait; root
# counts as one), which waits this long for the next before it ends
_CLOSER_LINGER = 1.0

# A non-root user may hold at most this share of the overlay's open-file
# limit in open files (EMFILE past it), however many processes they run.
_USER_SHARE_DIVISOR = 4
_MIN_USER_SHARE = 256

# pyfuse3 turns UTIME_NOW into the clock it read just before our handler; a
# time this close to the clock is taken as "now", which BACKING grants to
# anyone who may write the file (an explicit time needs the owner).
_NOW_SLACK_NS = 1_000_000_000


def _open_here(dirfd: int, name: bytes) -> int:
    """An O_PATH fd on ``name`` in ``dirfd``; EXDEV for a mount point.

    A mount under BACKING is refused before anything is asked of it: a
    hung network or FUSE filesystem there would stop the serving thread.
    """
    return libc.openat2(dirfd, name, _PATH_FLAGS, libc.RESOLVE_NO_XDEV)


def _proc(fd: int) -> str:
    # Reopening through the magic link reaches the fd's own inode: no name
    # is looked up again, so nothing on BACKING can redirect it.
    return f"/proc/self/fd/{fd}"


def _only_drops_setid(old: int, new: int) -> bool:
    """Whether mode ``new`` is ``old`` less some of its set-user/group-ID bits."""
    setid = stat.S_ISUID | stat.S_ISGID
    return new != old and new & ~old == 0 and (old & ~new) & ~setid == 0


def _backing_flags(flags: int) -> int:
    # O_DIRECT is the kernel's business between the caller and the overlay:
    # our reads go through Python buffers, which O_DIRECT would refuse.
    # O_CREAT/O_EXCL mean nothing on a reopen of an inode we hold, and
    # O_NOFOLLOW (the kernel already applied it) would refuse the magic link.
    drop = os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
    return (flags & ~drop) | os.O_CLOEXEC


# Per request (pyfuse3 serves each in a trio task of its own, so a context
# variable is the request's): the uid the inode fds it keeps are counted
# against, and the fds it opened for itself only, closed when it is answered.
_caller_uid: contextvars.ContextVar[int] = contextvars.ContextVar("caller_uid", default=0)
_passing_fds: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "passing_fds", default=None
)


def fuse_handler(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorate a pyfuse3 handler so that every failure becomes an errno reply.

    pyfuse3 ends its session on any exception but ``FUSEError``, so each of
    :class:`Overlay`'s handlers wears this.  An OSError keeps its errno;
    anything else is a bug, logged with its traceback and answered EIO, and
    the mount keeps serving.  It also says whose request it serves (the
    ``RequestContext``'s uid, root without one) and closes the fds the
    request opened for itself (:meth:`Overlay._fd` past a budget).
    """

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        uid = 0
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, pyfuse3.RequestContext):
                uid = arg.uid
                break
        token = _caller_uid.set(uid)
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed; answered EIO", handler.__name__)
            raise FUSEError(errno.EIO) from None
        finally:
            _caller_uid.reset(token)
            passing = _passing_fds.get()
            if passing is not None:
                _passing_fds.set(None)
                for fd in passing:
                    os.close(fd)

    return wrapper


def _pass_fd(fd: int) -> int:
    """``fd``, to be closed once the request being served is answered."""
    passing = _passing_fds.get()
    if passing is None:
        passing = []
        _passing_fds.set(passing)
    passing.append(fd)
    return fd


@dataclasses.dataclass(frozen=True)
class _Creds:
    """A caller's filesystem identity, taken on for the syscalls made for it.

    ``setfsuid``/``setfsgid`` and the raw ``setgroups`` syscall change the
    calling thread only, and pyfuse3 runs every handler on the trio thread,
    so a change around synchronous syscalls (no ``await`` in between)
    affects no other request and none of the replay threads, which stay
    root.  A non-zero fsuid drops the filesystem capabilities
    (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER...) until it is set back to 0;
    the others (CAP_SYS_ADMIN lists trusted.* xattrs, CAP_SYS_RESOURCE
    writes past quotas and reserved blocks) are dropped from the thread's
    effective set by :meth:`Overlay._acting`.  A uid-0 caller lacking some
    of the shim's capabilities keeps fsuid 0 and acts with its own.
    """

    uid: int
    gid: int
    groups: tuple[int, ...]
    # the effective capabilities acted with: none for a user; for a uid-0
    # caller without some of ours, its own (those within ours)
    caps: int = 0


def _root_caller_caps(tid: int) -> int:
    """The effective capabilities of task ``tid``, which made a request as uid 0.

    As for :func:`_caller_groups`: only if the task's own filesystem uid
    in /proc is 0 too (a request made with another task's ids gets none),
    and none if the task is gone: fewer rights, never more.
    """
    uid: list[bytes] = []
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key == b"Uid":
                    uid = value.split()
                elif key == b"CapEff":
                    # real, effective, saved, filesystem
                    return int(value, 16) if len(uid) == 4 and int(uid[3]) == 0 else 0
    except (OSError, ValueError):
        pass
    return 0


def _caller_groups(tid: int, uid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups of task ``tid``, which made a request as ``uid``/``gid``.

    The request gives the calling thread's id; its groups are only in
    /proc, and /proc shows a task's own credentials, not those a request
    may be made with: a kernel thread serving another machine (nfsd
    exporting the overlay) or a filesystem stacked on it acts with a
    client's fsuid and fsgid over its own groups, root's included.  So the
    groups count only if the task's filesystem ids there are the
    request's; otherwise, or if the task is gone, none: fewer rights,
    never more.  (A task whose request we are serving cannot exit, not even
    killed, until it has its answer, so its id is not someone else's yet.)
    """
    fields: dict[bytes, list[bytes]] = {}
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in (b"Uid", b"Gid", b"Groups"):
                    fields[key] = value.split()
                    if key == b"Groups":
                        break
    except OSError:
        return ()
    try:
        # real, effective, saved, filesystem
        if int(fields[b"Uid"][3]) != uid or int(fields[b"Gid"][3]) != gid:
            return ()
        return tuple(int(g) for g in fields[b"Groups"])
    except (KeyError, IndexError, ValueError):
        return ()


class _Inode:
    """One BACKING inode the kernel has looked up, and how to reach it.

    ``fd`` is an O_PATH fd on it, or None for an inode only listed by
    READDIRPLUS: a big directory would otherwise cost an fd per entry.  Such
    an inode is reached again through one of its ``links`` (a parent's fd and
    a name, no symlink followed) and must still be ``(dev, ino)``.
    """

    __slots__ = ("dev", "fd", "holder", "ino", "kind", "links", "lookups")

    def __init__(self, fd: int | None, st: os.stat_result) -> None:
        self.fd = fd
        # the uid whose request made us keep ``fd`` (0: root, or no request)
        self.holder = 0
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.kind = stat.S_IFMT(st.st_mode)
        self.lookups = 0
        # (parent inode, name) pairs seen: for path_of, and to reach an fd-less inode
        self.links: set[tuple[int, bytes]] = set()


@dataclasses.dataclass(frozen=True)
class _Version:
    """What tells one version of a BACKING file's data from another."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Version:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass
class _Dir:
    """An open directory: its fd, its inode, the opener, and where the fd is.

    A listing is BACKING's own, read a batch at a time as the kernel asks
    for it, with BACKING's offsets (``d_off`` cookies): they stay valid while
    BACKING changes as they do for a reader of BACKING itself, and nothing in
    proportion to the directory's size is ever held or done at once.
    """

    inode: int
    fd: int
    creds: _Creds | None
    # BACKING's offset the fd is at: a listing read in order never seeks
    # (a seek costs a walk from the start on some filesystems)
    pos: int = 0
    # set while a read of it in a thread runs
    reading: trio.Event | None = None


@dataclasses.dataclass
class _Handle:
    """An open file: its BACKING fd, its inode and the opener's identity.

    ``calls`` in worker threads use ``fd`` itself (a dup's close is a close
    too, which may wait: see :meth:`Overlay._close_later`); it is closed once
    the kernel released the handle and the last of them ended.
    """

    fd: int
    inode: int
    creds: _Creds | None
    calls: int = 0
    released: bool = False


class Overlay(pyfuse3.Operations):
    """A read-write passthrough of ``backing`` with synthetic replay handles."""

    # The kernel must not trust its own idea of size/mtime: BACKING changes
    # under us (other processes, other cluster nodes).
    enable_writeback_cache = False

    # POSIX ACLs: BACKING enforces them at every call made for a user, since
    # the call is made as that user.  Passed through to the kernel only with
    # ``acl=True`` (instance attribute, read by pyfuse3.init): the kernel then
    # honours ACLs that grant beyond the mode bits, and getfacl/setfacl work
    # through the overlay, but it asks for every file's ACL anew on every
    # getxattr (`ls -l` asks for each file: a round trip each).  Without it
    # the ACL xattrs answer EOPNOTSUPP, which `ls -l` remembers for the mount.
    enable_acl = False

    # flush is not implemented: writes reach BACKING at once, so a close has
    # nothing to report, and the ENOSYS answer makes the kernel stop sending
    # FLUSH at all: one request less for every close, replays included.

    def __init__(
        self, backing: str, threads: ReplayThreads, timeout: float = 1.0, *, acl: bool = False
    ) -> None:
        super().__init__()
        self.backing = os.path.realpath(backing)
        self.timeout = timeout
        self.enable_acl = acl
        self._hidden_xattrs = _HIDDEN_XATTRS if acl else _HIDDEN_XATTRS + _ACL_XATTRS
        self.replay_threads = threads
        _raise_fd_limit()
        # open files per non-root uid: one user holding every fd we may open
        # would leave every other user EMFILE
        self._user_handles: dict[int, int] = {}
        self._users_at_share: set[int] = set()
        # inode fds kept per non-root uid (see _hold): the kernel keeps what
        # one user looked up as long as it likes, so those are bounded too
        self._user_inode_fds: dict[int, int] = {}
        fd = os.open(self.backing, _PATH_FLAGS | os.O_DIRECTORY)
        st = os.fstat(fd)
        self._dev = st.st_dev
        self._root_ino = st.st_ino
        root = _Inode(fd, st)
        root.lookups = 1  # the kernel never forgets the root
        self._inodes: dict[int, _Inode] = {pyfuse3.ROOT_INODE: root}
        # our own groups and capabilities, restored after acting for a caller
        self._own_groups = tuple(os.getgroups())
        self._own_caps = libc.effective_caps()
        self._lease_waits = 0
        # calls that may wait, all users together: each holds a request task
        self._waiting = _WaitingCalls(_MAX_WAITING_CALLS)
        # ... each answered EINTR once its caller is killed
        self._killable = KillableCalls()
        # inode -> BACKING's _Version of it at the last open served from the
        # page cache: what the kernel's cached pages may hold (close-to-open)
        self._opened: dict[int, _Version] = {}
        # inode -> BACKING's _Version of it as last described to the kernel
        self._described: dict[int, _Version] = {}
        # directory handle (its fd) -> the open directory
        self._dirs: dict[int, _Dir] = {}
        # directory handle -> (offset, entries from it on) read but not sent
        self._read_ahead: collections.OrderedDict[int, tuple[int, list[tuple[bytes, int]]]] = (
            collections.OrderedDict()
        )
        self._listing_threads = _UserThreads(
            _LISTING_THREADS, _USER_LISTINGS, _MAX_PENDING_LISTINGS, self._waiting
        )
        self._data_threads = _UserThreads(
            _DATA_THREADS, _USER_DATA_CALLS, _MAX_PENDING_DATA_CALLS, self._waiting
        )
        # False once BACKING refused a read that does not wait (RWF_NOWAIT)
        self._nowait_reads = True
        self._handles: dict[int, _Handle] = {}
        self._closer = _Closer()
        self._replay_fhs: set[int] = set()
        self._next_replay_fh = _REPLAY_FH_BASE
        # devices or names of mounts under BACKING already logged
        self._warned_mounts: set[int | bytes] = set()

    # --- the caller's identity -----------------------------------------------

    def _creds(self, ctx: pyfuse3.RequestContext | None) -> _Creds | None:
        """Whom to act as: None for root (and for requests without a context)."""
        if ctx is None or (ctx.uid == 0 and ctx.pid <= 0):
            # no caller task (a request the kernel makes for itself)
            return None
        if ctx.uid == 0:
            # A uid-0 caller may lack capabilities (a container's root, a
            # service with an empty set): the kernel checks them on cached
            # attributes only, so it acts with its own, as a user does.
            # capget(2) of the caller answers the common case, a root with
            # all of ours, in one system call; /proc is read only otherwise.
            try:
                if libc.effective_caps(ctx.pid) & self._own_caps == self._own_caps:
                    return None
            except OSError:
                pass  # the task is gone: /proc says so, and it gets none
            caps = _root_caller_caps(ctx.pid) & self._own_caps
            if caps == self._own_caps:
                return None
            return _Creds(0, ctx.gid, _caller_groups(ctx.pid, 0, ctx.gid), caps)
        return _Creds(ctx.uid, ctx.gid, _caller_groups(ctx.pid, ctx.uid, ctx.gid))

    @contextlib.contextmanager
    def _acting(self, creds: _Creds | None) -> Iterator[None]:
        """Make the syscalls inside as ``creds`` (no ``await`` allowed inside)."""
        if creds is None:
            yield
            return
        try:
            libc.setgroups_thread(creds.groups)
            libc.setfsgid(creds.gid)
            libc.setfsuid(creds.uid)
            libc.set_effective_caps(creds.caps)
            yield
        finally:
            libc.set_effective_caps(self._own_caps)
            libc.setfsuid(0)
            libc.setfsgid(0)
            libc.setgroups_thread(self._own_groups)

    # --- inode table ---------------------------------------------------------

    def _fuse_ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self._root_ino else st_ino

    def _inode(self, inode: int) -> _Inode:
        try:
            return self._inodes[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def path_of(self, ino: int) -> str | None:
        """A BACKING path of inode ``ino`` if the kernel has looked it up.

        For finding a name to replay an access on (through the mount); the
        overlay itself never reaches BACKING by path.
        """
        names: list[str] = []
        cur = self._inodes.get(self._fuse_ino(ino))
        seen: set[int] = set()
        while cur is not None and cur is not self._inodes[pyfuse3.ROOT_INODE]:
            if not cur.links or cur.ino in seen or len(names) > 4096:
                return None
            seen.add(cur.ino)
            parent, name = min(cur.links)
            names.append(os.fsdecode(name))
            cur = self._inodes.get(parent)
        if cur is None:
            return None
        return os.path.join(self.backing, *reversed(names))

    def knows(self, st_ino: int) -> bool:
        """Whether the kernel holds an entry for BACKING inode ``st_ino``.

        Called from replay threads: one dict lookup, atomic under the GIL.
        """
        return self._fuse_ino(st_ino) in self._inodes

    def _remember(self, fd: int | None, st: os.stat_result, parent: int, name: bytes) -> int:
        """Count one lookup of the inode ``st`` describes; keeps at most one fd per inode."""
        ino = self._fuse_ino(st.st_ino)
        node = self._inodes.get(ino)
        if node is None:
            node = self._inodes[ino] = _Inode(None, st)
        elif node.fd is None:
            # an fd-less inode's number may have been freed and reused since
            node.kind = stat.S_IFMT(st.st_mode)
        if fd is not None and fd != node.fd and (node.fd is not None or not self._hold(node, fd)):
            os.close(fd)
        node.lookups += 1
        if ino != pyfuse3.ROOT_INODE:
            node.links.add((parent, name))
        return ino

    def _fd(self, node: _Inode, depth: int = 0) -> int:
        """The inode's O_PATH fd, reopened if it has none.

        The reopened fd is kept for the next calls if :meth:`_hold` allows,
        else closed once the request is answered.
        """
        if node.fd is not None:
            return node.fd
        fd = self._reopen(node, depth)
        if not self._hold(node, fd):
            _pass_fd(fd)
        return fd

    def _hold(self, node: _Inode, fd: int) -> bool:
        """Keep ``fd`` as ``node``'s inode fd, if the budgets allow; whether it is kept.

        Kept fds stay until the kernel forgets the inode, however many of
        them one user's lookups made: past the overlay's budget
        (:func:`_inode_fd_budget`), or past a quarter of it for the non-root
        user whose request this is, an inode is served without one.  Those
        open files others need stay free.
        """
        budget = _inode_fd_budget()
        if fd >= budget:
            # numbered lowest-free first: that many fds are open already
            return False
        uid = _caller_uid.get()
        if uid != 0:
            held = self._user_inode_fds.get(uid, 0)
            if held >= budget // _USER_SHARE_DIVISOR:
                return False
            self._user_inode_fds[uid] = held + 1
        node.fd = fd
        node.holder = uid
        return True

    def _release_fd(self, node: _Inode) -> None:
        """Close ``node``'s inode fd and free it from its holder's count."""
        if node.fd is None:
            return
        os.close(node.fd)
        node.fd = None
        if node.holder != 0:
            held = self._user_inode_fds.get(node.holder, 0) - 1
            if held > 0:
                self._user_inode_fds[node.holder] = held
            else:
                self._user_inode_fds.pop(node.holder, None)

    @contextlib.contextmanager
    def _path_fd(self, node: _Inode) -> Iterator[int]:
        """An O_PATH fd on ``node`` for one call; an fd-less inode stays fd-less."""
        if node.fd is not None:
            yield node.fd
            return
        fd = self._reopen(node)
        try:
            yield fd
        finally:
            os.close(fd)

    def _stat(self, node: _Inode) -> os.stat_result:
        """``node``'s attributes; for an fd-less one, one fstatat through a held parent."""
        if node.fd is not None:
            # the O_PATH fd holds the inode: this works for an unlinked open file too
            return os.fstat(node.fd)
        for parent_ino, name in sorted(node.links):
            parent = self._inodes.get(parent_ino)
            if parent is None or parent.fd is None:
                continue
            try:
                st = libc.lstat_cached(parent.fd, name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                return st
        with self._path_fd(node) as fd:
            return os.fstat(fd)

    def _reopen(self, node: _Inode, depth: int = 0) -> int:
        """Reach an fd-less inode again through a link; ESTALE if no link leads to it."""
        if depth > _MAX_DEPTH:
            raise FUSEError(errno.ELOOP)
        for parent_ino, name in sorted(node.links):
            parent = self._inodes.get(parent_ino)
            if parent is None:
                continue
            try:
                # directories are used as parents again and again: keep theirs
                fd = _open_here(self._fd(parent, depth + 1), name)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # not a stale link: out of fds
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                return fd
            os.close(fd)
        raise FUSEError(errno.ESTALE)

    def _open_path(self, parent: _Inode, name: bytes) -> tuple[int, os.stat_result]:
        """An O_PATH fd on ``name`` in ``parent``, on BACKING's filesystem only."""
        try:
            fd = _open_here(self._fd(parent), name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._not_crossed(name, None)
        try:
            st = os.fstat(fd)
            self._check_same_fs(st, name)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _not_crossed(self, name: bytes, dev: int | None) -> NoReturn:
        key = dev if dev is not None else name
        if key not in self._warned_mounts and len(self._warned_mounts) < 1024:
            self._warned_mounts.add(key)
            log.warning(
                "%r is a mount point under BACKING: not served (mounts are not crossed)",
                os.fsdecode(name),
            )
        raise FUSEError(errno.EOPNOTSUPP)

    def _check_same_fs(self, st: os.stat_result, name: bytes) -> None:
        if st.st_dev != self._dev:
            self._not_crossed(name, st.st_dev)
        if st.st_ino == pyfuse3.ROOT_INODE and st.st_ino != self._root_ino:
            # its number is taken by BACKING's root in the kernel's eyes
            log.warning("%r has inode number 1: not served", os.fsdecode(name))
            raise FUSEError(errno.EOPNOTSUPP)

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._fuse_ino(st.st_ino)
        entry.generation = 0
        entry.entry_timeout = self.timeout
        entry.attr_timeout = self.timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        self._described[entry.st_ino] = _Version.of(st)
        return entry

    def _lookup_entry(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        """Look ``name`` up in ``parent_inode`` (caller's rights already taken on)."""
        parent = self._inode(parent_inode)
        fd: int | None
        try:
            fd, st = self._open_path(parent, name)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # out of fds: serve it fd-less, reached through its parent when used
            st = libc.lstat_cached(self._fd(parent), name)
            self._check_same_fs(st, name)
            fd = None
        # kept within the budgets (_hold), else served fd-less
        self._remember(fd, st, parent_inode, name)
        return self._entry(st)

    # --- lookups -------------------------------------------------------------

    @fuse_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if self._announced_name(parent_inode, name, ctx):
            raise FUSEError(errno.ENOENT)
        if name == b"." or (name == b".." and parent_inode == pyfuse3.ROOT_INODE):
            # BACKING's root is its own parent: ".." never leads above it
            node = self._inode(parent_inode)
            node.lookups += 1
            with self._path_fd(node) as fd:
                return self._entry(os.fstat(fd))
        if name == b"..":
            # asked for with export support (NFS): answer only with an inode we hold
            with self._acting(self._creds(ctx)):
                fd, st = self._open_path(self._inode(parent_inode), name)
            os.close(fd)
            held = self._inodes.get(self._fuse_ino(st.st_ino))
            if held is None:
                raise FUSEError(errno.ENOENT)
            held.lookups += 1
            return self._entry(st)
        with self._acting(self._creds(ctx)):
            entry = self._lookup_entry(parent_inode, name)
        if ctx is not None and self.replay_threads.looked_up(entry.st_ino, ctx.pid):
            entry.entry_timeout = 0
        return entry

    def _announced_name(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None
    ) -> bool:
        """Whether a replay thread is announcing ``name`` (see replay._announce_dirs).

        To that thread the name does not exist yet, so that its ``mkdir``
        reaches us.
        """
        if ctx is None:
            return False
        what = self.replay_threads.announcing(ctx.pid)
        return what is not None and what.parent == parent_inode and what.name == name

    def _mkdir_announced(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        """A replay thread's ``mkdir``: BACKING's existing directory, as if just made."""
        fd, st = self._open_path(self._inode(parent_inode), name)
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise FUSEError(errno.ESTALE)
        self._remember(fd, st, parent_inode, name)
        entry = self._entry(st)
        # a watcher adding its watch then looks it up: the sign it did
        entry.entry_timeout = 0
        return entry

    @fuse_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            node = self._inodes.get(inode)
            if node is None:
                continue
            node.lookups -= nlookup
            if node.lookups > 0 or inode == pyfuse3.ROOT_INODE:
                continue
            del self._inodes[inode]
            self._opened.pop(inode, None)
            self._described.pop(inode, None)
            self._release_fd(node)

    @fuse_handler
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._stat(self._inode(inode)))

    @fuse_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        ifd = self._fd(node)
        handle = self._handles.get(fh) if fh is not None else None
        creds = self._creds(ctx)
        if fields.update_mode:
            if node.kind == stat.S_IFLNK:
                # Linux has no mode on symlinks (fchmodat refuses it too)
                raise FUSEError(errno.EOPNOTSUPP)
            mode = stat.S_IMODE(attr.st_mode)
            if _only_drops_setid(stat.S_IMODE(os.fstat(ifd).st_mode), mode) and self._may_write(
                ifd, creds
            ):
                # the kernel's own "kill suid/sgid" after a write, truncate or
                # chown by a non-owner (it skips the owner check for it):
                # BACKING would refuse the caller a chmod, and dropping
                # privilege is safe.  Only for one who may write the file: the
                # kernel checked ownership on attributes cached up to
                # --timeout, and the file may have changed hands since.
                with self._acting(None):
                    os.chmod(_proc(ifd), mode)
            else:
                with self._acting(creds):
                    if handle is not None:
                        os.fchmod(handle.fd, mode)
                    else:
                        os.chmod(_proc(ifd), mode)
        if fields.update_size:
            await self._truncate(node, ifd, handle, attr.st_size, creds, ctx.pid)
        with self._acting(creds):
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                flags = libc.AT_EMPTY_PATH | libc.AT_SYMLINK_NOFOLLOW
                libc.fchownat(ifd, b"", uid, gid, flags)
            if fields.update_atime or fields.update_mtime:
                self._utimens(node, ifd, attr, fields)
        return self._entry(os.fstat(ifd))

    def _may_write(self, fd: int, creds: _Creds | None) -> bool:
        """Whether BACKING lets ``creds`` write the inode ``fd`` holds, now."""
        with self._acting(creds):
            # AT_EACCESS: checked with the fsuid and groups taken on, not the real ids
            return os.access(_proc(fd), os.W_OK, effective_ids=True)

    async def _truncate(
        self,
        node: _Inode,
        ifd: int,
        handle: _Handle | None,
        size: int,
        creds: _Creds | None,
        caller: int,
    ) -> None:
        # In a thread, as a write: on scoutfs a change of size waits for
        # released data to be staged.  On our own fds, as a read's.
        if handle is not None:
            call = functools.partial(os.ftruncate, handle.fd, size)
            await self._handle_call(handle, creds, call, caller)
            return
        if node.kind != stat.S_IFREG:
            raise FUSEError(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
        await self._fd_call(creds, caller, os.dup(ifd), lambda fd: _truncate_inode(fd, size))

    @staticmethod
    def _utimens(
        node: _Inode, ifd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        now = time.time_ns()

        def spec(update: bool, ns: int) -> tuple[int, int]:
            if not update:
                return (0, libc.UTIME_OMIT)
            if abs(ns - now) < _NOW_SLACK_NS:
                return (0, libc.UTIME_NOW)
            return divmod(ns, 1_000_000_000)

        atime = spec(fields.update_atime, attr.st_atime_ns)
        mtime = spec(fields.update_mtime, attr.st_mtime_ns)
        if node.kind == stat.S_IFLNK:
            libc.utimensat(ifd, b"", atime, mtime, libc.AT_EMPTY_PATH)
        else:
            libc.utimensat(libc.AT_FDCWD, _proc(ifd), atime, mtime, 0)

    @fuse_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        # readlinkat with an empty name reads the symlink the fd holds
        with self._path_fd(self._inode(inode)) as fd:
            return os.readlink(b"", dir_fd=fd)

    # --- directories ---------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._inode(inode)
        creds = self._creds(ctx)
        self._check_share(creds)
        with self._acting(creds):
            fd = os.open(_proc(self._fd(node)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # the dir fd is unique while open: a handle number nobody else has
        self._dirs[fd] = _Dir(inode, fd, creds)
        # an open directory holds one of our fds too: counted in the user's share
        self._count_handle(creds, 1)
        return fd

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        ahead = self._read_ahead.pop(fh, None)
        if ahead is not None and ahead[0] == start_id:
            batch = ahead[1]
        else:
            batch = await self._next_entries(fh, d, start_id)
        # where the kernel asks next if this reply ends here, and what of the
        # batch it has not had then (entries left out are left out again)
        sent_at, unsent = start_id, 0
        # readdir gets no request context: the entries are the ones the
        # opener was allowed to list (opendir ran as them)
        while batch:
            for i, (name, next_offset) in enumerate(batch):
                if name in (b".", b".."):
                    continue
                try:
                    # asks a filesystem mounted here nothing: a hung one must
                    # not stop this thread (the entry is left out below)
                    st = libc.lstat_cached(d.fd, name)
                    self._check_same_fs(st, name)
                except (OSError, FUSEError):
                    continue  # removed on BACKING since it was read, or a nested mount
                # pyfuse3 answers READDIRPLUS: every entry sent is a lookup.  No
                # fd is taken: the entry is reached through this directory if used.
                if not pyfuse3.readdir_reply(token, name, self._entry(st), next_offset):
                    self._keep_ahead(fh, sent_at, batch[unsent:])
                    return
                self._remember(None, st, d.inode, name)
                sent_at, unsent = next_offset, i + 1
            if unsent:
                return
            # nothing of that batch could be sent: an empty reply would end the listing
            batch = await self._next_entries(fh, d, batch[-1][1])

    async def _next_entries(self, fh: int, d: _Dir, offset: int) -> list[tuple[bytes, int]]:
        """BACKING's entries of ``d`` from ``offset`` on, one batch, read in a thread.

        Reading a directory may wait for a disk or a server: never on the
        serving thread, where it would stop every user's calls.  A user's
        reads beyond their share wait for one of theirs to end, and beyond
        what may wait, they answer EAGAIN: none can hold every request
        pyfuse3 serves at once.
        """
        uid = d.creds.uid if d.creds is not None else 0

        async def run(hold: Hold) -> list[tuple[bytes, int]]:
            # the thread's own fd: it may go on after a killed caller's
            # answer, when RELEASEDIR has closed the directory's
            fd = os.dup(d.fd)
            hold.add(functools.partial(os.close, fd))
            # after a read given up (a killed caller's) has ended: a process
            # sharing the directory's fd reads on from where it left it
            while d.reading is not None:
                await d.reading.wait()
            reading = d.reading = trio.Event()
            hold.add(functools.partial(_read_ended, d, reading))
            read = functools.partial(_read_entries, d, fd, offset)
            return await self._listing_threads.run(uid, read, hold)

        # (the first READDIR of a listing is not always for offset 0: size unknown)
        return await self._killable.run(run, (fh, offset, -1))

    def _keep_ahead(self, fh: int, offset: int, entries: list[tuple[bytes, int]]) -> None:
        """Keep entries read but not sent for the next call, in a bounded table."""
        self._read_ahead[fh] = (offset, entries)
        if len(self._read_ahead) > _MAX_READ_AHEAD:
            # the oldest is read again from BACKING if its listing goes on
            self._read_ahead.popitem(last=False)

    @fuse_handler
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        self._read_ahead.pop(fh, None)
        if d is not None:
            os.close(d.fd)
            self._count_handle(d.creds, -1)

    @fuse_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        d = self._dirs[fh]
        await self._fd_call(d.creds, (fh, 0, 0), os.dup(d.fd), os.fsync)

    # --- namespace changes ---------------------------------------------------

    @staticmethod
    def _check_mode(mode: int, creds: _Creds | None) -> None:
        # Our thread keeps CAP_MKNOD whatever its fsuid: only root makes devices
        if creds is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise FUSEError(errno.EPERM)

    @fuse_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._announced_name(parent_inode, name, ctx):
            return self._mkdir_announced(parent_inode, name)
        if self.replay_threads.announcing(ctx.pid) is not None:
            # a replay thread (root) whose walk met another directory than
            # the one it announces (renamed on BACKING meanwhile): it never
            # makes a directory on BACKING
            raise FUSEError(errno.ESTALE)
        parent = self._inode(parent_inode)
        with self._acting(self._creds(ctx)):
            os.mkdir(name, mode & ~ctx.umask, dir_fd=self._fd(parent))
            return self._lookup_entry(parent_inode, name)

    @fuse_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        creds = self._creds(ctx)
        self._check_mode(mode, creds)
        with self._acting(creds):
            os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=self._fd(parent))
            return self._lookup_entry(parent_inode, name)

    @fuse_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        with self._acting(self._creds(ctx)):
            os.symlink(target, name, dir_fd=self._fd(parent))
            return self._lookup_entry(parent_inode, name)

    @fuse_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        parent = self._inode(new_parent_inode)
        with self._acting(self._creds(ctx)):
            # linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH, which a caller's
            # fsuid drops; following the magic link reaches the same inode
            os.link(
                _proc(self._fd(node)), new_name, dst_dir_fd=self._fd(parent), follow_symlinks=True
            )
            return self._lookup_entry(new_parent_inode, new_name)

    def _unlinked(self, parent_inode: int, name: bytes, st: os.stat_result) -> None:
        node = self._inodes.get(self._fuse_ino(st.st_ino))
        if node is not None:
            node.links.discard((parent_inode, name))

    @fuse_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        with self._acting(self._creds(ctx)):
            st = libc.lstat_cached(self._fd(parent), name)
            os.unlink(name, dir_fd=self._fd(parent))
        self._unlinked(parent_inode, name, st)

    @fuse_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        with self._acting(self._creds(ctx)):
            st = libc.lstat_cached(self._fd(parent), name)
            os.rmdir(name, dir_fd=self._fd(parent))
        self._unlinked(parent_inode, name, st)

    @fuse_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        with self._acting(self._creds(ctx)):
            st_old = libc.lstat_cached(self._fd(old_parent), name_old)
            try:
                st_new: os.stat_result | None = libc.lstat_cached(self._fd(new_parent), name_new)
            except FileNotFoundError:
                st_new = None
            libc.renameat2(self._fd(old_parent), name_old, self._fd(new_parent), name_new, flags)
        old_link = (parent_inode_old, name_old)
        new_link = (parent_inode_new, name_new)
        moved = self._inodes.get(self._fuse_ino(st_old.st_ino))
        other = self._inodes.get(self._fuse_ino(st_new.st_ino)) if st_new else None
        if other is not None:
            other.links.discard(new_link)
            if flags & pyfuse3.RENAME_EXCHANGE:
                other.links.add(old_link)
        if moved is not None:
            moved.links.discard(old_link)
            moved.links.add(new_link)

    # --- files ---------------------------------------------------------------

    def _file_info(self, inode: int, fd: int) -> pyfuse3.FileInfo:
        """How to answer an open of ``inode`` whose BACKING file is open as ``fd``.

        Close-to-open coherence, as NFS gives: the kernel keeps the pages it
        cached for ``inode`` only if BACKING's file is the version it was at
        the last open, so a reread of an unchanged file never reaches us and
        any change made on BACKING (by any process, on any node) is read in
        full by the next open.  The version includes ctime, which no caller
        can set back: a rewrite that restores size and mtime (``cp -p``,
        ``rsync -t``, ``tar -x``) still counts as a change.  It is taken here,
        never from GETATTR: a stat in between hands the kernel new attributes
        but leaves its pages.  Keeping pages is no permission hole: this open
        was made on BACKING with the caller's rights, and pages are only
        reached through an open file.
        """
        version = _Version.of(os.fstat(fd))
        changed = self._opened.get(inode) != version
        self._opened[inode] = version
        if self._described.get(inode) != version:
            # the kernel's size may be the old one too: make it ask again, so
            # a read after an append on BACKING gets all of it; a first open
            # right after its lookup costs no extra GETATTR
            # (OSError: the inode is not in the kernel's cache, nothing to drop)
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
        return pyfuse3.FileInfo(fh=fd, keep_cache=not changed)

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        expected = self.replay_threads.expected(ctx.pid)
        if expected is not None:
            return self._replay_open(inode, *expected)
        node = self._inode(inode)
        if node.kind != stat.S_IFREG:
            # devices and FIFOs are opened by the kernel itself, never here
            raise FUSEError(errno.EACCES)
        creds = self._creds(ctx)
        self._check_share(creds)
        if flags & os.O_TRUNC:
            # the kernel hands the open its O_TRUNC (atomic_o_trunc): a change
            # of size, which may wait as a truncate does (_truncate), so in a
            # thread as one; a lease's holder is waited for there too
            fd = await self._fd_call(
                creds,
                ctx.pid,
                os.dup(self._fd(node)),
                lambda path_fd: os.open(_proc(path_fd), _backing_flags(flags)),
                discard=os.close,
            )
        else:
            fd = await self._open_file(node, flags, creds, ctx.pid)
        try:
            info = self._file_info(inode, fd)
        except BaseException:
            os.close(fd)
            raise
        self._handles[fd] = _Handle(fd, inode, creds)
        self._count_handle(creds, 1)
        return info

    async def _open_file(self, node: _Inode, flags: int, creds: _Creds | None, caller: int) -> int:
        """Open ``node`` here, or in a thread if a lease's holder must be waited for."""
        try:
            with self._acting(creds):
                # O_NONBLOCK: an open that conflicts with a lease (any user
                # may take one on their own file) waits for its holder, up
                # to lease-break-time; never on this one serving thread
                fd = os.open(_proc(self._fd(node)), _backing_flags(flags) | os.O_NONBLOCK)
        except BlockingIOError:
            fd = await self._open_waiting(node, _backing_flags(flags), creds, caller)
        else:
            if not flags & os.O_NONBLOCK:
                try:
                    os.set_blocking(fd, True)
                except BaseException:
                    os.close(fd)
                    raise
        return fd

    def _check_share(self, creds: _Creds | None) -> None:
        """EMFILE for a user who holds their share of our open files already."""
        if creds is not None and (
            self._user_handles.get(creds.uid, 0) + self._closer.pending(creds.uid) >= _user_share()
        ):
            if creds.uid in self._users_at_share:
                raise FUSEError(errno.EMFILE)
            # once until the user closes some: a loop of opens is one line
            self._users_at_share.add(creds.uid)
            log.warning(
                "uid %d holds %d open files through the overlay, its share: EMFILE",
                creds.uid,
                _user_share(),
            )
            raise FUSEError(errno.EMFILE)

    def _count_handle(self, creds: _Creds | None, change: int) -> None:
        if creds is not None:
            held = self._user_handles.get(creds.uid, 0) + change
            if held > 0:
                self._user_handles[creds.uid] = held
            else:
                self._user_handles.pop(creds.uid, None)
            if held < _user_share():
                self._users_at_share.discard(creds.uid)

    async def _open_waiting(
        self, node: _Inode, flags: int, creds: _Creds | None, caller: int
    ) -> int:
        """Open ``node`` in a thread, where waiting for a lease's holder stops no one."""
        if self._lease_waits >= _MAX_LEASE_WAITS:
            raise FUSEError(errno.EAGAIN)
        # our own fd: a FORGET may close the inode's while the thread waits
        fd = os.dup(self._fd(node))

        def wait() -> int:
            with self._acting(creds):
                return os.open(_proc(fd), flags)

        async def run(hold: Hold) -> int:
            hold.add(functools.partial(os.close, fd))
            # counted until the thread ends, a killed caller's answered or not
            self._lease_waits += 1
            hold.add(self._lease_wait_ended)
            self._waiting.take(creds.uid if creds is not None else 0, hold)
            hold.discard = os.close
            return await thread(hold, wait)

        return await self._killable.run(run, caller)

    def _lease_wait_ended(self) -> None:
        self._lease_waits -= 1

    @fuse_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._inode(parent_inode)
        creds = self._creds(ctx)
        self._check_share(creds)
        base = _backing_flags(flags) | os.O_NOFOLLOW
        truncate = False
        with self._acting(creds):
            try:
                fd = os.open(
                    name, base | os.O_CREAT | os.O_EXCL, mode & ~ctx.umask, dir_fd=self._fd(parent)
                )
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                # its O_TRUNC is a change of size, which may wait: in a thread,
                # once it is open (as an open with O_TRUNC is, see open)
                truncate = bool(flags & os.O_TRUNC)
                # made on BACKING since the kernel's lookup: open it, but never
                # wait on a FIFO or open anything but a regular file.  Still
                # with O_CREAT (and the mode, should it be gone again): the
                # kernel then refuses, as it would this user on BACKING, a
                # file or FIFO of another's in a sticky directory
                # (protected_regular, protected_fifos)
                fd = libc.openat2(
                    self._fd(parent),
                    name,
                    (base & ~os.O_TRUNC) | os.O_CREAT | os.O_NONBLOCK,
                    libc.RESOLVE_NO_XDEV,
                    mode & ~ctx.umask,
                )
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise FUSEError(errno.EEXIST)
                    if not flags & os.O_NONBLOCK:
                        os.set_blocking(fd, True)
                except BaseException:
                    os.close(fd)
                    raise
        try:
            if truncate:
                # the thread's own fd: it may go on after a killed caller's
                # answer, when this one is closed
                await self._fd_call(creds, ctx.pid, os.dup(fd), lambda f: _truncate_inode(f, 0))
            st = os.fstat(fd)
            # the inode's own O_PATH fd, from the open file itself: no second lookup
            pfd = os.open(_proc(fd), _PATH_FLAGS & ~os.O_NOFOLLOW)
        except BaseException:
            os.close(fd)
            raise
        ino = self._remember(pfd, st, parent_inode, name)
        entry = self._entry(st)
        self._handles[fd] = _Handle(fd, ino, creds)
        self._count_handle(creds, 1)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @fuse_handler
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        # any buffer will do (pyfuse3 replies from its buffer protocol; its
        # stub says bytes): the data read at hand is not copied again
        if fh in self._replay_fhs:
            return _SYNTHETIC_BYTE
        if self._nowait_reads:
            data = self._read_at_hand(fh, off, size)
            if data is not None:
                return data
        handle = self._handles[fh]
        call = functools.partial(os.pread, fh, size, off)
        return await self._handle_call(handle, handle.creds, call, (fh, off, size))

    def _read_at_hand(self, fh: int, off: int, size: int) -> memoryview | None:
        """The data, if BACKING has all of it in memory; None if it may have to wait.

        A read of data BACKING must fetch may wait for long: a disk, a
        server, another node's lock, or on scoutfs a file whose data was
        released (any user may release their own), until something stages
        it back.  That must not happen on this one serving thread.
        """
        buf = bytearray(size)
        try:
            n = os.preadv(fh, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            # BACKING's filesystem has no such reads (scoutfs): always in threads
            log.info("BACKING cannot read without waiting (RWF_NOWAIT): reads go to threads")
            self._nowait_reads = False
            return None
        # a short read is the end of the file, or all BACKING had at hand
        if n < size and off + n < os.fstat(fh).st_size:
            return None
        return memoryview(buf)[:n]

    async def _data_call(self, creds: _Creds | None, call: Callable[[], R], hold: Hold) -> R:
        """``call()`` as ``creds`` in a thread, where waiting for BACKING stops no one else.

        A user's calls past their share wait for one of theirs to end, and
        past what may wait they answer EAGAIN.
        """

        def acting() -> R:
            # the thread's own fsuid, groups and capabilities (all per thread)
            with self._acting(creds):
                return call()

        return await self._data_threads.run(creds.uid if creds is not None else 0, acting, hold)

    @fuse_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._replay_fhs:
            raise FUSEError(errno.EBADF)
        # as the opener: BACKING clears set-user-ID bits on a write by anyone
        # without CAP_FSETID, which a root write would keep.  In a thread:
        # a write may wait as a read does (scoutfs waits for released data
        # to be staged before any write), and buffered writes that never
        # wait (RWF_NOWAIT) are refused by most filesystems.
        handle = self._handles[fh]
        call = functools.partial(os.pwrite, fh, buf, off)
        return await self._handle_call(handle, handle.creds, call, (fh, off, len(buf)))

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._replay_fhs:
            return
        # in a thread: it waits for the disk to take all the file's dirty
        # data (seconds for a big file), or for another node (scoutfs)
        handle = self._handles[fh]
        call = functools.partial(os.fdatasync if datasync else os.fsync, fh)
        await self._handle_call(handle, handle.creds, call, (fh, 0, 0))

    @fuse_handler
    async def release(self, fh: int) -> None:
        if fh in self._replay_fhs:
            self._replay_fhs.discard(fh)
            return
        handle = self._handles.pop(fh, None)
        if handle is None:
            os.close(fh)
            return
        handle.released = True
        if not handle.calls:
            self._close_later(handle)

    async def _handle_call(
        self, handle: _Handle, creds: _Creds | None, call: Callable[[], R], caller: Caller
    ) -> R:
        """:meth:`_data_call` on ``handle``'s fd, which stays open until it ends
        (a killed caller's answered or not)."""

        async def run(hold: Hold) -> R:
            handle.calls += 1
            hold.add(functools.partial(self._handle_call_ended, handle))
            return await self._data_call(creds, call, hold)

        return await self._killable.run(run, caller)

    def _handle_call_ended(self, handle: _Handle) -> None:
        handle.calls -= 1
        if handle.released and not handle.calls:
            self._close_later(handle)

    async def _fd_call(
        self,
        creds: _Creds | None,
        caller: Caller,
        fd: int,
        call: Callable[[int], R],
        discard: Callable[[R], None] | None = None,
    ) -> R:
        """:meth:`_data_call` of ``call(fd)``; ``fd`` is closed once it ends (a killed
        caller's answered or not), and ``discard`` is given a result come too late."""

        async def run(hold: Hold) -> R:
            hold.add(functools.partial(os.close, fd))
            hold.discard = discard
            return await self._data_call(creds, functools.partial(call, fd), hold)

        return await self._killable.run(run, caller)

    def _close_later(self, handle: _Handle) -> None:
        """Close ``handle``'s fd in a thread, where a close that waits stops no one.

        A close may wait: a network filesystem writes the file's dirty data
        back (FLUSH on a FUSE one), the last close of a file unlinked
        meanwhile frees its data (on scoutfs, under a cluster lock).  The
        RELEASE is answered at once (nobody waits for it); the fd counts in
        the opener's share of open files until it is closed (_check_share).
        """
        uid = handle.creds.uid if handle.creds is not None else 0
        self._closer.close(uid, handle.fd)
        self._count_handle(handle.creds, -1)

    # --- replays: the one place that serves without opening a file ------------

    def _replay_open(self, inode: int, expected: int, backing_path: str) -> pyfuse3.FileInfo:
        """Answer a replay thread's open of ``inode`` with a synthetic handle.

        The name the replay thread opened may lead to another file now
        (renamed or replaced on BACKING, or the kernel's dentry is older than
        that): an event on it would be a lie, so ESTALE unless
        ``backing_path`` leads, without following a symlink, to ``expected``,
        a regular file.  The file is never opened.
        """
        node = self._inodes.get(inode)
        if self._fuse_ino(expected) != inode or node is None or node.kind != stat.S_IFREG:
            raise FUSEError(errno.ESTALE)
        if self._walk(backing_path) != (node.dev, node.ino):
            raise FUSEError(errno.ESTALE)
        fh = self._next_replay_fh
        self._next_replay_fh += 1
        self._replay_fhs.add(fh)
        # keep_cache: a synthetic open must not drop real readers' pages;
        # direct_io: our 1-byte reply must not shrink the cached size.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=True)

    def _walk(self, backing_path: str) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of ``backing_path``, reached from BACKING's root in one
        ``openat2``: no symlink followed on the way or at the end, no mount crossed,
        never above the root (three syscalls for any depth: on the replay's path)."""
        prefix = self.backing.rstrip("/") + "/"
        if not backing_path.startswith(prefix):
            return None
        root = self._fd(self._inodes[pyfuse3.ROOT_INODE])
        try:
            st = libc.stat_beneath(root, backing_path[len(prefix) :])
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino)

    # --- the rest ------------------------------------------------------------

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(_proc(self._fd(self._inodes[pyfuse3.ROOT_INODE])))
        out = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, field, getattr(st, field))
        return out

    @contextlib.contextmanager
    def _xattr_path(self, inode: int, name: bytes = b"") -> Iterator[str]:
        if name.startswith(self._hidden_xattrs):
            raise FUSEError(errno.EOPNOTSUPP)
        node = self._inode(inode)
        if node.kind == stat.S_IFLNK:
            # no way to reach a symlink's own xattrs through its fd (the magic
            # link would follow it); Linux allows only trusted.* there anyway
            raise FUSEError(errno.EOPNOTSUPP)
        with self._path_fd(node) as fd:
            yield _proc(fd)

    @fuse_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with self._xattr_path(inode, name) as path, self._acting(self._creds(ctx)):
            return os.getxattr(path, name)

    @fuse_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        with self._xattr_path(inode, name) as path, self._acting(self._creds(ctx)):
            os.setxattr(path, name, value)

    @fuse_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        with self._xattr_path(inode) as path, self._acting(self._creds(ctx)):
            names = [os.fsencode(n) for n in os.listxattr(path)]
        return [n for n in names if not n.startswith(self._hidden_xattrs)]

    @fuse_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with self._xattr_path(inode, name) as path, self._acting(self._creds(ctx)):
            os.removexattr(path, name)


def _truncate_inode(fd: int, size: int) -> None:
    # in a worker thread: through an fd on the very inode (any kind, O_PATH
    # too); O_NONBLOCK: never wait for a lease's holder
    wfd = os.open(_proc(fd), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.ftruncate(wfd, size)
    finally:
        os.close(wfd)


def _read_ended(d: _Dir, reading: trio.Event) -> None:
    d.reading = None
    reading.set()


def _read_entries(d: _Dir, fd: int, offset: int) -> list[tuple[bytes, int]]:
    # in a worker thread, on a dup of d.fd (its offset); one at a time (d.reading)
    if d.pos != offset:
        os.lseek(fd, offset, os.SEEK_SET)
        d.pos = offset
    entries = libc.getdents(fd, _LISTING_BATCH)
    if entries:
        d.pos = entries[-1][1]
    return entries


class _Closer:
    """Closes fds in a thread per user, each in turn: a close that never ends
    holds its user's thread and fds only.

    Called from the serving thread; the threads end once idle for
    ``_CLOSER_LINGER`` seconds (a thread a close costs a burst of them
    nothing).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # uid -> fds to close, while its thread runs
        self._queues: dict[int, queue.SimpleQueue[int]] = {}
        # uid -> fds handed over and not yet closed
        self._pending: dict[int, int] = {}

    def pending(self, uid: int) -> int:
        """``uid``'s fds not closed yet (one dict lookup: no lock needed)."""
        return self._pending.get(uid, 0)

    def close(self, uid: int, fd: int) -> None:
        """Close ``fd`` in ``uid``'s thread, after those handed over before."""
        with self._lock:
            self._pending[uid] = self._pending.get(uid, 0) + 1
            fds = self._queues.get(uid)
            start = fds is None
            if fds is None:
                fds = self._queues[uid] = queue.SimpleQueue()
            # under the lock: the thread ends only with nothing put
            fds.put(fd)
        if start:
            threading.Thread(
                target=self._run, args=(uid, fds), name=f"overlay-close-{uid}", daemon=True
            ).start()

    def _run(self, uid: int, fds: queue.SimpleQueue[int]) -> None:
        while True:
            try:
                fd = fds.get(timeout=_CLOSER_LINGER)
            except queue.Empty:
                with self._lock:
                    if fds.empty():
                        del self._queues[uid]
                        return
                continue
            try:
                os.close(fd)
            except OSError as exc:
                log.warning("closing a file on BACKING: %s", exc)
            with self._lock:
                left = self._pending[uid] - 1
                if left:
                    self._pending[uid] = left
                else:
                    del self._pending[uid]


class _WaitingCalls:
    """Calls that may wait, all users together; EAGAIN past ``limit``.

    Each holds one of the request tasks pyfuse3 serves with until it ends
    (:data:`REQUEST_TASKS`); the limit leaves some for the calls that never
    wait, so that someone always reads /dev/fuse.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._warned = False

    def take(self, uid: int, hold: Hold) -> None:
        """One waiting call of ``uid``'s, given back with ``hold``; EAGAIN at the
        limit, or for a user other than root at the limit less root's own share."""
        if self.count >= self.limit - (_ROOT_WAITING_CALLS if uid != 0 else 0):
            if not self._warned:
                # once until half of them ended: a flood of calls is one line
                self._warned = True
                log.warning("%d calls wait on BACKING: more answer EAGAIN", self.count)
            raise FUSEError(errno.EAGAIN)
        self.count += 1
        hold.add(self._give_back)

    def _give_back(self) -> None:
        self.count -= 1
        if self.count <= self.limit // 2:
            self._warned = False


class _UserThreads:
    """Worker threads shared by every user, a few per user at once.

    A user's calls past ``per_user`` wait for one of theirs to end, and past
    ``max_pending`` they answer EAGAIN: no user can take every waiting call
    (``waiting``) with calls that never end, and past ``waiting``'s limit,
    all users together, they answer EAGAIN too.
    """

    def __init__(
        self, threads: int, per_user: int, max_pending: int, waiting: _WaitingCalls
    ) -> None:
        self._threads = trio.CapacityLimiter(threads)
        self._per_user = per_user
        self._max_pending = max_pending
        self._waiting = waiting
        # uid -> the limiter its calls hold or wait for, while any do
        self._users: dict[int, trio.CapacityLimiter] = {}

    async def run(self, uid: int, call: Callable[[], R], hold: Hold) -> R:
        """``call()`` in one of the threads, holding what it takes in ``hold``."""
        limiter = self._users.get(uid)
        if limiter is None:
            limiter = self._users[uid] = trio.CapacityLimiter(self._per_user)
        hold.add(functools.partial(self._user_done, uid, limiter))
        if _pending(limiter) >= self._max_pending:
            raise FUSEError(errno.EAGAIN)
        self._waiting.take(uid, hold)
        # a token each call, which its thread may hold past its request
        token = object()
        await limiter.acquire_on_behalf_of(token)
        hold.add(functools.partial(limiter.release_on_behalf_of, token))
        return await thread(hold, call, self._threads)

    def _user_done(self, uid: int, limiter: trio.CapacityLimiter) -> None:
        # (at shutdown every waiter is cancelled at once: the first ends it)
        if not _pending(limiter) and self._users.get(uid) is limiter:
            del self._users[uid]


def _pending(limiter: trio.CapacityLimiter) -> int:
    """Tasks holding or waiting for ``limiter`` (a token is handed on at release)."""
    st = limiter.statistics()
    return st.borrowed_tokens + st.tasks_waiting


def _inode_fd_budget() -> int:
    # Inode fds may take all but this share of the open-file limit: the rest
    # is for the synthetic opens (up to the replayer's max_open, 512), the
    # replay's and _walk's passing fds, and the files users hold open.
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _FD_LIMIT
    return soft - max(soft // _FD_RESERVE_SHARE, _FD_RESERVE_MIN)


def _user_share() -> int:
    # read each time, as the budget: an admin's prlimit applies at once
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = _FD_LIMIT
    return max(_MIN_USER_SHARE, soft // _USER_SHARE_DIVISOR)


def _raise_fd_limit() -> None:
    # One O_PATH fd per inode the kernel looked up.  Root may raise the hard
    # limit up to fs.nr_open unless its capabilities are bounded (a
    # container); then the soft limit goes up to the hard one.  Past the
    # limit a lookup is served fd-less, and a call that needs an fd it cannot
    # open fails with EMFILE; the shim goes on serving.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _FD_LIMIT
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            want = min(want, int(f.read()))
    except (OSError, ValueError):
        want = hard
    if hard == resource.RLIM_INFINITY or want <= hard:
        want = hard
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        except (OSError, ValueError):
            continue
        log.debug("open-file limit: %d", limit)
        return
    log.warning("cannot raise the open-file limit: stays %d", soft)
