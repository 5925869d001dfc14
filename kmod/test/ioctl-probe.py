"""The READ_NOTIFY contract (docs/ABI.md section 3) checked on a real patched mount.

Runs in the qemu guest as root, on a freshly mounted scoutfs with no reader:

    python ioctl-probe.py MNT SYSFS_DIR

MNT is the mount, SYSFS_DIR its /sys/fs/scoutfs/<dir> (for the counters).
The ioctl goes through libc directly so that errnos (EINTR too) come back
as the kernel returned them.  Prints "probe ok: ..." per check, and exits 1
at the first failed one with "probe FAIL: ...".
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import threading
import time

from notifyd import abi

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

RING_RECORDS = 1024


class Mount:
    def __init__(self, mnt: str, sysfs: str) -> None:
        self.mnt = mnt
        self.sysfs = sysfs
        self.fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.buf = ctypes.create_string_buffer(2 * RING_RECORDS * abi.RECORD_SIZE)
        self.cmd = self._find_cmd()

    def _find_cmd(self) -> int:
        # EINVAL (bad size) answers only the right command; others are ENOTTY
        for cmd in abi.IOC_READ_NOTIFY_CANDIDATES:
            if self.call(0, cmd=cmd)[0] == -errno.EINVAL:
                return cmd
        fail("no READ_NOTIFY ioctl answers: is this the patched module?")
        raise AssertionError

    def counter(self, name: str) -> int:
        with open(f"{self.sysfs}/counters/{name}") as f:
            return int(f.read())

    def call(
        self,
        nbytes: int | None = None,
        flags: int = 0,
        timeout_ms: int = 0,
        pad: int = 0,
        ptr: int | None = None,
        cmd: int | None = None,
    ) -> tuple[int, int]:
        """(records or -errno, dropped as written back)."""
        arg = ctypes.create_string_buffer(abi.READ_NOTIFY.size)
        abi.READ_NOTIFY.pack_into(
            arg,
            0,
            ctypes.addressof(self.buf) if ptr is None else ptr,
            len(self.buf) if nbytes is None else nbytes,
            flags,
            timeout_ms,
            pad,
            0xDEAD,
        )
        ret = libc.ioctl(self.fd, self.cmd if cmd is None else cmd, arg)
        if ret < 0:
            return -ctypes.get_errno(), -1
        return ret, abi.READ_NOTIFY.unpack_from(arg)[5]

    def records(self, n: int) -> list[abi.Record]:
        return abi.decode(self.buf.raw[: n * abi.RECORD_SIZE])


def fail(msg: str) -> None:
    print(f"probe FAIL: {msg}", flush=True)
    sys.exit(1)


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)
    print(f"probe ok: {msg}", flush=True)


def in_child(func) -> int:
    """Run func in a forked process (its own tgid); returns its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(func())
        except BaseException:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> None:
    m = Mount(sys.argv[1], sys.argv[2])
    path = os.path.join(m.mnt, "probe-file")
    rec_size = abi.RECORD_SIZE

    # every EINVAL, and none of them attaches
    for nbytes, flags, pad in [
        (0, 0, 0),
        (rec_size - 1, 0, 0),
        (rec_size + 1, 0, 0),
        (rec_size, 1 << 2, 0),
        (rec_size, 1 << 31, 0),
        (rec_size, 0, 1),
        (0, abi.READ_NOTIFY_DETACH, 0),
    ]:
        ret, _ = m.call(nbytes, flags, pad=pad)
        check(ret == -errno.EINVAL, f"EINVAL for buf_bytes={nbytes} flags={flags:#x} pad={pad}")
    check(m.counter("notify_reader_attached") == 0, "EINVAL attached nobody")
    check(m.counter("notify_emitted") == 0, "nothing emitted without a reader")

    ret, dropped = m.call()
    check((ret, dropped) == (0, 0), "the first call attaches: 0 records, 0 dropped")
    check(m.counter("notify_reader_attached") == 1, "notify_reader_attached is 1")

    with open(path, "wb") as f:
        f.write(b"x" * 10000)
    ret, _ = m.call()
    recs = m.records(ret)
    check(
        ret == 1 and recs[0].type == abi.TYPE_OPEN and recs[0].flags & os.O_ACCMODE == os.O_WRONLY,
        f"creating and writing a file is one OPEN (O_WRONLY), no READ: {recs}",
    )
    ino = os.stat(path).st_ino

    def other_user_reads() -> int:
        os.setgroups([])
        os.setegid(123)
        os.seteuid(456)
        fd = os.open(path, os.O_RDONLY)
        os.pread(fd, 4096, 100)
        os.pread(fd, 10, 20000)  # at EOF: returns 0, no record
        return os.getpid() & 0xFF

    pid_low = in_child(other_user_reads)
    ret, _ = m.call()
    recs = m.records(ret)
    check(ret == 2, f"a child's open and read are two records: {recs}")
    op, rd = recs
    check(
        op.type == abi.TYPE_OPEN
        and op.ino == ino
        and op.pid & 0xFF == pid_low
        and (op.uid, op.gid) == (456, 123)
        and op.flags & os.O_ACCMODE == os.O_RDONLY
        and (op.pos, op.count, op.version, op.reserved) == (0, 0, 1, 0),
        f"OPEN record fields: {op}",
    )
    check(
        rd.type == abi.TYPE_READ
        and (rd.ino, rd.pid, rd.uid, rd.gid) == (ino, op.pid, 456, 123)
        and (rd.pos, rd.count, rd.flags) == (100, 4096, 0)
        and rd.seq == op.seq + 1
        and rd.time_ns >= op.time_ns,
        f"READ record fields: {rd}",
    )
    check(abs(rd.time_ns - time.time_ns()) < 600 * 10**9, "time_ns is CLOCK_REALTIME")

    ret, _ = m.call(flags=abi.READ_NOTIFY_WAIT, timeout_ms=100)
    check(ret == 0, "WAIT with nothing to read times out with 0")

    def read_later() -> None:
        time.sleep(0.3)
        with open(path, "rb") as f:
            f.read(1)

    reader = threading.Thread(target=read_later)
    reader.start()
    ret, _ = m.call(flags=abi.READ_NOTIFY_WAIT, timeout_ms=0)
    reader.join()
    check(ret >= 1, f"WAIT without timeout returns once a record is emitted ({ret})")
    m.call()

    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    ret, _ = m.call(flags=abi.READ_NOTIFY_WAIT, timeout_ms=0)
    check(ret == -errno.EINTR, "a signal interrupts WAIT with EINTR")

    with open(path, "rb") as f:
        f.read(1)
    ret, _ = m.call(ptr=8)
    check(ret == -errno.EFAULT, "a bad buffer is EFAULT")
    ret, _ = m.call()
    check(ret == 2, "records survive the EFAULT")

    check(
        in_child(lambda: 0 if m.call()[0] == -errno.EBUSY else 1) == 0, "EBUSY for another process"
    )
    check(
        in_child(lambda: 0 if m.call(flags=abi.READ_NOTIFY_DETACH)[0] == -errno.EBUSY else 1) == 0,
        "another process can't DETACH the reader either",
    )

    fd = os.open(path, os.O_RDONLY)
    m.call()
    emitted = m.counter("notify_emitted")
    extra = 100
    for i in range(RING_RECORDS + extra):
        os.pread(fd, 1, i)
    ret, dropped = m.call()
    recs = m.records(ret)
    check((ret, dropped) == (RING_RECORDS, extra), f"a full ring keeps {ret}, drops {dropped}")
    check(
        m.counter("notify_dropped_ring_full") == extra
        and m.counter("notify_emitted") - emitted == RING_RECORDS + extra,
        "notify_dropped_ring_full and notify_emitted count the drops",
    )
    last = recs[-1].seq
    os.pread(fd, 1, 0)
    ret, dropped = m.call()
    check(
        ret == 1 and dropped == extra and m.records(1)[0].seq == last + extra + 1,
        "the next record's seq shows a gap of exactly the dropped count",
    )

    ret, _ = m.call(flags=abi.READ_NOTIFY_DETACH)
    check(ret == 0, "DETACH")
    emitted = m.counter("notify_emitted")
    os.pread(fd, 1, 0)
    check(m.counter("notify_emitted") == emitted, "nothing is emitted after DETACH")
    os.close(fd)

    # a child becomes the reader and exits without DETACH: we take over
    check(in_child(lambda: 0 if m.call()[0] == 0 else 1) == 0, "a child attaches")
    with open(path, "rb") as f:
        f.read(1)
    ret, dropped = m.call()
    check(
        ret == 2 and dropped == 0, f"the exited child's reader is taken over, records kept ({ret})"
    )
    check(m.counter("notify_reader_attached") == 3, "notify_reader_attached counts every attach")

    os.close(m.fd)
    print("probe done", flush=True)


if __name__ == "__main__":
    main()
