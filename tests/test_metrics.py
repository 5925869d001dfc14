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
