"""The README's main job: the daemon over a directory, and what a watcher sees.

``python -m notifyd.demo [DIR]`` starts ``scoutfs-notifyd`` over DIR (the
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
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from compat.inotify_shim import demo as shim_demo

from . import ioctls
from .sdnotify import wait_ready

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


def pick_files(root: Path, n: int = FILES_TO_READ) -> list[Path]:
    """The first ``n`` readable regular files under ``root``, shallowest first."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
                found.append(p)
                if len(found) == n:
                    return found
    return found


class Daemon:
    """``scoutfs-notifyd`` as a child process, ready once it sent READY=1."""

    def __init__(self, source: str, path: Path, sock: Path, log: Path) -> None:
        self.socket = sock
        self.log = log
        notify_path = sock.with_name("sd_notify")
        # kept open until stop(): the daemon also reports STOPPING=1
        self._notify = notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        try:
            with open(log, "wb") as logf:
                self.proc = subprocess.Popen(
                    [*_PY, "notifyd.daemon", "--source", source, str(path), "--socket", str(sock)],
                    stdin=subprocess.DEVNULL,
                    stderr=logf,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                )
        except BaseException:
            notify.close()
            raise
        try:
            wait_ready(notify, self.proc, START_TIMEOUT)
        except (ChildProcessError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"the daemon did not start ({exc}):\n{log.read_text()}") from None

    def clients(self) -> int:
        out = subprocess.run(
            [*_PY, "notifyd.cli", "stats", "--json", "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return len(json.loads(out)["clients"])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._notify.close()
        return self.proc.returncode


class Watcher:
    """``scoutfs-notify watch`` as a child process; its lines are echoed as they come."""

    def __init__(self, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [*_PY, "notifyd.cli", "watch", "--socket", str(sock)],
            stdout=subprocess.PIPE,
        )
        self._buf = b""
        self.lines: list[str] = []

    def pump(self, timeout: float) -> None:
        """Echo whatever complete lines arrive within ``timeout``."""
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("scoutfs-notify watch ended early")
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        for raw in done:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            print(line, flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
    files = pick_files(directory)
    if not files:
        _log(f"no readable files under {directory}: nothing to show")
        return False
    _log(f"starting scoutfs-notifyd --source {source} {directory}")
    daemon = Daemon(source, directory, workdir / "notify.sock", workdir / "notifyd.log")
    watcher = None
    try:
        watcher = Watcher(daemon.socket)
        deadline = time.monotonic() + START_TIMEOUT
        while daemon.clients() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("scoutfs-notify watch did not connect")
            time.sleep(0.05)
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
    p = argparse.ArgumentParser(prog="python -m notifyd.demo", description=__doc__.split("\n")[0])
    p.add_argument("dir", nargs="?", help="a scoutfs mount or local directory (default: a new one)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        _log("run as root: fanotify and the scoutfs drain ioctl need CAP_SYS_ADMIN")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="nfy-demo-", dir="/tmp"))
    try:
        with demo_dir(args.dir) as directory:
            ok = run(directory, workdir)
    except (RuntimeError, OSError) as exc:
        _log(str(exc))
        ok = False
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
