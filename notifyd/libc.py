"""The one binding to the C library: system calls Python's ``os`` lacks.

Every function raises ``OSError`` with the C ``errno`` on failure, like
``os`` does, so callers handle named errnos and nothing else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Sequence

__all__ = [
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_SYMLINK_NOFOLLOW",
    "RESOLVE_BENEATH",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "UTIME_NOW",
    "UTIME_OMIT",
    "effective_caps",
    "fanotify_init",
    "fanotify_mark",
    "fchownat",
    "getdents",
    "inotify_add_watch",
    "inotify_init1",
    "ioctl",
    "keep_heap",
    "lstat_cached",
    "openat2",
    "renameat2",
    "set_effective_caps",
    "setfsgid",
    "setfsuid",
    "setgroups_thread",
    "stat_beneath",
    "umount2",
    "utimensat",
]

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# x86_64 system call number: glibc's setgroups() changes every thread of the
# process (its setxid broadcast); the raw call changes the calling thread only.
_SYS_SETGROUPS = 116
_SYS_OPENAT2 = 437
_SYS_GETDENTS64 = 217
# _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_CAP_VERSION_3 = 0x20080522

# None: the symbols of the running process, which links the C library.
_libc = ctypes.CDLL(None, use_errno=True)

_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int
# setfsuid/setfsgid are per-thread in glibc (no setxid broadcast)
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.setfsgid.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.fchownat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_int,
]
_libc.fchownat.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.utimensat.restype = ctypes.c_int


def _check(ret: int, what: object = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        if what is None:
            raise OSError(err, os.strerror(err))
        raise OSError(err, os.strerror(err), what)
    return ret


def ioctl(fd: int, request: int, arg: ctypes.c_void_p | int | None) -> int:
    """``ioctl(2)`` with a pointer (or integer) argument; returns its result."""
    return _check(_libc.ioctl(fd, request, arg))


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """``fanotify_init(2)``: a new fanotify group's fd."""
    return _check(_libc.fanotify_init(flags, event_f_flags))


def fanotify_mark(fan_fd: int, flags: int, mask: int, dirfd: int, path: str | bytes) -> None:
    """``fanotify_mark(2)``."""
    _check(_libc.fanotify_mark(fan_fd, flags, mask, dirfd, os.fsencode(path)), path)


def inotify_init1(flags: int) -> int:
    """``inotify_init1(2)``: a new inotify instance's fd."""
    return _check(_libc.inotify_init1(flags))


def inotify_add_watch(fd: int, path: str | bytes | os.PathLike[str], mask: int) -> int:
    """``inotify_add_watch(2)``: the watch descriptor."""
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), path)


def umount2(path: str | bytes, flags: int) -> None:
    """``umount2(2)``."""
    _check(_libc.umount2(os.fsencode(path), flags), path)


def renameat2(olddirfd: int, old: str | bytes, newdirfd: int, new: str | bytes, flags: int) -> None:
    """``renameat2(2)``: ``os.rename`` with dir fds and ``RENAME_*`` flags."""
    _check(_libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags), old)


def setfsuid(uid: int) -> None:
    """``setfsuid(2)`` for the calling thread; raises EPERM if it did not take."""
    _libc.setfsuid(uid)
    # the call reports the previous id, never an error: read the id back
    if _libc.setfsuid(0xFFFFFFFF) != uid:
        raise OSError(errno.EPERM, f"setfsuid({uid}) did not take")


def setfsgid(gid: int) -> None:
    """``setfsgid(2)`` for the calling thread; raises EPERM if it did not take."""
    _libc.setfsgid(gid)
    if _libc.setfsgid(0xFFFFFFFF) != gid:
        raise OSError(errno.EPERM, f"setfsgid({gid}) did not take")


def setgroups_thread(groups: Sequence[int]) -> None:
    """The calling thread's supplementary groups (raw ``setgroups(2)``)."""
    arr = (ctypes.c_uint * len(groups))(*groups)
    _check(_libc.syscall(_SYS_SETGROUPS, ctypes.c_size_t(len(groups)), arr))


def fchownat(dirfd: int, path: str | bytes, uid: int, gid: int, flags: int) -> None:
    """``fchownat(2)``; -1 leaves an id unchanged; takes ``AT_EMPTY_PATH``."""
    _check(
        _libc.fchownat(dirfd, os.fsencode(path), uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags), path
    )


