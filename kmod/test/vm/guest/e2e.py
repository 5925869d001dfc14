"""The whole system on a real kernel, run inside the VM by e2e.sh.

    e2e.py MNT_A MNT_B BIN OUTDIR

MNT_A and MNT_B are two mounts of one filesystem made with the patched
module, with no notify reader attached yet.  BIN holds scoutfs-notifyd and
scoutfs-notify-shim (the project's venv).  OUTDIR gets every log and the
recorded streams.  Each step prints "ok: ..." or fails the run with what it
saw; later steps build on earlier ones, so the first failure ends the run.

Waits are bounded (WAIT_S) only so that a broken pipeline fails instead of
hanging; nothing asserts how long anything took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from notify_probe import Drainer

from notifyd import abi, paths
from notifyd.client import Gap, SeqTracker
from notifyd.ioctls import statfs_more

# generous: python start-up alone takes seconds under tcg
WAIT_S = 120
READER_UID = 1234
PROBE = str(Path(__file__).with_name("notify_probe.py"))
OVERLAY = "/mnt/overlay"
FLOOD_READS = 3000  # with its OPEN, ~3x the 1024-record ring


class Failure(Exception):
    pass


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failure(msg)


def wait_until(pred: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise Failure(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


# --- the kernel side -----------------------------------------------------------


def sysfs_dir(mnt: str) -> Path:
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsid, rid = statfs_more(fd)
    finally:
        os.close(fd)
    for d in Path("/sys/fs/scoutfs").iterdir():
        if int((d / "fsid").read_text(), 16) == fsid and int((d / "rid").read_text(), 16) == rid:
            return d
    raise Failure(f"no /sys/fs/scoutfs dir for {mnt}")


def counters(d: Path) -> dict[str, int]:
    names = ("notify_emitted", "notify_dropped_ring_full", "notify_reader_attached")
    return {n: int((d / "counters" / n).read_text()) for n in names}


def read_as_user(path: str, bs: int = 65536) -> int:
    """Read ``path`` to the end in another process as READER_UID; return its pid."""
    # setpriv execs dd: the pid the records carry is the one started here
    p = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={READER_UID}",
            f"--regid={READER_UID}",
            "--clear-groups",
            "dd",
            f"if={path}",
            "of=/dev/null",
            f"bs={bs}",
            "status=none",
        ]
    )
    rc = p.wait(timeout=WAIT_S)
    check(rc == 0, f"dd of {path} as uid {READER_UID} failed ({rc})")
    return p.pid


def probe(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, PROBE, *args], capture_output=True, text=True, timeout=WAIT_S
    )
    return p.stdout.strip() or p.stderr.strip()


# --- the streams -----------------------------------------------------------------


class Stream:
    """What a raw SEQPACKET client recorded (notify_probe.py record)."""

    def __init__(self, sock: Path, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, PROBE, "record", str(sock), str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        check(line == "connected", f"raw client could not connect to {sock}: {line!r}")

    def events(self) -> tuple[list[abi.Record], list[Gap]]:
        """Records so far, and the gaps between them (and before the first: seq starts at 1)."""
        data = self.out.read_bytes() if self.out.exists() else b""
        data = data[: len(data) - len(data) % abi.RECORD_SIZE]
        t = SeqTracker()
        evs = t.events(data)
        recs = [e for e in evs if isinstance(e, abi.Record)]
        gaps = [e for e in evs if isinstance(e, Gap)]
        if recs and recs[0].seq > 1:
            gaps.insert(0, Gap(0, recs[0].seq))
        return recs, gaps

    def of_pid(self, pid: int) -> list[abi.Record]:
        return [r for r in self.events()[0] if r.pid == pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=WAIT_S)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "ab")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def stop(p: subprocess.Popen[bytes], what: str, sig: int = signal.SIGTERM) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        raise Failure(f"{what} still running {WAIT_S}s after signal {sig}") from None


def quiesce(stream: Stream, d: Path) -> tuple[list[abi.Record], list[Gap], dict[str, int]]:
    """Wait until the stream has caught up with every record the mount emitted."""

    def caught_up() -> tuple[list[abi.Record], list[Gap], dict[str, int]] | None:
        c = counters(d)
        recs, gaps = stream.events()
        last = recs[-1].seq if recs else 0
        return (recs, gaps, c) if last == c["notify_emitted"] else None

    got = wait_until(caught_up, f"stream {stream.out.name} catching up with notify_emitted")
    assert isinstance(got, tuple)
    return got


# --- the steps ---------------------------------------------------------------------


class E2E:
    def __init__(self, mnt_a: str, mnt_b: str, bin_dir: str, out: str) -> None:
        self.a, self.b = mnt_a, mnt_b
        self.bin = Path(bin_dir)
        self.out = Path(out)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.da = sysfs_dir(mnt_a)
        self.db = sysfs_dir(mnt_b)
        check(self.da != self.db, "both mounts share one sysfs dir")

    def files(self) -> None:
        a = Path(self.a)
        (a / "dir" / "sub").mkdir(parents=True)
        (a / "dir" / "sub" / "big").write_bytes(os.urandom(300_000))
        (a / "dir" / "small").write_bytes(b"hello scoutfs\n" * 10)
        (a / "warm").write_bytes(b"warm-up\n")
        (a / "flood").write_bytes(b"x" * 4096)
        (a / "only-a").write_bytes(b"a" * 1000)
        (a / "only-b").write_bytes(b"b" * 2000)
        for p in [a, a / "dir", a / "dir" / "sub"]:
            p.chmod(0o755)
        os.sync()
        # the other mount sees them (same filesystem)
        wait_until(lambda: (Path(self.b) / "only-b").exists(), "files visible on the second mount")
        ok("test files made on the first mount, visible on the second")

    def no_reader_no_emission(self) -> None:
        before = counters(self.da), counters(self.db)
        read_as_user(f"{self.a}/dir/small")
        read_as_user(f"{self.b}/only-b")
        after = counters(self.da), counters(self.db)
        check(before == after, f"counters moved with no reader: {before} -> {after}")
        check(after[0]["notify_emitted"] == 0, f"emitted before any reader: {after[0]}")
        ok("no reader attached: opens and reads emit nothing")

    def start_daemon_a(self) -> None:
        fd = os.open(self.a, os.O_RDONLY)
        fsid = statfs_more(fd)[0]
        os.close(fd)
        self.sock_a = paths.socket_path_for_fsid(fsid)
        self.daemon_a = start(
            [str(self.bin / "scoutfs-notifyd"), self.a, "--log-level", "info"],
            self.out / "daemon-a.log",
        )
        self.procs.append(("daemon A", self.daemon_a))
        wait_until(
            lambda: self.sock_a.exists() or self.daemon_a.poll() is not None,
            f"daemon A serving {self.sock_a}",
        )
        check(self.daemon_a.poll() is None, "daemon A exited: see daemon-a.log")
        self.stream_a = Stream(self.sock_a, self.out / "stream-a.bin")
        wait_until(
            lambda: counters(self.da)["notify_reader_attached"] >= 1,
            "notify_reader_attached after the daemon started",
        )
        check(probe("try", self.a) == "EBUSY", "a second reader did not get EBUSY")
        ok(f"daemon A attached and serving {self.sock_a}; a second reader gets EBUSY")

    def start_overlay(self) -> None:
        os.makedirs(OVERLAY, exist_ok=True)
        self.shim = start(
            [str(self.bin / "scoutfs-notify-shim"), self.a, OVERLAY, "--socket", str(self.sock_a)],
            self.out / "shim.log",
        )
        self.procs.append(("shim", self.shim))

        def mounted() -> bool:
            with open("/proc/mounts") as f:
                return any(line.split()[1] == OVERLAY for line in f)

        wait_until(lambda: mounted() or self.shim.poll() is not None, "shim mounted")
        check(self.shim.poll() is None, "shim exited: see shim.log")
        self.inotify_log = self.out / "inotifywait.log"
        self.inotify = subprocess.Popen(
            ["inotifywait", "-m", "-r", "--format", "%e|%w%f", OVERLAY],
            stdout=open(self.inotify_log, "wb"),  # noqa: SIM115
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(("inotifywait", self.inotify))  # type: ignore[arg-type]
        assert self.inotify.stderr
        while True:
            line = self.inotify.stderr.readline()
            check(bool(line), "inotifywait exited before its watches were set")
            if "Watches established" in line:
                break

        # the shim replays once it has subscribed: read until the watcher sees it
        def warm_seen() -> bool:
            read_as_user(f"{self.a}/warm")
            return f"OPEN|{OVERLAY}/warm" in self.inotify_log.read_text()

        wait_until(warm_seen, "the overlay watcher seeing a read made on the scoutfs mount")
        ok("shim mounted on the overlay; inotifywait -m -r sees accesses made on scoutfs")

    def reads_recorded(self) -> None:
        checked = []
        for rel, bs in (("dir/sub/big", 65536), ("dir/small", 7)):
            path = f"{self.a}/{rel}"
            size = os.stat(path).st_size
            ino = os.stat(path).st_ino
            t0 = time.time_ns()
            pid = read_as_user(path, bs)
            t1 = time.time_ns()

            def read_all(pid: int = pid, size: int = size) -> bool:
                reads = [r for r in self.stream_a.of_pid(pid) if r.type == abi.TYPE_READ]
                return sum(r.count for r in reads) >= size

            wait_until(read_all, f"READ records of pid {pid} summing to {size}")
            recs = self.stream_a.of_pid(pid)
            opens = [r for r in recs if r.type == abi.TYPE_OPEN]
            reads = [r for r in recs if r.type == abi.TYPE_READ]
            check(len(opens) == 1, f"{rel}: {len(opens)} OPEN records for pid {pid}, want 1")
            check(recs[0].type == abi.TYPE_OPEN, f"{rel}: first record of pid {pid} not OPEN")
            o = opens[0]
            check(o.flags & os.O_ACCMODE == os.O_RDONLY, f"{rel}: OPEN flags {o.flags:#o}")
            check(o.pos == 0 and o.count == 0, f"{rel}: OPEN pos/count {o.pos}/{o.count}")
            pos = 0
            for r in recs:
                check(r.ino == ino, f"{rel}: record ino {r.ino}, stat says {ino}")
                check(
                    r.uid == READER_UID and r.gid == READER_UID,
                    f"{rel}: uid/gid {r.uid}/{r.gid}, want {READER_UID}",
                )
                check(r.version == abi.VERSION and r.reserved == 0, f"{rel}: version/reserved {r}")
                check(t0 <= r.time_ns <= t1, f"{rel}: time_ns {r.time_ns} outside [{t0}, {t1}]")
            for r in reads:
                check(r.count > 0 and r.flags == 0, f"{rel}: READ count/flags {r}")
                check(r.pos == pos, f"{rel}: READ at pos {r.pos}, the previous ended at {pos}")
                pos += r.count
            check(pos == size, f"{rel}: READ counts sum to {pos}, read {size} bytes")
            checked.append(f"{rel} ({len(reads)} READs)")
        ok(
            "OPEN + READ records with ino, pid, uid/gid, pos and counts right: "
            + ", ".join(checked)
        )

    def overlay_events(self) -> None:
        for rel in ("dir/sub/big", "dir/small"):
            want = [f"{ev}|{OVERLAY}/{rel}" for ev in ("OPEN", "ACCESS", "CLOSE_NOWRITE,CLOSE")]

            def seen(want: list[str] = want) -> bool:
                lines = self.inotify_log.read_text().splitlines()
                return all(w in lines for w in want)

            wait_until(seen, f"overlay events {want}")
        ok("overlay watcher saw OPEN, ACCESS, CLOSE_NOWRITE with the right relative paths")

    def counters_match(self) -> None:
        recs, gaps, c = quiesce(self.stream_a, self.da)
        lost = sum(g.lost for g in gaps)
        check(
            c["notify_emitted"] == len(recs) + lost,
            f"emitted {c['notify_emitted']} != seen {len(recs)} + lost {lost}",
        )
        check(lost == c["notify_dropped_ring_full"], f"lost {lost} != counters {c}")
        ok(f"sysfs counters {c} match the stream ({len(recs)} records, {lost} lost)")

    def flood(self) -> None:
        before = counters(self.da)["notify_dropped_ring_full"]
        self.daemon_a.send_signal(signal.SIGSTOP)
        try:
            fd = os.open(f"{self.a}/flood", os.O_RDONLY)
            for i in range(FLOOD_READS):
                os.pread(fd, 1, i)
            os.close(fd)
        finally:
            self.daemon_a.send_signal(signal.SIGCONT)
        # records dropped at the tail leave no gap until a later record arrives
        pid = read_as_user(f"{self.a}/warm")
        wait_until(lambda: self.stream_a.of_pid(pid), "a read after the flood reaching the stream")
        recs, gaps, c = quiesce(self.stream_a, self.da)
        lost = sum(g.lost for g in gaps)
        dropped = c["notify_dropped_ring_full"]
        check(dropped - before >= FLOOD_READS + 1 - 1024, f"flood dropped only {dropped - before}")
        check(bool(gaps), "no seq gap in the stream after the flood")
        check(
            lost == dropped, f"stream gaps lose {lost} records, notify_dropped_ring_full {dropped}"
        )
        check(c["notify_emitted"] == len(recs) + lost, f"emitted != seen + lost after flood: {c}")
        ok(f"flood of {FLOOD_READS + 1} records: gaps total {lost} = notify_dropped_ring_full")

    def single_reader_b(self) -> None:
        hold = subprocess.Popen(
            [sys.executable, PROBE, "hold", self.b], stdout=subprocess.PIPE, text=True
        )
        assert hold.stdout
        line = hold.stdout.readline().strip()
        check(line == "attached", f"first reader on B: {line!r}")
        check(probe("try", self.b) == "EBUSY", "second reader on B did not get EBUSY")
        hold.kill()
        hold.wait()
        got = probe("try", self.b)
        check(got.startswith("ok"), f"takeover after the first reader was killed: {got!r}")
        check(probe("detach", self.b) == "ok", "DETACH on B")
        before = counters(self.db)["notify_emitted"]
        read_as_user(f"{self.b}/only-b")
        after = counters(self.db)["notify_emitted"]
        check(before == after, f"emitted moved after DETACH: {before} -> {after}")
        ok("B: EBUSY while the reader lives, takeover once it is killed, nothing after DETACH")

    def two_mounts(self) -> None:
        sock_dir = Path("/run/scoutfs-vmtest/b")
        sock_dir.mkdir(parents=True, mode=0o700)
        self.sock_b = sock_dir / "notify.sock"
        self.daemon_b = start(
            [str(self.bin / "scoutfs-notifyd"), self.b, "--socket", str(self.sock_b)],
            self.out / "daemon-b.log",
        )
        self.procs.append(("daemon B", self.daemon_b))
        wait_until(
            lambda: self.sock_b.exists() or self.daemon_b.poll() is not None, "daemon B serving"
        )
        check(self.daemon_b.poll() is None, "daemon B exited: see daemon-b.log")
        self.stream_b = Stream(self.sock_b, self.out / "stream-b.bin")
        pid_a = read_as_user(f"{self.a}/only-a")
        pid_b = read_as_user(f"{self.b}/only-b")
        wait_until(lambda: self.stream_a.of_pid(pid_a), "A's stream carrying A's read")
        wait_until(lambda: self.stream_b.of_pid(pid_b), "B's stream carrying B's read")
        quiesce(self.stream_b, self.db)
        recs_a, _ = self.stream_a.events()
        recs_b, _ = self.stream_b.events()
        check(not [r for r in recs_a if r.pid == pid_b], "A's stream has B's access")
        check(not [r for r in recs_b if r.pid == pid_a], "B's stream has A's access")
        ok("two mounts of one filesystem: each stream carries only its own mount's accesses")

    def teardown(self) -> None:
        check(stop(self.shim, "shim") == 0, "shim: SIGTERM exit status not 0: see shim.log")
        with open("/proc/mounts") as f:
            check(all(line.split()[1] != OVERLAY for line in f), "shim left its mount behind")
        stop(self.inotify, "inotifywait")  # type: ignore[arg-type]
        # unmount B while its daemon is attached
        um = subprocess.run(["umount", self.b], capture_output=True, text=True)
        if um.returncode != 0:
            print(
                f"umount {self.b} with the daemon attached: {um.stderr.strip()}; lazy", flush=True
            )
            check(subprocess.run(["umount", "-l", self.b]).returncode == 0, "umount -l B")
        rc = stop(self.daemon_b, "daemon B")
        print(f"daemon B exited {rc} after its mount went away", flush=True)
        wait_until(lambda: not self.db.exists(), "B's sysfs dir gone (superblock freed)")
        self.stream_b.stop()
        # daemon A: SIGTERM removes its socket
        check(stop(self.daemon_a, "daemon A") == 0, "daemon A SIGTERM exit status")
        check(not self.sock_a.exists(), f"daemon A left {self.sock_a} behind")
        self.stream_a.stop()
        d = Drainer(self.a)
        try:
            d.ioctl(abi.READ_NOTIFY_DETACH)
        finally:
            d.close()
        ok("overlay, daemons and B unmounted cleanly with the daemon attached")

    def kill_all(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["umount", "-l", OVERLAY], check=False, capture_output=True)


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    t = E2E(*sys.argv[1:])
    steps = [
        t.files,
        t.no_reader_no_emission,
        t.start_daemon_a,
        t.start_overlay,
        t.reads_recorded,
        t.overlay_events,
        t.counters_match,
        t.flood,
        t.single_reader_b,
        t.two_mounts,
        t.teardown,
    ]
    try:
        for step in steps:
            step()
    except Failure as exc:
        print(f"FAIL: {step.__name__}: {exc}", flush=True)
        t.kill_all()
        return 1
    except BaseException:
        t.kill_all()
        raise
    print("e2e: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
