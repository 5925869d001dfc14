"""The real daemon against hostile neighbours and unlucky operators (issue 14, item 5).

Every test runs ``scoutfs-notifyd`` with the fanotify source over real
sockets.  A client is known to be served when it receives the record of an
access the test made after its ``connect()`` returned (the daemon's ordering
guarantee); a refused client reads the end of its stream instead.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from notifyd import abi, procs
from notifyd.broadcast import CLIENT_LOG_BURST, CLIENT_LOG_INTERVAL
from notifyd.client import Subscriber
from notifyd.droplog import DROP_LOG_INTERVAL
from notifyd.paths import socket_path_for_dir, stats_path_for
from notifyd.sdnotify import wait_ready
from notifyd.stats import read_stats

DAEMON = [sys.executable, "-m", "notifyd.daemon"]
# Bounds against hangs, never timings.
RECV_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0

# Connects and closes as fast as it can for argv[2] seconds, then prints
# "<cycles> <refused>": a refused connection is closed by the daemon, so its
# reader sees the end of the stream at once.  With argv[3] == "wait" it
# reads until that end (for a daemon that refuses it); else it closes first.
CHURNER = """
import socket, sys, time
path, seconds, wait = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "wait"
cycles = refused = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)
        if wait:
            s.settimeout(20)
            if s.recv(4096) == b"":
                refused += 1
    cycles += 1
