"""The systemd readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from typing import Any

__all__ = ["sd_notify", "wait_ready"]

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager, if there is one.

    Returns False when $NOTIFY_SOCKET is unset (not started by systemd) or
    the manager did not take the message.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        # an abstract socket, written with a leading @ in the environment
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            # a path in STATUS= may hold bytes that are not UTF-8 (os.fsencode's rule)
            sock.sendall(state.encode(errors="surrogateescape"))
    except OSError as exc:
        # the manager going away must not take the daemon down with it
        log.warning("cannot notify the service manager at %s: %s", addr, exc.strerror)
        return False
    return True


def wait_ready(listener: socket.socket, proc: subprocess.Popen[Any], timeout: float) -> None:
    """The service manager's half: wait for READY=1 from ``proc``.

    ``listener`` is the bound datagram socket that ``proc``'s $NOTIFY_SOCKET
    names; tests and benchmarks that start a daemon themselves use this to
    know its socket listens.

    Raises:
        ChildProcessError: ``proc`` exited first.
        TimeoutError: no READY=1 within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    listener.settimeout(0.2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChildProcessError(f"exited with status {proc.returncode} before READY=1")
        try:
            msg = listener.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in msg.split(b"\n"):
            return
    raise TimeoutError(f"sent no READY=1 in {timeout} s")
