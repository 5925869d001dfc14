"""The fanotify source: records from real kernel events on any local directory.

It stands in for the scoutfs ring where there is none (CI, the demo, other
filesystems).  A mount mark sees the whole mount, so events are filtered to
the watched subtree by the path of their event fd, unless the watched
directory is the mount's root (then no path is needed: a record carries the
inode, from ``fstat`` of the event fd).  A path longer than the kernel can
name (``readlink`` of ``/proc/self/fd/N`` fails with ENAMETOOLONG past 4,095
bytes) cannot be checked against the subtree: such an event is kept when its
file is on the watched directory's filesystem, so no access is lost for a
long path; watch a mount's root to filter exactly.  Fields fanotify cannot
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

# The largest event this source can be given: metadata only (no info records
# without FID reporting); a read shorter than READ_BYTES by more than this
# emptied the queue.
_EVENT_MAX = fanotify.METADATA.size

# event fds are only fstat'ed and readlink'ed, never read
_EVENT_FD_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC


def _fs_ids(pid: int) -> tuple[int, int]:
    """The fsuid and fsgid of ``pid``, or UNKNOWN_ID when it has gone."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return abi.UNKNOWN_ID, abi.UNKNOWN_ID
    try:
        text = os.read(fd, 4096)
    except ProcessLookupError:
        return abi.UNKNOWN_ID, abi.UNKNOWN_ID
    finally:
        os.close(fd)
    # "Uid:\treal\teffective\tsaved\tfs\n": the fourth number is the fs id
    ids = []
    for key in (b"\nUid:", b"\nGid:"):
        at = text.find(key)
        if at < 0:
            return abi.UNKNOWN_ID, abi.UNKNOWN_ID
        ids.append(int(text[at : text.index(b"\n", at + 1)].split()[4]))
    return ids[0], ids[1]


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
        self._dev = -1
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
        self._dev = os.stat(self.root).st_dev
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

    @property
    def whole_mount(self) -> bool:
        """Whether the watched directory is a mount's root: no path filter then."""
        return self._whole_mount

    def fileno(self) -> int:
        """The fanotify fd, -1 before :meth:`open` and after :meth:`close`."""
        return self._fd

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        fd = self._fd
        convert = self.convert
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    buf = os.read(fd, READ_BYTES)
                except BlockingIOError:
                    break
                out = convert(buf)
                if out:
                    publish(bytes(out))
                if len(buf) < READ_BYTES - _EVENT_MAX:
                    # the queue held less than one read: it is empty now, and
                    # waiting for the next event costs less than a read that fails
                    break
                # let clients' senders run between large bursts
                await trio.lowlevel.checkpoint()

    def _inside(self, fd: int, st: os.stat_result) -> bool:
        """Whether an event's file lies under the watched directory."""
        if self._whole_mount:
            return True
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self._prefix)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                return False
            # too deep for the kernel to name: keep it if it can be ours
            return st.st_dev == self._dev

    def convert(self, buf: bytes) -> bytearray:
        """Turn one read(2) of the fanotify fd into records, closing every event fd."""
        out = bytearray()
        now = time.time_ns()
        ids: dict[int, tuple[int, int]] = {}
        pack = abi.RECORD.pack
        own = self._pid
        fstat = os.fstat
        close = os.close
        inside = self._inside
        is_reg = stat.S_ISREG
        for mask, fd, pid in fanotify.iter_events(buf):
            if mask & fanotify.FAN_Q_OVERFLOW:
                # at least one event lost: a gap of one is all we can prove
                self.seq += 1
                self.overflows += 1
                self._overflows.add(1, f", events lost (seq {self.seq} skipped)")
            if fd < 0:
                continue
            try:
                if pid == own:
                    continue
                try:
                    st = fstat(fd)
                    if not is_reg(st.st_mode) or not inside(fd, st):
                        continue
                except OSError:
                    continue
            finally:
                close(fd)
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
