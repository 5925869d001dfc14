"""The shim's part of the README's main job.

With a daemon already serving ``socket_path`` for ``directory``: mount the
shim over ``directory`` (at a fresh directory under /tmp), run
``inotifywait -m -r`` on the overlay, read a few files *directly* on
``directory``, and show what inotifywait reports for them.  Everything it
starts is stopped and unmounted before it returns.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from notifyd import procs

from ..procs import ShimExitedError, run_shim
from .mounts import mount_type

__all__ = ["run"]

# Bounds on waiting for the shim and for events: they end a hang, nothing more.
START_TIMEOUT = 30.0
EVENT_TIMEOUT = 20.0

# Files read on the directory to show the bridge at work.
SHOWN_FILES = 5


def run(directory: Path, socket_path: Path, out: TextIO = sys.stdout) -> int:
    """Show accesses on ``directory`` reported by inotifywait on the overlay.

    Returns 0 when every access was reported, 1 otherwise.
    """
    directory = directory.resolve()
    files = procs.pick_files(directory, SHOWN_FILES)
    if not files:
        print(f"demo: no regular files under {directory} to read", file=out)
        return 1
    # A directory of its own, emptied with rmdir/unlink only: a recursive
    # removal that met a mount still in place would delete BACKING's files.
    workdir = Path(tempfile.mkdtemp(prefix="scoutfs-notify-shim-demo-", dir="/tmp"))
    mountpoint = workdir / "overlay"
    mountpoint.mkdir()
    log = workdir / "shim.log"
    try:
        return _show(directory, files, mountpoint, socket_path, log, out)
    except (ShimExitedError, TimeoutError) as exc:
        print(f"demo: {exc}", file=out)
        return 1
    finally:
        if mount_type(str(mountpoint)) is None:
            print(f"demo: unmounted {mountpoint}", file=out)
            with contextlib.suppress(OSError):
                log.unlink()
                mountpoint.rmdir()
                workdir.rmdir()
        else:
            print(f"demo: {mountpoint} is still mounted: umount -l {mountpoint}", file=out)


def _show(
    directory: Path,
    files: list[Path],
    mountpoint: Path,
    socket_path: Path,
    log: Path,
    out: TextIO,
) -> int:
    print(f"demo: mounting the inotify shim over {directory} at {mountpoint}", file=out)
    with run_shim(directory, mountpoint, socket_path, log=log, ready_log="subscribed to") as shim:
        command = [
            "inotifywait",
            "-m",
            "-r",
            "-e",
            "open,access,close_nowrite",
            "--format",
            "%w%f %e",
            str(mountpoint),
        ]
        watcher = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert watcher.stdout is not None
            assert watcher.stderr is not None
            errors = procs.LineReader(watcher.stderr.fileno())
            deadline = time.monotonic() + START_TIMEOUT
            while (line := errors.next(deadline)) is not None and "Watches established" not in line:
                pass
            if line is None:
                print("demo: inotifywait did not start", file=out)
                return 1
            shown = " ".join(command[:-2]) + f" '%w%f %e' {mountpoint}"
            print(f"demo: $ {shown}", file=out)
            for path in files:
                print(f"demo: reading {path} (on {directory}, not the overlay)", file=out)
                path.read_bytes()
            waiting = {str(mountpoint / p.relative_to(directory)) for p in files}
            events = procs.LineReader(watcher.stdout.fileno())
            deadline = time.monotonic() + EVENT_TIMEOUT
            while waiting and (line := events.next(deadline)) is not None:
                print(f"inotifywait: {line}", file=out, flush=True)
                shown_path, _, names = line.rpartition(" ")
                if "CLOSE_NOWRITE" in names.split(","):
                    waiting.discard(shown_path)
        finally:
            watcher.kill()
            watcher.wait()
    if shim.proc.returncode:
        print(f"demo: the shim exited with {shim.proc.returncode}; its log:", file=sys.stderr)
        sys.stderr.write(shim.log())
    reported = len(files) - len(waiting)
    print(
        f"demo: inotifywait on the overlay reported {reported} of {len(files)} "
        f"files read directly on {directory}",
        file=out,
    )
    for missing in sorted(waiting):
        print(f"demo: not reported: {missing}", file=out)
    return 0 if not waiting else 1
