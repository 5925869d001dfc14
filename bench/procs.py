"""Processes a benchmark starts: CPU and memory of a pid, and cleanup that always runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["cpu_seconds", "rss_bytes", "spawn", "stop", "wait_ready"]

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
    deadline = time.monotonic() + READY_TIMEOUT
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before READY=1:\n"
                + log.read_text(errors="replace")
            )
        try:
            msg = notify.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in msg.split(b"\n"):
            return
    raise RuntimeError(f"no READY=1 in {READY_TIMEOUT} s:\n" + log.read_text(errors="replace"))
