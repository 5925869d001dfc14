"""The real scoutfs-notifyd, its scoutfs source draining a synthetic ring.

    python -m bench.relay_daemon CONTROL_FIFO [scoutfs-notifyd arguments...]

Everything is the daemon's own code (``notifyd.daemon.main``, the scoutfs
source's drain thread and publish loop, the broadcaster) except the ioctl,
which copies records out of memory instead of a kernel ring; the source
reaches the daemon through ``main``'s ``source_factory``.  The ring is
empty until the benchmark writes ``+N`` (a line) to CONTROL_FIFO: the next
N records are then handed out as fast as the source drains, 1024 a call,
like a kernel ring that is always full.  ``stop`` empties it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import select
import sys

from notifyd import abi, daemon
from notifyd.source_scoutfs import ScoutfsSource

from .records import RING_RECORDS, TEMPLATE, stamp

# any fsid: the benchmark always passes --socket
FSID = 0xBE0C400000000001


class SyntheticRing:
    """A stand-in for SCOUTFS_IOC_READ_NOTIFY with the same argument struct."""

    def __init__(self, control_fd: int) -> None:
        self.control = control_fd
        self.request = abi.IOC_READ_NOTIFY_CANDIDATES[0]
        self.left = 0
        self.seq = 0
        self._pending = b""

    def _poll_control(self, timeout: float) -> None:
        ready, _, _ = select.select([self.control], [], [], timeout)
        if not ready:
            return
        self._pending += os.read(self.control, 4096)
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if line == b"stop":
                self.left = 0
            elif line.startswith(b"+"):
                self.left += int(line[1:])

    def __call__(self, fd: int, request: int, addr: int) -> int:
        buf_ptr, buf_bytes, flags, timeout_ms, _, _ = abi.READ_NOTIFY.unpack(
            ctypes.string_at(addr, abi.READ_NOTIFY.size)
        )
        if request != self.request:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if flags & abi.READ_NOTIFY_DETACH:
            return 0
        wait = flags & abi.READ_NOTIFY_WAIT and not self.left
        self._poll_control(timeout_ms / 1000 if wait else 0)
        n = min(self.left, buf_bytes // abi.RECORD_SIZE, RING_RECORDS)
        if n:
            nbytes = n * abi.RECORD_SIZE
            ctypes.memmove(buf_ptr, TEMPLATE, nbytes)
            view = memoryview((ctypes.c_char * nbytes).from_address(buf_ptr)).cast("B")
            stamp(view, n, self.seq + 1)
            self.seq += n
            self.left -= n
        return n


def main(argv: list[str]) -> int:
    control = os.open(argv[0], os.O_RDWR | os.O_CLOEXEC)  # RDWR: never EOF
    ring = SyntheticRing(control)

    def source(args: argparse.Namespace) -> ScoutfsSource:
        return ScoutfsSource(args.path, ioctl=ring, statfs=lambda fd: (FSID, 1))

    return daemon.main(argv[1:], source_factory=source)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
