"""What the relay needs from a source of records.

A source turns some kernel facility into batches of whole 64-byte records in
``seq`` order and hands each batch to ``publish``.  The relay never looks
inside a batch, so a benchmark can drive it with an in-process source that
publishes prebuilt bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

__all__ = ["Publish", "Source"]

# Receives one message: 1 to 64 whole records (abi.MAX_MESSAGE_BYTES at most).
# Must not block; the relay queues or drops per client.
Publish = Callable[[bytes], None]


class Source(Protocol):
    """The interface of :mod:`notifyd.source_fanotify` and :mod:`notifyd.source_scoutfs`."""

    # "scoutfs" or "fanotify", for logs and stats
    name: str

    def open(self) -> None:
        """Acquire the kernel side so that events flow from now on.

        Raises:
            DaemonError: with a message that names the fix.
        """

    def default_socket_path(self, run_dir: str) -> str:
        """Where this source's socket lives under ``run_dir`` (ABI.md section 4)."""

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drain until cancelled, publishing batches."""

    def close(self) -> None:
        """Release the kernel side (detach); safe after a partial open."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``scoutfs-notify stats``."""
