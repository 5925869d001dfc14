"""Real processes for the shim's tests: the shim itself, inotifywait, a record feeder.

Every helper is a context manager that cleans up on failure too: the shim
(:func:`compat.procs.run_shim`, shared with the demo and the benchmarks) is
stopped (SIGTERM, then SIGKILL) and its mount removed (``fusermount3 -u``,
then ``umount -l``); watchers are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compat.procs import ShimProcess as Shim
from compat.procs import run_shim, shim_command, unmount
from notifyd import abi
from notifyd.procs import wait_until as wait_for

__all__ = [
    "EVENT_TIMEOUT",
    "START_TIMEOUT",
    "Feeder",
    "Shim",
    "Watcher",
    "feeder",
    "need_fuse",
    "need_inotifywait",
    "run_shim",
    "shim_command",
    "unmount",
    "wait_for",
    "watch",
]

# Generous deadlines: they bound a hang, they do not measure anything.
START_TIMEOUT = 30.0
EVENT_TIMEOUT = 20.0


def need_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("the shim tests mount FUSE and need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: load the fuse module")


def need_inotifywait() -> None:
    if shutil.which("inotifywait") is None:
        pytest.skip("inotifywait not installed (Debian package inotify-tools)")


class Watcher:
    """``inotifywait -m -r`` on a directory; events as (relative path, {EVENTS})."""

    def __init__(self, root: Path, proc: subprocess.Popen[str]) -> None:
        self.root = root
        self.proc = proc
        self.events: queue.Queue[tuple[str, frozenset[str]]] = queue.Queue()
        self.seen: list[tuple[str, frozenset[str]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        prefix = str(self.root) + "/"
        for line in self.proc.stdout:
            path, _, names = line.rstrip("\n").partition("\t")
            rel = path[len(prefix) :] if path.startswith(prefix) else path
            self.events.put((rel, frozenset(names.split(","))))

    def expect(self, path: str, event: str, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until ``event`` on ``path`` arrives (or was seen already)."""
        deadline = time.monotonic() + timeout
        while not any(p == path and event in e for p, e in self.seen):
            left = deadline - time.monotonic()
            try:
                self.seen.append(self.events.get(timeout=max(left, 0)))
            except queue.Empty:
                raise AssertionError(
                    f"no {event} for {path!r} within {timeout}s; saw {self.seen}"
                ) from None

    def drain(self, quiet: float = 1.0) -> list[tuple[str, frozenset[str]]]:
        """Collect events until none arrives for ``quiet`` seconds."""
        while True:
            try:
                self.seen.append(self.events.get(timeout=quiet))
            except queue.Empty:
                return self.seen

    def sequence(self, path: str) -> list[str]:
        """The events seen on ``path``, in order, ISDIR dropped."""
        out = []
        for p, names in self.seen:
            if p == path:
                out.extend(sorted(names - {"CLOSE", "ISDIR"}))
        return out


@contextlib.contextmanager
def watch(root: Path, *events: str) -> Iterator[Watcher]:
    """Run ``inotifywait -m -r`` on ``root`` until the block ends."""
    need_inotifywait()
    cmd = ["inotifywait", "-m", "-r", "--format", "%w%f\t%e"]
    for ev in events or ("open", "access", "close_nowrite"):
        cmd += ["-e", ev]
    proc = subprocess.Popen(
        [*cmd, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Watches established" in line:
                break
        else:
            raise AssertionError(f"inotifywait failed to start (exit {proc.wait()})")
        yield Watcher(root, proc)
    finally:
        proc.kill()
        proc.wait()


class Feeder:
    """A stand-in daemon: a real SEQPACKET socket that sends the records we give it.

    For unit tests of the bridge only; the tests that prove the feature use
    the real daemon.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        self.clients: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(str(path))
        self.sock.listen(8)

    def wait_client(self, count: int = 1) -> None:
        while len(self.clients) < count:
            self.sock.settimeout(START_TIMEOUT)
            conn, _ = self.sock.accept()
            self.clients.append(conn)

    def record(self, rec_type: int, ino: int, pid: int = 1, skip: int = 0) -> abi.Record:
        self.seq += 1 + skip
        return abi.Record(
            seq=self.seq,
            ino=ino,
            time_ns=time.time_ns(),
            pos=0,
            count=0,
            pid=pid,
            uid=0,
            gid=0,
            flags=0,
            type=rec_type,
        )

    def send(self, records: list[abi.Record]) -> None:
        for i in range(0, len(records), abi.MAX_MESSAGE_RECORDS):
            msg = abi.encode(records[i : i + abi.MAX_MESSAGE_RECORDS])
            for c in self.clients:
                c.sendall(msg)

    def access(self, path: Path, pid: int = 1, reads: int = 1) -> None:
        """Send the records a ``cat path`` by ``pid`` would produce."""
        ino = path.stat().st_ino
        recs = [self.record(abi.TYPE_OPEN, ino, pid)]
        recs += [self.record(abi.TYPE_READ, ino, pid) for _ in range(reads)]
        self.send(recs)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def feeder(path: Path) -> Iterator[Feeder]:
    f = Feeder(path)
    try:
        yield f
    finally:
        f.close()


def shim_stats(mnt: Path) -> dict[str, object]:
    """``scoutfs-notify stats --shim MNT --json``, the operator's view."""
    out = subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "stats", "--shim", str(mnt), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc: dict[str, object] = json.loads(out)
    return doc
