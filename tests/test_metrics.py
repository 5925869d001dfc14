"""--metrics: scrape the real daemon and the real shim over HTTP; values move with accesses."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shim_support import need_fuse, run_shim, wait_for

from notifyd.client import Subscriber
from notifyd.metrics import _kmod_counters, parse_listen

# A bound on waiting for a value to move, not a timing assertion.
WAIT = 30.0
READ = "import sys\nfor p in sys.argv[1:]:\n    open(p).read()"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_url(log: str) -> str:
    m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log)
    assert m, log
    return m[1]


def read_files(*paths: Path) -> None:
    subprocess.run([sys.executable, "-c", READ, *map(str, paths)], check=True)


def test_parse_listen() -> None:
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("x", ":9100", "host:", "1:70000", "a:-1"):
        with pytest.raises(ValueError, match=r"port|ADDR:PORT"):
            parse_listen(bad)


def test_daemon_metrics_move_with_accesses(notifyd_factory) -> None:
    d = notifyd_factory(None, "--metrics", "0", "--client-queue", "1")
    url = metrics_url(d.log())
    files = []
    for i in range(3):
        f = d.backing / f"f{i}"
        f.write_text("x")
        files.append(f)
    before = scrape(url)
    assert value(before, "scoutfs_notify_clients") == 0
    assert value(before, "scoutfs_notify_records_lost_total", cause="client_queue") == 0

    read_files(*files)  # 3 OPEN + 3 READ
    after = wait_for(
        lambda: (
            (s := scrape(url))
            and value(s, "scoutfs_notify_records_drained_total")
            >= value(before, "scoutfs_notify_records_drained_total") + 6
            and s
        ),
        WAIT,
        "drained to move",
    )
    drained = value(after, "scoutfs_notify_records_drained_total")
    assert value(after, "scoutfs_notify_records_relayed_total") == drained
    assert value(after, "scoutfs_notify_drain_batch_records_sum") == drained
    assert value(after, "scoutfs_notify_drain_batch_records_count") >= 1
    assert value(after, "scoutfs_notify_last_seq") >= 6
    assert value(after, "scoutfs_notify_records_lost_total", cause="fanotify_overflow") == 0

    # a client that never reads: its queue of one message fills, then drops
    with Subscriber(d.socket):
        wait_for(lambda: value(scrape(url), "scoutfs_notify_clients") == 1, WAIT, "a client")

        def flood_and_look() -> bool:
            # the client's socket buffer takes a few hundred messages before
            # its queue of one is used: a scrape per 3 reads filled it only
            # after about 30 s on a busy machine
            for _ in range(50):
                read_files(*files)
            lost = value(scrape(url), "scoutfs_notify_records_lost_total", cause="client_queue")
            return lost > 0

        wait_for(flood_and_look, WAIT, "the idle client to lose records")
    s = scrape(url)
    assert value(s, "scoutfs_notify_clients_accepted_total") == 1


def test_daemon_metrics_port_in_use_says_so(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "d").mkdir()
        res = subprocess.run(
            [sys.executable, "-m", "notifyd.daemon", "--source", "fanotify", str(tmp_path / "d"),
             "--socket", str(tmp_path / "s.sock"), "--metrics", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert f"--metrics 127.0.0.1:{port}: Address already in use" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.daemon", str(tmp_path), "--metrics", "a:b"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "the port must be a number" in res.stderr


def test_shim_metrics_move_with_accesses(fanotify_daemon, tmp_path) -> None:
    need_fuse()
    d = fanotify_daemon
    f = d.backing / "data"
    f.write_text("data\n")
    log = tmp_path / "shim.log"
    with run_shim(d.backing, tmp_path / "overlay", d.socket, "--metrics", "0", log=log) as shim:
        url = metrics_url(shim.log())
        shim.wait_log("subscribed to")
        before = scrape(url)
        read_files(f)  # on BACKING, not through the overlay: replayed
        after = wait_for(
            lambda: (
                (s := scrape(url))
                and value(s, "scoutfs_notify_shim_replay_latency_seconds_count")
                > value(before, "scoutfs_notify_shim_replay_latency_seconds_count")
                and s
            ),
            WAIT,
            "a replay to be measured",
        )
        got = value(after, "scoutfs_notify_shim_records_received_total")
        assert got >= value(before, "scoutfs_notify_shim_records_received_total") + 2
        assert value(after, "scoutfs_notify_shim_events_replayed_total") >= 1
        assert value(after, "scoutfs_notify_shim_replay_latency_seconds_sum") > 0
        for cause in ("gap", "overload", "unresolved", "gone", "failed"):
            assert (
                "scoutfs_notify_shim_records_lost_total",
                (("cause", cause),),
            ) in after, cause
        # a file deleted before its replay is a loss with its cause
        gone = d.backing / "gone"
        gone.write_text("x")
        shim.proc.send_signal(signal.SIGSTOP)
        try:
            read_files(gone)
            gone.unlink()
        finally:
            shim.proc.send_signal(signal.SIGCONT)
        wait_for(
            lambda: (
                sum(
                    value(scrape(url), "scoutfs_notify_shim_records_lost_total", cause=c)
                    for c in ("unresolved", "gone")
                )
                > 0
            ),
            WAIT,
            "the lost replay to be counted",
        )


def test_kmod_counters_from_sysfs(tmp_path) -> None:
    """The sysfs reader alone (the real counters need the patched module: VM tests)."""
    (tmp_path / "notify_emitted").write_text("12\n")
    (tmp_path / "notify_dropped_ring_full").write_text("3\n")
    (tmp_path / "lock_grant").write_text("99\n")
    got = {m.name: m.samples[0].value for m in _kmod_counters(tmp_path)}
    assert got == {
        "scoutfs_notify_kmod_dropped_ring_full": 3,
        "scoutfs_notify_kmod_emitted": 12,
    }


def test_forward_metrics_move_with_accesses(notifyd_factory, tmp_path) -> None:
    """A real daemon, a real nats-server and the real forwarder, scraped over HTTP."""
    from cluster_support import forwarders, nats_servers, start_forwarder

    d = notifyd_factory(None, "--metrics", "0", "--client-queue", "1")
    durl = metrics_url(d.log())
    files = []
    for i in range(3):
        f = d.backing / f"f{i}"
        f.write_text("x")
        files.append(f)
    backlog = 20
    fwd_lost = "scoutfs_notify_forward_records_lost_total"
    with nats_servers(tmp_path / "nats", 1) as servers, forwarders(tmp_path) as fwds:
        server = servers[0]
        args = ["--nats", server.url, "--socket", str(d.socket), "--fsid", "testfs"]
        fwd = start_forwarder(
            fwds, tmp_path, d.backing, *args, "--node", "n1", "--backlog", str(backlog),
            "--metrics", "0",
        )  # fmt: skip
        url = metrics_url(fwd.log())
        s = scrape(url)
        assert value(s, "scoutfs_notify_forward_records_received_total") == 0
        assert value(s, "scoutfs_notify_forward_backlog_records") == 0

        # the forwarder is ready once connected; the daemon relays to it once
        # it has taken the connection
        wait_for(lambda: value(scrape(durl), "scoutfs_notify_clients") == 1, WAIT, "a client")
        # records the daemon relayed before the forwarder subscribed
        before = value(scrape(durl), "scoutfs_notify_records_relayed_total")

        def settled() -> tuple[dict, float] | None:
            """Once every record the daemon relayed is published or counted as lost.

            The daemon's queue for the forwarder holds one message: what it
            drops is a seq jump the forwarder sees on the next record, and
            tells the stream of on the next message.
            """
            read_files(files[0])  # a record after the last loss makes it visible
            ds = scrape(durl)
            relayed = value(ds, "scoutfs_notify_records_relayed_total")
            dropped = value(ds, "scoutfs_notify_records_lost_total", cause="client_queue")
            s = scrape(url)
            received = value(s, "scoutfs_notify_forward_records_received_total")
            published = value(s, "scoutfs_notify_forward_records_published_total")
            gap = value(s, fwd_lost, cause="daemon_gap")
            lost_backlog = value(s, fwd_lost, cause="backlog")
            told = value(s, "scoutfs_notify_forward_records_lost_published_total")
            done = (
                gap == dropped
                and received + dropped + before == relayed
                and received == published + lost_backlog
                and told == dropped + lost_backlog
                and value(s, "scoutfs_notify_forward_backlog_records") == 0
            )
            return (s, dropped) if done else None

        # records the daemon relays are received, published and acknowledged
        read_files(*files)
        s, dropped0 = wait_for(settled, WAIT, "the first records published", interval=0.2)
        # 3 OPEN + 3 READ, each published or dropped by the daemon
        assert value(s, "scoutfs_notify_forward_records_published_total") + dropped0 >= 6
        assert value(s, "scoutfs_notify_forward_records_published_total") >= 1
        assert value(s, "scoutfs_notify_forward_publish_seconds_count") == value(
            s, "scoutfs_notify_forward_messages_published_total"
        )
        assert value(s, fwd_lost, cause="backlog") == 0

        # a stopped forwarder: the daemon drops what its queue of one cannot
        # hold, and the forwarder counts the seq jump once it runs again
        assert fwd.proc is not None
        fwd.proc.send_signal(signal.SIGSTOP)
        try:

            def flood_and_look() -> bool:
                read_files(*files)
                ds = scrape(durl)
                lost = value(ds, "scoutfs_notify_records_lost_total", cause="client_queue")
                return lost > dropped0

            wait_for(flood_and_look, WAIT, "the stopped forwarder to lose records")
        finally:
            fwd.proc.send_signal(signal.SIGCONT)
        s, dropped = wait_for(
            settled, WAIT, "the forwarder to count the daemon's drops", interval=0.2
        )
        assert value(s, fwd_lost, cause="daemon_gap") == dropped > dropped0
        # what the socket buffer held comes in one burst, maybe past --backlog
        backlog_before = value(s, fwd_lost, cause="backlog")

        # NATS away: records wait in the backlog, past --backlog they are
        # dropped; back: the forwarder reconnects and publishes the rest
        server.stop()
        many = []
        for i in range(50):
            f = d.backing / f"m{i}"
            f.write_text("x")
            many.append(f)
        read_files(*many)  # 100 records, more than the backlog holds
        wait_for(
            lambda: value(scrape(url), fwd_lost, cause="backlog") > backlog_before,
            WAIT,
            "backlog drops",
        )

        # the publisher may hold all the backlog had in the message it retries:
        # records read now wait in the backlog
        def waiting() -> dict | None:
            read_files(files[0])
            s = scrape(url)
            return s if value(s, "scoutfs_notify_forward_backlog_records") > 0 else None

        s = wait_for(waiting, WAIT, "records waiting in the backlog", interval=0.2)
        assert value(s, "scoutfs_notify_forward_backlog_records") <= backlog
        assert value(s, "scoutfs_notify_forward_nats_reconnects_total") == 0
        server.start()

        s, _ = wait_for(
            settled, WAIT, "the backlog and its loss marker to be published", interval=0.2
        )
        assert value(s, "scoutfs_notify_forward_nats_reconnects_total") >= 1
        assert value(s, "scoutfs_notify_forward_backlog_records") == 0
        assert value(s, "scoutfs_notify_forward_messages_duplicate_total") == 0
        assert fwd.stop() == 0, fwd.log()


def test_forward_metrics_port_in_use_says_so(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "notifyd.cluster.forward", str(tmp_path), "--nats",
             "nats://127.0.0.1:1", "--socket", str(tmp_path / "s.sock"), "--metrics", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert f"--metrics 127.0.0.1:{port}: Address already in use" in res.stderr
    assert "Traceback" not in res.stderr