def utimensat(
    dirfd: int, path: str | bytes, atime: tuple[int, int], mtime: tuple[int, int], flags: int
) -> None:
    """``utimensat(2)`` with ``(sec, nsec)`` pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(dirfd, os.fsencode(path), times, flags), path)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(
    dirfd: int, path: str | bytes | os.PathLike[str], flags: int, resolve: int, mode: int = 0
) -> int:
    """``openat2(2)``: ``os.open`` with ``RESOLVE_*`` restrictions on the whole walk."""
    how = _OpenHow(flags, mode, resolve)
    ret = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(ret, path)


def stat_beneath(dirfd: int, path: str | bytes) -> os.stat_result:
    """``lstat`` of ``path`` reached from ``dirfd`` through no symlink (on the way or
    at the end), across no mount and never above ``dirfd``."""
    fd = openat2(
        dirfd,
        path,
        os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV,
    )
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


# struct linux_dirent64 up to its name: d_ino, d_off, d_reclen, d_type
_DIRENT64 = struct.Struct("=QqHB")


def getdents(fd: int, size: int) -> list[tuple[bytes, int]]:
    """``getdents64(2)``: the next entries of directory ``fd``, at most ``size`` bytes of them.

    Each comes as ``(name, d_off)``, ``d_off`` being the filesystem's cookie
    for the position after that entry: ``os.lseek(fd, d_off, os.SEEK_SET)``
    goes back there, as ``seekdir(3)`` does.  ``.`` and ``..`` are included;
    an empty list is the end of the directory.
    """
    buf = ctypes.create_string_buffer(size)
    ret = _libc.syscall(
        ctypes.c_long(_SYS_GETDENTS64), ctypes.c_int(fd), buf, ctypes.c_size_t(size)
    )
    raw = buf.raw[: _check(ret)]
    out = []
    pos = 0
    while pos < len(raw):
        _ino, off, reclen, _kind = _DIRENT64.unpack_from(raw, pos)
        start = pos + _DIRENT64.size
        out.append((raw[start : raw.index(b"\0", start)], off))
        pos += reclen
    return out


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


def _caps(tid: int = 0) -> tuple[_CapHeader, ctypes.Array[_CapData]]:
    header = _CapHeader(_CAP_VERSION_3, tid)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data))
    return header, data


def effective_caps(tid: int = 0) -> int:
    """The effective capability set of thread ``tid`` (0: the calling
    thread), as a bit mask.  Raises OSError(ESRCH) for a thread gone."""
    _header, data = _caps(tid)
    return int(data[0].effective) | int(data[1].effective) << 32


def set_effective_caps(mask: int) -> None:
    """Set the calling thread's effective capabilities (``capset(2)``, this thread only).

    The permitted set is kept, so a mask within it can be set again later.
    """
    header, data = _caps()
    data[0].effective = mask & 0xFFFFFFFF
    data[1].effective = mask >> 32
    _check(_libc.capset(ctypes.byref(header), data))


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("_pad", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16),
        ("_pad1", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("atime", _StatxTimestamp),
        ("btime", _StatxTimestamp),
        ("ctime", _StatxTimestamp),
        ("mtime", _StatxTimestamp),
        ("rdev_major", ctypes.c_uint32),
        ("rdev_minor", ctypes.c_uint32),
        ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32),
        ("_spare", ctypes.c_uint64 * 14),
    ]


_libc.statx.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.POINTER(_Statx),
]
_libc.statx.restype = ctypes.c_int
_AT_STATX_DONT_SYNC = 0x4000
_STATX_BASIC_STATS = 0x7FF


def lstat_cached(dirfd: int, name: str | bytes) -> os.stat_result:
    """``os.lstat(name, dir_fd=dirfd)`` that asks a remote filesystem nothing.

    ``statx(2)`` with ``AT_STATX_DONT_SYNC``: a network or FUSE filesystem
    answers from what it has cached, so a hung one cannot block the caller.
    Local filesystems (and scoutfs) ignore the flag and answer as ``lstat``.
    """
    buf = _Statx()
    flags = AT_SYMLINK_NOFOLLOW | _AT_STATX_DONT_SYNC
    _check(_libc.statx(dirfd, os.fsencode(name), flags, _STATX_BASIC_STATS, buf), name)
    times = (buf.atime, buf.mtime, buf.ctime)
    ns = tuple(t.sec * 1_000_000_000 + t.nsec for t in times)
    return os.stat_result(
        (
            buf.mode,
            buf.ino,
            os.makedev(buf.dev_major, buf.dev_minor),
            buf.nlink,
            buf.uid,
            buf.gid,
            buf.size,
            *(t.sec for t in times),
            *(n / 1e9 for n in ns),
            *ns,
            buf.blksize,
            buf.blocks,
            os.makedev(buf.rdev_major, buf.rdev_minor),
        )
    )


# <malloc.h>: glibc's mallopt() parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_heap(largest: int, retained: int) -> bool:
    """Serve allocations up to ``largest`` bytes from the heap, and keep up
    to ``retained`` bytes of freed heap instead of giving them back.

    By default glibc maps a block of 128 KiB or more on its own, or gives
    the heap's free top back past a threshold it moves as it goes; a process
    that allocates and frees a megabyte at a time then pays a page fault
    and a zeroed page for every 4 KiB of each one.  Returns False where
    the C library has no ``mallopt`` (not glibc), which changes nothing.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, largest)) and bool(mallopt(_M_TRIM_THRESHOLD, retained))
