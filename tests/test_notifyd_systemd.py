"""The systemd template unit passes ``systemd-analyze verify`` as an instance."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from systemd_support import verify_instance

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "scoutfs-notifyd@.service"
INSTALLED_EXEC = "/usr/local/bin/scoutfs-notifyd"


def test_unit_verifies(tmp_path) -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert f"ExecStart={INSTALLED_EXEC} %f" in text
    verify_instance(tmp_path, UNIT.name, "scoutfs-notifyd@mnt-scoutfs.service")


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
