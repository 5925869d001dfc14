"""The one binding to the C library: system calls Python's ``os`` lacks.

Every function raises ``OSError`` with the C ``errno`` on failure, like
``os`` does, so callers handle named errnos and nothing else.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "AT_FDCWD",
    "fanotify_init",
    "fanotify_mark",
    "inotify_add_watch",
    "inotify_init1",
    "ioctl",
    "renameat2",
    "umount2",
]

AT_FDCWD = -100

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


def inotify_add_watch(fd: int, path: str | bytes, mask: int) -> int:
    """``inotify_add_watch(2)``: the watch descriptor."""
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), path)


def umount2(path: str | bytes, flags: int) -> None:
    """``umount2(2)``."""
    _check(_libc.umount2(os.fsencode(path), flags), path)


def renameat2(olddirfd: int, old: str | bytes, newdirfd: int, new: str | bytes, flags: int) -> None:
    """``renameat2(2)``: ``os.rename`` with dir fds and ``RENAME_*`` flags."""
    _check(_libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags), old)
