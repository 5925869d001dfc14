"""The README's main job: the daemon over a directory, and what a watcher sees.

``python -m compat.demo [DIR]`` starts ``scoutfs-notifyd`` over DIR (the
scoutfs source when DIR is a scoutfs mount, else the fanotify source; a
fresh directory with a few files when DIR is not given), subscribes with
``scoutfs-notify watch``, reads a few files in a child process, prints the
watcher's lines; then mounts the inotify shim over DIR, runs ``inotifywait
-m -r`` on the overlay and reads files directly on DIR again
(:mod:`compat.inotify_shim.demo`), and stops everything.  It exits 0 when
the watcher saw a READ record and inotifywait an open, access and close for
every file read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from notifyd import ioctls, procs

from .inotify_shim import demo as shim_demo

__all__ = ["main"]

# Bounds on waiting for the daemon and for records; never reached when all is well.
START_TIMEOUT = 30.0
RECORD_TIMEOUT = 15.0
# How many files of a given DIR the demo reads.
FILES_TO_READ = 3

_PY = [sys.executable, "-m"]


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def is_scoutfs(path: str | os.PathLike[str]) -> bool:
    try:
        ioctls.fsid_of(path)
    except ioctls.NotScoutfsError:
        return False
    return True


class Daemon:
    """``scoutfs-notifyd`` as a child process, ready once it sent READY=1."""

    def __init__(self, source: str, path: Path, sock: Path, log: Path) -> None:
        self.socket = sock
        self.log = log
        cmd = [*_PY, "notifyd.daemon", "--source", source, str(path), "--socket", str(sock)]
        try:
            self._ready = procs.start_ready(cmd, sock.with_name("sd_notify"), log)
        except procs.NotReadyError as exc:
            raise RuntimeError(f"the daemon did not start: {exc}") from None

    def clients(self) -> int:
        out = subprocess.run(
            [*_PY, "notifyd.cli", "stats", "--json", "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return len(json.loads(out)["clients"])

    def stop(self) -> int:
        return self._ready.stop()


class Watcher:
    """``scoutfs-notify watch`` as a child process; its lines are echoed as they come."""

    def __init__(self, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [*_PY, "notifyd.cli", "watch", "--socket", str(sock)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self._lines = procs.LineReader(self.proc.stdout.fileno())
        self.lines: list[str] = []

    def pump(self, timeout: float) -> None:
        """Echo the next line, if one arrives within ``timeout``."""
        line = self._lines.next(time.monotonic() + timeout)
        if line is None:
            if self._lines.eof:
                raise RuntimeError("scoutfs-notify watch ended early")
            return
        self.lines.append(line)
        print(line, flush=True)

    def stop(self) -> None:
        # SIGINT: watch's own way to end, as Ctrl-C would
        procs.stop(self.proc, signal.SIGINT)


def read_in_child(files: list[Path]) -> int:
    """Read every file in a child process (an access like any other); its pid."""
    code = "import os, sys\nfor p in sys.argv[1:]: open(p, 'rb').read()\nprint(os.getpid())"
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True
    )
    return int(res.stdout)


@contextlib.contextmanager
def demo_dir(arg: str | None) -> Iterator[Path]:
    if arg:
        yield Path(arg).resolve()
        return
    d = Path(tempfile.mkdtemp(prefix="scoutfs-notify-demo-"))
    try:
        for name, text in [
            ("hello.txt", "hello\n"),
            ("notes.md", "# notes\n"),
            ("data.csv", "a,b\n"),
        ]:
            (d / name).write_text(text)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(directory: Path, workdir: Path) -> bool:
    source = "scoutfs" if is_scoutfs(directory) else "fanotify"
    files = procs.pick_files(directory, FILES_TO_READ)
    if not files:
        _log(f"no readable files under {directory}: nothing to show")
        return False
    _log(f"starting scoutfs-notifyd --source {source} {directory}")
    daemon = Daemon(source, directory, workdir / "notify.sock", workdir / "notifyd.log")
    watcher = None
    try:
        watcher = Watcher(daemon.socket)
        procs.wait_until(daemon.clients, START_TIMEOUT, "scoutfs-notify watch to connect")
        _log(f"reading {', '.join(f.name for f in files)} in a child process; watch prints:")
        pid = read_in_child(files)
        inos = {os.stat(f).st_ino for f in files}
        deadline = time.monotonic() + RECORD_TIMEOUT
        while time.monotonic() < deadline:
            seen = {
                int(word[4:])
                for line in watcher.lines
                if " READ " in line and f" pid={pid} " in line
                for word in line.split()
                if word.startswith("ino=")
            }
            if inos <= seen:
                break
            watcher.pump(0.2)
        else:
            _log(f"no READ record from pid {pid} for some files within {RECORD_TIMEOUT} s")
            return False
        _log(f"saw OPEN and READ for all {len(files)} files read by pid {pid}")
        _log("and through the inotify shim, for inotify watchers:")
        return shim_demo.run(directory, daemon.socket) == 0
    finally:
        if watcher:
            watcher.stop()
        rc = daemon.stop()
        _log(f"scoutfs-notifyd exited with status {rc}; its log:")
        for line in daemon.log.read_text(errors="replace").splitlines():
            print(f"  {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m compat.demo", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("dir", nargs="?", help="a scoutfs mount or local directory (default: a new one)")
    args = p.parse_args(argv)
    if args.dir and not os.path.isdir(args.dir):
        p.error(f"{args.dir}: not a directory")
    if os.geteuid() != 0:
        _log("run as root: fanotify and the scoutfs drain ioctl need CAP_SYS_ADMIN")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="nfy-demo-", dir="/tmp"))
    try:
        with demo_dir(args.dir) as directory:
            ok = run(directory, workdir)
    except (RuntimeError, OSError, TimeoutError) as exc:
        _log(str(exc))
        ok = False
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
