"""The forwarder's template unit verifies as an instance, like the daemon's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "scoutfs-notify-forward@.service"
INSTALLED_EXEC = "/usr/local/bin/scoutfs-notify-forward"


def test_forward_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert "After=scoutfs-notifyd@%i.service" in text
    assert f"ExecStart={INSTALLED_EXEC} $FORWARD_ARGS %f" in text
    # credentials come from the environment file, never the command line
    assert "PASSWORD" not in text.split("ExecStart=")[1].splitlines()[0]
    script = Path(sys.executable).with_name("scoutfs-notify-forward")
    if not script.exists():
        pytest.skip(f"{script} missing: install the project (pip install -e .)")
    text = text.replace(INSTALLED_EXEC, str(script))
    (tmp_path / UNIT.name).write_text(text)
    daemon = (ROOT / "systemd" / "scoutfs-notifyd@.service").read_text()
    daemon = daemon.replace(
        "/usr/local/bin/scoutfs-notifyd", str(script.with_name("scoutfs-notifyd"))
    )
    (tmp_path / "scoutfs-notifyd@.service").write_text(daemon)
    instance = tmp_path / "scoutfs-notify-forward@mnt-scoutfs.service"
    instance.write_text(text)
    res = subprocess.run(
        [analyze, "verify", str(instance)], capture_output=True, text=True, timeout=120
    )
    ours = [line for line in res.stderr.splitlines() if "scoutfs-notify" in line]
    assert res.returncode == 0, res.stderr
    assert not ours, res.stderr


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
