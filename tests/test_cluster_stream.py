"""The cluster stream end to end, with real parts: nats-server 2.15 (a 3-server
cluster or one server), real scoutfs-notifyd daemons on the fanotify source,
real forwarders and the real ``scoutfs-notify watch --nats``.

Each daemon also has a raw local subscriber: what it saw is the truth the
stream is compared with.  Two directories stand for two nodes, each daemon
with its forwarder and node name; they share one --fsid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from notifyd import abi
from notifyd.client import Subscriber
from cluster_support import forwarders, nats_servers, start_forwarder

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons need root")

FSID = "testfs"
EVENT_TIMEOUT = 60.0


class Truth:
    """A raw subscriber of one daemon, in a thread: every record it relays."""

    def __init__(self, socket: Path) -> None:
        self.sub = Subscriber(socket)
        self.records: list[abi.Record] = []
        self.gaps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            for ev in self.sub:
                if isinstance(ev, abi.Record):
                    self.records.append(ev)
                else:
                    self.gaps += 1

    def seqs_of(self, ino: int) -> list[int]:
        return [r.seq for r in self.records if r.ino == ino]

    def close(self) -> None:
        self.sub.sock.shutdown(2)
        self.sub.close()
        self.thread.join(5)


class Watch:
    """``scoutfs-notify watch --nats URL --json ...`` with its lines collected."""

    def __init__(self, url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyd.cli", "watch", "--nats", url, "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def records(self, node: str) -> list[dict]:
        return [d for d in self.lines if d["node"] == node and d["type"] != "GAP"]

    def gaps(self, node: str) -> list[dict]:
        return [d for d in self.lines if d["node"] == node and d["type"] == "GAP"]

    def wait_ino(self, node: str, ino: int, what: str) -> None:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while not any(d["ino"] == ino for d in self.records(node)):
            if self.proc.poll() is not None:
                raise AssertionError(f"watch exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"watch never printed {what} (ino {ino}) of {node}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)
        self.thread.join(5)
        return self.proc.returncode

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""


def read_files(d: Path, n: int, prefix: str) -> list[Path]:
    files = []
    for i in range(n):
        f = d / f"{prefix}{i}"
        f.write_bytes(b"x" * 100)
        files.append(f)
    for f in files:
        f.read_bytes()
    return files


def sentinel(d: Path, name: str = "sentinel") -> int:
    """Read a fresh file: once its record is seen, every earlier record of that node is."""
    f = d / name
    f.write_bytes(b"s")
    f.read_bytes()
    return f.stat().st_ino


def wait_truth(truth: Truth, ino: int) -> None:
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not truth.seqs_of(ino):
        assert time.monotonic() < deadline, f"the daemon never relayed ino {ino}"
        time.sleep(0.02)


def assert_per_node_exact(watch: Watch, node: str, truth: Truth, upto_ino: int) -> list[int]:
    """Every record the daemon relayed up to the sentinel is in the stream once, in order."""
    last = max(truth.seqs_of(upto_ino))
    want = [r.seq for r in truth.records if r.seq <= last]
    got = [d["seq"] for d in watch.records(node) if d["seq"] <= last]
    assert got == sorted(set(got)), f"{node}: out of order or duplicated: {got}"
    assert got == want, f"{node}: stream {got} != daemon {want}"
    return got


@pytest.fixture
def nodes(notifyd_factory, tmp_path: Path) -> Iterator[list[tuple[str, object, Truth]]]:
    out = []
    for name in ("nodeA", "nodeB"):
        daemon = notifyd_factory()
        out.append((name, daemon, Truth(daemon.socket)))
    yield out
    for _, _, truth in out:
        truth.close()


def fwd_args(url: str, daemon, node: str, *extra: str) -> list[str]:
    return ["--nats", url, "--socket", str(daemon.socket), "--fsid", FSID, "--node", node, *extra]


def test_three_server_cluster_two_nodes_watch_sees_both_in_order(
    tmp_path: Path, nodes
) -> None:
    with nats_servers(tmp_path / "nats", 3) as servers, forwarders(tmp_path) as fwds:
        urls = [s.url for s in servers]
        for (name, daemon, _), url in zip(nodes, urls, strict=False):
            start_forwarder(
                fwds, tmp_path, daemon.backing, *fwd_args(url, daemon, name, "--replicas", "3", "--max-bytes", "64M")
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
            assert len(seqs) >= 62  # 30 files open + read, and the sentinel's
            assert not watch.gaps(name)
        for f in fwds:
            assert f.stop() == 0, f.log()
