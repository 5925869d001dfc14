"""Descriptors a long-running command did not ask for, closed at its start.

A command started from a shell keeps a copy of every descriptor the shell
had open without close-on-exec, for as long as it runs.  On scoutfs an
unlinked file is not deleted while a descriptor holds it, so a daemon that
kept a shell's descriptor to such a file for months would keep it an
orphan: scoutfs's own inode-deletion test waited for ever on exactly that
with the daemon started from the test's shell (README, "Kernel").  Python
opens every descriptor of its own with close-on-exec (PEP 446), and none
of these commands takes a descriptor from its parent (no socket
activation), so at the start of ``main`` one past stderr without it came
through exec and is closed.
"""

from __future__ import annotations

import fcntl
import logging
import os

__all__ = ["close_inherited"]


def close_inherited(log: logging.Logger) -> list[int]:
    """Close every descriptor past stderr that lacks FD_CLOEXEC, say so in
    ``log``, and return them."""
    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the listing's own descriptor, closed since
        if not flags & fcntl.FD_CLOEXEC:
            os.close(fd)
            closed.append(fd)
    closed.sort()
    if closed:
        log.info(
            "closed %d descriptor%s inherited from the parent (%s): a long-running "
            "process keeps nothing open it did not ask for",
            len(closed),
            "s" if len(closed) != 1 else "",
            ", ".join(map(str, closed)),
        )
    return closed
