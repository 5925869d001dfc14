"""The README's main job (``bash bootstrap.sh demo``) shows records for its reads."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_over_a_fresh_directory() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "compat.demo"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    reads = re.findall(r"^\S+Z READ ino=\d+ pid=(\d+) ", res.stdout, re.M)
    opens = re.findall(r"^\S+Z OPEN ino=\d+ pid=(\d+) ", res.stdout, re.M)
    assert len(reads) >= 3, res.stdout
    assert len(opens) >= 3, res.stdout
    assert "exited with status 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_over_a_given_directory(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "only.txt").write_text("x\n")
    res = subprocess.run(
        [sys.executable, "-m", "compat.demo", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reading only.txt" in res.stderr
    assert re.search(r"^\S+Z READ ino=\d+ ", res.stdout, re.M), res.stdout
