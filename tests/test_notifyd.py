"""The real daemon with the fanotify source, end to end over its real socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from notifyd import abi, procs
from notifyd.client import Gap, Subscriber
from notifyd.stats import read_stats

# How long a test waits for a record that should come; a bound, not a timing.
RECV_TIMEOUT = 20.0


def records_until(sub: Subscriber, want, limit: int = 10000) -> list:
    """Read events until ``want(events)`` holds; fail if the stream ends first."""
    got: list = []
    it = iter(sub)
    for ev in it:
        got.append(ev)
        if want(got) or len(got) >= limit:
            return got
    raise AssertionError(f"stream ended after {got}")


# Runs as nobody, reads the file, then waits on stdin so that its uid is still
# in /proc when the daemon looks it up.
READER = """
import sys
with open(sys.argv[1], "rb") as f:
    sys.stdout.buffer.write(f.read())
sys.stdout.buffer.flush()
sys.stdin.read()
"""
NOBODY = 65534


def test_cat_gives_open_then_read(notifyd_factory, tmp_path) -> None:
    backing = Path(tempfile.mkdtemp(prefix="nfy-backing-", dir="/tmp"))
    try:
        backing.chmod(0o755)
        daemon = notifyd_factory(backing)
        f = backing / "hello.txt"
        f.write_text("hello world\n")
        ino = os.stat(f).st_ino
        with Subscriber(daemon.socket, timeout=RECV_TIMEOUT) as sub:
            as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            reader = subprocess.Popen(
                [*as_nobody, sys.executable, "-c", READER, str(f)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert reader.stdout.read(12) == b"hello world\n"
                # the test's own write_text may still be in flight: wait for the reader's READ
                got = records_until(
                    sub, lambda g: any(r.type == abi.TYPE_READ and r.pid == reader.pid for r in g)
                )
            finally:
                reader.communicate(timeout=RECV_TIMEOUT)
    finally:
        shutil.rmtree(backing)
    assert reader.returncode == 0
    assert not any(isinstance(e, Gap) for e in got)
    assert [r.seq for r in got] == list(range(got[0].seq, got[0].seq + len(got)))
    assert all(r.ino == ino for r in got), f"records for files the test did not touch: {got}"
    theirs = [r for r in got if r.pid == reader.pid]
    assert [r.type for r in theirs] == [abi.TYPE_OPEN, abi.TYPE_READ]
    for r in theirs:
        assert (r.pid, r.uid, r.gid) == (reader.pid, NOBODY, NOBODY)
        assert r.pos == 0
        assert r.count == 0
        assert r.flags == 0
        assert r.version == abi.VERSION
        assert r.reserved == 0


def _stats(daemon) -> dict:
    return read_stats(str(daemon.stats_socket))


def _wait_clients(daemon, n: int) -> None:
    procs.wait_until(
        lambda: len(_stats(daemon)["clients"]) == n, RECV_TIMEOUT, f"the daemon to have {n} clients"
    )


def test_sixteen_clients_get_identical_streams(fanotify_daemon) -> None:
    names = [fanotify_daemon.backing / f"f{i}" for i in range(40)]
    for p in names:
        p.write_text(p.name)
    subs = [Subscriber(fanotify_daemon.socket, timeout=RECV_TIMEOUT) for _ in range(16)]
    try:
        code = "import os, sys\nfor p in sys.argv[1:]: open(p).read()\nprint(os.getpid())"
        out = subprocess.run(
            [sys.executable, "-c", code, *map(str, names)], capture_output=True, check=True
        )
        pid = int(out.stdout)
        last_ino = os.stat(names[-1]).st_ino

        def done(got: list) -> bool:
            return any(r.pid == pid and r.ino == last_ino and r.type == abi.TYPE_READ for r in got)

        streams = [records_until(s, done) for s in subs]
    finally:
        for s in subs:
            s.close()
    # before the child ran, clients connected one by one and may have seen
    # different tails of the test's own writes; from its first record on, all
    # 16 must hold the same records
    tails = [s[next(i for i, r in enumerate(s) if r.pid == pid) :] for s in streams]
    assert all(t == tails[0] for t in tails)
    assert [r.seq for r in tails[0]] == list(range(tails[0][0].seq, tails[0][-1].seq + 1))
    theirs = [r for r in tails[0] if r.pid == pid]
    assert [r.ino for r in theirs] == [os.stat(p).st_ino for p in names for _ in (1, 2)]


def test_daemon_leaks_no_fds_over_1000_connections(fanotify_daemon) -> None:
    fds = f"/proc/{fanotify_daemon.proc.pid}/fd"
    _wait_clients(fanotify_daemon, 0)
    before = len(os.listdir(fds))
    for i in range(1000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.connect(str(fanotify_daemon.socket))
            if i % 10 == 0:
                c.send(b"ignored")
    # every connection accepted (none left in the queue), then none served
    procs.wait_until(
        lambda: _stats(fanotify_daemon)["clients_total"] == 1000,
        RECV_TIMEOUT,
        "the daemon to accept all 1000",
    )
    _wait_clients(fanotify_daemon, 0)
    assert len(os.listdir(fds)) == before
    assert _stats(fanotify_daemon)["clients_total"] == 1000


def test_daemon_disconnects_a_flooder_and_serves_the_rest(fanotify_daemon) -> None:
    f = fanotify_daemon.backing / "f"
    f.write_text("x")
    with Subscriber(fanotify_daemon.socket, timeout=RECV_TIMEOUT) as good:
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        flood.settimeout(RECV_TIMEOUT)
        flood.connect(str(fanotify_daemon.socket))

        def flood_until_closed() -> None:
            for _ in range(1000):
                flood.send(b"x" * 4096)

        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            flood_until_closed()
        flood.close()
        subprocess.run(["cat", str(f)], capture_output=True, check=True)
        records_until(good, lambda g: any(r.type == abi.TYPE_READ for r in g))
    assert "disconnecting a flooding client" in fanotify_daemon.log()
