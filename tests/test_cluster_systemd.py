"""The forwarder's template unit verifies as an instance, like the daemon's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from systemd_support import verify_instance

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "scoutfs-notify-forward@.service"
INSTALLED_EXEC = "/usr/local/bin/scoutfs-notify-forward"


def test_forward_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert "After=scoutfs-notifyd@%i.service" in text
    assert f"ExecStart={INSTALLED_EXEC} $FORWARD_ARGS %f" in text
    # credentials come from the environment file, never the command line
    assert "PASSWORD" not in text.split("ExecStart=")[1].splitlines()[0]
    verify_instance(
        tmp_path,
        UNIT.name,
        "scoutfs-notify-forward@mnt-scoutfs.service",
        "scoutfs-notifyd@.service",
    )


def test_nats_url_from_the_environment_as_the_unit_gives_it() -> None:
    env = {"NATS_URL": "nats://127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "notifyd.cluster.forward", "--fsid", "f", "--node", "n", "/"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in r.stderr
