"""Raw access to the notify ring and socket, independent of notifyd's code.

The VM test uses these as its oracle: the drain ioctl issued directly (so the
kernel's single-reader rules can be exercised process by process) and a bare
SOCK_SEQPACKET reader that records the daemon's stream byte for byte.  Only
the layouts come from :mod:`notifyd.abi`.

Subcommands (each one process, so each is its own reader tgid):

    notify_probe.py try MNT              one drain without WAIT; prints "ok N" or the errno name
    notify_probe.py hold MNT             attach, print "attached", then sleep until killed
    notify_probe.py detach MNT           DETACH; prints "ok" or the errno name
    notify_probe.py wait MNT             attach, print "waiting", then block in WAIT (no timeout)
    notify_probe.py thread-detach MNT    attach; a second thread blocks in WAIT while the
                                         first DETACHes; prints what each call returned,
                                         then "detached" and sleeps until killed
    notify_probe.py record SOCKET OUT    append every message to OUT until SIGTERM
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import time

from notifyd import abi

# one ioctl drains at most this many records
BATCH_RECORDS = 256


class Drainer:
    """The drain ioctl on one mount, with its command number found once."""

    def __init__(self, mnt: str) -> None:
        self.fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.buf = ctypes.create_string_buffer(BATCH_RECORDS * abi.RECORD_SIZE)
        self.cmd: int | None = None

    def close(self) -> None:
        os.close(self.fd)

    def ioctl(self, flags: int = 0, timeout_ms: int = 0) -> tuple[bytes, int]:
        """One READ_NOTIFY: (records copied, dropped since attach).  Raises OSError."""
        arg = bytearray(
            abi.READ_NOTIFY.pack(ctypes.addressof(self.buf), len(self.buf), flags, timeout_ms, 0, 0)
        )
        cmds = [self.cmd] if self.cmd is not None else list(abi.IOC_READ_NOTIFY_CANDIDATES)
        for cmd in cmds:
            try:
                n = fcntl.ioctl(self.fd, cmd, arg, True)
            except OSError as exc:
                if exc.errno == errno.ENOTTY and self.cmd is None:
                    continue
                raise
            self.cmd = cmd
            dropped = abi.READ_NOTIFY.unpack(arg)[5]
            return self.buf.raw[: n * abi.RECORD_SIZE], dropped
        raise OSError(errno.ENOTTY, "no READ_NOTIFY ioctl here: is the module patched?")


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def cmd_try(mnt: str) -> int:
    d = Drainer(mnt)
    try:
        recs, _ = d.ioctl()
    except OSError as exc:
        print(errno_name(exc), flush=True)
        return 1
    finally:
        d.close()
    print(f"ok {len(recs) // abi.RECORD_SIZE}", flush=True)
    return 0


def cmd_hold(mnt: str) -> int:
    d = Drainer(mnt)
    try:
        d.ioctl()
    except OSError as exc:
        print(errno_name(exc), flush=True)
        return 1
    print("attached", flush=True)
    while True:
        time.sleep(3600)


def cmd_detach(mnt: str) -> int:
    d = Drainer(mnt)
    try:
        d.ioctl(abi.READ_NOTIFY_DETACH)
    except OSError as exc:
        print(errno_name(exc), flush=True)
        return 1
    finally:
        d.close()
    print("ok", flush=True)
    return 0


def in_ioctl(tid: int) -> bool:
    """True while thread ``tid`` of this process sits in ioctl(2) (x86-64 nr 16)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] == "16"
    except (OSError, IndexError):
        return False


def cmd_wait(mnt: str) -> int:
    d = Drainer(mnt)
    try:
        d.ioctl()
    except OSError as exc:
        print(errno_name(exc), flush=True)
        return 1
    print("waiting", flush=True)
    # returns only when a record comes: the test kills us before any does
    recs, _ = d.ioctl(abi.READ_NOTIFY_WAIT, 0)
    print(f"woke with {len(recs) // abi.RECORD_SIZE}", flush=True)
    return 0


def cmd_thread_detach(mnt: str) -> int:
    d = Drainer(mnt)
    d.ioctl()
    got: list[str] = []
    tid: list[int] = []

    def waiter() -> None:
        tid.append(threading.get_native_id())
        try:
            recs, _ = d.ioctl(abi.READ_NOTIFY_WAIT, 0)
            got.append(f"ok {len(recs) // abi.RECORD_SIZE}")
        except OSError as exc:
            got.append(errno_name(exc))

    t = threading.Thread(target=waiter)
    t.start()
    # the sentinel: the waiter is inside the ioctl before we detach
    end = time.monotonic() + 60
    while not (tid and in_ioctl(tid[0])):
        if time.monotonic() > end:
            print("waiter never entered the ioctl", flush=True)
            return 1
        time.sleep(0.05)
    try:
        d.ioctl(abi.READ_NOTIFY_DETACH)
        detach = "ok"
    except OSError as exc:
        detach = errno_name(exc)
    t.join(60)
    print(f"detach {detach} waiter {got[0] if got else 'still blocked'}", flush=True)
    if t.is_alive():
        return 1
    print("detached", flush=True)
    while True:
        time.sleep(3600)


def cmd_record(sock_path: str, out: str) -> int:
    """Append each message to OUT; "connected" on stdout once the socket is up."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sock_path)
    s.settimeout(0.2)
    print("connected", flush=True)
    with open(out, "ab", buffering=0) as f:
        while not stop:
            try:
                msg = s.recv(abi.MAX_MESSAGE_BYTES * 2)
            except TimeoutError:
                continue
            if not msg:
                break
            if len(msg) % abi.RECORD_SIZE or len(msg) > abi.MAX_MESSAGE_BYTES:
                print(f"bad message of {len(msg)} bytes", file=sys.stderr, flush=True)
                return 1
            f.write(msg)
    return 0


def main(argv: list[str]) -> int:
    cmds = {
        "try": cmd_try,
        "hold": cmd_hold,
        "detach": cmd_detach,
        "record": cmd_record,
        "wait": cmd_wait,
        "thread-detach": cmd_thread_detach,
    }
    if not argv or argv[0] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
