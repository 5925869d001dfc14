"""The scoutfs source's drain loop, nr probing and error mapping.

The kernel ring is a stand-in here (the real one runs in the VM tests): a
tiny fake ioctl that reads and writes the real argument struct through the
address the source passes, so the marshalling is exercised as well.
Directories and fds are real.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from notifyd import abi, procs
from notifyd.client import Subscriber
from notifyd.errors import DaemonError
from notifyd.paths import stats_path_for
from notifyd.source_scoutfs import ScoutfsSource
from notifyd.stats import read_stats

FSID = 0x1234ABCD5678EF00
_DROPPED = struct.Struct("<Q")
_DROPPED_OFFSET = abi.READ_NOTIFY.size - _DROPPED.size


def rec(seq: int) -> bytes:
    return abi.Record(seq, 1000 + seq, 0, 0, 10, 7, 0, 0, 0, abi.TYPE_READ).pack()


class FakeRing:
    """Answers READ_NOTIFY at ``abi.IOC_READ_NOTIFY_CANDIDATES[index]``, ENOTTY otherwise."""

    def __init__(self, index: int = 0, error: int = 0) -> None:
        self.request = abi.IOC_READ_NOTIFY_CANDIDATES[index]
        self.error = error
        self.calls: list[tuple[int, int]] = []
        self.records: list[bytes] = []
        self.dropped = 0
        self.detached = False
        self.cond = threading.Condition()

    def push(self, *seqs: int, dropped: int = 0) -> None:
        with self.cond:
            self.records += [rec(s) for s in seqs]
            self.dropped += dropped
            self.cond.notify_all()

    def __call__(self, fd: int, request: int, addr: int) -> int:
        buf_ptr, buf_bytes, flags, timeout_ms, pad, _ = abi.READ_NOTIFY.unpack(
            ctypes.string_at(addr, abi.READ_NOTIFY.size)
        )
        self.calls.append((request, flags))
        if request != self.request:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        if self.error:
            raise OSError(self.error, "fake")
        assert pad == 0
        assert buf_bytes
        assert buf_bytes % abi.RECORD_SIZE == 0
        assert not flags & ~(abi.READ_NOTIFY_WAIT | abi.READ_NOTIFY_DETACH)
        if flags & abi.READ_NOTIFY_DETACH:
            self.detached = True
            return 0
        with self.cond:
            if not self.records and flags & abi.READ_NOTIFY_WAIT:
                self.cond.wait(timeout_ms / 1000)
            n = min(len(self.records), buf_bytes // abi.RECORD_SIZE)
            data = b"".join(self.records[:n])
            del self.records[:n]
            ctypes.memmove(buf_ptr, data, len(data))
            ctypes.memmove(addr + _DROPPED_OFFSET, _DROPPED.pack(self.dropped), _DROPPED.size)
        return n


def source(tmp_path, ring: FakeRing) -> ScoutfsSource:
    return ScoutfsSource(tmp_path, ioctl=ring, statfs=lambda fd: (FSID, 1), wait_ms=50)


@pytest.mark.parametrize("index", [0, 1])
def test_probes_25_then_26(tmp_path, index: int) -> None:
    ring = FakeRing(index)
    src = source(tmp_path, ring)
    src.open()
    try:
        assert src.request == abi.IOC_READ_NOTIFY_CANDIDATES[index]
        assert [c[0] for c in ring.calls] == list(abi.IOC_READ_NOTIFY_CANDIDATES[: index + 1])
        assert src.default_socket_path("/run/x") == f"/run/x/{FSID:016x}/notify.sock"
    finally:
        src.close()
    assert ring.detached
    assert ring.calls[-1] == (ring.request, abi.READ_NOTIFY_DETACH)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (errno.EPERM, "needs CAP_SYS_ADMIN: run as root"),
        (errno.EBUSY, "another process is this mount's notify reader"),
        (errno.EINVAL, "READ_NOTIFY failed: "),
    ],
)
def test_open_errors_name_the_cause(tmp_path, error: int, message: str) -> None:
    src = source(tmp_path, FakeRing(0, error=error))
    fds = os.listdir("/proc/self/fd")
    with pytest.raises(DaemonError, match=message):
        src.open()
    # the mount's fd is closed again: nothing leaks, close() has nothing to do
    assert os.listdir("/proc/self/fd") == fds


def test_kernel_without_the_patches(tmp_path) -> None:
    # the real ioctl on a real directory that is not scoutfs answers ENOTTY
    src = ScoutfsSource(tmp_path, statfs=lambda fd: (FSID, 1))
    with pytest.raises(DaemonError, match=r"no notify ioctl \(ENOTTY on nr 25 and 26\)"):
        src.open()


def test_not_a_scoutfs_mount(tmp_path) -> None:
    with pytest.raises(DaemonError, match=r"not a scoutfs mount \(use --source fanotify"):
        ScoutfsSource(tmp_path).open()
    with pytest.raises(DaemonError, match="No such file"):
        ScoutfsSource(tmp_path / "missing").open()


async def test_drain_loop_batches_gaps_and_detach(tmp_path) -> None:
    ring = FakeRing(1)
    src = source(tmp_path, ring)
    ring.push(*range(1, 101))
    src.open()
    got: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, got.append)
            while sum(len(b) for b in got) < 100 * abi.RECORD_SIZE:  # noqa: ASYNC110 - polled list
                await trio.sleep(0.01)
            # seqs 101 and 102 lost in the ring; the kernel says so in `dropped`
            ring.push(103, 104, dropped=2)
            while sum(len(b) for b in got) < 102 * abi.RECORD_SIZE:  # noqa: ASYNC110 - polled list
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        src.close()
    # one batch per drain: the first holds all 100 records
    assert len(got[0]) == 100 * abi.RECORD_SIZE
    assert [r.seq for b in got for r in abi.decode(b)] == [*range(1, 101), 103, 104]
    assert src.stats()["ring_dropped"] == 2
    assert src.stats()["ring_seq_lost"] == 2
    assert src.stats()["records"] == 102
    assert ring.detached
    # drains after the probe and the attaching call: without WAIT first, and
    # WAIT (bounded) only when that found the ring empty
    flags = [f for _, f in ring.calls[2:-1]]
    assert set(flags) == {0, abi.READ_NOTIFY_WAIT}
    assert all(f == 0 for f, g in itertools.pairwise(flags) if g == abi.READ_NOTIFY_WAIT)


@pytest.mark.parametrize("delay_ms", [0.0, 1.0, 5.0])
def test_drain_delay_batches_a_steady_stream(tmp_path, delay_ms: float) -> None:
    # A stream that never lets the ring empty: every publish pushes more.  Time
    # is trio's MockClock (virtual: sleeps jump it), so the spacing of the drains
    # is exact; the ring never empties, so no WAIT (a real-time thread) runs.
    ring = FakeRing(0)
    src = ScoutfsSource(
        tmp_path, ioctl=ring, statfs=lambda fd: (FSID, 1), wait_ms=50, drain_delay_ms=delay_ms
    )
    ring.push(1)
    src.open()
    when: list[tuple[float, int]] = []
    # drain sizes: small ones must wait, a half ring (512) or more must not
    sizes = iter([3, 600, 511, 512, 1])
    seq = itertools.count(2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            def publish(batch: bytes) -> None:
                when.append((trio.current_time(), len(batch) // abi.RECORD_SIZE))
                n = next(sizes, None)
                if n is None:
                    nursery.cancel_scope.cancel()
                    return
                ring.push(*(next(seq) for _ in range(n)))

            await nursery.start(src.run, publish)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        src.close()
    assert [n for _, n in when] == [1, 3, 600, 511, 512, 1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(when)]
    d = delay_ms / 1000
    # after 1, 3 and 511 records the next drain waits; after 600 and 512 it does not
    assert gaps == pytest.approx([d, d, 0, d, 0])
    assert src.stats()["drains"] == 6


def test_drain_delay_refuses_negative(tmp_path) -> None:
    with pytest.raises(ValueError, match="negative"):
        ScoutfsSource(tmp_path, drain_delay_ms=-1)


# The real daemon process with its scoutfs source; only the ioctl is a stand-in
# (nr 26 answers, 25 is ENOTTY), serving 3 x 100 records once TRIGGER exists.
DAEMON_WITH_FAKE_RING = """
import ctypes, errno, os, sys, time
from notifyd import abi, daemon
from notifyd.source_scoutfs import ScoutfsSource
from notifyd.stats import read_stats

