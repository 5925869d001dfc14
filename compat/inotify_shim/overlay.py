"""The passthrough overlay: every request is served from BACKING as root.

The shape follows pyfuse3's ``examples/passthroughfs.py``: private tables
built in ``__init__``, lookup counts released by ``forget``, and one mapping
from ``OSError`` to ``FUSEError`` (:func:`_fuse_errors`).  Differences, and
why:

- ``default_permissions`` is always on, so the kernel checks every access
  against the mode bits we report; the server then acts as root.  Files and
  directories created through the overlay are chowned to the caller.
- One backing fd per open (passthroughfs shares one per inode, with the flags
  of whichever open came first).
- Final path components are opened with ``O_NOFOLLOW``: a file swapped for a
  symlink on BACKING after the kernel's permission check must not lead out.
- Synthetic opens made by the replay threads (:mod:`.replay`) are recognised
  by the caller's thread id, never touch BACKING and are served one byte with
  ``direct_io``; real opens get ``keep_cache`` unless the backing file changed
  since we last described it, in which case its cached attributes and pages
  are dropped so a read right after an append on BACKING sees all the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import itertools
import logging
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .replay import ReplayThreads

__all__ = ["Overlay"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Synthetic handles live far above any fd number, so read/release (which get
# no request context) can tell them from the backing fds real handles carry.
_REPLAY_FH_BASE = 1 << 48

# One byte is enough for the kernel to raise IN_ACCESS (even on an empty file)
_SYNTHETIC_BYTE = b"\0"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def _backing_flags(flags: int) -> int:
    # O_DIRECT is the kernel's business between the caller and the overlay:
    # our reads go through Python buffers, which O_DIRECT would refuse.
    return (flags & ~os.O_DIRECT) | os.O_NOFOLLOW | os.O_CLOEXEC


def _fuse_errors(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn an OSError from BACKING into the same errno for the caller."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    return wrapper


class Overlay(pyfuse3.Operations):
    """A read-write passthrough of ``backing`` with synthetic replay handles."""

    # The kernel must not trust its own idea of size/mtime: BACKING changes
    # under us (other processes, other cluster nodes).
    enable_writeback_cache = False

    # The kernel enforces POSIX ACLs too, reading them through getxattr, so
    # an ACL that refuses a user on BACKING refuses them here.
    enable_acl = True

    # flush is not implemented: writes reach BACKING at once, so a close has
    # nothing to report, and the ENOSYS answer makes the kernel stop sending
    # FLUSH at all: one request less for every close, replays included.

    def __init__(self, backing: str, threads: ReplayThreads, timeout: float = 1.0) -> None:
        super().__init__()
        self.backing = os.path.realpath(backing)
        self.timeout = timeout
        self.replay_threads = threads
        self._root_ino = os.lstat(self.backing).st_ino
        # inode -> backing path, or a set of paths for hard links
        self._paths: dict[int, str | set[str]] = {pyfuse3.ROOT_INODE: self.backing}
        self._lookups: defaultdict[int, int] = defaultdict(int)
        # inode -> (size, mtime_ns) as last reported to the kernel
        self._described: dict[int, tuple[int, int]] = {}
        # directory handle -> (inode, entries snapshot taken at offset 0)
        self._dirs: dict[int, tuple[int, list[str]]] = {}
        self._dir_fhs = itertools.count(1)
        self._replay_fhs: set[int] = set()
        # real handles: backing fd -> inode, so an unlinked open file still has attributes
        self._fd_inodes: dict[int, int] = {}
        self._next_replay_fh = itertools.count(_REPLAY_FH_BASE)

    # --- inode table ---------------------------------------------------------

    def path_of(self, ino: int) -> str | None:
        """A backing path of inode ``ino`` if the kernel has looked it up."""
        if ino == self._root_ino:
            ino = pyfuse3.ROOT_INODE
        val = self._paths.get(ino)
        if isinstance(val, set):
            return min(val)
        return val

    def _path(self, inode: int) -> str:
        path = self.path_of(inode)
        if path is None:
            raise FUSEError(errno.ENOENT)
        return path

    def _child(self, inode_p: int, name: bytes) -> str:
        return os.path.join(self._path(inode_p), os.fsdecode(name))

    def _add_path(self, inode: int, path: str) -> None:
        self._lookups[inode] += 1
        val = self._paths.get(inode)
        if val is None:
            self._paths[inode] = path
        elif isinstance(val, set):
            val.add(path)
        elif val != path:
            self._paths[inode] = {val, path}

    def _drop_path(self, inode: int, path: str) -> None:
        # An inode's last path stays until forget: the kernel may still ask
        # about it, and a stale path fails cleanly with ENOENT.
        val = self._paths.get(inode)
        if isinstance(val, set):
            val.discard(path)
            if len(val) == 1:
                self._paths[inode] = next(iter(val))

    def _moved(self, old: str, new: str) -> None:
        """Rewrite every known path under ``old`` (a renamed file or tree)."""
        prefix = old + os.sep
        for inode, val in self._paths.items():
            paths = val if isinstance(val, set) else {val}
            if not any(p == old or p.startswith(prefix) for p in paths):
                continue
            fixed = {
                new + p[len(old) :] if (p == old or p.startswith(prefix)) else p for p in paths
            }
            self._paths[inode] = fixed if len(fixed) > 1 else next(iter(fixed))

    def _fuse_ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self._root_ino else st_ino

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
        self._described[entry.st_ino] = (st.st_size, st.st_mtime_ns)
        return entry

    # --- lookups -------------------------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            # asked for with export support (NFS); BACKING's root is its own parent
            parent = self._path(parent_inode)
            path = parent if parent == self.backing else os.path.dirname(parent)
        else:
            path = self._child(parent_inode, name)
        entry = self._entry(os.lstat(path))
        # every reply is a lookup the kernel counts, "." and ".." included
        self._add_path(entry.st_ino, path)
        return entry

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            if self._lookups[inode] > nlookup:
                self._lookups[inode] -= nlookup
                continue
            self._lookups.pop(inode, None)
            self._described.pop(inode, None)
            if inode != pyfuse3.ROOT_INODE:
                self._paths.pop(inode, None)

    @_fuse_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(os.lstat(self._path(inode)))
        except FileNotFoundError:
            # unlinked while open: the kernel still asks (fstat on an fd)
            fd = next((fd for fd, ino in self._fd_inodes.items() if ino == inode), None)
            if fd is None:
                raise
            return self._entry(os.fstat(fd))

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        target: int | str = self._path(inode) if fh is None or fh in self._replay_fhs else fh
        follow = not isinstance(target, str)
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode), follow_symlinks=follow)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            old = os.stat(target, follow_symlinks=follow)
            atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
        return self._entry(os.lstat(self._path(inode)))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    # --- directories ---------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)
        fh = next(self._dir_fhs)
        self._dirs[fh] = (inode, [])
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, names = self._dirs[fh]
        path = self._path(inode)
        if start_id == 0:
            # Snapshot once so offsets stay stable while BACKING changes.
            names = sorted(os.listdir(path))
            self._dirs[fh] = (inode, names)
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                entry = self._entry(os.lstat(child))
            except FileNotFoundError:
                continue  # removed on BACKING since the snapshot
            # pyfuse3 answers READDIRPLUS: every entry sent is a lookup
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), entry, i + 1):
                break
            self._add_path(entry.st_ino, child)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(self._dirs[fh][0]), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- namespace changes ---------------------------------------------------

    def _created(self, path: str, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        entry = self._entry(os.lstat(path))
        self._add_path(entry.st_ino, path)
        return entry

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        return self._created(path, ctx)

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        return self._created(path, ctx)

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(os.fsdecode(target), path)
        return self._created(path, ctx)

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        entry = self._entry(os.lstat(path))
        self._add_path(entry.st_ino, path)
        return entry

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        ino = os.lstat(path).st_ino
        os.unlink(path)
        self._drop_path(ino, path)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        ino = os.lstat(path).st_ino
        os.rmdir(path)
        self._drop_path(ino, path)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags:
            _renameat2(old, new, flags)
        else:
            os.rename(old, new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            tmp = old + "\0"
            self._moved(old, tmp)
            self._moved(new, old)
            self._moved(tmp, new)
        elif stat.S_ISDIR(os.lstat(new).st_mode):
            self._moved(old, new)
        else:
            # a file: only its own entry changes, no need to scan the table
            ino = os.lstat(new).st_ino
            val = self._paths.get(ino)
            if isinstance(val, set):
                val.discard(old)
                val.add(new)
            elif val == old:
                self._paths[ino] = new

    # --- files ---------------------------------------------------------------

    def _file_info(self, inode: int, fd: int) -> pyfuse3.FileInfo:
        # Drop cached attributes and pages only when BACKING changed since we
        # last described the file: a read after an append there gets it all,
        # and an unchanged file keeps its page cache across opens.  (The 6.18
        # kernel these tests ran on revalidates at open by itself as well; this
        # makes close-to-open coherence independent of that.)
        st = os.fstat(fd)
        changed = self._described.get(inode) != (st.st_size, st.st_mtime_ns)
        if changed:
            self._described[inode] = (st.st_size, st.st_mtime_ns)
            # FileNotFoundError: not in the kernel's cache, nothing to drop
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
        return pyfuse3.FileInfo(fh=fd, keep_cache=not changed)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        expected = self.replay_threads.expected(ctx.pid)
        if expected is not None:
            return self._open_synthetic(inode, *expected)
        try:
            fd = os.open(self._path(inode), _backing_flags(flags))
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        try:
            info = self._file_info(inode, fd)
            self._fd_inodes[fd] = inode
            return info
        except OSError as exc:
            os.close(fd)
            raise FUSEError(exc.errno or errno.EIO) from None

    def _open_synthetic(self, inode: int, expected: int, backing_path: str) -> pyfuse3.FileInfo:
        # The name the replay thread opened may lead to another file now
        # (renamed or replaced on BACKING, or the kernel's dentry is older
        # than that): an event on it would be a lie.
        try:
            current = os.lstat(backing_path).st_ino
        except OSError:
            current = None
        if self._fuse_ino(expected) != inode or current != expected:
            raise FUSEError(errno.ESTALE)
        fh = next(self._next_replay_fh)
        self._replay_fhs.add(fh)
        # keep_cache: a synthetic open must not drop real readers' pages;
        # direct_io: our 1-byte reply must not shrink the cached size.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=True)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        try:
            path = self._child(parent_inode, name)
            open_flags = _backing_flags(flags) | os.O_CREAT
            try:
                fd = os.open(path, open_flags | os.O_EXCL, mode & ~ctx.umask)
                created = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = os.open(path, open_flags & ~os.O_CREAT)
                created = False
            try:
                if created:
                    os.fchown(fd, ctx.uid, ctx.gid)
                entry = self._entry(os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        self._add_path(entry.st_ino, path)
        self._fd_inodes[fd] = entry.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._replay_fhs:
            return _SYNTHETIC_BYTE
        return os.pread(fh, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._replay_fhs:
            raise FUSEError(errno.EBADF)
        return os.pwrite(fh, buf, off)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._replay_fhs:
            return
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        if fh in self._replay_fhs:
            self._replay_fhs.discard(fh)
            return
        self._fd_inodes.pop(fh, None)
        os.close(fh)

    # --- the rest ------------------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.backing)
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

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @_fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._path(inode), name, follow_symlinks=False)
