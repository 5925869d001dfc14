"""Processes a benchmark starts: CPU and memory of a pid, and cleanup that always runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from notifyd import sdnotify

__all__ = [
    "bind_self",
    "cpu_seconds",
    "mounted",
    "notifyd",
    "rss_bytes",
    "spawn",
    "stop",
    "tmpfs",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parent.parent

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Bounds on a hang, not measurements.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (its own threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        # the command name may hold spaces: fields start after the last ')'
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` now."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Signal ``proc``, then SIGKILL it if it has not exited within STOP_TIMEOUT."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def spawn(cmd: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """Popen that is stopped (SIGTERM, then SIGKILL) when the block ends, however it ends."""
    proc = subprocess.Popen(list(cmd), **kwargs)
    try:
        yield proc
    finally:
        stop(proc)


def wait_ready(notify: socket.socket, proc: subprocess.Popen, log: Path) -> None:
    """Wait for READY=1 on a bound ``$NOTIFY_SOCKET`` datagram socket (sd_notify)."""
    try:
        sdnotify.wait_ready(notify, proc, READY_TIMEOUT)
    except (ChildProcessError, TimeoutError) as exc:
        raise RuntimeError(f"{proc.args[0]} {exc}:\n" + log.read_text(errors="replace")) from None


@contextlib.contextmanager
def notifyd(
    cfg_env: dict[str, str], tmp: Path, args: Sequence[str], module: str = "notifyd.daemon"
) -> Iterator[subprocess.Popen]:
    """A daemon (``python -m MODULE ARGS``) that has sent READY=1; stopped on exit.

    Its log is ``tmp/MODULE.log``.
    """
    log = tmp / f"{module}.log"
    sd = tmp / f"{module}.sd"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sd))
    env = {**cfg_env, "NOTIFY_SOCKET": str(sd)}
    cmd = [sys.executable, "-m", module, *args]
    with (
        notify,
        open(log, "wb") as out,
        spawn(cmd, stdout=out, stderr=out, env=env, cwd=ROOT) as proc,
    ):
        wait_ready(notify, proc, log)
        yield proc


def mounted(target: str) -> bool:
    """Whether something is mounted exactly at ``target`` (/proc/mounts does not lie)."""
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


@contextlib.contextmanager
def bind_self(path: Path) -> Iterator[Path]:
    """Bind-mount ``path`` onto itself: a mount of its own, so that a fanotify
    mount mark on it sees this benchmark's accesses and nothing else on the machine."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "512m") -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; whatever is on it goes with the unmount."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