TRIGGER, FSID = sys.argv[1], int(sys.argv[2])
seq = 0

def ioctl(fd, request, addr):
    global seq
    buf_ptr, buf_bytes, flags, timeout_ms, pad, _ = abi.READ_NOTIFY.unpack(
        ctypes.string_at(addr, abi.READ_NOTIFY.size))
    if request != abi.IOC_READ_NOTIFY_CANDIDATES[1]:
        raise OSError(errno.ENOTTY, "")
    if flags & abi.READ_NOTIFY_DETACH:
        print("fake ring: DETACH", file=sys.stderr, flush=True)
        return 0
    if not flags & abi.READ_NOTIFY_WAIT or seq >= 300 or not os.path.exists(TRIGGER):
        time.sleep(timeout_ms / 1000 if flags & abi.READ_NOTIFY_WAIT else 0)
        return 0
    data = b"".join(
        abi.Record(seq + i + 1, 5, 0, 0, 1, 1, 0, 0, 0, abi.TYPE_READ).pack() for i in range(100))
    seq += 100
    ctypes.memmove(buf_ptr, data, len(data))
    return 100

def source(args):
    return ScoutfsSource(args.path, ioctl=ioctl, statfs=lambda fd: (FSID, 1))

sys.exit(daemon.main(sys.argv[3:], source_factory=source))
"""


def test_daemon_with_the_scoutfs_source(tmp_path) -> None:
    run = Path(tempfile.mkdtemp(prefix="nfy-s-", dir="/tmp"))
    trigger = tmp_path / "go"
    sock = run / f"{FSID:016x}" / "notify.sock"
    args = [str(trigger), str(FSID), str(tmp_path), "--run-dir", str(run)]
    try:
        daemon = procs.start_ready(
            [sys.executable, "-c", DAEMON_WITH_FAKE_RING, *args], run / "sd", tmp_path / "log"
        )
        try:
            with Subscriber(sock, timeout=20) as sub:
                trigger.touch()
                it = iter(sub)
                got = [next(it) for _ in range(300)]
            stats = read_stats(str(stats_path_for(sock)))
        finally:
            rc = daemon.stop()
        err = daemon.log()
    finally:
        shutil.rmtree(run, ignore_errors=True)
    assert rc == 0, err
    assert [r.seq for r in got] == list(range(1, 301))
    assert stats["source"] == "scoutfs"
    assert stats["fsid"] == f"{FSID:016x}"
    assert stats["ioctl_nr"] == 26
    assert stats["records"] == 300
    assert f"draining {tmp_path} (fsid {FSID:016x}) with ioctl nr 26" in err
    assert "fake ring: DETACH" in err
    assert "SIGTERM: shutting down" in err
    assert not sock.exists()


def test_daemon_on_a_plain_directory_names_the_fix(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.daemon", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.strip().endswith(
        f"scoutfs-notifyd: {tmp_path}: not a scoutfs mount "
        "(use --source fanotify for other filesystems)"
    ), res.stderr


def test_drain_delay_option(capsys) -> None:
    from notifyd import daemon, source_scoutfs

    args = daemon.parse_args(["/mnt/x"])
    assert args.drain_delay == source_scoutfs.DRAIN_DELAY_MS
    src = daemon.make_source(daemon.parse_args(["/mnt/x", "--drain-delay", "0"]))
    assert isinstance(src, ScoutfsSource)
    assert src.drain_delay_ms == 0
    for bad in ("-1", "1001", "nan", "x"):
        with pytest.raises(SystemExit) as exc:
            daemon.parse_args(["/mnt/x", "--drain-delay", bad])
        assert exc.value.code == 2
        assert "--drain-delay" in capsys.readouterr().err
