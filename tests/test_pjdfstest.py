"""pjdfstest, the POSIX suite FUSE filesystems run in CI, inside the overlay over a tmpfs.

The whole suite, as root, with ``--allow-other`` (its tests act as other
users): every test must pass, as on the tmpfs itself.  It takes minutes
(about 5 on a 2-core machine shared with other jobs).

The suite is built from ``shared/vendor/pjdfstest.bundle`` beside the
checkout by ``tests/build-pjdfstest``; ``PJDFSTEST_BUNDLE`` names another
bundle.  Without one the test skips, except under CI (``CI=true``), where a
missing suite is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from shim_support import need_fuse, run_shim

ROOT = Path(__file__).resolve().parent.parent

# Bounds a hang; the run itself takes minutes.
PROVE_TIMEOUT = 45 * 60

# The suite at the vendored commit; fewer means tests were not run.
MIN_TESTS = 8798


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"pjdfstest cannot run under CI: {why}")
    pytest.skip(why)


def _bundle() -> Path | None:
    env = os.environ.get("PJDFSTEST_BUNDLE")
    if env:
        return Path(env)
    # ../shared beside the clone (CI), or one level up (a git worktree)
    for base in (ROOT.parent, ROOT.parent.parent):
        cand = base / "shared" / "vendor" / "pjdfstest.bundle"
        if cand.is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def pjdfstest() -> Path:
    """The built suite's directory (pjdfstest binary and tests/)."""
    if shutil.which("prove") is None:
        _unavailable("prove (Debian package perl) is not installed")
    bundle = _bundle()
    if bundle is None or not bundle.is_file():
        _unavailable(
            "no pjdfstest.bundle in ../shared/vendor or ../../shared/vendor beside the checkout "
            "(or PJDFSTEST_BUNDLE)"
        )
        raise AssertionError("unreachable")
    res = subprocess.run(
        [str(ROOT / "tests" / "build-pjdfstest"), str(bundle)],
        capture_output=True,
        text=True,
        timeout=15 * 60,
        check=False,
    )
    if res.returncode == 3:
        _unavailable(res.stderr.strip())
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip())


@pytest.fixture
def tmpfs(tmp_path: Path):
    need_fuse()
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(back)], check=True)
    try:
        yield back
    finally:
        subprocess.run(["umount", "-l", str(back)], check=False)


def test_pjdfstest_passes_inside_the_overlay_over_tmpfs(
    pjdfstest: Path, tmpfs: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with run_shim(tmpfs, mnt, tmp_path / "absent.sock", "--allow-other") as shim:
        work = mnt / "work"
        work.mkdir()
        started = time.monotonic()
        res = subprocess.run(
            ["prove", "-r", str(pjdfstest / "tests")],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=PROVE_TIMEOUT,
            check=False,
        )
        took = time.monotonic() - started
        log = shim.log()
    summary = re.search(r"^Files=(\d+), Tests=(\d+),", res.stdout, re.M)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert summary, tail
    print(f"pjdfstest: {summary.group(0)} {took:.0f} s inside the overlay")
    assert "Result: PASS" in res.stdout, tail
    assert res.returncode == 0, tail
    assert int(summary.group(2)) >= MIN_TESTS, tail
    # no handler hit an unexpected exception on the way
    assert "answered EIO" not in log, log[-4000:]
