"""The forwarder and its local daemon: readiness, and a daemon restart.

- READY=1 only once the daemon accepted the forwarder's connection (its stats
  socket lists the forwarder's pid) and the stream is set up: a socket that
  only listens must not make the forwarder ready.  The daemon here is a
  stand-in (a listening socket that does not accept, and a stats socket):
  no real daemon can be made to leave a connection unaccepted.
- A fanotify daemon restarted numbers its records from 1 again: the forwarder
  publishes the new daemon's records under a new epoch, with the records the
  new daemon read before the forwarder connected as an exact loss marker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cluster_support import (
    FSID,
    NatsServer,
    Truth,
    Watch,
    forwarders,
    fwd_args,
    read_files,
    sentinel,
    start_forwarder,
    wait_truth,
)

from notifyd import procs
from notifyd.paths import stats_path_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons need root")

TIMEOUT = 30.0


class StandIn:
    """A notify socket that listens but accepts only when told, and its stats socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.stats = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stats.bind(str(stats_path_for(path)))
        self.stats.listen(4)
        self.clients: list[dict[str, int]] = []
        self.asked = 0
        self.conn: socket.socket | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.stats.accept()
            except OSError:
                return
            with c:
                c.sendall(json.dumps({"clients": list(self.clients)}).encode())
            self.asked += 1

    def accept(self, pid: int) -> None:
        self.conn, _ = self.listener.accept()
        self.clients.append({"pid": pid})

    def close(self) -> None:
        for s in (self.conn, self.listener, self.stats):
            if s is not None:
                s.close()


