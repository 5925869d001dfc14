"""The systemd template unit passes ``systemd-analyze verify`` as an instance."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "scoutfs-notifyd@.service"
INSTALLED_EXEC = "/usr/local/bin/scoutfs-notifyd"


def test_unit_verifies(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert f"ExecStart={INSTALLED_EXEC} %f" in text
    # verify insists that ExecStart exists: point it at this environment's script
    script = Path(sys.executable).with_name("scoutfs-notifyd")
    if not script.exists():
        pytest.skip(f"{script} missing: install the project (pip install -e .)")
    text = text.replace(INSTALLED_EXEC, str(script))
    (tmp_path / UNIT.name).write_text(text)
    instance = tmp_path / "scoutfs-notifyd@mnt-scoutfs.service"
    instance.write_text(text)
    res = subprocess.run(
        [analyze, "verify", str(instance)], capture_output=True, text=True, timeout=120
    )
    # unknown keys are only warnings (exit 0): any line about our unit fails too
    ours = [line for line in res.stderr.splitlines() if "scoutfs-notifyd" in line]
    assert res.returncode == 0, res.stderr
    assert not ours, res.stderr


def test_instance_is_the_escaped_mount_path() -> None:
    analyze = shutil.which("systemd-escape")
    if analyze is None:
        pytest.skip("systemd-escape not installed (Debian package systemd)")
    name = subprocess.run(
        [analyze, "--path", "--template", UNIT.name, "/mnt/scoutfs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert name == "scoutfs-notifyd@mnt-scoutfs.service"
    assert "%f" in UNIT.read_text()
