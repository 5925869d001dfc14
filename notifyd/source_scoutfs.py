"""The scoutfs source: drain a mount's notify ring with SCOUTFS_IOC_READ_NOTIFY.

The ioctl is issued on the mount's root directory (docs/ABI.md section 3).
Its number is probed: 25 on v1.28-v1.30, 26 on series for v1.31 and later;
a wrong number answers ENOTTY.  The first successful call makes this
process the ring's only reader.

The blocking WAIT call runs in a worker thread through :func:`libc.ioctl`
(ctypes), which drops the GIL for the call (``fcntl.ioctl`` would hold it
and stall the trio loop).  Each call waits at most ``wait_ms``, so a
cancelled drain returns within that bound and the fd is never used by an
abandoned thread.  Records lost in the ring show both in the ``dropped``
field and as ``seq`` gaps; both are counted and logged.

After a drain that found the ring less than half full, the next drain waits
``drain_delay_ms`` (docs/ABI.md section 3): a steady stream of accesses then
costs one drain per delay instead of one per record, which on a busy mount
took a CPU from the accessing tasks.  The first record after an idle spell
still wakes the WAIT at once.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from . import abi, ioctls, libc, paths
from .droplog import DropLog
from .errors import DaemonError
from .source import Publish

__all__ = ["Ioctl", "ScoutfsSource"]

log = logging.getLogger(__name__)

# (fd, request, address of the argument) -> the ioctl's return value; raises OSError
Ioctl = Callable[[int, int, int], int]

# The whole ring (64 KiB = 1024 records) fits in one call.
BUF_RECORDS = 1024
# Upper bound on one WAIT call: how long a shutdown waits for the drain thread.
WAIT_MS = 500
# The pause after a drain of fewer than DELAY_BELOW records: records wait at
# most this long in the ring beyond their first drain chance.  At 1 ms the
# ring's 1024 records absorb a million accesses a second before the pause
# stops (a drain of DELAY_BELOW or more records drains again at once).
DRAIN_DELAY_MS = 1.0
DELAY_BELOW = BUF_RECORDS // 2


def _other_drainers() -> list[int]:
    """Pids of other running notify daemons, to name in an EBUSY error."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"scoutfs-notifyd" in cmdline or b"notifyd.daemon" in cmdline:
            found.append(int(entry.name))
    return found


