"""The read-only stats socket: connect, read one JSON document, done.

It sits beside the notify socket (:func:`notifyd.paths.stats_path_for`) with
the same mode.  The daemon never reads from it, so a client cannot change
anything; ``scoutfs-notify stats`` is its consumer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from .listen import Listener
from .peer import check_peer

__all__ = ["read_stats", "serve_stats"]

log = logging.getLogger(__name__)

# A stats reader that does not take its few KiB within this long is dropped.
SEND_TIMEOUT = 2.0


async def serve_stats(
    listener: Listener | socket.socket,
    snapshot: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on ``listener`` (SOCK_STREAM) with ``snapshot()``.

    Given a :class:`Listener`, its ``sock`` is read anew each time:
    :meth:`Listener.rebind` may replace it, and wakes this task with
    ``notify_closing`` on the old one.
    """
    task_status.started()
    while True:
        sock = listener.sock if isinstance(listener, Listener) else listener
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            if not isinstance(listener, Listener) or sock is listener.sock:
                raise
            continue
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            continue
        doc = (json.dumps(snapshot(), indent=2) + "\n").encode()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(doc)
        if scope.cancelled_caught:
            log.warning("stats reader did not read its answer in %.0f s", SEND_TIMEOUT)
        await trio.aclose_forcefully(stream)


def read_stats(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Fetch one stats document from the daemon at stats socket ``path``.

    Raises:
        OSError: cannot connect, or no answer within ``timeout``.
        ValueError: the answer is not a JSON object (not a daemon's socket).
        UntrustedPeerError: neither root nor the caller serves ``path``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        check_peer(sock, path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not a stats document")
    return doc
