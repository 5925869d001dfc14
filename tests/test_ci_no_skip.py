"""Under CI a kernel test never skips: the reason it would have skipped fails it.

Runs one real scoutfs_src test of the suite in a child pytest with the source
pointed at nothing, once as a developer would (it skips and says why) and once
with CI=true (it fails, carrying the same reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# needs only the source: git grep over the release tags, no build
VICTIM = "tests/test_kmod_series.py::test_nr_is_free_in_each_release"


def run_victim(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["SCOUTFS_SRC"] = str(tmp_path / "no-scoutfs-here")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", VICTIM],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_ci_a_missing_source_skips_with_the_reason(tmp_path: Path) -> None:
    p = run_victim(tmp_path, None)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 skipped" in p.stdout
    assert "no scoutfs git repository at SCOUTFS_SRC=" in p.stdout


def test_under_ci_a_missing_source_fails_with_the_reason(tmp_path: Path) -> None:
    p = run_victim(tmp_path, "true")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "skipped" not in p.stdout.splitlines()[-1]
    assert "CI=true: a test marked scoutfs_src must not skip in CI" in p.stdout
    assert "no scoutfs git repository at SCOUTFS_SRC=" in p.stdout
