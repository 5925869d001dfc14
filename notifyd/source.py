"""What the relay needs from a source of records.

A source turns some kernel facility into batches of whole 64-byte records in
``seq`` order and hands each batch to ``publish``, typically one batch per
drain of the kernel.  The relay never looks inside a batch (it cuts it into
messages of up to 64 records as it sends), so a benchmark can drive it with
an in-process source that publishes prebuilt bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

__all__ = ["Publish", "Source"]

# Receives one batch of whole records, any number of them.  The relay keeps a
# reference, so the bytes must not change afterwards.  Never blocks; the relay
# queues or drops per client.
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
        """Where this source's socket lives under ``run_dir`` (docs/ABI.md section 4)."""

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drain until cancelled, publishing batches."""

    def close(self) -> None:
        """Release the kernel side (detach); safe after a partial open."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``scoutfs-notify stats``."""
