"""``systemd-analyze verify`` of the repository's template units, as instances."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
# where the units' ExecStart expects the console scripts (pip install . as root)
INSTALLED_BIN = "/usr/local/bin/"


def verify_instance(tmp_path: Path, template: str, instance: str, *also: str) -> None:
    """Verify ``instance`` of the unit file ``template``; ``also``: units it names.

    verify insists that each ExecStart exists, so every unit's scripts are
    pointed at this environment's; unknown keys are only warnings (exit 0), so
    any line about our units fails too.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    bindir = Path(sys.executable).parent
    for name in (template, *also):
        text = (SYSTEMD_DIR / name).read_text()
        for script in re.findall(re.escape(INSTALLED_BIN) + r"(\S+)", text):
            if not (bindir / script).exists():
                pytest.skip(f"{bindir / script} missing: install the project (pip install -e .)")
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, f"{bindir}/"))
    (tmp_path / instance).write_text((tmp_path / template).read_text())
    res = subprocess.run(
        [analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    ours = [line for line in res.stderr.splitlines() if "scoutfs-notify" in line]
    assert not ours, res.stderr
