"""Notice when the mount a daemon watches goes away.

A fanotify mount mark does not keep its mount busy, and a scoutfs mount can
be detached lazily (``umount -l``) while the daemon holds its root open:
either way the source goes quiet for good.  The daemon then exits non-zero
so that systemd restarts it (and the restart names the cause).

The mount is known by its mount id (``mnt_id`` in ``/proc/self/fdinfo``),
read once at start without keeping a descriptor open, which would make a
plain ``umount`` fail with EBUSY.  ``/proc/self/mountinfo`` signals every
change of the mount table with ``EPOLLPRI``; the table is read again only
then.
"""

from __future__ import annotations

import logging
import os
import select

import trio

from .errors import DaemonError

__all__ = ["mount_id", "mounted_ids", "watch_mount"]

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"


def mount_id(path: str | os.PathLike[str]) -> int:
    """The id of the mount ``path`` lies on (what ``statx`` calls ``stx_mnt_id``)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise DaemonError(f"{path}: the kernel gives no mount id (needs Linux 3.15 or later)")


def mounted_ids() -> set[int]:
    """The ids of every mount in this process's mount namespace."""
    with open(MOUNTINFO, "rb") as f:
        return {int(line.split(maxsplit=1)[0]) for line in f}


async def watch_mount(
    path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Return never; raise once the mount holding ``path`` is unmounted.

    Raises:
        DaemonError: the mount went away (the message says which).
    """
    table = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
    # mountinfo is always readable; only EPOLLPRI marks a change, so it is
    # watched through an epoll set of its own that asks for nothing else
    changes = select.epoll(1)
    try:
        changes.register(table, select.EPOLLPRI)
        # after the registration, so an unmount in between is not missed
        mid = mount_id(path)
        task_status.started()
        while mid in mounted_ids():
            await trio.lowlevel.wait_readable(changes.fileno())
            changes.poll(0)
    finally:
        changes.close()
        os.close(table)
    log.error("%s: its mount (id %d) was unmounted: exiting", path, mid)
    raise DaemonError(f"{path}: its mount was unmounted; restart the daemon once it is mounted")
