"""fanotify(7) for the fanotify source: init, mark, and event parsing.

There is no maintained Python binding, and the project needs only the
notification class without FID reporting, where every event carries an open
file descriptor of the accessed file.  The system calls go through
:mod:`notifyd.libc`.  Nothing here reads events or owns a loop:
:mod:`notifyd.source_fanotify` and the tests do that.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

from . import libc

__all__ = [
    "FAN_ACCESS",
    "FAN_CLASS_NOTIF",
    "FAN_CLOEXEC",
    "FAN_MARK_ADD",
    "FAN_MARK_MOUNT",
    "FAN_NOFD",
    "FAN_NONBLOCK",
    "FAN_OPEN",
    "FAN_Q_OVERFLOW",
    "METADATA",
    "Event",
    "fanotify_init",
    "fanotify_mark",
    "iter_events",
]

# <linux/fanotify.h>
FAN_ACCESS = 0x00000001
FAN_OPEN = 0x00000020
FAN_Q_OVERFLOW = 0x00004000

FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000

FAN_MARK_ADD = 0x00000001
FAN_MARK_MOUNT = 0x00000010

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1

# struct fanotify_event_metadata: event_len vers reserved metadata_len mask fd pid
METADATA = struct.Struct("=IBBHQii")


class Event(NamedTuple):
    """One fanotify event; ``fd`` is FAN_NOFD or an open fd the caller must close."""

    mask: int
    fd: int
    pid: int


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2); returns the new fanotify fd.  Needs CAP_SYS_ADMIN."""
    return libc.fanotify_init(flags, event_f_flags)


def fanotify_mark(
    fan_fd: int, flags: int, mask: int, path: str | os.PathLike[str], dirfd: int = libc.AT_FDCWD
) -> None:
    """fanotify_mark(2) on ``path``."""
    libc.fanotify_mark(fan_fd, flags, mask, dirfd, os.fspath(path))


def iter_events(buf: bytes | bytearray | memoryview) -> Iterator[Event]:
    """Parse the events of one read(2) of a fanotify fd.

    Raises:
        ValueError: the kernel speaks another metadata version, or the buffer
            ends inside an event; both mean this parser cannot be trusted.
    """
    off = 0
    end = len(buf)
    size = METADATA.size
    unpack_from = METADATA.unpack_from
    while off + size <= end:
        event_len, vers, _res, _mlen, mask, fd, pid = unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected 3")
        if event_len < size or off + event_len > end:
            raise ValueError(f"truncated fanotify event of {event_len} bytes")
        yield Event(mask, fd, pid)
        off += event_len
    if off != end:
        raise ValueError(f"{end - off} trailing bytes after the last fanotify event")