print(cycles, refused)
"""
UNLOGGED = re.compile(r"(\d+) more clients connected without a log line")
# How long the churn tests churn: the 5 s.
CHURN_SECONDS = 5.0


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # a blocking connect, as watch makes it: with a timeout set, an AF_UNIX
    # connect fails with EAGAIN while the daemon's accept queue is full
    s.connect(str(path))
    s.settimeout(RECV_TIMEOUT)
    return s


def _access(path: Path) -> int:
    """Open and read ``path`` (it gives an OPEN and a READ record); return its inode."""
    with open(path, "rb") as f:
        f.read()
    return os.stat(path).st_ino


def _receives(sock: socket.socket, ino: int) -> bool:
    """Read until a READ record of ``ino``; False if the daemon closed the stream."""
    while True:
        msg = sock.recv(abi.MAX_MESSAGE_BYTES)
        if not msg:
            return False
        if any(r.ino == ino and r.type == abi.TYPE_READ for r in abi.decode(msg)):
            return True


def _until(pred, what: str) -> None:
    """Wait for the sentinel ``pred()``; the timeout bounds a hang, it is no timing."""
    procs.wait_until(pred, RECV_TIMEOUT, what)


def _sentinel(daemon) -> Path:
    f = daemon.backing / "sentinel"
    if not f.exists():
        f.write_text("s")
    return f


def _exited_on_its_own(daemon) -> int:
    """Wait for a daemon that must exit by itself; teardown then expects nothing."""
    rc = daemon.proc.wait(EXIT_TIMEOUT)
    daemon.killed = True
    return rc


# --- churn ---------------------------------------------------------------------


def test_after_2000_connect_close_cycles_new_clients_are_accepted(notifyd_factory) -> None:
    d = notifyd_factory()  # the default --max-clients 1024
    for _ in range(2000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.connect(str(d.socket))
    clients = [_connect(d.socket) for _ in range(10)]
    try:
        ino = _access(_sentinel(d))
        served = sum(_receives(c, ino) for c in clients)
    finally:
        for c in clients:
            c.close()
    assert served == 10
    st = read_stats(str(d.stats_socket))
    assert st["clients_refused"] == 0
    assert st["clients_total"] == 2010
    assert "client limit" not in d.log()


def test_a_5s_churn_refuses_no_legitimate_client(notifyd_factory) -> None:
    d = notifyd_factory()
    sentinel = _sentinel(d)
    churners = [
        subprocess.Popen(
            [sys.executable, "-c", CHURNER, str(d.socket), str(CHURN_SECONDS), "close"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    served = 0
    start = time.monotonic()
    try:
        while any(p.poll() is None for p in churners):
            # a blocking connect, then the client library's (with a timeout: it
            # waits while the kernel's accept queue is full of churned connections)
            if served % 2:
                with Subscriber(d.socket, timeout=RECV_TIMEOUT) as sub:
                    assert _receives(sub.sock, _access(sentinel)), "a library client was refused"
            else:
                with _connect(d.socket) as c:
                    assert _receives(c, _access(sentinel)), "a legitimate client was refused"
            served += 1
    finally:
        outs = [p.communicate(timeout=EXIT_TIMEOUT)[0] for p in churners]
    elapsed = time.monotonic() - start
    cycles = sum(int(out.split()[0]) for out in outs)
    assert served >= 1
    assert cycles >= 1
    assert read_stats(str(d.stats_socket))["clients_refused"] == 0
    d.stop()
    # connects and disconnects: a burst per interval logged, the rest counted
    lines = d.log().splitlines()
    windows = 2 + math.ceil(elapsed / CLIENT_LOG_INTERVAL)
    assert len(lines) <= windows * (2 * CLIENT_LOG_BURST + 1) + 10, len(lines)
    counted = sum(int(m[1]) for m in map(UNLOGGED.search, lines) if m)
    logged = sum(ln.endswith((" connected", " had closed before it was accepted")) for ln in lines)
    # every client the daemon accepted is either in a line or in a count
    accepted = int(re.search(r"served (\d+) client\(s\)", lines[-1])[1])
    assert logged + counted == accepted
    assert accepted <= cycles + served  # a churner's last connects may never be accepted
    print(f"{cycles} churn cycles, {served} legitimate clients served, {len(lines)} log lines")


def test_refusals_are_logged_at_a_bounded_rate(notifyd_factory) -> None:
    d = notifyd_factory(None, "--max-clients", "2")
    held = [_connect(d.socket) for _ in range(2)]
    try:
        ino = _access(_sentinel(d))
        assert all(_receives(c, ino) for c in held)
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", CHURNER, str(d.socket), str(CHURN_SECONDS), "wait"],
            capture_output=True,
            text=True,
            check=True,
            timeout=CHURN_SECONDS + EXIT_TIMEOUT,
        ).stdout
        elapsed = time.monotonic() - start
        cycles, refused = map(int, out.split())
        assert refused == cycles > 0
        assert read_stats(str(d.stats_socket))["clients_refused"] == refused
        # the held clients are still served
        ino = _access(_sentinel(d))
        assert all(_receives(c, ino) for c in held)
    finally:
        for c in held:
            c.close()
    d.stop()
    lines = [ln for ln in d.log().splitlines() if "client limit:" in ln]
    # one line at once, then at most one per interval, and one at shutdown
    assert 1 <= len(lines) <= 2 + math.ceil(elapsed / DROP_LOG_INTERVAL)
    counts = [int(re.search(r"client limit: (\d+) connections refused", ln)[1]) for ln in lines]
    assert sum(counts) == refused, lines  # every refusal is counted in some line
    assert lines[-1].endswith(f"({refused} in all)")
    print(f"{refused} refusals in {elapsed:.1f} s, {len(lines)} log lines")


# --- half-close ----------------------------------------------------------------


def test_a_client_that_half_closes_keeps_receiving(notifyd_factory) -> None:
    d = notifyd_factory()
    with _connect(d.socket) as c:
        c.shutdown(socket.SHUT_WR)
        _until(lambda: "half-closed: it keeps receiving" in d.log(), "the half-close")
        assert _receives(c, _access(_sentinel(d)))
    # and once it closes for good it stops counting
    _until(lambda: not read_stats(str(d.stats_socket))["clients"], "the close")


def test_socat_with_stdin_at_eof_keeps_receiving(notifyd_factory) -> None:
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("no socat (bootstrap.sh installs it)")
    d = notifyd_factory()
    # bidirectional, stdin at EOF: socat shuts down its writing side at once;
    # -t keeps it reading for an hour after that
    proc = subprocess.Popen(
        [socat, "-t", "3600", f"UNIX-CONNECT:{d.socket},type=5", "-"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        _until(lambda: "half-closed: it keeps receiving" in d.log(), "socat's half-close")
        ino = _access(_sentinel(d))
        got = b""
        while not any(
            r.ino == ino and r.type == abi.TYPE_READ for r in abi.decode(got[: len(got) // 64 * 64])
        ):
            chunk = proc.stdout.read1(4096)
            assert chunk, "socat's stream ended"
            got += chunk
    finally:
        proc.kill()
        proc.wait()


# --- signals, removed sockets, unmounts ----------------------------------------


def test_sighup_stops_cleanly_like_sigterm(notifyd_factory) -> None:
    d = notifyd_factory()
    d.proc.send_signal(signal.SIGHUP)
    assert d.proc.wait(EXIT_TIMEOUT) == 0
    assert not d.socket.exists()
    assert not stats_path_for(d.socket).exists()
    assert "SIGHUP: shutting down" in d.log()
    assert "Traceback" not in d.log()


def test_a_removed_socket_is_bound_again(notifyd_factory) -> None:
    d = notifyd_factory()
    with _connect(d.socket) as old:
        os.unlink(d.socket)
        os.unlink(d.stats_socket)
        gone = time.monotonic()
        _until(lambda: d.socket.exists() and d.stats_socket.exists(), "the sockets again")
        print(f"bound again after {time.monotonic() - gone:.2f} s")
        with _connect(d.socket) as new:
            ino = _access(_sentinel(d))
            assert _receives(new, ino)
            assert _receives(old, ino)  # connected before: unaffected
        assert len(read_stats(str(d.stats_socket))["clients"]) >= 1
    assert f"{d.socket} was removed: binding it again" in d.log()
    assert f"{d.stats_socket} was removed: binding it again" in d.log()
    assert (os.stat(d.socket).st_mode & 0o777) == 0o600


def test_a_removed_socket_directory_is_made_again(short_run, notifyd_factory) -> None:
    d = notifyd_factory(run_dir=short_run)
    shutil.rmtree(d.socket.parent)
    _until(lambda: d.socket.exists(), "the socket again")
    with _connect(d.socket) as c:
        assert _receives(c, _access(_sentinel(d)))
    assert (os.stat(d.socket.parent).st_mode & 0o777) == 0o700
    assert (d.socket.parent / "notify.sock.lock").exists()


def test_a_socket_that_cannot_be_bound_again_is_retried(short_run, notifyd_factory) -> None:
    # --socket's directory is the operator's: the daemon never makes it again
    short_run.mkdir(mode=0o700)
    d = notifyd_factory(None, socket=short_run / "n.sock")
    with _connect(d.socket) as c:
        shutil.rmtree(short_run)
        _until(
            lambda: f"cannot bind {d.socket} again: {short_run}: no such directory" in d.log(),
            "the failure",
        )
        assert _receives(c, _access(_sentinel(d)))  # connected clients are still served
        short_run.mkdir(mode=0o700)
        _until(lambda: d.socket.exists() and d.stats_socket.exists(), "the sockets again")
        with _connect(d.socket) as again:
            ino = _access(_sentinel(d))
            assert _receives(again, ino)
            assert _receives(c, ino)
    assert f"{d.socket} is bound again" in d.log()
    assert d.log().count("cannot bind") <= 2  # once per socket, not once per look


@pytest.fixture
def short_run():
    """A fresh run dir with a short path (sun_path holds 107 bytes)."""
    top = Path(tempfile.mkdtemp(prefix="nfy-h-", dir="/tmp"))
    yield top / "run"
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def mountpoint(tmp_path):
    """A directory to mount on; whatever the test mounted there is unmounted after."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield mnt
    while os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _mount(kind: str, mnt: Path, tmp_path: Path) -> None:
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "nfy-test", str(mnt)], check=True)
    else:
        src = tmp_path / "bind-src"
        src.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True)


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_the_watched_mount_unmounted_ends_the_daemon_non_zero(
    notifyd_factory, mountpoint, tmp_path, kind
) -> None:
    _mount(kind, mountpoint, tmp_path)
    d = notifyd_factory(mountpoint)
    # another mount coming and going is not the watched one
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "nfy-other", str(other)], check=True)
    subprocess.run(["umount", str(other)], check=True)
    with _connect(d.socket) as c:
        assert _receives(c, _access(_sentinel(d)))
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert _exited_on_its_own(d) == 1
    log = d.log()
    assert re.search(rf"{re.escape(str(mountpoint))}: its mount \(id \d+\) was unmounted", log)
    assert "restart the daemon once it is mounted" in log
    assert "Traceback" not in log
    assert not d.socket.exists()


