"""scoutfs-notify watch/stats against a real daemon and a real stream."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_support import need_fuse, run_shim

from notifyd import abi, procs
from notifyd.cli import format_json, format_text
from notifyd.client import Gap

# A bound on waiting for output that should come, not a timing assertion.
LINE_TIMEOUT = 20.0

CLI = [sys.executable, "-m", "notifyd.cli"]


class Watch:
    """A running ``scoutfs-notify watch`` whose lines the test reads."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        cmd = [*CLI, "watch", *args]
        if sigint_ignored:
            # as a non-interactive shell starts a background job (`watch ... &`)
            cmd = ["bash", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(
            cmd,
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
        """SIGINT, then its exit status and stderr.

        Only once the daemon counts this client (``_connected``): watch honours
        SIGINT from before it connects, and before that the interpreter may
        still be starting (a SIGINT then ends it as the signal's default does).
        """
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

    def start(*args: str, sigint_ignored: bool = False) -> Watch:
        w = Watch(*args, sigint_ignored=sigint_ignored)
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


def test_watch_started_with_sigint_ignored_still_ends_on_it(fanotify_daemon, watch) -> None:
    """A script's `scoutfs-notify watch ... & kill -INT $!` ends it (130, no traceback)."""
    f = fanotify_daemon.backing / "data"
    f.write_text("x")
    w = watch("--socket", str(fanotify_daemon.socket), sigint_ignored=True)
    _connected(fanotify_daemon, 1)
    with open(f"/proc/{w.proc.pid}/status") as st:
        ignored = int(next(line for line in st if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1)) == 0, "watch kept SIGINT ignored"
    pid = _read_file(f)
    w.lines_until(lambda line: f" pid={pid} " in line)
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
    # 1, as inotifywait: watch keeps 2 for -t running out
    assert res.returncode == 1
    assert "give MOUNT or --socket PATH" in res.stderr


def test_resolve_paths_off_scoutfs_walks_the_directory(fanotify_daemon, watch) -> None:
    f = fanotify_daemon.backing / "data"
    f.write_text("x")
    w = watch("--resolve-paths", "--socket", str(fanotify_daemon.socket), str(f.parent))
    _connected(fanotify_daemon, 1)
    pid = _read_file(f)
    lines = w.lines_until(lambda line: " READ ino=" in line and f" pid={pid} " in line)
    assert f" path={f} pid={pid} " in lines[-1], lines
    rc, err = w.stop()
    assert rc == 130, err
    assert "Traceback" not in err, err


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


# --- bad input: one clear line, never a traceback (issue 14, item 5) ----------

DAEMON = [sys.executable, "-m", "notifyd.daemon"]
SHIM = [sys.executable, "-m", "compat.inotify_shim.main"]
# A bound on a command that must fail at once, not a timing.
FAIL_TIMEOUT = 30.0
NOT_UTF8 = os.fsdecode(b"\xff\xfe")


def _fails_cleanly(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command that must refuse its input: non-zero, a message, no traceback."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=FAIL_TIMEOUT, env=env)
    assert res.returncode in (1, 2), (cmd, res.returncode, res.stderr)
    assert res.stderr.strip(), cmd
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


@pytest.fixture
def short_tmp():
    d = tempfile.mkdtemp(prefix="nfy-c-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_the_daemon_under_systemd_serves_a_socket_path_that_is_not_utf8(
    notifyd_factory, short_tmp
) -> None:
    # notifyd_factory sets NOTIFY_SOCKET and waits for READY=1
    path = short_tmp / f"{NOT_UTF8}.sock"
    d = notifyd_factory(None, socket=path)
    assert "Traceback" not in d.log()
    res = subprocess.run(
        [*CLI, "stats", "--json", "--socket", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["clients_total"] == 0


def test_watch_on_the_stats_socket_names_the_mistake(fanotify_daemon) -> None:
    err = _fails_cleanly([*CLI, "watch", "--socket", str(fanotify_daemon.stats_socket)])
    assert "is not a scoutfs-notifyd notify socket (wrong socket type)" in err
    assert "give the notify socket, not its .stats" in err


def test_stats_accepts_the_stats_socket_itself(fanotify_daemon) -> None:
    res = subprocess.run(
        [*CLI, "stats", "--json", "--socket", str(fanotify_daemon.stats_socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(res.stdout)["source"] == "fanotify"


def test_stats_against_a_stopped_daemon(notifyd_factory) -> None:
    d = notifyd_factory()
    d.stop()
    err = _fails_cleanly([*CLI, "stats", "--socket", str(d.socket)])
    assert f"no daemon socket at {d.stats_socket}: is scoutfs-notifyd running?" in err
    # killed: its sockets stay, nobody listens
    k = notifyd_factory()
    k.kill()
    err = _fails_cleanly([*CLI, "stats", "--socket", str(k.socket)])
    assert f"nothing listens on {k.stats_socket}: restart scoutfs-notifyd" in err
    err = _fails_cleanly([*CLI, "watch", "--socket", str(k.socket)])
    assert f"nothing listens on {k.socket}" in err


def test_socket_group_with_no_group_of_that_id(notifyd_factory) -> None:
    gid = 99999
    try:
        grp.getgrgid(gid)
        pytest.skip(f"a group with gid {gid} exists here")
    except KeyError:
        pass
    d = notifyd_factory(None, "--socket-group", str(gid))
    st = os.lstat(d.socket)
    assert (st.st_gid, st.st_mode & 0o777) == (gid, 0o660)
    assert f"--socket-group {gid}: no group has this id; granting it anyway" in d.log()


def _daemon_bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    src = ["--source", "fanotify", str(tmp)]
    sock = ["--socket", str(tmp / "n.sock")]
    return [
        ([*src, *sock, "--client-queue", "1e20"], "invalid int value: '1e20'"),
        ([*src, *sock, "--client-queue", "0"], "--client-queue must be at least 1"),
        ([*src, *sock, "--max-clients", "-5"], "--max-clients must be at least 1"),
        ([*src, *sock, "--max-clients", NOT_UTF8], "invalid int value"),
        ([*src, *sock, "--socket-group", "no-such-group-here"], "no such group"),
        ([*src, *sock, "--socket-group", NOT_UTF8], "no such group"),
        ([*src, *sock, "--socket-group", "4294967295"], "not a group id"),
        ([*src, *sock, "--log-level", "loud"], "invalid choice"),
        (["--source", "nfs", str(tmp)], "invalid choice"),
        (["--source", "fanotify", "", *sock], "the watched path is empty"),
        ([*src, "--socket", ""], "--socket: give a path"),
        ([*src, "--run-dir", ""], "--run-dir: give a directory"),
        (["--source", "fanotify", str(tmp / "missing"), *sock], "not a directory"),
        (["--source", "fanotify", "/etc/hostname", *sock], "not a directory"),
        ([str(tmp), *sock], "not a scoutfs mount (use --source fanotify"),
        ([str(tmp / NOT_UTF8), *sock], "No such file or directory"),
        ([*src, "--socket", str(tmp / ("x" * 200))], "too long for a socket path"),
        ([*src, "--socket", str(tmp / "missing" / "n.sock")], "no such directory"),
        ([*src, "--socket", "/tmp/nfy-bad-input.sock"], "writable by other users"),
        ([*src, "--run-dir", "/tmp"], "writable by other users"),
        ([*src, "--socket", str(tmp / "x" / "n.sock")], "not a directory or a symlink"),
        ([*src, "--socket", "/dev/null"], "is a character device, not a socket"),
        ([*src, "--socket", str(tmp / "b")], "is a directory: give the socket's own path"),
    ]


def _cli_bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    return [
        (["watch"], "give MOUNT or --socket PATH"),
        (["stats", "--socket", ""], "give MOUNT or --socket PATH"),
        (["frobnicate"], "invalid choice"),
        (["watch", "--resolve-paths", "--socket", str(tmp / "n.sock")], "needs MOUNT"),
        (["watch", str(tmp / "missing")], "No such file or directory"),
        (["stats", str(tmp / "missing")], "No such file or directory"),
        (["watch", "--socket", str(tmp / ("x" * 200))], "AF_UNIX path too long"),
        (["stats", "--socket", str(tmp / ("x" * 200))], "AF_UNIX path too long"),
        (["watch", "--socket", "/etc/hostname"], "is not a socket"),
        (["watch", "--socket", str(tmp / NOT_UTF8)], "no daemon socket at"),
        (["stats", "--socket", str(tmp / NOT_UTF8)], "no daemon socket at"),
    ]


def _shim_bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    b, m = str(tmp / "b"), str(tmp / "m")
    return [
        (["", m], "BACKING is empty"),
        ([b, ""], "MOUNTPOINT is empty"),
        ([b, m, "--socket", ""], "--socket is empty"),
        ([b, m, "--timeout", "inf"], "must be more than 0 seconds"),
        ([b, m, "--timeout", "nan"], "must be more than 0 seconds"),
        ([b, m, "--close-after", "2"], "at most 1 second"),
        ([b, m, "--workers", "1e3"], "not a whole number: '1e3'"),
        ([b, m, "--max-pending", "0"], "must be at least 1"),
        ([b, m, "--read-ahead", "-1"], "must be 0 or more"),
        ([str(tmp / "missing"), m], "is not a directory"),
        ([b, str(tmp / "missing")], "does not exist"),
        ([b, b], "contain one another"),
        ([str(tmp / NOT_UTF8), m], "is not a directory"),
    ]


def test_every_bad_input_of_the_three_commands_is_one_clear_line(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "x").write_text("a file where a directory should be")
    cases = [(DAEMON, args, want) for args, want in _daemon_bad_inputs(tmp_path)]
    cases += [(CLI, args, want) for args, want in _cli_bad_inputs(tmp_path)]
    cases += [(SHIM, args, want) for args, want in _shim_bad_inputs(tmp_path)]
    # NOTIFY_SOCKET set, as under systemd: a refusal must not depend on it
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "no-manager")}
    for cmd, args, want in cases:
        err = _fails_cleanly([*cmd, *args], env=env)
        assert want in err, (args, err)
    assert not os.path.lexists("/tmp/nfy-bad-input.sock")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == []


# A user who may write a directory binds the names a daemon would serve there,
# answers every connection with a forged record or stats, and says "ready".
SQUATTER = """
import socket, sys, threading
path = sys.argv[1]
forged = bytes(64)
def serve(kind, name, answer):
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(name)
    s.listen(8)
    def loop():
        while True:
            c, _ = s.accept()
            c.send(answer)
    threading.Thread(target=loop, daemon=True).start()
serve(socket.SOCK_SEQPACKET, path, forged)
serve(socket.SOCK_STREAM, path + ".stats", b'{"clients": [], "records": 0}')
print("ready", flush=True)
sys.stdin.read()
"""
NOBODY = 65534


@contextlib.contextmanager
def _squatter() -> Iterator[tuple[Path, int]]:
    """(socket path, pid): SQUATTER serving as nobody in a directory anyone may write."""
    open_dir = Path(tempfile.mkdtemp(prefix="nfy-sq-", dir="/tmp"))
    try:
        open_dir.chmod(0o1777)
        path = open_dir / "notify.sock"
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        squatter = subprocess.Popen(
            [*as_nobody, sys.executable, "-c", SQUATTER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert squatter.stdout.readline() == "ready\n"
            yield path, squatter.pid
        finally:
            squatter.stdin.close()
            squatter.wait(FAIL_TIMEOUT)
    finally:
        shutil.rmtree(open_dir)


def test_watch_and_stats_refuse_a_socket_another_user_serves(tmp_path) -> None:
    with _squatter() as (path, pid):
        for command in ("watch", "stats"):
            err = _fails_cleanly([*CLI, command, "--socket", str(path)])
            assert f"is served by uid {NOBODY} (pid {pid}), not by root" in err


def test_the_shim_refuses_a_socket_another_user_serves(tmp_path) -> None:
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    with (
        _squatter() as (path, pid),
        run_shim(backing, tmp_path / "mnt", path, ready_log="not by root") as shim,
    ):
        log = shim.log()
    assert f"is served by uid {NOBODY} (pid {pid}), not by root" in log
    assert "subscribed to" not in log
    assert "Traceback" not in log


def test_daemon_help_says_what_it_refuses_and_how_it_ends() -> None:
    res = subprocess.run([*DAEMON, "--help"], capture_output=True, text=True, check=True)
    text = " ".join(res.stdout.split())
    for words in (
        "SIGTERM, SIGINT or SIGHUP stop it and remove its sockets",
        "the watched mount unmounted under it ends it with status 1",
        "writable by root alone",
        "an existing one keeps its mode",
    ):
        assert words in text, words
