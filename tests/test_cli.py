"""scoutfs-notify watch/stats against a real daemon and a real stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from notifyd import abi, procs
from notifyd.cli import format_json, format_text
from notifyd.client import Gap

# A bound on waiting for output that should come, not a timing assertion.
LINE_TIMEOUT = 20.0

CLI = [sys.executable, "-m", "notifyd.cli"]


class Watch:
    """A running ``scoutfs-notify watch`` whose lines the test reads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # lines are split from the fd, not by a buffered reader that select() cannot see into
        self.lines = procs.LineReader(self.proc.stdout.fileno())

    def line(self) -> str:
        line = self.lines.next(time.monotonic() + LINE_TIMEOUT)
        if line is None:
            assert not self.lines.eof, f"watch ended: {self.proc.stderr.read()}"
            raise AssertionError(f"no output from watch in {LINE_TIMEOUT} s")
        return line

    def lines_until(self, pred) -> list[str]:
        got = []
        while not got or not pred(got[-1]):
            got.append(self.line())
        return got

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=LINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError("watch ignored SIGINT") from None
        return self.proc.returncode, err


@pytest.fixture
def watch():
    started: list[Watch] = []

    def start(*args: str) -> Watch:
        w = Watch(*args)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.communicate()


def _connected(daemon, n: int) -> None:
    """Wait until the daemon serves ``n`` clients (watch has subscribed)."""

    def clients() -> int:
        st = subprocess.run(
            [*CLI, "stats", "--json", "--socket", str(daemon.socket)],
            capture_output=True,
            text=True,
            check=True,
        )
        return len(json.loads(st.stdout)["clients"])

    procs.wait_until(lambda: clients() >= n, LINE_TIMEOUT, f"{n} watch client(s) to connect")


READ_AND_SAY_PID = "import os, sys; open(sys.argv[1]).read(); print(os.getpid())"


def _read_file(path) -> int:
    """Read ``path`` in a child process; returns its pid."""
    child = subprocess.run(
        [sys.executable, "-c", READ_AND_SAY_PID, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (OPEN|READ) ino=(\d+) pid=(\d+) "
    r"uid=(\d+|\?) gid=(\d+|\?) (flags=0[0-7]*|pos=0 count=0) seq=(\d+)$"
)


def test_watch_text_and_json(fanotify_daemon, watch) -> None:
    f = fanotify_daemon.backing / "data"
    f.write_text("some data\n")
    ino = os.stat(f).st_ino
    text = watch("--socket", str(fanotify_daemon.socket))
    js = watch("--json", "--socket", str(fanotify_daemon.socket))
    _connected(fanotify_daemon, 2)
    pid = _read_file(f)

    lines = text.lines_until(lambda line: f" READ ino={ino} pid={pid} " in line)
    mine = [LINE.match(line) for line in lines if f" pid={pid} " in line]
    assert all(mine), lines
    assert [(m[1], int(m[2])) for m in mine] == [("OPEN", ino), ("READ", ino)]

    docs = [json.loads(line) for line in js.lines_until(lambda line: '"READ"' in line)]
    docs = [d for d in docs if d["pid"] == pid]
    assert [d["type"] for d in docs] == ["OPEN", "READ"]
    assert {d["ino"] for d in docs} == {ino}
    assert set(docs[0]) == {*abi.Record._fields, "type"} - {"reserved"}
    # same stream, same seqs in both formats
    assert [d["seq"] for d in docs] == [int(m[7]) for m in mine]

    for w in (text, js):
        rc, err = w.stop()
        assert rc == 130, err
        assert "Traceback" not in err, err


def test_watch_exits_cleanly_on_epipe(fanotify_daemon, watch) -> None:
    f = fanotify_daemon.backing / "data"
    f.write_text("x")
    w = watch("--socket", str(fanotify_daemon.socket))
    _connected(fanotify_daemon, 1)
    _read_file(f)
    w.line()
    w.proc.stdout.close()
    # keep making records until watch writes into the closed pipe and ends
    deadline = time.monotonic() + LINE_TIMEOUT
    while w.proc.poll() is None and time.monotonic() < deadline:
        _read_file(f)
    assert w.proc.returncode == 0, w.proc.stderr.read()
    assert "Traceback" not in w.proc.stderr.read()


def test_watch_reports_gaps_and_unknown_ids() -> None:
    rec = abi.Record(7, 42, 1_700_000_000_123_456_789, 4096, 10, 99, abi.UNKNOWN_ID, 5, 0, 2)
    assert format_text(rec) == (
        "2023-11-14T22:13:20.123456789Z READ ino=42 pid=99 uid=? gid=5 pos=4096 count=10 seq=7"
    )
    assert "path=/mnt/a b" in format_text(rec, "/mnt/a b")
    assert json.loads(format_json(rec, "/mnt/x"))["path"] == "/mnt/x"
    assert re.search(r" GAP lost=3 after seq=7$", format_text(Gap(7, 11)))
    assert json.loads(format_json(Gap(7, 11))) == {
        "type": "GAP",
        "last_seq": 7,
        "next_seq": 11,
        "lost": 3,
    }


def test_watch_without_a_daemon_says_so(tmp_path) -> None:
    res = subprocess.run(
        [*CLI, "watch", "--socket", str(tmp_path / "none.sock")], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "no daemon socket at" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*CLI, "watch"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "give MOUNT or --socket PATH" in res.stderr


def test_resolve_paths_off_scoutfs_says_why(fanotify_daemon, watch) -> None:
    f = fanotify_daemon.backing / "data"
    f.write_text("x")
    w = watch("--resolve-paths", "--socket", str(fanotify_daemon.socket), str(f.parent))
    _connected(fanotify_daemon, 1)
    pid = _read_file(f)
    lines = w.lines_until(lambda line: " READ ino=" in line and f" pid={pid} " in line)
    assert all("path=" not in line for line in lines)
    rc, err = w.stop()
    assert rc == 130
    assert "--resolve-paths: " in err
    assert "is not scoutfs: printing inode numbers" in err


def test_stats_text(fanotify_daemon, watch) -> None:
    f = fanotify_daemon.backing / "data"
    f.write_text("x")
    watch("--socket", str(fanotify_daemon.socket))
    _connected(fanotify_daemon, 1)
    _read_file(f)
    res = subprocess.run(
        [*CLI, "stats", "--socket", str(fanotify_daemon.socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert re.search(r"^source +fanotify$", res.stdout, re.M), res.stdout
    assert re.search(r"^clients: 1$", res.stdout, re.M), res.stdout
    assert re.search(r"^  client \d+: pid \d+ uid 0, \d+ records sent, 0 dropped", res.stdout, re.M)


def test_help_explains() -> None:
    res = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)
    for words in ("watch", "stats", "GAP lost=N", "/run/scoutfs/<fsid>/notify.sock"):
        assert words in res.stdout
    res = subprocess.run([*CLI, "watch", "--help"], capture_output=True, text=True, check=True)
    assert "--resolve-paths" in res.stdout
    assert "--json" in res.stdout


def test_watch_ends_when_the_daemon_stops(fanotify_daemon, watch) -> None:
    w = watch("--socket", str(fanotify_daemon.socket))
    _connected(fanotify_daemon, 1)
    fanotify_daemon.stop()
    try:
        _, err = w.proc.communicate(timeout=LINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("watch did not notice the daemon stopping") from None
    assert w.proc.returncode == 1
    assert "scoutfs-notify: the daemon closed the connection" in err
