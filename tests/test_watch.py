"""scoutfs-notify watch's inotifywait-grade options, against a real daemon.

Absence is proven with a sentinel: the access that must be filtered out is
made first, a matching one after it, and ``-c`` ends watch on the first line it
prints; records reach a client in ``seq`` order, so a broken filter would print
the unwanted record first.
"""

from __future__ import annotations

import csv
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from notifyd import abi
from notifyd.client import Gap
from notifyd.watch import expand_format, format_csv, format_json, format_text

CLI = [sys.executable, "-m", "notifyd.cli"]
# A bound on waiting for what should come, not a timing assertion.
WAIT = 30.0
NOBODY = 65534

# A reader that makes one access per line of stdin: "read PATH" or "open PATH",
# answering "done" once it is made, so its pid is known before it reads.
READER = r"""
import os, sys
if len(sys.argv) > 1:
    os.setgroups([]); os.setresgid(int(sys.argv[1]), int(sys.argv[1]), int(sys.argv[1]))
    os.setresuid(int(sys.argv[1]), int(sys.argv[1]), int(sys.argv[1]))
print(os.getpid(), flush=True)
for line in sys.stdin:
    what, path = line.rstrip("\n").split(" ", 1)
    with open(path, "rb") as f:
        if what == "read":
            f.read()
    print("done", flush=True)
"""


