"""The real daemon with the fanotify source, end to end over its real socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from notifyd import abi
from notifyd.client import Gap, Subscriber

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
        assert r.pos == 0 and r.count == 0 and r.flags == 0
        assert r.version == abi.VERSION and r.reserved == 0
