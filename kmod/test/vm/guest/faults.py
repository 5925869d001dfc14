"""The kernel side under faults, run inside the VM by faults.sh.

    faults.py MNT_A MNT_B BIN OUTDIR

MNT_A and MNT_B are two mounts of one filesystem made with the patched
module, with no notify reader yet.  BIN holds scoutfs-notifyd (the project's
venv).  Each fault below is its own result: OUTDIR/results.tsv gets one line
per fault, "NAME<TAB>passed" or "NAME<TAB>failed<TAB>what was seen", and the
run goes on to the next fault after a failure (the host turns each line into
a pytest test).  They run in this order, the later ones on what the earlier
left (daemons on both mounts):

- kill9_restart: the daemon SIGKILLed during a flood, then restarted;
- reader_killed_in_wait: a reader blocked in WAIT is SIGKILLed;
- thread_detach_while_waiting: one thread DETACHes while another waits;
- two_mounts_restart: one mount's daemon restarted repeatedly, the other
  mount's stream has no gap;
- stress: 8 processes open and read on both mounts for STRESS_S seconds
  while the daemons drain and another process hammers the ioctl with bad
  arguments; counters consistent;
- umount_lazy: ``umount -l`` of a mount whose daemon is attached, then the
  daemon exits cleanly and the superblock goes (faults.sh adds the module
  unload and the dmesg check as ``unload_clean``).

Waits are bounded (WAIT_S) only so that a broken kernel fails instead of
hanging; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e import (
    PROBE,
    WAIT_S,
    Failure,
    Stream,
    check,
    counters,
    probe,
    read_as_user,
    stop,
    sysfs_dir,
    wait_until,
)

from notifyd.sdnotify import wait_ready

RING_NR = 1024  # NOTIFY_RING_NR: 64 KiB of 64-byte records
RESTARTS = 3
STRESS_S = int(os.environ.get("FAULTS_STRESS_S", "60"))
STRESS_WORKERS = 8

# a process that reads one byte at a time from FILE until killed
FLOOD = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("flooding", flush=True)
i = 0
while True:
    os.pread(fd, 1, i % 4096)
    i += 1
"""

# open, read in small pieces, close, for SECONDS, pausing PAUSE seconds after each file
WORKER = """
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
pause = float(sys.argv[2])
files = sys.argv[3:]
n = 0
while time.monotonic() < end:
    fd = os.open(files[n % len(files)], os.O_RDONLY)
    while os.read(fd, 997):
        pass
    os.close(fd)
    n += 1
    if pause:
        time.sleep(pause)
print(n, flush=True)
"""
# the readers while a daemon restarts: steady, but leaving the one vCPU to
# the restarting daemon's start-up
RESTART_PAUSE_S = "0.05"

