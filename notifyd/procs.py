"""Child processes for the demo, the tests and the benchmarks.

One place for what each of them needs around a process it starts: start it
and wait for READY=1 (:func:`start_ready`), stop it with SIGTERM then SIGKILL
(:func:`stop`, :func:`spawn`), wait until a condition holds
(:func:`wait_until`), read its output by lines with a deadline
(:class:`LineReader`), and pick files to read (:func:`pick_files`).  The
daemon itself never uses this module.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .sdnotify import wait_ready

__all__ = [
    "POLL_INTERVAL",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "LineReader",
    "NotReadyError",
    "ReadyProcess",
    "pick_files",
    "spawn",
    "start_ready",
    "stop",
    "wait_until",
]

T = TypeVar("T")

# Bounds on a hang, never measurements: generous, because the machines these
# run on share two cores between FUSE daemons, qemu guests and benchmarks.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# How often wait_until looks again: short enough not to slow a test down,
# long enough not to steal the CPU the awaited process needs.
POLL_INTERVAL = 0.02


class NotReadyError(RuntimeError):
    """A process exited, or stayed silent, before it reported READY=1."""


def stop(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> int:
    """Send ``sig`` to ``proc``; SIGKILL it if it has not exited within ``timeout``.

    Returns:
        Its exit status; ``-signal.SIGKILL`` tells a process that had to be
        killed (when ``sig`` was something else).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def spawn(cmd: Sequence[str], **popen_kwargs: Any) -> Iterator[subprocess.Popen[Any]]:
    """``Popen(cmd)`` stopped with :func:`stop` when the block ends, however it ends."""
    proc: subprocess.Popen[Any] = subprocess.Popen(list(cmd), **popen_kwargs)
    try:
        yield proc
    finally:
        stop(proc)


class ReadyProcess:
    """A child started by :func:`start_ready` that has reported READY=1.

    Attributes:
        proc: the process; its stdout and stderr go to ``log_path``.
        log_path: its log file.
    """

    def __init__(
        self, proc: subprocess.Popen[bytes], notify: socket.socket, log_path: Path
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        # open until stop(): a daemon reports STOPPING=1 on its way out too
        self._notify: socket.socket | None = notify

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """:func:`stop` the process and close its notify socket; its exit status."""
        rc = stop(self.proc, sig, timeout)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        return rc


def start_ready(
    cmd: Sequence[str],
    notify_path: Path,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = READY_TIMEOUT,
) -> ReadyProcess:
    """Start ``cmd`` as a systemd ``Type=notify`` service would, and wait for READY=1.

    ``notify_path`` becomes the child's ``$NOTIFY_SOCKET`` (a stale socket
    there is replaced); the child's stdout and stderr are appended to
    ``log_path``; ``env`` replaces the environment (default: ours).

    Raises:
        NotReadyError: the child exited or sent no READY=1 within ``timeout``;
            the message holds its log.  The child is stopped first.
    """
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        notify.bind(str(notify_path))
        child_env = {**(os.environ if env is None else env), "NOTIFY_SOCKET": str(notify_path)}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env,
                cwd=cwd,
            )
    except BaseException:
        notify.close()
        raise
    ready = ReadyProcess(proc, notify, log_path)
    try:
        wait_ready(notify, proc, timeout)
    except (ChildProcessError, TimeoutError) as exc:
        ready.stop()
        raise NotReadyError(f"{' '.join(cmd[:3])}: {exc}; its log:\n{ready.log()}") from None
    return ready


def wait_until(
    check: Callable[[], T], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> T:
    """Call ``check`` until it returns something true, and return that.

    Raises:
        TimeoutError: still false after ``timeout`` seconds; the message
            names ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class LineReader:
    """Lines from a pipe, each awaited with a deadline, without a reader thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self.eof = False

    def next(self, deadline: float) -> str | None:
        """The next line without its newline; None at EOF or once ``deadline``
        (a ``time.monotonic()`` value) has passed."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if self.eof or left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")


def pick_files(root: Path, count: int) -> list[Path]:
    """The first ``count`` readable regular files under ``root``, shallowest
    directory first, by name within one; symlinks are passed over."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                found.append(path)
                if len(found) == count:
                    return found
    return found
