"""The cluster wire format without a server: names, ids, headers, per-node tracking."""

from __future__ import annotations

import pytest

from notifyd import abi
from notifyd.cluster import wire


def rec(seq: int, ino: int = 7) -> abi.Record:
    return abi.Record(seq, ino, 0, 0, 0, 1, 0, 0, 0, abi.TYPE_OPEN)


def batch(seqs: list[int], node: str = "a", epoch: str = "e1", lost: int = 0) -> wire.Batch:
    return wire.Batch("fs", node, epoch, lost, abi.encode(rec(s) for s in seqs))


def test_tokens_refuse_what_nats_would_split_or_match() -> None:
    assert wire.check_token("node", "node-A_1") == "node-A_1"
    for bad in ("", "a.b", "a*", ">", "a b", "x" * 65):
        with pytest.raises(wire.WireError, match="cannot be a NATS subject token"):
            wire.check_token("node", bad)


def test_msg_id_is_the_same_for_a_resend_and_differs_across_seq_spaces() -> None:
    h1 = wire.headers_for("fs", "a", "e1", 10, 20, 0)
    assert h1 == wire.headers_for("fs", "a", "e1", 10, 20, 0)
    assert h1[wire.HDR_MSG_ID] == "fs.a.e1.10"
    assert wire.HDR_LOST not in h1
    assert wire.headers_for("fs", "a", "e2", 10, 20, 0)[wire.HDR_MSG_ID] != h1[wire.HDR_MSG_ID]
    assert wire.headers_for("fs", "a", "e1", 10, 20, 3)[wire.HDR_LOST] == "3"


def test_parse_message_checks_subject_headers_and_payload() -> None:
    payload = abi.encode([rec(1)])
    hdrs = wire.headers_for("fs", "a", "e1", 1, 1, 2)
    b = wire.parse_message("scoutfs.notify.fs.a", hdrs, payload)
    assert (b.fsid, b.node, b.epoch, b.lost) == ("fs", "a", "e1", 2)
    with pytest.raises(wire.WireError, match=r"is not scoutfs\.notify"):
        wire.parse_message("other.subject", hdrs, payload)
    with pytest.raises(wire.WireError, match="no Scoutfs-Notify-Epoch"):
        wire.parse_message("scoutfs.notify.fs.a", {}, payload)
    with pytest.raises(wire.WireError, match="not whole records"):
        wire.parse_message("scoutfs.notify.fs.a", hdrs, payload[:-1])
    with pytest.raises(wire.WireError, match="bad Scoutfs-Notify-Lost"):
        wire.parse_message("scoutfs.notify.fs.a", {**hdrs, wire.HDR_LOST: "x"}, payload)


def test_tracker_reports_lost_headers_seq_jumps_once_and_drops_repeats() -> None:
    t = wire.NodeTracker()
    # a consumer that starts here learns the loss only from the header
    ev = t.events(batch([5, 6], lost=4))
    assert ev[0] == wire.ClusterGap("fs", "a", None, 5, 4)
    assert [e.record.seq for e in ev[1:]] == [5, 6]
    # the header and the jump name the same loss: one gap of 2, not 4
    ev = t.events(batch([9], lost=2))
    assert ev[0] == wire.ClusterGap("fs", "a", 6, 9, 2)
    # a message the stream's limits deleted shows as a jump without a header
    ev = t.events(batch([20, 21]))
    assert ev[0].lost == 10
    # a re-delivered message: nothing new
    assert t.events(batch([20, 21])) == []
    assert t.repeats == 2
    # nodes are tracked apart; a new epoch starts afresh
    assert [e.record.seq for e in t.events(batch([1], node="b"))] == [1]
    assert [e.record.seq for e in t.events(batch([1], epoch="e2"))] == [1]
    assert t.lost == 16