def test_a_watched_subdirectory_of_an_unmounted_mount(notifyd_factory, mountpoint, tmp_path):
    # the fanotify source watching a directory inside the mount, not its root
    _mount("tmpfs", mountpoint, tmp_path)
    sub = mountpoint / "sub"
    sub.mkdir()
    d = notifyd_factory(sub)
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)
    assert _exited_on_its_own(d) == 1
    assert "was unmounted" in d.log()


def test_the_default_run_dir_layout_survives_a_restart(short_run, notifyd_factory) -> None:
    # the run dir the first daemon made is the second one's to keep as it is
    first = notifyd_factory(run_dir=short_run)
    first.stop()
    again = notifyd_factory(first.backing, run_dir=short_run)
    assert again.socket == socket_path_for_dir(first.backing, short_run)
    assert (os.stat(short_run).st_mode & 0o777) == 0o700
    again.stop()  # before teardown looks for the first one's socket, which is the same path


# --- the open-file limit -------------------------------------------------------


@pytest.fixture
def limited_daemon(tmp_path):
    """``start(soft, hard)``: a fanotify daemon started under that RLIMIT_NOFILE.

    Set in the child alone: lowering a hard limit cannot be undone without
    CAP_SYS_RESOURCE.  Gives (process, socket, log path, watched directory);
    stopped after.
    """
    started: list[subprocess.Popen[bytes]] = []
    top = Path(tempfile.mkdtemp(prefix="nfy-r-", dir="/tmp"))

    def start(soft: int, hard: int) -> tuple[subprocess.Popen[bytes], Path, Path, Path]:
        n = len(started)
        backing = tmp_path / f"rb{n}"
        backing.mkdir()
        sock, log = top / f"{n}.sock", tmp_path / f"rd{n}.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(top / f"{n}.sd"))
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [*DAEMON, "--source", "fanotify", str(backing), "--socket", str(sock)],
                    stdout=out,
                    stderr=out,
                    env={**os.environ, "NOTIFY_SOCKET": str(top / f"{n}.sd")},
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
                )
            started.append(proc)
            wait_ready(notify, proc, EXIT_TIMEOUT)
        return proc, sock, log, backing

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT) == 0
    shutil.rmtree(top, ignore_errors=True)


def _nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_daemon_raises_its_open_file_limit(limited_daemon) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    proc, _, log, _ = limited_daemon(1024, hard)
    assert _nofile(proc.pid) == (hard, hard)
    assert "does not fit the open-file limit" not in log.read_text()


def test_max_clients_beyond_the_open_file_limit_is_lowered_and_said(limited_daemon) -> None:
    _, sock, log, backing = limited_daemon(512, 512)
    assert (
        "--max-clients 1024 does not fit the open-file limit (512): serving at most 256"
        in log.read_text()
    )
    held = [_connect(sock) for _ in range(257)]
    try:
        f = backing / "sentinel"
        f.write_text("s")
        ino = _access(f)
        served = [_receives(c, ino) for c in held]
    finally:
        for c in held:
            c.close()
    assert served == [True] * 256 + [False]
