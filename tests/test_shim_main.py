"""The shim's command line and lifecycle: bad mount points, stale mounts, signals, reconnects."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from shim_support import (
    START_TIMEOUT,
    feeder,
    need_fuse,
    run_shim,
    shim_command,
    unmount,
    wait_for,
    watch,
)

from compat.inotify_shim.mounts import FSTYPE, mount_device, mount_type
from notifyd import abi

ROOT = Path(__file__).resolve().parent.parent


def _run(backing: Path, mountpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        shim_command(backing, mountpoint, *args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def test_help_explains() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "compat.inotify_shim.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inotify" in out.stdout
    assert "--allow-other" in out.stdout
    assert "--socket" in out.stdout


def test_missing_mountpoint_says_how_to_fix(tmp_path: Path) -> None:
    need_fuse()
    out = _run(tmp_path, tmp_path.parent / "nope" / "mnt")
    assert out.returncode == 1
    assert "does not exist: mkdir -p" in out.stderr


def test_mountpoint_inside_backing_is_refused(tmp_path: Path) -> None:
    need_fuse()
    (tmp_path / "mnt").mkdir()
    out = _run(tmp_path, tmp_path / "mnt")
    assert out.returncode == 1
    assert "outside BACKING" in out.stderr


def test_busy_mountpoint_is_refused(tmp_path: Path) -> None:
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    with run_shim(backing, tmp_path / "mnt", tmp_path / "absent.sock"):
        out = _run(backing, tmp_path / "mnt")
        assert out.returncode == 1
        assert "is busy" in out.stderr
        assert f"umount {tmp_path / 'mnt'}" in out.stderr


def test_stale_mount_of_a_killed_shim_is_recovered(tmp_path: Path) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "f").write_text("still here")
    try:
        with run_shim(backing, mnt, tmp_path / "absent.sock") as shim:
            shim.stop(signal.SIGKILL)
            assert mount_type(str(mnt)) == FSTYPE
            with pytest.raises(OSError, match="not connected") as exc:
                os.stat(mnt)
            assert exc.value.errno == errno.ENOTCONN
            with run_shim(backing, mnt, tmp_path / "absent.sock") as again:
                again.wait_log("unmounted a stale mount left by a killed shim")
                assert (mnt / "f").read_text() == "still here"
    finally:
        unmount(mnt)


def test_dead_mount_of_something_else_is_reported_with_the_command(tmp_path: Path) -> None:
    need_fuse()
    # a dead FUSE mount not of our type: a server that dies right after mounting
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    script = (
        "import os, pyfuse3\n"
        f"pyfuse3.init(pyfuse3.Operations(), {str(mnt)!r}, {{'fsname=other', 'subtype=other'}})\n"
        "os._exit(0)\n"
    )
    try:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=START_TIMEOUT)
        assert mount_type(str(mnt)) == "fuse.other"
        out = _run(backing, mnt)
        assert out.returncode == 1
        assert f"umount -l {mnt}" in out.stderr
    finally:
        unmount(mnt)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_replays_in_flight_leaves_no_mount(tmp_path: Path, sig: int) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    inos = []
    for i in range(300):
        p = backing / f"f{i}"
        p.write_text("x")
        inos.append(p.stat().st_ino)
    with feeder(tmp_path / "notify.sock") as feed, run_shim(backing, mnt, feed.path) as shim:
        feed.wait_client()
        with watch(mnt) as w:
            recs = []
            for ino in inos:
                recs += [feed.record(abi.TYPE_OPEN, ino), feed.record(abi.TYPE_READ, ino)]
            feed.send(recs)
            w.expect("f0", "OPEN")  # replays have begun
            assert shim.stop(sig) == 0
        assert mount_type(str(mnt)) is None
        assert "unmounted" in shim.log()


def test_follows_the_daemon_across_restarts(tmp_path: Path) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "a").write_text("a")
    (backing / "b").write_text("b")
    sock = tmp_path / "notify.sock"
    # the shim starts first, with no daemon: it serves files and waits
    with run_shim(backing, mnt, sock) as shim:
        assert (mnt / "a").read_text() == "a"
        with watch(mnt) as w:
            with feeder(sock) as feed:
                feed.wait_client()
                feed.access(backing / "a")
                w.expect("a", "CLOSE_NOWRITE")
            # the daemon went away; a new one comes up at the same path
            mark = len(shim.log())
            with feeder(sock) as feed:
                feed.wait_client()
                shim.wait_log("subscribed to", after=mark)
                feed.access(backing / "b")
                w.expect("b", "CLOSE_NOWRITE")
        wait_for(lambda: "closed" in shim.log(), START_TIMEOUT, "the disconnect to be logged")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    unit = (ROOT / "systemd" / "scoutfs-notify-shim@.service").read_text()
    # point ExecStart at this checkout's script: verify wants an executable
    script = Path(sys.executable).with_name("scoutfs-notify-shim")
    if not script.exists():
        pytest.skip(f"{script} missing: install the project (pip install -e .)")
    assert "/usr/local/bin/scoutfs-notify-shim " in unit
    unit = unit.replace("/usr/local/bin/scoutfs-notify-shim", str(script))
    copy = tmp_path / "scoutfs-notify-shim@.service"
    copy.write_text(unit)
    out = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "Type=notify" in unit
    assert "After=scoutfs-notifyd@%i.service" in unit


def test_unmounted_from_outside_the_shim_exits(tmp_path: Path) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    with run_shim(backing, mnt, tmp_path / "absent.sock") as shim:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert shim.proc.wait(START_TIMEOUT) == 0
        assert "the FUSE session ended" in shim.log()
        assert mount_type(str(mnt)) is None


def test_ready_is_reported_to_systemd(tmp_path: Path) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    notify_path = tmp_path / "sd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(START_TIMEOUT)
        proc = subprocess.Popen(
            shim_command(backing, mnt, "--socket", str(tmp_path / "absent.sock")),
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stderr=subprocess.DEVNULL,
        )
        try:
            assert notify.recv(4096) == b"READY=1"
            # READY means mounted: the overlay answers at once
            assert mount_type(str(mnt)) == FSTYPE
            assert os.listdir(mnt) == []
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            assert proc.wait(START_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            unmount(mnt)


def test_mountpoint_with_spaces_is_seen_as_busy(tmp_path: Path) -> None:
    """/proc/mounts escapes spaces (\\040): the busy check must still see the mount."""
    need_fuse()
    backing, mnt = tmp_path / "my backing", tmp_path / "my mnt"
    backing.mkdir()
    (backing / "f").write_text("spaced")
    with run_shim(backing, mnt, tmp_path / "absent.sock"):
        assert mount_type(str(mnt)) == FSTYPE
        assert (mnt / "f").read_text() == "spaced"
        out = _run(backing, mnt)
        assert out.returncode == 1
        assert "is busy" in out.stderr


@pytest.mark.parametrize(("args", "expected"), [((), 8192), (("--read-ahead", "512"), 512)])
def test_read_ahead_is_set_once_the_session_runs(
    tmp_path: Path, args: tuple[str, ...], expected: int
) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    with run_shim(backing, mnt, None, *args) as shim:
        shim.wait_log("overlay readahead:")
        dev = mount_device(str(mnt))
        knob = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
        assert int(knob.read_text()) == expected


def test_read_ahead_zero_leaves_the_fuse_default(tmp_path: Path) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "f").write_text("x")
    with run_shim(backing, mnt, None, "--read-ahead", "0") as shim:
        # a request answered means INIT is done: the kernel's figure stays
        assert (mnt / "f").read_text() == "x"
        dev = mount_device(str(mnt))
        assert int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text()) == 128
        assert "overlay readahead" not in shim.log()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # under a regular file: no socket can be made there
        (["--stats-socket", "{tmp}/file/shim.stats"], "cannot serve the stats socket"),
        (["--new-dir-wait", "-1"], "--new-dir-wait: must be from 0 to 10 seconds"),
        (["--new-dir-wait", "nan"], "--new-dir-wait: must be from 0 to 10 seconds"),
    ],
)
def test_bad_options_are_refused_before_mounting(
    tmp_path: Path, args: list[str], said: str
) -> None:
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (tmp_path / "file").write_text("not a directory")
    out = _run(backing, mnt, *(a.format(tmp=tmp_path) for a in args))
    assert out.returncode != 0
    assert said in out.stderr
    assert "Traceback" not in out.stderr
    assert mount_type(str(mnt)) is None
