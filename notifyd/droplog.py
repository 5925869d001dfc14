"""Log lost records without flooding the log while they keep being lost.

A client just slower than the feed, or a ring that stays full, loses records
on every drain; one warning per drain would bury everything else.  The
first loss is logged at once, later ones are summed and logged at most once
per interval, and :meth:`DropLog.flush` reports what is left (at shutdown or
disconnect).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["DROP_LOG_INTERVAL", "DropLog"]

# At most one warning per this many seconds per source of losses.
DROP_LOG_INTERVAL = 5.0


class DropLog:
    """Sums losses and logs ``"<what>: N <unit><why>"`` at most once per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        unit: str = "records lost",
        interval: float = DROP_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.what = what
        self.unit = unit
        self.interval = interval
        self.clock = clock
        self.pending = 0
        self.total = 0
        self._next = 0.0

    def add(self, n: int, why: str = "") -> None:
        self.pending += n
        self.total += n
        now = self.clock()
        if now >= self._next:
            self._emit(why)
            self._next = now + self.interval

    def flush(self, why: str = "") -> None:
        if self.pending:
            self._emit(why)

    def _emit(self, why: str) -> None:
        self.log.warning(
            "%s: %d %s%s (%d in all)", self.what, self.pending, self.unit, why, self.total
        )
        self.pending = 0
