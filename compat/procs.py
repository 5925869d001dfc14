"""The inotify shim as a child process, for the demo, the tests and the benchmarks.

:func:`run_shim` mounts the shim and always takes it down again: the shim is
stopped (SIGTERM, then SIGKILL) and whatever is left mounted is removed
(``fusermount3 -u``, then ``umount -l``), also when the block fails.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from notifyd import procs

from .inotify_shim.mounts import FSTYPE, mount_type

__all__ = ["ShimExitedError", "ShimProcess", "run_shim", "shim_command", "unmount"]

# Bounds on a hang: mounting, subscribing and exiting take well under a second
# on an idle machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class ShimExitedError(RuntimeError):
    """The shim exited before it mounted, or ignored a signal to stop."""


def shim_command(backing: Path, mountpoint: Path, *args: str) -> list[str]:
    """The command line that runs ``scoutfs-notify-shim`` with ``args``."""
    return [sys.executable, "-m", "compat.inotify_shim.main", *args, str(backing), str(mountpoint)]


def unmount(mountpoint: Path) -> None:
    """Remove any mount at ``mountpoint``, however dead its server."""
    for cmd in (["fusermount3", "-u", "-q"], ["umount", "-l"]):
        if mount_type(str(mountpoint)) is None:
            return
        subprocess.run([*cmd, str(mountpoint)], capture_output=True, check=False)


class ShimProcess:
    """A running ``scoutfs-notify-shim``; its output goes to ``log_path``."""

    def __init__(self, proc: subprocess.Popen[bytes], mountpoint: Path, log_path: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = START_TIMEOUT, after: int = 0) -> None:
        """Wait until ``text`` is in the log, past its first ``after`` characters."""
        procs.wait_until(lambda: text in self.log()[after:], timeout, f"{text!r} in the shim's log")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait; its exit status.

        Raises:
            ShimExitedError: it ignored ``sig`` for ``timeout`` seconds (it is
                then killed).
        """
        rc = procs.stop(self.proc, sig, timeout)
        if rc == -signal.SIGKILL and sig != signal.SIGKILL:
            raise ShimExitedError(f"the shim ignored signal {sig}:\n{self.log()}")
        return rc


@contextlib.contextmanager
def run_shim(
    backing: Path,
    mountpoint: Path,
    socket_path: Path | None,
    *args: str,
    log: Path | None = None,
    ready_log: str | None = None,
) -> Iterator[ShimProcess]:
    """Mount the shim of ``backing`` at ``mountpoint``.

    Yields once it is mounted and its log shows ``ready_log`` (by default,
    with a ``socket_path``, that path: the shim names it once it has
    subscribed or found no daemon there).  A mount already at
    ``mountpoint`` (left by a killed shim) is left for the shim to judge.
    ``args`` go to the shim before BACKING; the log defaults to
    ``shim-<mountpoint name>.log`` beside the mountpoint.

    Raises:
        ShimExitedError: the shim exited before it mounted.
        TimeoutError: it did not mount (or name its socket) in START_TIMEOUT.
    """
    if mount_type(str(mountpoint)) is None:
        mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"shim-{mountpoint.name}.log"
    extra = ["--socket", str(socket_path)] if socket_path else []
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            shim_command(backing, mountpoint, *extra, *args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    shim = ShimProcess(proc, mountpoint, log)
    try:
        procs.wait_until(
            lambda: mount_type(str(mountpoint)) == FSTYPE or proc.poll() is not None,
            START_TIMEOUT,
            "the shim to mount",
        )
        if proc.poll() is not None:
            raise ShimExitedError(f"the shim exited with {proc.returncode}:\n{shim.log()}")
        if ready_log is None and socket_path:
            ready_log = str(socket_path)
        if ready_log:
            shim.wait_log(ready_log)
        yield shim
    finally:
        with contextlib.suppress(ShimExitedError):
            shim.stop()
        unmount(mountpoint)
