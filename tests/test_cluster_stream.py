"""The cluster stream end to end, with real parts: nats-server 2.15 (a 3-server
cluster or one server), real scoutfs-notifyd daemons on the fanotify source,
real forwarders and the real ``scoutfs-notify watch --nats``.

Each daemon also has a raw local subscriber: what it saw is the truth the
stream is compared with.  Two directories stand for two nodes, each daemon
with its forwarder and node name; they share one --fsid.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from cluster_support import (
    EVENT_TIMEOUT,
    FSID,
    Truth,
    Watch,
    assert_per_node_exact,
    forwarders,
    fwd_args,
    nats_servers,
    read_files,
    sentinel,
    start_forwarder,
    wait_some_sentinel,
    wait_truth,
)

from notifyd import abi, procs
from notifyd.cluster.forward import MAX_BATCH_RECORDS, daemon_message_records
from notifyd.cluster.wire import DEFAULT_STREAM as STREAM
from notifyd.paths import stats_path_for
from notifyd.stats import read_stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons need root")


@pytest.fixture
def nodes(notifyd_factory, tmp_path: Path) -> Iterator[list[tuple[str, object, Truth]]]:
    out = []
    for name in ("nodeA", "nodeB"):
        daemon = notifyd_factory()
        out.append((name, daemon, Truth(daemon.socket)))
    yield out
    for _, _, truth in out:
        truth.close()


def test_three_server_cluster_two_nodes_watch_sees_both_in_order(tmp_path: Path, nodes) -> None:
    with nats_servers(tmp_path / "nats", 3) as servers, forwarders(tmp_path) as fwds:
        urls = [s.url for s in servers]
        for (name, daemon, _), url in zip(nodes, urls, strict=False):
            start_forwarder(
                fwds,
                tmp_path,
                daemon.backing,
                *fwd_args(url, daemon, name, "--replicas", "3", "--max-bytes", "64M"),
            )
        watch = Watch(urls[2], "--all", "--fsid", FSID)
        try:
            for name, daemon, _ in nodes:
                read_files(daemon.backing, 30, name)
            sentinels = {name: sentinel(daemon.backing) for name, daemon, _ in nodes}
            for name, _, truth in nodes:
                wait_truth(truth, sentinels[name])
                watch.wait_ino(name, sentinels[name], "the sentinel")
        finally:
            assert watch.stop() == 0, watch.stderr()
        for name, _, truth in nodes:
            seqs = assert_per_node_exact(watch, name, truth, sentinels[name])
            # 30 files open + read, and the sentinel's first record (the one the
            # watch waited for: assert_per_node_exact compares up to it)
            assert len(seqs) >= 61
            assert not watch.gaps(name)
        # each forwarder asked its daemon for its largest messages (docs/ABI.md
        # section 4); the daemon's raw subscriber (Truth) did not ask
        for (_, daemon, _), f in zip(nodes, fwds, strict=True):
            clients = read_stats(os.fspath(stats_path_for(daemon.socket)))["clients"]
            sizes = {c["pid"]: c["message_records"] for c in clients}
            assert f.proc is not None
            assert sizes.pop(f.proc.pid) == daemon_message_records(MAX_BATCH_RECORDS), clients
            assert set(sizes.values()) == {abi.MAX_MESSAGE_RECORDS}, clients
        for f in fwds:
            assert f.stop() == 0, f.log()


def connected_port(fwd) -> int:
    """The server port the forwarder logged it publishes through."""
    for line in fwd.log().splitlines():
        if " forwarding " in line and " on 127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"the forwarder did not say where it is connected:\n{fwd.log()}")


def test_killing_the_forwarders_server_loses_and_duplicates_nothing(tmp_path: Path, nodes) -> None:
    name, daemon, truth = nodes[0]
    with nats_servers(tmp_path / "nats", 3) as servers, forwarders(tmp_path) as fwds:
        urls = ",".join(s.url for s in servers)
        fwd = start_forwarder(
            fwds,
            tmp_path,
            daemon.backing,
            *fwd_args(urls, daemon, name, "--replicas", "3", "--max-bytes", "64M"),
        )
        victim = next(s for s in servers if s.port == connected_port(fwd))
        stop = threading.Event()

        def flow() -> None:
            i = 0
            while not stop.is_set():
                f = daemon.backing / f"flow{i % 50}"
                f.write_bytes(b"y")
                f.read_bytes()
                i += 1
                time.sleep(0.002)

        reader = threading.Thread(target=flow)
        reader.start()
        try:
            deadline = time.monotonic() + EVENT_TIMEOUT
            while len(truth.records) < 200:
                assert time.monotonic() < deadline, "no records flow"
                time.sleep(0.02)
            victim.kill()
            seen = len(truth.records)
            while len(truth.records) < seen + 300:
                assert time.monotonic() < deadline, "records stopped flowing"
                time.sleep(0.02)
        finally:
            stop.set()
            reader.join()
        last = sentinel(daemon.backing)
        wait_truth(truth, last)
        alive = [s for s in servers if s is not victim]
        watch = Watch(alive[0].url, "--all", "--fsid", FSID)
        try:
            watch.wait_ino(name, last, "the sentinel")
        finally:
            assert watch.stop() == 0, watch.stderr()
        assert "reconnected" in fwd.log(), fwd.log()
        seqs = assert_per_node_exact(watch, name, truth, last)
        assert len(seqs) > 500
        assert not watch.gaps(name)
        assert fwd.stop() == 0, fwd.log()


def test_forwarder_killed_and_restarted_reports_the_exact_loss(tmp_path: Path, nodes) -> None:
    name, daemon, truth = nodes[0]
    with nats_servers(tmp_path / "nats", 1) as servers, forwarders(tmp_path) as fwds:
        args = fwd_args(servers[0].url, daemon, name)
        fwd = start_forwarder(fwds, tmp_path, daemon.backing, *args)
        watch = Watch(servers[0].url, "--all")
        try:
            read_files(daemon.backing, 20, "before")
            s1 = sentinel(daemon.backing, "s1")
            watch.wait_ino(name, s1, "the first sentinel")
            fwd.kill()
            read_files(daemon.backing, 20, "missed")
            s2 = sentinel(daemon.backing, "s2")
            wait_truth(truth, s2)
            fwd2 = start_forwarder(fwds, tmp_path, daemon.backing, *args)
            read_files(daemon.backing, 20, "after")
            s3 = sentinel(daemon.backing, "s3")
            wait_truth(truth, s3)
            watch.wait_ino(name, s3, "the last sentinel")
        finally:
            assert watch.stop() == 0, watch.stderr()
        # up to s3's first record, the one the watch waited for
        last = min(truth.seqs_of(s3))
        got = [d["seq"] for d in watch.records(name) if d["seq"] <= last]
        assert got == sorted(set(got)), "duplicated or out of order"
        last_before = max(truth.seqs_of(s1))
        first_after = min(s for s in got if s > last_before)
        missed = [r.seq for r in truth.records if last_before < r.seq < first_after]
        # every record the daemon relayed while no forwarder ran, and only those
        assert len(missed) >= 42  # 20 files open + read, and s2's
        assert max(truth.seqs_of(s2)) in missed
        gaps = watch.gaps(name)
        assert [(g["lost"], g["next_seq"]) for g in gaps] == [(len(missed), first_after)]
        want = [r.seq for r in truth.records if r.seq <= last]
        assert sorted(got + missed) == want
        assert f"{len(missed)} records of {name} lost" in fwd2.log()


def test_durable_watch_stopped_and_restarted_gets_exactly_the_rest(tmp_path: Path, nodes) -> None:
    name, daemon, truth = nodes[0]
    with nats_servers(tmp_path / "nats", 1) as servers, forwarders(tmp_path) as fwds:
        url = servers[0].url
        start_forwarder(fwds, tmp_path, daemon.backing, *fwd_args(url, daemon, name))
        read_files(daemon.backing, 30, "first")
        s1 = sentinel(daemon.backing, "s1")
        first = Watch(url, "--durable", "archiver", "--all")
        try:
            first.wait_ino(name, s1, "the first sentinel")
        finally:
            assert first.stop() == 0, first.stderr()
        read_files(daemon.backing, 30, "second")
        s2 = sentinel(daemon.backing, "s2")
        wait_truth(truth, s2)
        # no start option: the durable continues where it stopped
        second = Watch(url, "--durable", "archiver")
        try:
            second.wait_ino(name, s2, "the second sentinel")
        finally:
            assert second.stop() == 0, second.stderr()
        # up to s2's first record, the one the second watch waited for
        last = min(truth.seqs_of(s2))
        a = [d["seq"] for d in first.records(name)]
        b = [d["seq"] for d in second.records(name) if d["seq"] <= last]
        assert a
        assert b
        assert max(a) < min(b), "the restarted consumer repeated records"
        want = [r.seq for r in truth.records if r.seq <= last]
        assert a + b == want
        assert not first.gaps(name)
        assert not second.gaps(name)


def test_nats_down_backlog_arrives_in_order_and_past_the_bound_a_loss_marker(
    tmp_path: Path, nodes
) -> None:
    name, daemon, truth = nodes[0]
    backlog = 200
    with nats_servers(tmp_path / "nats", 1) as servers, forwarders(tmp_path) as fwds:
        server = servers[0]
        fwd = start_forwarder(
            fwds,
            tmp_path,
            daemon.backing,
            *fwd_args(server.url, daemon, name, "--backlog", str(backlog)),
        )
        read_files(daemon.backing, 10, "up")
        s1 = sentinel(daemon.backing, "s1")
        wait_truth(truth, s1)
        # down: fewer records than the bound are held and arrive in order
        server.stop()
        read_files(daemon.backing, 40, "held")
        s2 = sentinel(daemon.backing, "s2")
        wait_truth(truth, s2)
        server.start()
        watch = Watch(server.url, "--all")
        try:
            watch.wait_ino(name, s2, "the held sentinel")
        finally:
            assert watch.stop() == 0, watch.stderr()
        upto_s2 = assert_per_node_exact(watch, name, truth, s2)
        assert not watch.gaps(name)
        # down again, and more records than the bound: a loss marker
        server.stop()
        before = len(truth.records)
        read_files(daemon.backing, 300, "over")
        s3 = sentinel(daemon.backing, "s3")
        wait_truth(truth, s3)
        over = len(truth.records) - before
        assert over > backlog
        server.start()
        # s3 came while the backlog was full, and so may the next few: read
        # fresh sentinels until one arrives (the backlog has gone out then)
        watch = Watch(server.url, "--all")
        try:
            s4 = wait_some_sentinel(watch, name, daemon.backing)
        finally:
            assert watch.stop() == 0, watch.stderr()
        last = min(truth.seqs_of(s4))  # the watch waited for s4's first record
        got = [d["seq"] for d in watch.records(name) if d["seq"] <= last]
        assert got == sorted(set(got)), "duplicated or out of order"
        assert got[: len(upto_s2)] == upto_s2
        want = [r.seq for r in truth.records if r.seq <= last]
        dropped = sorted(set(want) - set(got))
        # all but what the backlog held, and the message in flight when NATS went
        # (taken from the backlog, so at most as many again)
        assert len(dropped) >= over - 2 * backlog
        gaps = watch.gaps(name)
        assert gaps, "no loss marker"
        assert sum(g["lost"] for g in gaps) == len(dropped)
        for g in gaps:
            assert list(range(g["next_seq"] - g["lost"], g["next_seq"])) == [
                s for s in dropped if g["next_seq"] - g["lost"] <= s < g["next_seq"]
            ]
        assert "backlog full" in fwd.log()
        assert fwd.stop() == 0, fwd.log()


def test_watch_since_and_new_start_where_asked(tmp_path: Path, nodes) -> None:
    name, daemon, truth = nodes[0]
    with nats_servers(tmp_path / "nats", 1) as servers, forwarders(tmp_path) as fwds:
        url = servers[0].url
        start_forwarder(fwds, tmp_path, daemon.backing, *fwd_args(url, daemon, name))
        read_files(daemon.backing, 10, "old")
        s1 = sentinel(daemon.backing, "s1")
        every = Watch(url, "--all")
        every.wait_ino(name, s1, "the first sentinel")
        # the stream stamps messages in whole microseconds: step past the last one
        time.sleep(0.01)
        since = datetime.datetime.now(datetime.UTC).isoformat()
        time.sleep(0.01)
        read_files(daemon.backing, 10, "later")
        s2 = sentinel(daemon.backing, "s2")
        every.wait_ino(name, s2, "the second sentinel")
        later = Watch(url, "--since", since)
        new = Watch(url, "--new")
        try:
            later.wait_ino(name, s2, "the second sentinel")
            new.wait_watching()
            # --new started after s2: it must see the third batch whole, nothing before
            s3 = sentinel(daemon.backing, "s3")
            new.wait_ino(name, s3, "the third sentinel")
            every.wait_ino(name, s3, "the third sentinel")
        finally:
            for w in (every, later, new):
                assert w.stop() == 0, w.stderr()
        last1 = max(truth.seqs_of(s1))
        last2 = max(truth.seqs_of(s2))
        got_later = [d["seq"] for d in later.records(name) if d["seq"] <= last2]
        assert got_later == [d["seq"] for d in every.records(name) if last1 < d["seq"] <= last2]
        assert min(d["seq"] for d in new.records(name)) > last2
        # each watch stopped on its own: the one stopped later may have more
        # records after the third sentinel's first (its READ, say)
        upto = min(max(d["seq"] for d in w.records(name)) for w in (every, new))
        assert [d["seq"] for d in new.records(name) if d["seq"] <= upto] == [
            d["seq"] for d in every.records(name) if last2 < d["seq"] <= upto
        ]


def _consumer_leaders(url: str, stream: str) -> dict[str, str | None]:
    """The stream's consumers and the server leading each (None: no leader now)."""
    import asyncio

    import nats

    async def leaders() -> dict[str, str | None]:
        nc = await nats.connect(url)
        try:
            infos = await nc.jetstream().consumers_info(stream)
            return {ci.name: ci.cluster.leader if ci.cluster else None for ci in infos}
        finally:
            await nc.close()

    return asyncio.run(leaders())