# bad READ_NOTIFY calls on every mount until END; prints the errnos seen
HAMMER = """
import ctypes, errno, fcntl, json, os, sys, time
from notifyd import abi
end = time.monotonic() + float(sys.argv[1])
fds = [os.open(m, os.O_RDONLY | os.O_DIRECTORY) for m in sys.argv[2:]]
buf = ctypes.create_string_buffer(64 * abi.RECORD_SIZE)
addr = ctypes.addressof(buf)
cmd = None
for c in abi.IOC_READ_NOTIFY_CANDIDATES:
    try:
        fcntl.ioctl(fds[0], c, bytearray(abi.READ_NOTIFY.pack(addr, 0, 0, 0, 0, 0)), True)
    except OSError as exc:
        if exc.errno != errno.ENOTTY:
            cmd = c
            break
assert cmd is not None, "no READ_NOTIFY ioctl"
cases = {
    "bad flags": (abi.READ_NOTIFY.pack(addr, len(buf), 1 << 7, 0, 0, 0), "EINVAL"),
    "pad set": (abi.READ_NOTIFY.pack(addr, len(buf), 0, 0, 1, 0), "EINVAL"),
    "odd size": (abi.READ_NOTIFY.pack(addr, 63, 0, 0, 0, 0), "EINVAL"),
    "zero size": (abi.READ_NOTIFY.pack(addr, 0, abi.READ_NOTIFY_DETACH, 0, 0, 0), "EINVAL"),
    "bad arg pointer": (8, "EFAULT"),
    "not the reader": (abi.READ_NOTIFY.pack(addr, len(buf), 0, 0, 0, 0), "EBUSY"),
    "not the reader, bad buffer": (abi.READ_NOTIFY.pack(8, len(buf), 0, 0, 0, 0), "EBUSY"),
    "detach another's": (
        abi.READ_NOTIFY.pack(addr, len(buf), abi.READ_NOTIFY_DETACH, 0, 0, 0), "EBUSY"
    ),
}
seen = {}
bad = []
while time.monotonic() < end:
    for fd in fds:
        for name, (arg, want) in cases.items():
            try:
                if isinstance(arg, int):
                    fcntl.ioctl(fd, cmd, arg)
                else:
                    fcntl.ioctl(fd, cmd, bytearray(arg), True)
                got = "success"
            except OSError as exc:
                got = errno.errorcode.get(exc.errno, str(exc.errno))
            seen[got] = seen.get(got, 0) + 1
            if got != want:
                bad.append(f"{name}: {got}, want {want}")
print(json.dumps({"seen": seen, "bad": bad[:20]}), flush=True)
"""


def daemon_stats(sock: Path) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    try:
        s.connect(str(sock) + ".stats")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    got = json.loads(data)
    assert isinstance(got, dict)
    return got


def seqs_after(stream: Stream, after: int) -> tuple[list[int], int]:
    """Seqs the stream carries past ``after``, and how many are missing in between."""
    recs, _ = stream.events()
    seqs = [r.seq for r in recs if r.seq > after]
    check(seqs == sorted(set(seqs)), f"{stream.out.name}: seqs not strictly increasing")
    missing = (seqs[-1] - after - len(seqs)) if seqs else 0
    return seqs, missing