class ScoutfsSource:
    """Records from the notify ring of the scoutfs mount at ``path``.

    Args:
        ioctl: how to issue the drain ioctl; a unit test passes a stand-in.
        statfs: ``fd -> (fsid, rid)``; a unit test passes a stand-in.
    """

    name = "scoutfs"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ioctl: Ioctl = libc.ioctl,
        statfs: Callable[[int], tuple[int, int]] = ioctls.statfs_more,
        wait_ms: int = WAIT_MS,
        drain_delay_ms: float = DRAIN_DELAY_MS,
    ) -> None:
        if drain_delay_ms < 0:
            raise ValueError("drain_delay_ms must not be negative")
        self.path = os.fspath(path)
        self._ioctl = ioctl
        self._statfs = statfs
        self.wait_ms = wait_ms
        self.drain_delay_ms = drain_delay_ms
        self._fd = -1
        self._buf = ctypes.create_string_buffer(BUF_RECORDS * abi.RECORD_SIZE)
        self._arg = ctypes.create_string_buffer(abi.READ_NOTIFY.size)
        self.fsid: int | None = None
        self.request: int | None = None
        self._pending = 0
        self.records = 0
        self.drains = 0
        self.ring_dropped = 0
        self.seq_lost = 0
        self.last_seq: int | None = None
        self._ring_drops = DropLog(log, f"scoutfs {self.path}")

    def default_socket_path(self, run_dir: str) -> str:
        assert self.fsid is not None, "open() first"
        return str(paths.socket_path_for_fsid(self.fsid, run_dir))

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "path": self.path,
            "fsid": f"{self.fsid:016x}" if self.fsid is not None else None,
            "ioctl_nr": self.request & 0xFF if self.request is not None else None,
            "seq": self.last_seq,
            "records": self.records,
            "ring_dropped": self.ring_dropped,
            "ring_seq_lost": self.seq_lost,
            "drains": self.drains,
        }

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DaemonError(f"{self.path}: {exc.strerror}") from None
        try:
            self.fsid = self._statfs(self._fd)[0]
        except ioctls.NotScoutfsError:
            self.close()
            raise DaemonError(
                f"{self.path}: not a scoutfs mount (use --source fanotify for other filesystems)"
            ) from None
        for request in abi.IOC_READ_NOTIFY_CANDIDATES:
            try:
                self._pending = self._call(request, 0, 0)
            except OSError as exc:
                if exc.errno == errno.ENOTTY:
                    continue
                self.close()
                raise self._open_error(exc) from None
            self.request = request
            break
        else:
            self.close()
            raise DaemonError(
                f"{self.path}: this scoutfs has no notify ioctl (ENOTTY on nr 25 and 26): "
                "load a scoutfs module built with the kmod/ patches"
            )
        log.info(
            "scoutfs: draining %s (fsid %016x) with ioctl nr %d",
            self.path,
            self.fsid,
            self.request & 0xFF,
        )

    def _open_error(self, exc: OSError) -> DaemonError:
        if exc.errno == errno.EPERM:
            return DaemonError("draining the notify ring needs CAP_SYS_ADMIN: run as root")
        if exc.errno == errno.EBUSY:
            pids = _other_drainers()
            who = f" (running notify daemons: pid {', '.join(map(str, pids))})" if pids else ""
            return DaemonError(
                f"{self.path}: another process is this mount's notify reader{who}: "
                "stop it, or serve its socket instead"
            )
        return DaemonError(f"{self.path}: READ_NOTIFY failed: {exc.strerror}")

    def _call(self, request: int, flags: int, timeout_ms: int) -> int:
        """One READ_NOTIFY into our buffer; returns the number of records."""
        abi.READ_NOTIFY.pack_into(
            self._arg, 0, ctypes.addressof(self._buf), len(self._buf), flags, timeout_ms, 0, 0
        )
        n = self._ioctl(self._fd, request, ctypes.addressof(self._arg))
        if n < 0 or n * abi.RECORD_SIZE > len(self._buf):
            raise OSError(errno.EIO, f"READ_NOTIFY returned {n} records")
        dropped = abi.READ_NOTIFY.unpack_from(self._arg)[5]
        if dropped > self.ring_dropped:
            self._ring_drops.add(dropped - self.ring_dropped, " in the kernel ring (full)")
            self.ring_dropped = dropped
        return n

    def _wait(self) -> int:
        """The worker thread's part: one bounded WAIT."""
        assert self.request is not None
        try:
            return self._call(self.request, abi.READ_NOTIFY_WAIT, self.wait_ms)
        except InterruptedError:
            return 0

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        assert self.request is not None
        n, self._pending = self._pending, 0
        while True:
            if n:
                self._publish(n, publish)
                # the clients' senders run here, between two drains
                if n < DELAY_BELOW and self.drain_delay_ms:
                    await trio.sleep(self.drain_delay_ms / 1000)
                else:
                    await trio.lowlevel.checkpoint()
            try:
                # Under load the ring is rarely empty: a call without WAIT never
                # sleeps in the kernel, so it runs here and skips the thread
                # handoff; only an empty ring is waited on in a worker thread.
                n = self._call(self.request, 0, 0)
                if not n:
                    # not abandoned on cancel: the call returns within wait_ms,
                    # and close() must not DETACH while a thread uses the fd
                    n = await trio.to_thread.run_sync(self._wait)
            except OSError as exc:
                raise DaemonError(f"{self.path}: draining the notify ring: {exc}") from None

    def _publish(self, n: int, publish: Publish) -> None:
        nbytes = n * abi.RECORD_SIZE
        view = memoryview(self._buf)[:nbytes]
        first, last = abi.seq_range(view)
        if self.last_seq is not None and first != self.last_seq + 1 and first > self.last_seq:
            self.seq_lost += first - self.last_seq - 1
        self.last_seq = last
        self.records += n
        self.drains += 1
        # a copy: the buffer is reused by the next drain while clients still queue it
        publish(bytes(view))

    def close(self) -> None:
        """DETACH (stop emission, empty the ring), then close the mount fd."""
        if self._fd < 0:
            return
        self._ring_drops.flush(" in the kernel ring (full)")
        if self.request is not None:
            try:
                self._call(self.request, abi.READ_NOTIFY_DETACH, 0)
                log.info("scoutfs: detached from the notify ring of %s", self.path)
            except OSError as exc:
                log.warning("scoutfs: detach from %s failed: %s", self.path, exc.strerror)
            self.request = None
        os.close(self._fd)
        self._fd = -1
