"""Stage: a big directory listed through the overlay, against listing BACKING directly.

``ls -l`` of a directory of empty files on a tmpfs, through the real shim
(``compat.procs.run_shim``, no daemon: listing needs none) and directly on
the tmpfs, the two arms back to back and in turns first.  The first listing
through a fresh mount (every entry new to the overlay) is reported apart
from the later ones (the kernel already holds the names).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from compat.procs import run_shim

from .config import Config
from .figures import Figure, Stage, median
from .procs import tmpfs

__all__ = ["run"]

STAGE = "overlay_dirs"
ENTRIES = 20_000
ENTRIES_QUICK = 2_000
TARGET_RATIO = 3.0  # overlay / BACKING
# the C locale: no collation cost, the same for both arms
LS_ENV = {**os.environ, "LC_ALL": "C"}

WHY = (
    "every READDIRPLUS request is served by the shim's one trio thread, in Python: one "
    "fstatat and one EntryAttributes per entry (`Overlay.readdir`, "
    "compat/inotify_shim/overlay.py), while ls -l on BACKING is one getdents and one "
    "statx per entry in the kernel"
)


def _cannot_run() -> str:
    if os.geteuid() != 0:
        return "the shim mounts FUSE and needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: load the fuse module"
    return ""


def _ls(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-l", str(path)], stdout=subprocess.DEVNULL, env=LS_ENV, check=True)
    return time.perf_counter() - t0


def _make_entries(d: Path, count: int) -> None:
    d.mkdir()
    for i in range(count):
        os.close(os.open(d / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))


def run(cfg: Config) -> Stage:
    entries = cfg.pick(ENTRIES, ENTRIES_QUICK)
    stage = Stage(
        STAGE,
        "big directories through the overlay",
        method=(
            f"`ls -l` (LC_ALL=C, output discarded) of a directory of {entries} empty files "
            "on a tmpfs BACKING, through the real shim (`scoutfs-notify-shim`, default "
            "options, no daemon) and directly on the tmpfs; each run lists both, in turns "
            "first. The first listing through a fresh mount, when every entry is new to the "
            "overlay, is a figure of its own; the others are medians of the runs."
        ),
    )
    why = _cannot_run()
    if why:
        stage.skipped = why
        return stage
    with tempfile.TemporaryDirectory(prefix="nfyb-dirs-", dir=cfg.workdir) as tmp_name:
        tmp = Path(tmp_name)
        backing, mnt = tmp / "backing", tmp / "mnt"
        backing.mkdir()
        with tmpfs(backing):
            _make_entries(backing / "big", entries)
            _ls(backing / "big")  # BACKING's own caches warm, as they are for the overlay
            with run_shim(backing, mnt, None, log=tmp / "shim.log"):
                direct_first = _ls(backing / "big")
                first = _ls(mnt / "big")
                over: list[float] = []
                back: list[float] = []
                for r in range(cfg.repeats):
                    arms = [(over, mnt), (back, backing)]
                    for runs, root in arms if r % 2 else arms[::-1]:
                        runs.append(_ls(root / "big"))
    stage.add(
        Figure(
            STAGE,
            "ls_l_first_s",
            first,
            "s",
            direct_first,
            "the same ls -l on BACKING directly, just before",
            note=f"{entries} entries, the first listing through a fresh mount (one run)",
        )
    )
    paired = median(o / b for o, b in zip(over, back, strict=True))
    fig = Figure(
        STAGE,
        "ls_l_s",
        median(over),
        "s",
        median(back),
        "the same ls -l on BACKING directly, in the same run",
        target=f"<= {TARGET_RATIO:g}x BACKING (median of per-run ratios)",
        met=paired <= TARGET_RATIO,
        runs=over,
        note=f"{entries} entries; median of the per-run overlay/BACKING ratios {paired:.3g}",
    )
    if not fig.met:
        fig.why = WHY
    stage.add(fig)
    return stage
