"""The systemd units under the real systemd, PID 1 of a qemu guest.

``kmod/test/vm/run-guest --systemd`` boots the 6.1 test kernel with systemd
as init over the host's root (read-only, as the other VM tests), and
``kmod/test/vm/guest/systemd.sh`` drives scoutfs-notifyd@,
scoutfs-notify-forward@ (to a nats-server in the guest) and
scoutfs-notify-shim@ for a tmpfs mount with systemctl: active only after
READY=1, socket modes, kill -9 restarted, RequiresMountsFor, the journal,
stop removes the socket and unmounts the overlay.  The fanotify source
serves the mount, so no scoutfs build is needed.  A few minutes under tcg.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_vm_e2e import host_missing

ROOT = Path(__file__).resolve().parent.parent
RUN_GUEST = ROOT / "kmod" / "test" / "vm" / "run-guest"
GUEST = ROOT / "kmod" / "test" / "vm" / "guest" / "systemd.sh"
# run-guest kills a guest past this; the boot alone is ~1 min under tcg
GUEST_TIMEOUT = 900

pytestmark = pytest.mark.vm

CHECKS = [
    "ok systemd is PID 1",
    "ok RequiresMountsFor: starting scoutfs-notifyd@mnt-data.service mounted /mnt/data first",
    "ok READY=1: scoutfs-notifyd@mnt-data.service was never active before /run/scoutfs/local-",
    "ok journal: scoutfs-notifyd: ready: fanotify source on /mnt/data",
    "ok socket modes: /run/scoutfs/local-",
    "ok kill -9 of pid ",
    "ok READY=1: scoutfs-notify-forward@mnt-data.service was never active before its stream",
    "ok journal of the forwarder: ",
    "ok kill -9 of forwarder pid ",
    "ok systemctl stop scoutfs-notify-forward@mnt-data.service: inactive, not failed",
    "ok READY=1: scoutfs-notify-shim@mnt-data.service was never active before /mnt/data.inotify",
    "ok doctor: all is well",
    "ok kill -9 of shim pid ",
    "ok systemctl stop scoutfs-notify-shim@mnt-data.service unmounted /mnt/data.inotify",
    "ok systemctl stop scoutfs-notifyd@mnt-data.service removed /run/scoutfs/local-",
    "systemd ok",
]


def test_units_under_systemd(tmp_path: Path) -> None:
    why = host_missing()
    if why:
        pytest.skip(f"cannot boot the 6.1 test kernel: {why}")
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("no /lib/systemd/systemd on the host root: apt-get install systemd")
    work = tmp_path / "work"
    bin_dir = Path(sys.executable).parent
    p = subprocess.run(
        [str(RUN_GUEST), "--systemd", "--work", str(work), "--timeout", str(GUEST_TIMEOUT),
         "--", "bash", str(GUEST), str(bin_dir), str(ROOT)],
        capture_output=True, text=True, timeout=GUEST_TIMEOUT + 120, check=False,
    )  # fmt: skip
    console = (work / "console.log").read_text(errors="replace").replace("\r", "")
    guest = "\n".join(line for line in console.splitlines() if line.startswith("guest: "))
    assert p.returncode == 0, f"{p.stderr}\n{guest}\n{console[-4000:]}"
    for check in CHECKS:
        assert f"guest: {check}" in console, f"{check!r} missing:\n{guest}"
