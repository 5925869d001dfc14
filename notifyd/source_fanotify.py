"""The fanotify source: records from real kernel events on any local directory.

It stands in for the scoutfs ring where there is none (CI, the demo, other
filesystems).  A mount mark sees the whole mount, so events are filtered to
the watched subtree by the path of their event fd.  Fields fanotify cannot
know are set as docs/ABI.md section 1 says: ``pos``, ``count`` and ``flags`` are 0,
``time_ns`` is when the event was read, and ``uid``/``gid`` come from
``/proc/<pid>/status`` or are UNKNOWN_ID once the process is gone.

The kernel's fanotify queue is this source's bounded buffer: when it
overflows (FAN_Q_OVERFLOW) ``seq`` skips one number, so consumers see a gap;
the kernel does not say how many events it lost.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any

import trio

from . import abi, fanotify, paths
from .droplog import DropLog
from .errors import DaemonError
from .source import Publish

__all__ = ["FanotifySource"]

log = logging.getLogger(__name__)

# One read(2) takes this much: ~2700 events, so a burst costs few syscalls.
READ_BYTES = 64 * 1024

# event fds are only fstat'ed and readlink'ed, never read
_EVENT_FD_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC


def _fs_ids(pid: int) -> tuple[int, int]:
    """The fsuid and fsgid of ``pid``, or UNKNOWN_ID when it has gone."""
    uid = gid = abi.UNKNOWN_ID
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[4])
                elif line.startswith(b"Gid:"):
                    gid = int(line.split()[4])
                    break
    except (FileNotFoundError, ProcessLookupError):
        return abi.UNKNOWN_ID, abi.UNKNOWN_ID
    return uid, gid


class FanotifySource:
    """Records for opens and reads of regular files under ``path``."""

    name = "fanotify"

    def __init__(self, path: str | os.PathLike[str], *, mark_flags: int = 0) -> None:
        self.root = os.path.realpath(path)
        self._prefix = self.root.rstrip("/") + "/"
        # on a mount's root the mount mark sees exactly the subtree: no path filter
        self._whole_mount = False
        self._mark_flags = mark_flags or fanotify.FAN_MARK_MOUNT
        self._fd = -1
        self._pid = os.getpid()
        self.seq = 0
        self.records = 0
        self.overflows = 0
        self._overflows = DropLog(log, "fanotify", unit="queue overflows")

    def default_socket_path(self, run_dir: str) -> str:
        return str(paths.socket_path_for_dir(self.root, run_dir))

    def open(self) -> None:
        if not os.path.isdir(self.root):
            raise DaemonError(f"{self.root}: not a directory")
        try:
            self._fd = fanotify.fanotify_init(
                fanotify.FAN_CLASS_NOTIF | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK,
                _EVENT_FD_FLAGS,
            )
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise DaemonError("fanotify needs CAP_SYS_ADMIN: run as root") from None
            raise
        try:
            fanotify.fanotify_mark(
                self._fd,
                fanotify.FAN_MARK_ADD | self._mark_flags,
                fanotify.FAN_OPEN | fanotify.FAN_ACCESS,
                self.root,
            )
        except OSError as exc:
            self.close()
            raise DaemonError(f"cannot watch {self.root} with fanotify: {exc.strerror}") from None
        self._whole_mount = os.path.ismount(self.root)
        log.info(
            "fanotify: watching %s%s",
            self.root,
            " (a mount root)" if self._whole_mount else " (filtered from its mount)",
        )

    def close(self) -> None:
        self._overflows.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "path": self.root,
            "seq": self.seq,
            "records": self.records,
            "source_overflows": self.overflows,
        }

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        fd = self._fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    buf = os.read(fd, READ_BYTES)
                except BlockingIOError:
                    break
                out = self._convert(buf)
                if out:
                    publish(bytes(out))
                # let clients' senders run between large bursts
                await trio.lowlevel.checkpoint()

    def _inside(self, fd: int) -> bool:
        """Whether an event's file lies under the watched directory."""
        return self._whole_mount or os.readlink(f"/proc/self/fd/{fd}").startswith(self._prefix)

    def _convert(self, buf: bytes) -> bytearray:
        """Turn one read of events into records, closing every event fd."""
        out = bytearray()
        now = time.time_ns()
        ids: dict[int, tuple[int, int]] = {}
        pack = abi.RECORD.pack
        for mask, fd, pid in fanotify.iter_events(buf):
            if mask & fanotify.FAN_Q_OVERFLOW:
                # at least one event lost: a gap of one is all we can prove
                self.seq += 1
                self.overflows += 1
                self._overflows.add(1, f", events lost (seq {self.seq} skipped)")
            if fd < 0:
                continue
            try:
                if pid == self._pid:
                    continue
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or not self._inside(fd):
                        continue
                except OSError:
                    continue
            finally:
                os.close(fd)
            uid_gid = ids.get(pid)
            if uid_gid is None:
                uid_gid = ids[pid] = _fs_ids(pid)
            uid, gid = uid_gid
            # a merged OPEN|ACCESS is an open followed by a read
            if mask & fanotify.FAN_OPEN:
                self.seq += 1
                out += pack(
                    self.seq, st.st_ino, now, 0, 0, pid, uid, gid, 0, abi.TYPE_OPEN, abi.VERSION, 0
                )
            if mask & fanotify.FAN_ACCESS:
                self.seq += 1
                out += pack(
                    self.seq, st.st_ino, now, 0, 0, pid, uid, gid, 0, abi.TYPE_READ, abi.VERSION, 0
                )
        self.records += len(out) // abi.RECORD_SIZE
        return out
