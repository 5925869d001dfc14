"""DropLog: the first loss at once, then at most one line per interval, nothing lost."""

from __future__ import annotations

import logging

from notifyd.droplog import DropLog


def test_losses_are_summed_between_lines(caplog) -> None:
    now = [100.0]
    drops = DropLog(logging.getLogger("t"), "client 3", interval=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        drops.add(10, ": queue full")
        for _ in range(50):
            now[0] += 0.01
            drops.add(2, ": queue full")
        assert [r.getMessage() for r in caplog.records] == [
            "client 3: 10 records lost: queue full (10 in all)"
        ]
        now[0] += 5.0
        drops.add(1, ": queue full")
        drops.flush()
        drops.add(0)
    assert [r.getMessage() for r in caplog.records][1:] == [
        "client 3: 101 records lost: queue full (111 in all)"
    ]
    assert drops.total == 111
    assert drops.pending == 0


def test_flush_reports_the_rest(caplog) -> None:
    now = [0.0]
    drops = DropLog(logging.getLogger("t"), "ring", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        drops.add(1)
        drops.add(4)
        drops.flush(" before shutdown")
        drops.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "ring: 1 records lost (1 in all)",
        "ring: 4 records lost before shutdown (5 in all)",
    ]
