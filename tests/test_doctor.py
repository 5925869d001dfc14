"""scoutfs-notify doctor on a healthy set-up and on each broken one it detects.

Real daemons, a real shim and real sockets; each broken set-up is made the way
it breaks in the field (a daemon SIGKILLed, a chmod, a shim pointed at the wrong
socket or SIGKILLed, a client that stops reading).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from shim_support import need_fuse, run_shim, unmount, wait_for

CLI = [sys.executable, "-m", "notifyd.cli"]
# Bounds on waiting, not timing assertions.
WAIT = 30.0


def doctor(*args: str) -> tuple[int, str]:
    res = subprocess.run(
        [*CLI, "doctor", "--interval", "0.2", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout


def _clients(daemon) -> list[dict]:
    st = subprocess.run(
        [*CLI, "stats", "--json", "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(st.stdout)["clients"]


def _subscribed(daemon, pid: int) -> None:
    wait_for(lambda: pid in {c["pid"] for c in _clients(daemon)}, WAIT, f"pid {pid} to subscribe")


def test_healthy(fanotify_daemon, tmp_path) -> None:
    need_fuse()
    d = fanotify_daemon
    mp = tmp_path / "overlay"
    with run_shim(d.backing, mp, d.socket) as shim:
        _subscribed(d, shim.proc.pid)
        rc, out = doctor(str(d.backing), "--socket", str(d.socket))
    assert rc == 0, out
    assert f"info  kernel  {d.backing} is not scoutfs: the fanotify source serves it" in out
    assert f"ok    daemon  pid {d.proc.pid} serves {d.backing} on {d.socket}" in out
    assert f"ok    modes   socket {d.socket} is 0600" in out
    assert "ok    losses  none in 0.2 s" in out
    assert f"ok    shim    pid {shim.proc.pid} mounts {mp} and is subscribed" in out
    # from the shim's own stats socket
    assert (
        f"info  shim    {mp}: 0 events replayed, records not replayed since it started: none" in out
    )
    assert out.endswith("all is well\n")


def test_no_daemon(tmp_path) -> None:
    rc, out = doctor(str(tmp_path))
    assert rc == 1
    assert "FAIL  daemon  no socket at /run/scoutfs/local-" in out
    assert f"fix: scoutfs-notifyd --source fanotify {tmp_path}" in out
    assert f"info  shim    no scoutfs-notify-shim over {tmp_path}" in out


def test_missing_path(tmp_path) -> None:
    rc, out = doctor(str(tmp_path / "nowhere"))
    assert rc == 1
    assert "FAIL  path" in out
    assert "No such file or directory" in out


def test_stale_socket(fanotify_daemon) -> None:
    d = fanotify_daemon
    d.kill()
    rc, out = doctor(str(d.backing), "--socket", str(d.socket))
    assert rc == 1
    assert f"FAIL  daemon  {d.socket} is stale: nothing listens" in out


def test_socket_mode(fanotify_daemon) -> None:
    d = fanotify_daemon
    d.socket.chmod(0o666)
    rc, out = doctor(str(d.backing), "--socket", str(d.socket))
    assert rc == 1
    assert f"FAIL  modes   socket {d.socket} is 0666, expected 0600 or 0660" in out
    assert f"fix: chmod 0600 {d.socket}" in out


def test_socket_of_another_mount(notifyd_factory, tmp_path) -> None:
    other = notifyd_factory()
    here = tmp_path / "here"
    here.mkdir()
    rc, out = doctor(str(here), "--socket", str(other.socket))
    assert rc == 1
    assert f"is served by a daemon for {other.backing}, not {here}" in out


def test_shim_not_subscribed(fanotify_daemon, tmp_path) -> None:
    need_fuse()
    d = fanotify_daemon
    mp = tmp_path / "overlay"
    wrong = tmp_path / "wrong.sock"
    with run_shim(d.backing, mp, wrong) as shim:
        rc, out = doctor(str(d.backing), "--socket", str(d.socket))
    assert rc == 1, out
    assert f"FAIL  shim    pid {shim.proc.pid} mounts {mp} but is not subscribed" in out


def test_dead_overlay(fanotify_daemon, tmp_path) -> None:
    need_fuse()
    d = fanotify_daemon
    mp = tmp_path / "overlay"
    try:
        with run_shim(d.backing, mp, d.socket) as shim:
            shim.proc.kill()
            shim.proc.wait()
            rc, out = doctor(str(d.backing), "--socket", str(d.socket), "--overlay", str(mp))
    finally:
        unmount(mp)
    assert rc == 1, out
    assert f"FAIL  shim    {mp} is a dead overlay" in out
    assert f"fix: umount -l {mp}; systemctl restart scoutfs-notify-shim@" in out


def test_losses_name_the_slow_client(notifyd_factory) -> None:
    d = notifyd_factory(None, "--client-queue", "1")
    f = d.backing / "data"
    f.write_text("x")
    slow = subprocess.Popen(
        [*CLI, "watch", "-q", "--socket", str(d.socket)], stdout=subprocess.PIPE
    )
    flood = None
    try:
        _subscribed(d, slow.pid)
        slow.send_signal(signal.SIGSTOP)
        # reads until killed: the stopped client's queue stays full, so every
        # record it misses while doctor watches is a drop doctor must report
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(f)])
        wait_for(lambda: any(c["records_dropped"] for c in _clients(d)), WAIT, "a first drop")
        # a window long enough for the flood to read a file on a loaded machine
        rc, out = doctor(str(d.backing), "--socket", str(d.socket), "--interval", "5")
    finally:
        for proc in (flood, slow):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert rc == 1, out
    assert f"warn  losses  client pid {slow.pid} (" in out
    assert "records in 5 s" in out
    assert "--client-queue" in out


FLOOD = "import sys\nwhile True:\n    open(sys.argv[1]).read()"
