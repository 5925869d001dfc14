"""The cluster stream on a real kernel, run inside the VM by cluster.sh.

    cluster.py MNT_A MNT_B BIN OUTDIR

Two mounts of one patched scoutfs filesystem stand for two nodes: a
scoutfs-notifyd and a scoutfs-notify-forward per mount, one nats-server
(the venv's, 2.15) on the guest's loopback, the shim with --nats on mount A
and inotifywait -m -r on its overlay.  A read on mount B must reach that
watcher as IN_OPEN and IN_ACCESS on the right name, and each mount's records
must be on the subject of its own rid.  Each step prints "ok: ..."; the
first failure ends the run.  Waits are bounds on a hang, not measurements.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from notifyd.ioctls import statfs_more

WAIT_S = 180  # python start-up alone takes seconds under tcg
OVERLAY = "/mnt/overlay"
NATS_PORT = 4222
SOCK_B = Path("/run/scoutfs-b/notify.sock")


class Failure(Exception):
    pass


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failure(msg)


def wait_until(pred: Callable[[], object], what: str) -> object:
    end = time.monotonic() + WAIT_S
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise Failure(f"{what}: not within {WAIT_S}s")
        time.sleep(0.2)


def ids(mnt: str) -> tuple[str, str]:
    fd = os.open(mnt, os.O_RDONLY)
    try:
        fsid, rid = statfs_more(fd)
    finally:
        os.close(fd)
    return f"{fsid:016x}", f"{rid:016x}"


class Cluster:
    def __init__(self, mnt_a: str, mnt_b: str, bin_dir: str, out: str) -> None:
        self.a, self.b = mnt_a, mnt_b
        self.bin = Path(bin_dir)
        self.out = Path(out)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.url = f"nats://127.0.0.1:{NATS_PORT}"

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.out / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.out / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str, p: subprocess.Popen[bytes]) -> None:
        check(p.poll() is None, f"{name} exited {p.returncode}: see {name}.log")

    def nats(self) -> None:
        store = Path("/tmp/nats-store")
        store.mkdir(parents=True, exist_ok=True)
        p = self.start(
            "nats-server",
            [str(self.bin / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(NATS_PORT),
             "-sd", str(store)],
        )  # fmt: skip
        wait_until(lambda: "Server is ready" in self.log("nats-server") or p.poll() is not None,
                   "nats-server ready")  # fmt: skip
        self.alive("nats-server", p)
        ok(f"nats-server ({self.log('nats-server').split('Version:')[1].split()[0]}) on lo")

    def daemons_and_forwarders(self) -> None:
        self.fsid, self.rid_a = ids(self.a)
        fsid_b, self.rid_b = ids(self.b)
        check(fsid_b == self.fsid, "the two mounts have different fsids")
        check(self.rid_a != self.rid_b, "the two mounts have the same rid")
        SOCK_B.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        da = self.start("daemon-a", [str(self.bin / "scoutfs-notifyd"), self.a])
        db = self.start("daemon-b", [str(self.bin / "scoutfs-notifyd"), self.b,
                                     "--socket", str(SOCK_B)])  # fmt: skip
        sock_a = Path(f"/run/scoutfs/{self.fsid}/notify.sock")
        wait_until(lambda: (sock_a.exists() and SOCK_B.exists()) or da.poll() or db.poll(),
                   "both daemons serving")  # fmt: skip
        self.alive("daemon-a", da)
        self.alive("daemon-b", db)
        # the guest's store is a small tmpfs: the default 1G stream does not fit
        fwd = [str(self.bin / "scoutfs-notify-forward"), "--nats", self.url, "--max-bytes", "64M"]
        fa = self.start("forward-a", [*fwd, self.a])
        fb = self.start("forward-b", [*fwd, "--socket", str(SOCK_B), self.b])
        for name, p, rid in (("forward-a", fa, self.rid_a), ("forward-b", fb, self.rid_b)):
            wait_until(lambda name=name, p=p: "subscribed to" in self.log(name) or p.poll(),
                       f"{name} subscribed")  # fmt: skip
            self.alive(name, p)
            subject = f"scoutfs.notify.{self.fsid}.{rid}"
            check(f"as {subject} " in self.log(name), f"{name} does not publish as {subject}")
        ok(f"a daemon and a forwarder per mount; subjects scoutfs.notify.{self.fsid}."
           f"{{{self.rid_a},{self.rid_b}}} (each mount's rid)")  # fmt: skip

    def shim_and_watcher(self) -> None:
        # before the watch: a directory made on BACKING after inotifywait -r
        # started gets no watch (README, known limits of the shim)
        d = Path(self.a) / "cluster"
        d.mkdir(exist_ok=True)
        (d / "from-b").write_bytes(b"written on A, read on B\n")
        os.sync()
        os.makedirs(OVERLAY, exist_ok=True)
        shim = self.start("shim", [str(self.bin / "scoutfs-notify-shim"), "--nats", self.url,
                                   self.a, OVERLAY])  # fmt: skip
        wait_until(lambda: "following the other nodes" in self.log("shim") or shim.poll(),
                   "the shim following the cluster stream")  # fmt: skip
        self.alive("shim", shim)
        self.inotify_log = self.out / "inotifywait.log"
        self.inotify = subprocess.Popen(
            ["inotifywait", "-m", "-r", "--format", "%e|%w%f", OVERLAY],
            stdout=open(self.inotify_log, "wb"),  # noqa: SIM115
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.inotify.stderr
        while True:
            line = self.inotify.stderr.readline()
            check(bool(line), "inotifywait exited before its watches were set")
            if "Watches established" in line:
                break
        ok("shim --nats on mount A's overlay, inotifywait -m -r on it")

    def watch_stream(self) -> None:
        self.watch_out = self.out / "watch-nats.jsonl"
        self.watch = subprocess.Popen(
            [str(self.bin / "scoutfs-notify"), "watch", "--nats", self.url, "--all", "--json"],
            stdout=open(self.watch_out, "wb"),  # noqa: SIM115
            stderr=open(self.out / "watch-nats.err", "wb"),  # noqa: SIM115
        )

    def read_on_b_seen_on_a(self) -> None:
        ino = (Path(self.a) / "cluster" / "from-b").stat().st_ino
        want = f"{OVERLAY}/cluster/from-b"

        def read_on_b_and_look() -> bool:
            # B may not see A's new file at once: read until the watcher has it
            try:
                with open(f"{self.b}/cluster/from-b", "rb") as f:
                    f.read()
            except FileNotFoundError:
                return False
            text = self.inotify_log.read_text()
            return f"OPEN|{want}" in text and f"ACCESS|{want}" in text

        wait_until(read_on_b_and_look, f"IN_OPEN and IN_ACCESS on {want} for a read on mount B")
        ok("a read on mount B raised IN_OPEN and IN_ACCESS on cluster/from-b in A's overlay")

        def b_records() -> list[dict[str, object]]:
            out = []
            for line in self.watch_out.read_text().splitlines():
                doc = json.loads(line)
                if doc.get("ino") == ino and doc.get("node") == self.rid_b:
                    out.append(doc)
            return out

        recs = wait_until(b_records, "mount B's records of from-b in the cluster watch")
        assert isinstance(recs, list)
        check(all(r["fsid"] == self.fsid for r in recs), "a record of B has another fsid")
        ok(f"watch --nats shows B's reads of from-b under node {self.rid_b} (mount B's rid)")

    def teardown(self) -> None:
        for p in (self.watch, self.inotify):
            p.terminate()
            p.wait(WAIT_S)
        # the shim first (it unmounts), then forwarders, daemons, the server
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                rc = p.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                raise Failure(f"{name} ignored SIGTERM") from None
            check(rc == 0, f"{name} exited {rc} after SIGTERM: see {name}.log")
        for name, _ in self.procs:
            check("Traceback" not in self.log(name), f"a traceback in {name}.log")
        ok("everything stopped cleanly")

    def kill_all(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()


def main() -> int:
    t = Cluster(*sys.argv[1:5])
    try:
        t.nats()
        t.daemons_and_forwarders()
        t.shim_and_watcher()
        t.watch_stream()
        t.read_on_b_seen_on_a()
        t.teardown()
    except Failure as exc:
        print(f"FAIL: {exc}", flush=True)
        t.kill_all()
        return 1
    print("cluster: all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