def test_a_live_watch_whose_consumer_dies_with_its_server_resumes_where_it_was(
    tmp_path: Path, nodes
) -> None:
    """A plain watch is an ordered consumer, kept on one server: killed with
    it before a record came, it is made again after the seq it started at,
    so the watch gets every later record once and none from before it."""
    name, daemon, truth = nodes[0]
    with nats_servers(tmp_path / "nats", 3) as servers, forwarders(tmp_path) as fwds:
        urls = ",".join(s.url for s in servers)
        start_forwarder(
            fwds,
            tmp_path,
            daemon.backing,
            *fwd_args(urls, daemon, name, "--replicas", "3", "--max-bytes", "64M"),
        )
        read_files(daemon.backing, 10, "old")
        before = sentinel(daemon.backing, "before")
        every = Watch(urls, "--all", "--fsid", FSID)
        try:
            every.wait_ino(name, before, "the sentinel before the watch")
        finally:
            assert every.stop() == 0, every.stderr()
        earlier = set(_consumer_leaders(servers[0].url, STREAM))
        watch = Watch(urls, "--fsid", FSID)
        try:
            watch.wait_watching()
            mine = {
                c: leader
                for c, leader in _consumer_leaders(servers[0].url, STREAM).items()
                if c not in earlier
            }
            assert len(mine) == 1, mine
            assert None not in mine.values(), mine
            victim = next(s for s in servers if s.name in mine.values())
            victim.kill()
            alive = next(s for s in servers if s is not victim)

            def made_again() -> bool:
                try:
                    now = _consumer_leaders(alive.url, STREAM)
                except nats.errors.TimeoutError:
                    return False  # the cluster elects new leaders after the kill
                return any(
                    c not in earlier and c not in mine and leader not in (None, victim.name)
                    for c, leader in now.items()
                )

            procs.wait_until(made_again, EVENT_TIMEOUT, "the watch to make its consumer again")
            read_files(daemon.backing, 10, "new")
            after = sentinel(daemon.backing, "after")
            watch.wait_ino(name, after, "the sentinel after the kill")
        finally:
            assert watch.stop() == 0, watch.stderr()
    first_new = max(truth.seqs_of(before)) + 1
    last = max(truth.seqs_of(after))
    want = [r.seq for r in truth.records if first_new <= r.seq <= last]
    got = [d["seq"] for d in watch.records(name) if d["seq"] <= last]
    assert got == want, f"watch {got} != the daemon's records after the first sentinel {want}"
    assert not watch.gaps(name)
