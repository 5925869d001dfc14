"""Fixtures shared across the suite."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def scoutfs_cache_dir() -> Path:
    """Where kmod/fetch-scoutfs clones upstream scoutfs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "scoutfs-notify" / "scoutfs"


def find_scoutfs_src() -> tuple[Path | None, str]:
    """Return (git repo, "") or (None, why not)."""
    env = os.environ.get("SCOUTFS_SRC")
    cand = Path(env) if env else scoutfs_cache_dir()
    where = f"SCOUTFS_SRC={env}" if env else f"the fetch-scoutfs cache {cand}"
    try:
        subprocess.run(
            ["git", "-C", str(cand), "rev-parse", "--git-dir"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None, (
            f"no scoutfs git repository at {where}: set SCOUTFS_SRC to a scoutfs "
            "clone, or run kmod/fetch-scoutfs"
        )
    return cand, ""


@pytest.fixture(scope="session")
def scoutfs_src() -> Path:
    """A scoutfs git repository with the release tags; skips with the reason if none."""
    src, why = find_scoutfs_src()
    if src is None:
        pytest.skip(why)
    return src
