"""What a SIGKILLed shim leaves in the run dir is reused or removed, and nothing else is."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shim_support import need_fuse, run_shim

from compat.inotify_shim import rundir
from notifyd.paths import shim_stats_path


def _shim_dir(run: Path, name: str, mode: int = 0o700) -> Path:
    d = run / f"shim-{name:0>16}"
    d.mkdir(mode=mode)
    d.chmod(mode)
    return d


def _socket(path: Path, listening: bool) -> socket.socket:
    """A stream socket bound at ``path``: listening, or closed as a killed process leaves it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    if listening:
        s.listen()
    else:
        s.close()
    return s


def test_sweep_takes_only_what_a_killed_shim_left(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o711)
    stale = _shim_dir(run, "a1")
    _socket(stale / "shim.stats", listening=False)
    empty = _shim_dir(run, "a2")
    live = _shim_dir(run, "a3")
    server = _socket(live / "shim.stats", listening=True)
    mine = _shim_dir(run, "a4")  # the starting shim's own: it reuses it
    _socket(mine / "shim.stats", listening=False)
    kept = {
        "live": live,
        "mine": mine,
        "other mode": _shim_dir(run, "b1", mode=0o755),
        "other owner": _shim_dir(run, "b2"),
        "another file": _shim_dir(run, "b3"),
        "a file, not a socket": _shim_dir(run, "b4"),
        "not a shim's name": run / "shim-notahash",
        "a daemon's": run / "local-00000000000000c1",
    }
    os.chown(kept["other owner"], 65534, 65534)
    _socket(kept["another file"] / "shim.stats", listening=False)
    (kept["another file"] / "notes").write_text("")
    (kept["a file, not a socket"] / "shim.stats").write_text("")
    kept["not a shim's name"].mkdir(mode=0o700)
    kept["a daemon's"].mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (run / f"shim-{'c2':0>16}").symlink_to(target)  # a symlink is never followed
    try:
        with rundir.locked(run):
            removed = rundir.sweep(run, keep=mine)
    finally:
        server.close()
    assert sorted(removed) == [stale, empty]
    assert not stale.exists()
    assert not empty.exists()
    for why, d in kept.items():
        assert d.is_dir(), why
    assert (live / "shim.stats").exists()
    assert (mine / "shim.stats").exists()
    assert (run / f"shim-{'c2':0>16}").is_symlink()
    assert target.is_dir()


def _stats(mountpoint: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "stats", "--json", "--shim", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_killed_shims_directory_is_reused_then_removed_by_another_start(tmp_path) -> None:
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    absent = tmp_path / "absent.sock"  # no daemon: the stats socket works without one
    left = shim_stats_path(mnt_a).parent
    with run_shim(backing, mnt_a, absent) as shim:
        shim.stop(signal.SIGKILL)
    assert sorted(os.listdir(left)) == ["shim.stats"]

    # the same mount point again: the directory and the socket's name are taken back
    with run_shim(backing, mnt_a, absent) as shim:
        assert _stats(mnt_a)["pid"] == shim.proc.pid
        ident = os.lstat(left).st_ino
        shim.stop(signal.SIGKILL)
    assert os.lstat(left).st_ino == ident

    # another mount point's start removes it, and says so
    with run_shim(backing, mnt_b, absent) as other:
        other.wait_log(f"removed {left}, left by a shim that was killed")
        assert not left.exists()
        own = shim_stats_path(mnt_b).parent
        assert _stats(mnt_b)["pid"] == other.proc.pid
    # stopped by SIGTERM, a shim removes its own
    assert not own.exists()