def test_ready_only_once_the_daemon_accepted_the_connection(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, "n1")
    server.start()
    standin = StandIn(tmp_path / "d.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "sd"))
    notify.settimeout(TIMEOUT)
    log = open(tmp_path / "fwd.log", "wb")  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "notifyd.cluster.forward", "--nats", server.url]
    cmd += ["--socket", str(standin.path), "--fsid", FSID, "--node", "n1", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "sd")}, stdout=log, stderr=log
    )
    try:
        # the sentinel: the forwarder connected and has asked the stats socket
        # three times whether the daemon lists it; until then no READY
        procs.wait_until(
            lambda: standin.asked >= 3 or proc.poll() is not None, TIMEOUT, "stats questions"
        )
        assert proc.poll() is None, (tmp_path / "fwd.log").read_text()
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)
        notify.settimeout(TIMEOUT)
        standin.accept(proc.pid)
        got = notify.recv(4096).decode()
        assert "READY=1" in got
        assert "accepted our connection" in (tmp_path / "fwd.log").read_text()
        # and the stream exists by then
        assert "SCOUTFS_NOTIFY" in (tmp_path / "fwd.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
        notify.close()
        standin.close()
        server.stop()


def test_daemon_restart_is_a_new_epoch_with_the_exact_loss(tmp_path: Path, notifyd_factory) -> None:
    daemon = notifyd_factory()
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:
        with forwarders(tmp_path) as fwds:
            args = fwd_args(server.url, daemon, "nodeA")
            fwd = start_forwarder(fwds, tmp_path, daemon.backing, *args)
            watch = Watch(server.url, "--all")
            try:
                s1 = sentinel(daemon.backing, "s1")
                watch.wait_ino("nodeA", s1, "the first daemon's sentinel")
                fwd.stop()
                daemon.stop()
                daemon2 = notifyd_factory(daemon.backing, socket=daemon.socket)
                truth = Truth(daemon2.socket)
                try:
                    # read by the new daemon while no forwarder was connected
                    read_files(daemon.backing, 10, "unseen")
                    s2 = sentinel(daemon.backing, "s2")
                    wait_truth(truth, s2)
                    # at least this much was relayed before the forwarder came;
                    # the rest of s2's records may come a little later
                    unseen = max(truth.seqs_of(s2))
                    fwd2 = start_forwarder(fwds, tmp_path, daemon.backing, *args)
                    s3 = sentinel(daemon.backing, "s3")
                    wait_truth(truth, s3)
                    watch.wait_ino("nodeA", s3, "the new daemon's sentinel")
                finally:
                    truth.close()
            finally:
                assert watch.stop() == 0, watch.stderr()
    finally:
        server.stop()
    # the fixture then checks that the first daemon left no socket behind
    daemon2.stop()
    assert next(r.seq for r in truth.records) == 1
    gaps = watch.gaps("nodeA")
    assert len(gaps) == 1, gaps
    # the first daemon's records were all published (it read nothing after
    # the forwarder stopped), so the gap is exactly what the new one relayed
    # before the forwarder connected: every record from the gap on is in the
    # stream, in order, none before it
    lost = gaps[0]["lost"]
    assert lost >= unseen
    assert gaps[0]["last_seq"] is None  # a new epoch: nothing to count from
    assert gaps[0]["next_seq"] == lost + 1
    # the watch's lines after the gap are the new daemon's: up to s3's first
    # record (which both the truth and the watch saw, in seq order) they are
    # exactly what it relayed from the gap on
    lines = [d for d in watch.lines if d["node"] == "nodeA"]
    after = lines[lines.index(gaps[0]) + 1 :]
    upto = min(truth.seqs_of(s3))
    got = [d["seq"] for d in after if d["seq"] <= upto]
    assert got == [r.seq for r in truth.records if lost < r.seq <= upto]
    assert f"{lost} records of nodeA lost before seq {lost + 1}" in fwd2.log()


def test_forwarder_running_across_a_daemon_restart_counts_exactly(
    tmp_path: Path, notifyd_factory
) -> None:
    """The forwarder keeps running while its daemon restarts: the new epoch's
    gap is exactly the new daemon's records it was not served (maybe none, if
    it reconnected first), and every later record arrives."""
    daemon = notifyd_factory()
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:
        with forwarders(tmp_path) as fwds:
            fwd = start_forwarder(
                fwds, tmp_path, daemon.backing, *fwd_args(server.url, daemon, "A")
            )
            watch = Watch(server.url, "--all")
            try:
                s1 = sentinel(daemon.backing, "s1")
                watch.wait_ino("A", s1, "the first daemon's sentinel")
                daemon.stop()
                daemon2 = notifyd_factory(daemon.backing, socket=daemon.socket)
                truth = Truth(daemon2.socket)
                try:
                    read_files(daemon.backing, 10, "early")
                    s2 = sentinel(daemon.backing, "s2")
                    wait_truth(truth, s2)
                    # records read before the forwarder is served again are
                    # lost (the gap says how many); s3 must come after that
                    procs.wait_until(
                        lambda: fwd.log().count("accepted our connection") == 2,
                        TIMEOUT,
                        "the forwarder to be served by the new daemon",
                    )
                    s3 = sentinel(daemon.backing, "s3")
                    wait_truth(truth, s3)
                    watch.wait_ino("A", s3, "the new daemon's sentinel")
                finally:
                    truth.close()
                assert fwd.stop() == 0, fwd.log()
            finally:
                assert watch.stop() == 0, watch.stderr()
    finally:
        server.stop()
    daemon2.stop()
    lines = watch.lines
    # the first daemon's last record is s1's; everything after is the new epoch
    end_old = max(i for i, d in enumerate(lines) if d.get("ino") == s1)
    new = lines[end_old + 1 :]
    if new[0]["type"] == "GAP":
        gap = new.pop(0)
        assert gap["last_seq"] is None  # a new epoch: nothing to count from
        assert gap["lost"] == gap["next_seq"] - 1
        first_new = gap["next_seq"]
    else:
        first_new = new[0]["seq"]
        assert first_new == 1
    assert not [d for d in new if d["type"] == "GAP"]
    last = min(truth.seqs_of(s3))  # the watch waited for s3's first record only
    want = [r.seq for r in truth.records if first_new <= r.seq <= last]
    assert [d["seq"] for d in new if d["seq"] <= last] == want
    assert truth.records[0].seq == 1