class Daemon:
    """scoutfs-notifyd on one mount with its own socket, and a raw recorder on it."""

    def __init__(self, mnt: str, sock: Path, out: Path, name: str) -> None:
        self.mnt, self.sock, self.out, self.name = mnt, sock, out, name
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.stream: Stream | None = None

    def start(self, record: bool = True) -> Stream | None:
        self.runs += 1
        # READY=1 says the socket listens; a killed daemon's socket stays behind.
        # Not in OUTDIR: that is the host's 9p share, where no socket can be bound.
        notify_path = self.sock.parent / "sd"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        # open until the daemon is stopped: its STOPPING=1 lands too
        self.notify = notify
        try:
            with open(self.out / f"daemon-{self.name}.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [str(BIN / "scoutfs-notifyd"), self.mnt, "--socket", str(self.sock)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                )
            try:
                # python start-up on a busy one-vCPU tcg guest: minutes, not seconds
                wait_ready(notify, self.proc, 3 * WAIT_S)
            except (ChildProcessError, TimeoutError) as exc:
                raise Failure(
                    f"daemon {self.name} (run {self.runs}) {exc}: see daemon-{self.name}.log"
                ) from None
        except BaseException:
            notify.close()
            raise
        self.stream = (
            Stream(self.sock, self.out / f"stream-{self.name}{self.runs}.bin") if record else None
        )
        return self.stream

    def stats(self) -> dict[str, Any]:
        return daemon_stats(self.sock)

    def ensure(self) -> Stream:
        """Running with a recorder: what a fault that failed may not have left."""
        if self.proc is None or self.proc.poll() is not None or self.stream is None:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            self.start()
        assert self.stream is not None
        return self.stream

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        rc = stop(self.proc, f"daemon {self.name}", sig)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self.stream is not None:
            # the recorder reads what the daemon sent, then sees EOF
            try:
                self.stream.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.stream.stop()
        return rc


BIN = Path()


class Faults:
    def __init__(self, mnt_a: str, mnt_b: str, out: str) -> None:
        self.a, self.b = mnt_a, mnt_b
        self.out = Path(out)
        self.da = sysfs_dir(mnt_a)
        self.db = sysfs_dir(mnt_b)
        run = Path("/run/scoutfs-faults")
        for m in "ab":
            (run / m).mkdir(parents=True, mode=0o700, exist_ok=True)
        self.daemon_a = Daemon(mnt_a, run / "a" / "notify.sock", self.out, "a")
        self.daemon_b = Daemon(mnt_b, run / "b" / "notify.sock", self.out, "b")
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, code: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def files(self) -> None:
        a = Path(self.a)
        (a / "flood").write_bytes(b"x" * 4096)
        for i in range(16):
            (a / f"f{i}").write_bytes(os.urandom(3000 + 1000 * i))
        os.sync()
        wait_until(lambda: (Path(self.b) / "f15").exists(), "files visible on the second mount")

    # --- the faults ---------------------------------------------------------------

    def kill9_restart(self) -> str:
        """SIGKILL the daemon mid-flood, restart it: the ring's records go to the new one."""
        c0 = counters(self.da)
        check(c0["notify_emitted"] == 0, f"mount A emitted before its first reader: {c0}")
        s1 = self.daemon_a.start()
        assert s1 is not None
        flood = self.spawn(FLOOD, f"{self.a}/flood")
        assert flood.stdout
        check(flood.stdout.readline().strip() == "flooding", "flood did not start")
        wait_until(lambda: len(s1.of_pid(flood.pid)) >= 200, "200 flood records through daemon A")
        drops1 = Faults.client_drops(self.daemon_a)
        self.daemon_a.kill(signal.SIGKILL)
        check(flood.poll() is None, "the flood ended before the daemon was killed")
        # no reader now: the ring fills with what it keeps for the next one, then drops
        d_kill = counters(self.da)["notify_dropped_ring_full"]
        wait_until(
            lambda: counters(self.da)["notify_dropped_ring_full"] >= d_kill + 100,
            "the ring filling up after the kill (ring-full drops)",
        )
        flood.kill()
        flood.wait()
        stopped = counters(self.da)
        recs1, gaps1 = s1.events()
        last1 = recs1[-1].seq
        check(recs1[0].seq == 1, f"the first daemon's stream starts at seq {recs1[0].seq}")
        lost1 = sum(g.lost for g in gaps1)

        s2 = self.daemon_a.start()
        assert s2 is not None
        wait_until(
            lambda: int(self.daemon_a.stats()["records"]) >= RING_NR,
            f"the new daemon draining the {RING_NR} records the ring kept",
        )
        check(probe("try", self.a) == "EBUSY", "a third reader did not get EBUSY")
        pid = read_as_user(f"{self.a}/f0")
        wait_until(lambda: s2.of_pid(pid), "a read after the restart reaching the new stream")
        st = self.daemon_a.stats()
        c = counters(self.da)
        recs2, _ = s2.events()
        stop_seq = stopped["notify_emitted"]
        # the new stream may carry the tail of the kept records: sent after it connected
        kept_seen = [r.seq for r in recs2 if r.seq <= stop_seq]
        after = [r.seq for r in recs2 if r.seq > stop_seq]
        check(bool(after) and after[0] == stop_seq + 1, f"after the restart: seqs {after[:3]}")
        check(after == list(range(stop_seq + 1, c["notify_emitted"] + 1)), "gap after restart")
        # what the new daemon drained: the kept records, then those after the takeover
        kept = int(st["records"]) - len(after)
        check(kept == RING_NR, f"the new daemon drained {kept} records before the marker read")
        check(st["seq"] == c["notify_emitted"], f"daemon at seq {st['seq']}, emitted {c}")
        ring_gap = int(st["ring_seq_lost"])
        last_kept = stop_seq - ring_gap
        first_kept = last_kept - RING_NR + 1
        if kept_seen:
            check(
                kept_seen == list(range(kept_seen[0], last_kept + 1)),
                f"kept records in the new stream: {kept_seen[0]}..{kept_seen[-1]}, "
                f"want ..{last_kept} without gaps",
            )
        # Between the old stream's last record and the first kept one lie the records the
        # killed daemon drained but never sent (lost with its memory, not by the ring), and
        # the ring's drops among them, which no record of the old stream came after to
        # show as a gap.  Every other drop is a gap the two daemons saw.
        unsent = first_kept - last1 - 1
        check(unsent >= 0, f"kept records start at {first_kept}, before the old stream's {last1}")
        dropped = c["notify_dropped_ring_full"]
        hidden = dropped - lost1 - ring_gap
        check(
            0 <= hidden <= unsent,
            f"gaps {lost1} (first daemon) + {ring_gap} (after the kept records) and "
            f"notify_dropped_ring_full {dropped}: {hidden} drops unaccounted for, with "
            f"{unsent} records drained by the killed daemon and never sent "
            f"(its client drops before the kill: {drops1})",
        )
        return (
            f"first daemon delivered seq 1..{last1} ({lost1} dropped by the ring); "
            f"{unsent} after it went with the killed daemon ({unsent - hidden} drained, "
            f"{hidden} ring drops among them); the new one drained the {RING_NR} kept "
            f"({first_kept}..{last_kept}, {len(kept_seen)} of them reached its new client), "
            f"then a gap of {ring_gap} = the drops once the ring was full, then {len(after)} "
            f"records from {stop_seq + 1}; notify_dropped_ring_full {dropped} = "
            f"{lost1} + {hidden} + {ring_gap}"
        )

    def reader_killed_in_wait(self) -> str:
        w = subprocess.Popen(
            [sys.executable, PROBE, "wait", self.b], stdout=subprocess.PIPE, text=True
        )
        self.procs.append(w)
        assert w.stdout
        check(w.stdout.readline().strip() == "waiting", "the waiting reader did not attach")

        def in_ioctl() -> bool:
            try:
                return Path(f"/proc/{w.pid}/syscall").read_text().split()[0] == "16"
            except (OSError, IndexError):
                return False

        wait_until(in_ioctl, "the reader blocked in the ioctl")
        check(probe("try", self.b) == "EBUSY", "another reader did not get EBUSY")
        w.kill()
        w.wait()
        got = probe("try", self.b)
        check(got.startswith("ok"), f"takeover after the waiting reader was killed: {got!r}")
        check(probe("detach", self.b) == "ok", "DETACH")
        return "killed in WAIT; the next reader took over"

    def thread_detach_while_waiting(self) -> str:
        t = subprocess.Popen(
            [sys.executable, PROBE, "thread-detach", self.b], stdout=subprocess.PIPE, text=True
        )
        self.procs.append(t)
        assert t.stdout
        line = t.stdout.readline().strip()
        check(line == "detach ok waiter ok 0", f"thread-detach: {line!r}")
        check(t.stdout.readline().strip() == "detached", "thread-detach did not finish")
        # the process lives on, detached: another one may attach
        got = probe("try", self.b)
        check(got.startswith("ok"), f"attach while the detached process lives: {got!r}")
        check(probe("detach", self.b) == "ok", "DETACH")
        t.kill()
        t.wait()
        return f"{line}; another process attached while the detached one lived"

    def two_mounts_restart(self) -> str:
        sb = self.daemon_b.start()
        assert sb is not None
        e0 = counters(self.db)
        files_a = [f"{self.a}/f{i}" for i in range(8)]
        files_b = [f"{self.b}/f{i}" for i in range(8, 16)]
        wa = self.spawn(WORKER, "3600", RESTART_PAUSE_S, *files_a)
        wb = self.spawn(WORKER, "3600", RESTART_PAUSE_S, *files_b)
        how = []
        for i in range(RESTARTS):
            sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
            before = len(sb.events()[0])
            wait_until(lambda b=before: len(sb.events()[0]) > b, "B's stream moving")
            rc = self.daemon_a.kill(sig)
            how.append(f"{signal.Signals(sig).name}->{rc}")
            self.daemon_a.start(record=i == RESTARTS - 1)
        wa.kill()
        wb.kill()
        wa.wait()
        wb.wait()
        pid = read_as_user(f"{self.b}/f8")
        wait_until(lambda: sb.of_pid(pid), "the last read on B reaching its stream")
        c = counters(self.db)
        seqs, missing = seqs_after(sb, e0["notify_emitted"])
        check(missing == 0, f"B's stream lost {missing} records while A's daemon restarted")
        check(seqs[-1] == c["notify_emitted"], f"B's stream ends at {seqs[-1]}, emitted {c}")
        check(
            c["notify_dropped_ring_full"] == e0["notify_dropped_ring_full"],
            f"B dropped records: {e0} -> {c}",
        )
        return (
            f"A's daemon restarted {RESTARTS}x ({', '.join(how)}); B: {len(seqs)} records, no gap"
        )

    def stress(self) -> str:
        sa, sb = self.daemon_a.ensure(), self.daemon_b.ensure()
        c0 = {"a": counters(self.da), "b": counters(self.db)}
        drops0 = {m: self.client_drops(d) for m, d in (("a", self.daemon_a), ("b", self.daemon_b))}
        files_a = [f"{self.a}/f{i}" for i in range(16)]
        files_b = [f"{self.b}/f{i}" for i in range(16)]
        workers = []
        for i in range(STRESS_WORKERS):
            files = files_a if i % 2 else files_b
            workers.append(self.spawn(WORKER, str(STRESS_S), "0", *files[i:], *files[:i]))
        hammer = self.spawn(HAMMER, str(STRESS_S), self.a, self.b)
        loops = []
        for w in workers:
            out, _ = w.communicate(timeout=STRESS_S + WAIT_S)
            check(w.returncode == 0, f"a stress worker failed ({w.returncode})")
            loops.append(int(out.strip()))
        out, _ = hammer.communicate(timeout=STRESS_S + WAIT_S)
        check(hammer.returncode == 0, f"the ioctl hammer failed ({hammer.returncode})")
        h = json.loads(out)
        check(not h["bad"], f"unexpected ioctl results: {h['bad']}")
        for e in ("EINVAL", "EFAULT", "EBUSY"):
            check(h["seen"].get(e, 0) > 0, f"the hammer never got {e}: {h['seen']}")
        check(
            all(d.proc and d.proc.poll() is None for d in (self.daemon_a, self.daemon_b)),
            "a daemon died during the stress",
        )
        # a last read per mount: drops at the tail show as a gap only before a later record
        pa = read_as_user(f"{self.a}/f1")
        pb = read_as_user(f"{self.b}/f9")
        wait_until(lambda: sa.of_pid(pa), "A's stream after the stress")
        wait_until(lambda: sb.of_pid(pb), "B's stream after the stress")
        res = []
        for m, d, s, sd in (("a", self.daemon_a, sa, self.da), ("b", self.daemon_b, sb, self.db)):
            c = counters(sd)
            e0 = c0[m]["notify_emitted"]
            seqs, missing = seqs_after(s, e0)
            emitted = c["notify_emitted"] - e0
            ring = c["notify_dropped_ring_full"] - c0[m]["notify_dropped_ring_full"]
            client = self.client_drops(d) - drops0[m]
            check(seqs[-1] == c["notify_emitted"], f"{m}: stream at {seqs[-1]}, emitted {c}")
            check(
                emitted == len(seqs) + ring + client and missing == ring + client,
                f"{m}: emitted {emitted} != delivered {len(seqs)} + ring drops {ring} "
                f"+ client-queue drops {client} (missing {missing})",
            )
            res.append(f"{m}: {emitted} = {len(seqs)} + {ring} + {client}")
        return (
            f"{STRESS_WORKERS} workers x {STRESS_S}s ({sum(loops)} open+read loops), "
            f"hammer {h['seen']}; emitted = delivered + ring drops + client drops: "
            + "; ".join(res)
        )

    @staticmethod
    def client_drops(d: Daemon) -> int:
        st = d.stats()
        clients = st["clients"]
        assert isinstance(clients, list)
        return sum(int(c["records_dropped"]) for c in clients)

    def umount_lazy(self) -> str:
        check(self.db.exists(), "B's sysfs dir is already gone")
        self.daemon_a.ensure()
        self.daemon_b.ensure()
        um = subprocess.run(["umount", "-l", self.b], capture_output=True, text=True)
        check(um.returncode == 0, f"umount -l {self.b}: {um.stderr.strip()}")
        # the daemon notices its mount is gone and exits on its own, with status 1 so
        # that systemd restarts it (notifyd/mountwatch.py), after detaching
        proc = self.daemon_b.proc
        assert proc is not None
        try:
            rc = proc.wait(timeout=3 * WAIT_S)
        except subprocess.TimeoutExpired:
            raise Failure("daemon B still runs after its mount was lazily unmounted") from None
        self.daemon_b.kill(signal.SIGTERM)
        log = (self.out / "daemon-b.log").read_text(errors="replace")
        check(rc == 1, f"daemon B exited {rc} after its mount went, want 1: see daemon-b.log")
        check("was unmounted: exiting" in log, "daemon B did not say why it exited")
        check(
            "detached from the notify ring of" in log.split("was unmounted: exiting")[-1],
            "daemon B did not DETACH on its way out",
        )
        check("Traceback" not in log, "daemon B logged a traceback")
        check(not self.daemon_b.sock.exists(), "daemon B left its socket behind")
        wait_until(lambda: not self.db.exists(), "B's sysfs dir gone (superblock freed)")
        rc = self.daemon_a.kill(signal.SIGTERM)
        check(rc == 0, f"daemon A exited {rc} after SIGTERM: see daemon-a.log")
        check(counters(self.da)["notify_reader_attached"] >= 1, "A never had a reader")
        return (
            "B lazily unmounted under its daemon; the daemon exited 1 on its own "
            "(mount gone), detached, removed its socket; superblock freed; A's daemon "
            "SIGTERM exit 0"
        )

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for d in (self.daemon_a, self.daemon_b):
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()


def main() -> int:
    global BIN
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    mnt_a, mnt_b, bin_dir, out = sys.argv[1:]
    BIN = Path(bin_dir)
    results = Path(out) / "results.tsv"
    t = Faults(mnt_a, mnt_b, out)
    t.files()
    faults: list[Callable[[], str]] = [
        t.kill9_restart,
        t.reader_killed_in_wait,
        t.thread_detach_while_waiting,
        t.two_mounts_restart,
        t.stress,
        t.umount_lazy,
    ]
    failed = 0
    try:
        for fault in faults:
            name = fault.__name__
            print(f"fault: {name}: start", flush=True)
            try:
                what = fault()
                line = f"{name}\tpassed\t{what}"
            except Failure as exc:
                failed += 1
                line = f"{name}\tfailed\t{exc}"
            except Exception:
                failed += 1
                line = f"{name}\tfailed\t" + traceback.format_exc().replace("\n", " | ")
            print(f"fault: {line}", flush=True)
            with open(results, "a") as f:
                f.write(line.replace("\n", " ") + "\n")
    finally:
        t.kill_all()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
