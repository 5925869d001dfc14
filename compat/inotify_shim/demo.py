"""The shim's part of the README's main job.

With a daemon already serving ``socket_path`` for ``directory``: mount the
shim over ``directory`` (at a fresh directory under /tmp), run
``inotifywait -m -r`` on the overlay, read a few files *directly* on
``directory``, and show what inotifywait reports for them.  Everything it
starts is stopped and unmounted before it returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from .mounts import FSTYPE, mount_type

__all__ = ["run"]

# Bounds on waiting for the shim and for events: they end a hang, nothing more.
START_TIMEOUT = 30.0
EVENT_TIMEOUT = 20.0

# Files read on the directory to show the bridge at work.
SHOWN_FILES = 5


def _wait(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pick_files(directory: Path, count: int = SHOWN_FILES) -> list[Path]:
    """A few regular files under ``directory``, shallowest first."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
                if len(found) == count:
                    return found
    return found


@contextlib.contextmanager
def _shim(directory: Path, mountpoint: Path, socket_path: Path, log: Path) -> Iterator[None]:
    cmd = [sys.executable, "-m", "compat.inotify_shim.main", "--socket", str(socket_path)]
    with open(log, "ab") as out:
        proc = subprocess.Popen([*cmd, str(directory), str(mountpoint)], stdout=out, stderr=out)
    try:
        _wait(
            lambda: proc.poll() is not None or "subscribed to" in log.read_text(errors="replace"),
            START_TIMEOUT,
            "the shim to mount and subscribe",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"the shim exited with {proc.returncode}; its log is {log}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mount_type(str(mountpoint)) == FSTYPE:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        if proc.returncode != 0:
            print(f"demo: the shim exited with {proc.returncode}; its log:", file=sys.stderr)
            sys.stderr.write(log.read_text(errors="replace"))


class _Lines:
    """Lines from a pipe, with a deadline, without a reader thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


def run(directory: Path, socket_path: Path, out: TextIO = sys.stdout) -> int:
    """Show accesses on ``directory`` reported by inotifywait on the overlay.

    Returns 0 when every access was reported, 1 otherwise.
    """
    directory = directory.resolve()
    files = pick_files(directory)
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
    with _shim(directory, mountpoint, socket_path, log):
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
            assert watcher.stdout is not None and watcher.stderr is not None
            errors = _Lines(watcher.stderr.fileno())
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
            events = _Lines(watcher.stdout.fileno())
            deadline = time.monotonic() + EVENT_TIMEOUT
            while waiting and (line := events.next(deadline)) is not None:
                print(f"inotifywait: {line}", file=out, flush=True)
                path, _, names = line.rpartition(" ")
                if "CLOSE_NOWRITE" in names.split(","):
                    waiting.discard(path)
        finally:
            watcher.kill()
            watcher.wait()
    reported = len(files) - len(waiting)
    print(
        f"demo: inotifywait on the overlay reported {reported} of {len(files)} "
        f"files read directly on {directory}",
        file=out,
    )
    for path in sorted(waiting):
        print(f"demo: not reported: {path}", file=out)
    return 0 if not waiting else 1