class Reader:
    def __init__(self, uid: int | None = None) -> None:
        args = [] if uid is None else [str(uid)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = int(self.proc.stdout.readline())

    def do(self, what: str, path: Path) -> None:
        self.proc.stdin.write(f"{what} {path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(WAIT)


@pytest.fixture
def reader():
    made: list[Reader] = []

    def make(uid: int | None = None) -> Reader:
        r = Reader(uid)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


@pytest.fixture
def daemon(notifyd_factory):
    """A fanotify daemon over a world-readable directory (so nobody can read it too)."""
    top = Path(tempfile.mkdtemp(prefix="nfy-watch-", dir="/tmp"))
    top.chmod(0o755)
    d = notifyd_factory(top)
    yield d
    d.stop()
    shutil.rmtree(top, ignore_errors=True)


def _clients(daemon) -> int:
    st = subprocess.run(
        [*CLI, "stats", "--json", "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(json.loads(st.stdout)["clients"])


class Watch:
    def __init__(self, daemon, *args: str, subscribe: bool = True) -> None:
        """Start watch; with ``subscribe``, return once the daemon serves it."""
        before = _clients(daemon)
        cmd = [*CLI, "watch", "--socket", str(daemon.socket), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT
        while subscribe and _clients(daemon) <= before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate()
                raise AssertionError(f"watch did not subscribe: {err.decode()}")
            time.sleep(0.05)
        self.buf = b""

    def line(self) -> str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], WAIT)
            assert ready, f"no output from watch in {WAIT} s"
            chunk = os.read(fd, 65536)
            assert chunk, "watch ended"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def finish(self) -> tuple[int, str, str]:
        """Wait for watch to exit on its own (-c, -t, daemon gone)."""
        try:
            out, err = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("watch did not exit") from None
        return self.proc.returncode, (self.buf + out).decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def watch():
    started: list[Watch] = []

    def start(daemon, *args: str, subscribe: bool = True) -> Watch:
        w = Watch(daemon, *args, subscribe=subscribe)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def _files(daemon, *names: str) -> list[Path]:
    out = []
    for name in names:
        f = daemon.backing / name
        f.write_text(f"contents of {name}\n")
        out.append(f)
    return out


def test_event_and_pid_filters(daemon, watch, reader) -> None:
    (f,) = _files(daemon, "data")
    other, me = reader(), reader()
    w = watch(daemon, "-e", "read", "--pid", f"{me.pid}", "-c", "1", "--format", "%e %p")
    other.do("read", f)  # the wrong pid
    me.do("open", f)  # the wrong event
    me.do("read", f)  # OPEN then READ: only the READ passes
    rc, out, err = w.finish()
    assert (rc, out) == (0, f"READ {me.pid}\n"), err


def test_uid_filter_takes_names_and_numbers(daemon, watch, reader) -> None:
    (f,) = _files(daemon, "data")
    root, nobody = reader(), reader(NOBODY)
    by_name = watch(daemon, "--uid", "nobody", "-e", "open", "-c", "1", "--format", "%u %p")
    by_number = watch(daemon, "--uid", f"1,{NOBODY}", "-e", "open", "-c", "1", "--format", "%u")
    root.do("open", f)
    nobody.do("open", f)
    assert by_name.finish()[:2] == (0, f"{NOBODY} {nobody.pid}\n")
    assert by_number.finish()[:2] == (0, f"{NOBODY}\n")


@pytest.mark.parametrize(
    ("option", "regex", "order", "printed"),
    [
        ("--include", r"\.txt$", ["b.log", "C.TXT", "a.txt"], ["a.txt"]),
        ("--includei", r"\.txt$", ["b.log", "C.TXT", "a.txt"], ["C.TXT", "a.txt"]),
        ("--exclude", r"a\.txt", ["a.txt", "C.TXT", "b.log"], ["C.TXT", "b.log"]),
        ("--excludei", r"c\.txt", ["C.TXT", "a.txt", "b.log"], ["a.txt", "b.log"]),
    ],
)
def test_path_filters(daemon, watch, reader, option, regex, order, printed) -> None:
    files = dict(zip(order, _files(daemon, *order), strict=True))
    r = reader()
    w = watch(
        daemon, str(daemon.backing), option, regex, "-e", "read", "-c", str(len(printed)),
        "--format", "%f",
    )  # fmt: skip
    for name in order:
        r.do("read", files[name])
    rc, out, err = w.finish()
    assert (rc, out.splitlines()) == (0, printed), err


def test_format_has_every_field(daemon, watch, reader) -> None:
    (f,) = _files(daemon, "sub dir,x")
    ino = os.stat(f).st_ino
    fmt = "%w|%f|%e|%T|%t|%s|%i|%p|%u|%g|%F|%o|%c|%v|%l|%%|%_e|%0|%n"
    w = watch(
        daemon, str(daemon.backing), "--format", fmt, "--timefmt", "%Y", "--no-newline",
        "-e", "read", "-c", "1",
    )  # fmt: skip
    r = reader()
    r.do("read", f)
    rc, out, err = w.finish()
    assert rc == 0, err
    fields = out.split("|")
    assert fields[:3] == [f"{daemon.backing}/", "sub dir,x", "READ"]
    year, time_ns = fields[3], int(fields[4])
    assert year == time.strftime("%Y", time.localtime(time_ns / 1e9))
    assert int(fields[5]) >= 1
    assert fields[6:10] == [str(ino), str(r.pid), "0", "0"]
    # the fanotify source cannot know flags, pos and count (ABI.md section 1)
    assert fields[10:16] == ["00", "0", "0", "1", "0", "%"]
    assert fields[16:] == ["READ", "\0", "\n"]


def test_csv_quotes_and_carries_the_path(daemon, watch, reader) -> None:
    (f,) = _files(daemon, 'a, "b".txt')
    w = watch(daemon, str(daemon.backing), "--csv", "-c", "2")
    r = reader()
    r.do("read", f)
    rc, out, err = w.finish()
    assert rc == 0, err
    rows = list(csv.reader(out.splitlines()))
    assert [row[1] for row in rows] == ["OPEN", "READ"]
    for row in rows:
        assert len(row) == 12
        assert row[2] == str(f)
        assert row[3] == str(os.stat(f).st_ino)
        assert row[4] == str(r.pid)
        assert row[11] == "0"


def test_timeout_exit_statuses(daemon, watch, reader) -> None:
    (f,) = _files(daemon, "data")
    # no record passes --pid 1 (init never reads here): 2 once -t runs out
    none = watch(daemon, "-t", "1", "--pid", "1", subscribe=False)
    rc, out, err = none.finish()
    assert (rc, out) == (2, ""), err
    # -t counts from watch's start: the reader is started before it and
    # reads at once once it is subscribed, so only delivery is in the window
    r = reader()
    some = watch(daemon, "-t", "5", "-e", "open")
    r.do("open", f)
    rc, out, err = some.finish()
    assert rc == 0, err
    assert " OPEN ino=" in out, err


def test_quiet(daemon, watch, reader) -> None:
    (f,) = _files(daemon, "data")
    loud = watch(daemon, "-c", "1")
    quiet = watch(daemon, "-q", "-c", "1")
    silent = watch(daemon, "-qq", "-c", "1")
    reader().do("open", f)
    rc, out, err = loud.finish()
    assert rc == 0
    assert "watching" in err
    assert " OPEN " in out
    rc, out, err = quiet.finish()
    assert (rc, err) == (0, "")
    assert " OPEN " in out
    assert silent.finish() == (0, "", "")


def test_usage_errors_exit_1_and_say_why(daemon) -> None:
    for args, why in [
        (["-e", "write"], "-e write: unknown event"),
        (["--include", "("], "--include '(':"),
        (["--include", "a", "--includei", "b"], "not both"),
        (["--uid", "no-such-user-here"], "no such user"),
        (["--pid", "x"], "not a process id"),
        (["-c", "0"], "at least 1"),
        (["-c", "x"], "invalid int value"),
        (["--format", "%q"], "unknown conversion %q"),
        (["--include", "x"], "needs MOUNT"),
        (["--csv", "--json"], "not allowed with"),
    ]:
        res = subprocess.run(
            [*CLI, "watch", "--socket", str(daemon.socket), *args], capture_output=True, text=True
        )
        assert res.returncode == 1, (args, res.stderr)
        assert why in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr, (args, res.stderr)


def test_gaps_show_in_every_format(notifyd_factory, watch, reader) -> None:
    """A client that stops reading loses records; every format says how many."""
    d = notifyd_factory(None, "--client-queue", "1")
    (f,) = _files(d, "data")
    formats = {
        "text": [],
        "json": ["--json"],
        "csv": ["--csv", str(d.backing)],
        "format": ["--format", "%e %i"],
    }
    ws = {name: watch(d, *args) for name, args in formats.items()}
    for w in ws.values():
        w.proc.send_signal(signal.SIGSTOP)
    try:
        r = reader()
        deadline = time.monotonic() + WAIT
        dropped = 0
        while dropped < len(ws):
            assert time.monotonic() < deadline, "no client dropped a record"
            for _ in range(200):
                r.do("read", f)
            st = subprocess.run(
                [*CLI, "stats", "--json", "--socket", str(d.socket)],
                capture_output=True,
                text=True,
                check=True,
            )
            dropped = sum(1 for c in json.loads(st.stdout)["clients"] if c["records_dropped"])
    finally:
        for w in ws.values():
            w.proc.send_signal(signal.SIGCONT)
    lost = {}
    for name, w in ws.items():
        while name not in lost:
            line = w.line()
            if name == "json" and '"GAP"' in line:
                lost[name] = json.loads(line)["lost"]
            elif name == "csv" and ",GAP," in line:
                lost[name] = int(next(csv.reader([line]))[11])
            elif m := re.search(r"GAP lost=(\d+) after seq=\d+$", line):
                lost[name] = int(m[1])
    assert all(n > 0 for n in lost.values()), lost


def test_formatters_of_a_gap_and_unknown_ids() -> None:
    gap = Gap(7, 11)
    assert re.search(r" GAP lost=3 after seq=7$", format_text(gap))
    assert json.loads(format_json(gap))["lost"] == 3
    row = next(csv.reader([format_csv(gap)]))
    assert (row[1], row[10], row[11]) == ("GAP", "7", "3")
    assert expand_format("GAP lost=%l after seq=%s", gap) == "GAP lost=3 after seq=7"
    rec = abi.Record(7, 42, 1_700_000_000_123_456_789, 0, 0, 99, abi.UNKNOWN_ID, 5, 0o100002, 1)
    assert expand_format("%u %g %F %f", rec) == "? 5 0100002 ?"
    assert next(csv.reader([format_csv(rec)]))[5:8] == ["?", "5", "0100002"]


def test_help_documents_formats_and_exit_statuses() -> None:
    res = subprocess.run([*CLI, "watch", "--help"], capture_output=True, text=True, check=True)
    for conv in "wfeTtsipugFocvln0":
        assert f"%{conv}" in res.stdout, conv
    for words in ("exit status", "-t S ran out and no record", "--csv columns", "--includei"):
        assert words in res.stdout, words
