"""Seq-gap detection of the client library, over a real SEQPACKET socketpair."""

from __future__ import annotations

import socket

import pytest

from notifyd import abi
from notifyd.client import Gap, SeqTracker, Subscriber


def _rec(seq: int) -> abi.Record:
    return abi.Record(seq, 100 + seq, 0, 0, 0, 1, 0, 0, 0, abi.TYPE_OPEN)


def test_tracker_reports_gaps_within_and_across_batches() -> None:
    t = SeqTracker()
    first = t.events(abi.encode([_rec(5), _rec(6), _rec(9)]))
    assert [type(e).__name__ for e in first] == ["Record", "Record", "Gap", "Record"]
    assert first[2] == Gap(6, 9)
    assert first[2].lost == 2
    second = t.events(abi.encode([_rec(10), _rec(20)]))
    assert second[1] == Gap(10, 20)
    assert t.lost == 2 + 9


def test_subscriber_over_socketpair(tmp_path) -> None:
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen()
    with Subscriber(path, timeout=5) as sub:
        conn, _ = srv.accept()
        conn.send(abi.encode([_rec(1), _rec(2)]))
        conn.send(abi.encode([_rec(4)]))
        conn.send(b"\0" * 10)
        it = iter(sub)
        got = [next(it) for _ in range(4)]
        assert [getattr(e, "seq", None) for e in got] == [1, 2, None, 4]
        with pytest.raises(abi.ABIError, match="malformed message of 10 bytes"):
            next(it)
        conn.close()
    srv.close()
