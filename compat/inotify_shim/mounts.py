"""Checks on BACKING and MOUNTPOINT before mounting, with fixes in the errors.

``/proc/self/mounts`` is the source of truth: ``os.path.ismount`` answers
False on a dead FUSE mount (one whose server was killed), where any access
fails with ENOTCONN until someone unmounts it.
"""

from __future__ import annotations

import errno
import logging
import os

from notifyd import libc

__all__ = [
    "FSNAME",
    "FSTYPE",
    "MountpointError",
    "check_paths",
    "mount_type",
    "set_read_ahead",
]

log = logging.getLogger(__name__)

FSNAME = "scoutfs-notify-shim"
# the type /proc/mounts shows for our mounts (the `subtype` mount option)
FSTYPE = "fuse." + FSNAME

_MNT_DETACH = 2


class MountpointError(Exception):
    """BACKING or MOUNTPOINT cannot be used; the message says how to fix it."""


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _top_mount(path: str) -> tuple[str, str] | None:
    """``(major:minor, fstype)`` of the filesystem mounted at exactly ``path``.

    The top one, when several are stacked there.  Read from
    /proc/self/mountinfo, so it costs the mount no request: a stat of a FUSE
    mount point waits for its server (forever, if the server is dead).
    """
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and _unescape(fields[4]) == path:
                # optional fields end at "-"; the type follows it
                found = (fields[2], fields[fields.index("-", 6) + 1])
    return found


def mount_type(path: str) -> str | None:
    """The filesystem type mounted at exactly ``path`` (the top one), or None."""
    top = _top_mount(path)
    return top[1] if top else None


def mount_device(path: str) -> str | None:
    """``major:minor`` of the filesystem mounted at exactly ``path`` (the top one), or None."""
    top = _top_mount(path)
    return top[0] if top else None


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Set the readahead of the FUSE mount at ``mountpoint`` to ``kb`` KiB.

    FUSE mounts start at 128 KiB, where disks usually have far more; above
    it, the kernel's READ requests for sequential reads grow from 128 KiB to
    1 MiB, so fewer round trips to the one-threaded server.  Failure is
    logged, never fatal: the overlay works at any readahead.
    """
    dev = mount_device(mountpoint)
    knob = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, "not in /proc/self/mountinfo", mountpoint)
        with open(knob, "w", encoding="ascii") as f:
            f.write(f"{kb}\n")
    except OSError as exc:
        log.warning("cannot set the overlay's readahead to %d KiB (%s): %s", kb, knob, exc)
        return
    log.info("overlay readahead: %d KiB (%s)", kb, knob)


def _lazy_unmount(path: str) -> None:
    libc.umount2(path, _MNT_DETACH)


def _absolute(path: str) -> str:
    # resolve the parent only: touching a dead mount point itself fails
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _check_mountpoint(mountpoint: str) -> None:
    fstype = mount_type(mountpoint)
    if fstype is not None:
        try:
            os.stat(mountpoint)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise MountpointError(f"{mountpoint}: {exc.strerror}") from None
            if fstype != FSTYPE:
                raise MountpointError(
                    f"{mountpoint} holds a dead {fstype} mount; run: umount -l {mountpoint}"
                ) from None
            try:
                _lazy_unmount(mountpoint)
            except OSError as uexc:
                raise MountpointError(
                    f"{mountpoint} holds a stale mount left by a killed shim and "
                    f"unmounting it failed ({uexc.strerror}); run: umount -l {mountpoint}"
                ) from None
            log.warning("unmounted a stale mount left by a killed shim at %s", mountpoint)
        else:
            raise MountpointError(
                f"{mountpoint} is busy: {fstype} is mounted there (another shim?); "
                f"unmount it first: umount {mountpoint}"
            )
    if not os.path.exists(mountpoint):
        raise MountpointError(f"mount point {mountpoint} does not exist: mkdir -p {mountpoint}")
    if not os.path.isdir(mountpoint):
        raise MountpointError(f"mount point {mountpoint} is not a directory")


def check_paths(backing: str, mountpoint: str) -> tuple[str, str]:
    """Validate both paths; recover a stale shim mount at ``mountpoint``.

    Returns:
        (BACKING, MOUNTPOINT) as absolute paths without symlinks.

    Raises:
        MountpointError: with the command or change that fixes it.
    """
    mountpoint = _absolute(mountpoint)
    _check_mountpoint(mountpoint)
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(backing):
        raise MountpointError(f"BACKING {backing} is not a directory")
    backing = os.path.realpath(backing)
    if os.path.commonpath([backing, mountpoint]) in (backing, mountpoint):
        # a mount point inside BACKING would make the overlay serve itself,
        # and a lookup of it from the server would wait on its own reply
        raise MountpointError(
            f"{mountpoint} and {backing} contain one another: choose a mount point outside BACKING"
        )
    return backing, mountpoint
