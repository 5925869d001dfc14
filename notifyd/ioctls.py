"""Thin wrappers for the scoutfs ioctls the project issues from userspace.

Layouts and numbers come from :mod:`notifyd.abi`; this module only moves
bytes in and out of the kernel.  The drain ioctl lives with the scoutfs
source, which owns its buffer and threading.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from . import abi

__all__ = ["NotScoutfsError", "fsid_of", "ino_paths", "statfs_more"]

# PATH_MAX plus the result header, as scoutfs's own ino-path command sizes it
_INO_PATH_RESULT_BYTES = abi.INO_PATH_RESULT.size + 4096


class NotScoutfsError(OSError):
    """The file descriptor is not on a scoutfs mount."""


def statfs_more(fd: int) -> tuple[int, int]:
    """Return ``(fsid, rid)`` of the scoutfs mount that ``fd`` is on.

    Raises:
        NotScoutfsError: the ioctl is unknown there (ENOTTY/EINVAL/EOPNOTSUPP).
    """
    buf = bytearray(abi.STATFS_MORE.size)
    try:
        fcntl.ioctl(fd, abi.IOC_STATFS_MORE, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise NotScoutfsError(exc.errno, "not a scoutfs filesystem") from None
        raise
    fsid, rid, *_ = abi.STATFS_MORE.unpack(buf)
    return fsid, rid


def fsid_of(path: str | os.PathLike[str]) -> int:
    """Return the fsid of the scoutfs mount holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return statfs_more(fd)[0]
    finally:
        os.close(fd)


def ino_paths(fd: int, ino: int, limit: int = 64) -> list[str]:
    """Return up to ``limit`` paths of inode ``ino``, relative to the mount root.

    Every hard link is one path.  An inode with no paths (deleted, or never
    existed) gives an empty list.  Needs CAP_DAC_READ_SEARCH.
    """
    result = ctypes.create_string_buffer(_INO_PATH_RESULT_BYTES)
    paths: list[str] = []
    dir_ino = dir_pos = 0
    while len(paths) < limit:
        arg = bytearray(
            abi.INO_PATH.pack(ino, dir_ino, dir_pos, ctypes.addressof(result), len(result))
        )
        try:
            fcntl.ioctl(fd, abi.IOC_INO_PATH, arg, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                break
            raise
        dir_ino, dir_pos, nbytes = abi.INO_PATH_RESULT.unpack_from(result.raw)
        start = abi.INO_PATH_RESULT.size
        # path_bytes counts the terminating NUL (scoutfs ioctl.c copies it)
        path = result.raw[start : start + nbytes]
        paths.append(os.fsdecode(path[:-1] if path.endswith(b"\0") else path))
        # advance past the entry just returned, carrying into dir_ino
        dir_pos = (dir_pos + 1) & 0xFFFFFFFFFFFFFFFF
        if dir_pos == 0:
            dir_ino = (dir_ino + 1) & 0xFFFFFFFFFFFFFFFF
            if dir_ino == 0:
                break
    return paths
