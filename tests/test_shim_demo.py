"""The README's main job shows inotifywait on the overlay reporting reads made on DIR."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from shim_support import need_fuse, need_inotifywait

from compat.inotify_shim.mounts import FSTYPE


def _mounted_shims() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if FSTYPE in line]


def test_demo_shows_inotifywait_reporting_direct_reads(tmp_path: Path) -> None:
    need_fuse()
    need_inotifywait()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("deep\n")
    (tmp_path / "top.txt").write_text("top\n")
    before = _mounted_shims()
    # its own session, so a hung demo is killed with everything it started
    proc = subprocess.Popen(
        [sys.executable, "-m", "compat.demo", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # a killed shim leaves its mount: remove the ones this demo made
            for line in set(_mounted_shims()) - set(before):
                subprocess.run(["umount", "-l", line.split()[1]], check=False)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    overlay = re.search(r"^demo: mounting the inotify shim over \S+ at (\S+)$", res.stdout, re.M)
    assert overlay, res.stdout
    mnt = overlay.group(1)
    for name in ("top.txt", "sub/deep.txt"):
        for event in ("OPEN", "ACCESS", "CLOSE_NOWRITE,CLOSE"):
            assert f"inotifywait: {mnt}/{name} {event}\n" in res.stdout, res.stdout
    assert "reported 2 of 2 files read directly" in res.stdout
    assert f"demo: unmounted {mnt}" in res.stdout
    assert _mounted_shims() == before
    assert not Path(mnt).exists()
    assert (tmp_path / "sub" / "deep.txt").read_text() == "deep\n"
