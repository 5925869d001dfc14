"""Processes a benchmark starts: CPU and memory of a pid, and cleanup that always runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from notifyd.procs import spawn, start_ready, stop

__all__ = [
    "Usage",
    "bind_self",
    "cpu_seconds",
    "mounted",
    "notifyd",
    "rss_bytes",
    "spawn",
    "stop",
    "thread_cpu_seconds",
    "tmpfs",
]

ROOT = Path(__file__).resolve().parent.parent

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(path: str) -> tuple[str, list[str]]:
    """A /proc ``stat`` file: the command name, and the fields after it (state first)."""
    with open(path) as f:
        text = f.read()
    # the command name may hold spaces and parentheses: it ends at the last ')'
    head, _, rest = text.rpartition(")")
    return head.partition("(")[2], rest.split()


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (its own threads, not its children)."""
    return _cpu(_stat(f"/proc/{pid}/stat")[1])


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of ``pid``: its name and the user + system CPU seconds it used."""
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread gone meanwhile
                comm, fields = _stat(f"/proc/{pid}/task/{tid}/stat")
                out[int(tid)] = (comm, _cpu(fields))
    return out


@dataclass
class Usage:
    """What a process and the machine used between two readings (``Usage.read`` and ``-``).

    Context switches are summed over the threads alive at the reading; a
    voluntary one is a wait (a read that blocked, a hand-off to another
    thread), an involuntary one a preemption by another runnable task.
    """

    user: float = 0.0  # CPU seconds of the process
    system: float = 0.0
    voluntary: int = 0
    involuntary: int = 0
    machine_busy: float = 0.0  # CPU seconds of every core, not idle
    machine_total: float = 0.0

    @classmethod
    def read(cls, pid: int) -> Usage:
        fields = _stat(f"/proc/{pid}/stat")[1]
        u = cls(user=int(fields[11]) / _TICK, system=int(fields[12]) / _TICK)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            u.voluntary += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            u.involuntary += int(line.split()[1])
        with open("/proc/stat") as f:
            # cpu user nice system idle iowait irq softirq steal ...
            jiffies = [int(x) for x in f.readline().split()[1:9]]
        u.machine_total = sum(jiffies) / _TICK
        u.machine_busy = u.machine_total - (jiffies[3] + jiffies[4]) / _TICK
        return u

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__))

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__))

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def idle_share(self) -> float:
        """The share of the machine's CPU time that was idle (all cores)."""
        return 1 - self.machine_busy / self.machine_total if self.machine_total else 0.0


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` now."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@contextlib.contextmanager
def notifyd(
    cfg_env: dict[str, str], tmp: Path, args: Sequence[str], module: str = "notifyd.daemon"
) -> Iterator[subprocess.Popen]:
    """A daemon (``python -m MODULE ARGS``) that has sent READY=1; stopped on exit.

    Its log is ``tmp/MODULE.log``.
    """
    log = tmp / f"{module}.log"
    cmd = [sys.executable, "-m", module, *args]
    ready = start_ready(cmd, tmp / f"{module}.sd", log, env=cfg_env, cwd=ROOT)
    try:
        yield ready.proc
    finally:
        ready.stop()


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
