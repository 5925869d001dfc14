"""Stage 4: the inotify shim, end to end, against inotify on a local directory.

The real daemon (fanotify source) watches BACKING, bind-mounted onto itself so
that its mount mark sees this benchmark and nothing else on the machine; the
real shim mounts the overlay (``compat.procs.run_shim``).  An inotify
reader thread in this process stamps the first IN_OPEN per name; the access
(open, read 1 byte, close) is made on BACKING.  The baseline is the same
access on a plain local directory watched directly by the same reader.
"""

from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from compat.procs import run_shim
from notifyd.paths import shim_stats_path
from notifyd.stats import read_stats

from .config import Config
from .figures import Figure, Stage, median
from .procs import Usage, bind_self, notifyd, thread_cpu_seconds, tmpfs

__all__ = ["run"]

STAGE = "shim"
LATENCY_RATE = 1000  # accesses/s for the latency figures
LATENCY_TARGET_MS = 2.0
FAST_RATE = 5000  # accesses/s for the second latency target
FAST_TARGET_MS = 5.0
SUSTAINED_TARGET = 10000  # distinct events/s
SUSTAINED_TARGET_RATIO = 0.5  # of local inotify in the same run
SEQ_TARGET = 0.8  # overlay / BACKING, cold and warm
# how long to wait for the last events of a run once nothing has arrived
QUIET = 1.0
GRACE = 15.0
SEQ_CHUNK = 1 << 20
# seconds; Python's default of 5 ms would delay the event reader behind the accessor
GIL_SWITCH = 0.0002
RAND_CHUNK = 4096
# the share of the machine's CPU left idle above which a read miss is not put
# down to a lack of CPU
IDLE_ENOUGH = 0.25
PAGE = os.sysconf("SC_PAGE_SIZE")

SHIM_CPU_TARGET_US = 100  # shim CPU per replayed access
DAEMON_CPU_TARGET_US = 50  # the fanotify source's CPU per access
# FUSE requests a replay of a file the kernel has no fresh entry for costs
# (LOOKUP, OPEN, RELEASE; the IN_ACCESS is a zero-length read, no request)
REPLAY_REQUESTS = 3
# names stat'ed through the overlay, each once, to time one LOOKUP
LOOKUP_PROBES = 4000
LOOKUP_PROBES_QUICK = 1500
# the profile taken before the figures (py-spy, when installed): its length
PROFILE_SECONDS = 4.0
PROFILE_SECONDS_QUICK = 2.0
PROFILE_TOP = 6


def _why_cpu(used: Used, events: int, runs: str) -> str:
    """Why an event figure misses, from what the shim, the daemon and the machine used
    during the ``runs`` it comes from, in which ``events`` accesses were replayed."""
    n = max(events, 1)
    shim, daemon = used.use["shim"], used.use["daemon"]
    stats = used.stats
    shim_us = shim.cpu / n * 1e6
    daemon_us = daemon.cpu / n * 1e6
    replayed = stats.get("replayed", 0)
    text = (
        f"over {runs} ({events:,} accesses replayed) the shim used {shim_us:.0f} us "
        f"of CPU per replayed access ({shim.user / n * 1e6:.0f} user, "
        f"{shim.system / n * 1e6:.0f} system; target {SHIM_CPU_TARGET_US}) and the daemon "
        f"{daemon_us:.0f} us per access (target {DAEMON_CPU_TARGET_US}): together "
        f"{(shim.cpu + daemon.cpu) / max(used.seconds, 1e-9):.0%} of one core over the "
        f"{used.seconds:.1f} s of the runs. The shim's "
        f"threads waited {shim.voluntary / n:.1f} times per access (a FUSE request read or "
        "replied to, a hand-off between its trio thread and a replay worker) and were "
        f"preempted {shim.involuntary / n:.1f} times; the daemon woke "
        f"{daemon.voluntary / n:.2f} times per access. The machine's "
        f"{os.cpu_count()} cores were {shim.idle_share():.0%} idle over the runs "
        f"(load average {_loadavg()} at the end), so the shim and the daemon waited for a "
        "CPU as well as used one"
    )
    if replayed:
        text += (
            f"; the shim replayed {replayed:,} records (collapsed "
            f"{stats.get('collapsed', 0):,}, lost to overload {stats.get('overload', 0):,}). "
            "A replay of a file the kernel has no entry for costs three FUSE requests "
            "(LOOKUP, OPEN, and RELEASE once the file is quiet; the IN_ACCESS is a "
            "zero-length read, no request), each served by pyfuse3's one trio thread "
            "(compat/inotify_shim/replay.py)"
        )
    lookup_us = used.lookup_us
    if lookup_us:
        text += (
            f". In this run one LOOKUP cost the shim {lookup_us:.0f} us of CPU "
            f"(`shim.lookup_cpu_us`), so the {REPLAY_REQUESTS} requests of a replay alone "
            f"come to about {REPLAY_REQUESTS * lookup_us:.0f} us against the "
            f"{SHIM_CPU_TARGET_US} us target: pyfuse3 serves every request in Python on one "
            "thread, and the replay threads hand the GIL to and from it around each one"
        )
    th = used.threads
    if sum(th.values()):
        text += (
            f". By thread: the trio thread (every FUSE request, the records from the "
            f"daemon, the hand-offs) {th['trio'] / n * 1e6:.0f} us per access, the replay "
            f"threads {th['replay'] / n * 1e6:.0f} us (mostly system time: the opens through "
            "the overlay wait for its replies, and each blocking call gives the GIL up and "
            "takes it back), trio's thread pool (closes, path look-ups) "
            f"{th['closes'] / n * 1e6:.0f} us"
        )
    if used.profile:
        text += f". Profile: {used.profile}"
    return text


def _why_daemon_wakeups(daemon: Usage) -> str:
    """What batching the daemon's wakeups would take to meet its target at LATENCY_RATE."""
    if daemon.voluntary == 0:
        return ""
    per_wakeup = daemon.cpu / daemon.voluntary * 1e6
    need = math.ceil(per_wakeup / DAEMON_CPU_TARGET_US)
    if need <= 1:
        return ""
    # accesses come every 1/LATENCY_RATE s: gathering `need` of them waits for the last
    wait_ms = (need - 1) * 1e3 / LATENCY_RATE
    return (
        f"A wakeup cost it {per_wakeup:.0f} us: to reach {DAEMON_CPU_TARGET_US} us per access "
        f"each would have to carry {need} accesses, i.e. hold the first for about "
        f"{wait_ms:.0f} ms at {LATENCY_RATE:,}/s"
        + (
            f", beyond the {LATENCY_TARGET_MS:g} ms latency target, so the daemon wakes per "
            "access at this rate"
            if wait_ms >= LATENCY_TARGET_MS
            else ""
        )
    )


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _why_seq(
    use: Usage,
    mib: float,
    paired: float,
    back_mb_s: float,
    *,
    reader: tuple[float, float] | None = None,
    folios: tuple[float, float] | None = None,
) -> str:
    """Why an overlay read figure misses, from what the shim used while serving it.

    ``reader``: the reading thread's own CPU in ms per MiB, through the
    overlay and on BACKING; ``folios``: the mean pages per page-cache folio
    of the file, the overlay's and BACKING's (:func:`_folio_pages`).
    """
    mib = max(mib, 1e-9)
    text = (
        f"the median of the per-run overlay/BACKING ratios was {paired:.2f}, with BACKING "
        f"at {back_mb_s:,.0f} MB/s; "
    )
    if folios is not None and folios[1] >= 2 * folios[0]:
        over_pages, back_pages = folios
        text += (
            f"the page cache held the file in folios of {over_pages:,.1f} page(s) on the "
            f"overlay and {back_pages:,.1f} on BACKING (means, from /proc/kpageflags): a read "
            "served from the cache pays the kernel's per-folio costs (lookup, reference, LRU "
            f"activation at the second access, a copy) {back_pages / over_pages:,.0f} times "
            "as often on the overlay, whatever the shim does (the kernel's FUSE makes the "
            "overlay's folios, the shim has no say in their size); "
        )
    if reader is not None:
        over_ms, back_ms = reader
        text += (
            f"the reading thread itself used {over_ms:.2f} ms of CPU per MiB through the "
            f"overlay and {back_ms:.2f} on BACKING; "
        )
    if use.voluntary == 0:
        # an idle shim sleeps in epoll on /dev/fuse: serving a request starts by waking
        return text + (
            f"the shim's threads did not wake once while these reads ran ({mib:,.0f} MiB), "
            "so no FUSE request reached it: the kernel served them from the overlay's own "
            "page cache, and the gap is the kernel's FUSE read path against BACKING's, "
            "not the shim"
        )
    per_mib = use.cpu / mib * 1e3
    text += (
        f"while serving these reads ({mib:,.0f} MiB) the shim's threads woke "
        f"{use.voluntary:,} times in all and used {use.cpu * 1e3:.0f} ms of CPU "
        f"({per_mib:.2f} ms per MiB)"
    )
    if use.cpu < 0.05:
        text += " (too few of /proc's clock ticks to judge its CPU)"
    else:
        text += f", {use.system / use.cpu:.0%} of it system time (the pread of BACKING, the copy)"
        cap = 1.048576e3 / per_mib
        measured = paired * back_mb_s
        text += f"; at that cost one core serves {cap:,.0f} MB/s"
        if reader is not None:
            over_ms, back_ms = reader
            total = over_ms + per_mib
            text += (
                f"; with the reading thread's own, the overlay cost {total:.2f} ms of CPU per "
                f"MiB against {back_ms:.2f} for reading BACKING directly, so where the cores are "
                f"the limit ({use.idle_share():.0%} idle here) it reaches at most "
                f"{back_ms / total:.2f} of BACKING's rate"
            )
        # one core's worth says nothing when no core was free
        if cap > 1.5 * measured and use.idle_share() >= IDLE_ENOUGH:
            text += (
                f", well above the overlay's {measured:,.0f}, so the shim's CPU is not what "
                "holds it back: its requests are served one at a time, each a blocking "
                "os.pread of BACKING on its one trio thread (compat/inotify_shim/overlay.py "
                "`read`), so one request's read of BACKING never overlaps the next"
            )
    return text + (
        f"; it was preempted {use.involuntary:,} times, on {os.cpu_count()} cores "
        f"{use.idle_share():.0%} idle. Every FUSE read request is a round trip to the shim's "
        "Python `read` handler, and pyfuse3 has no FUSE passthrough that would take the "
        "shim out of the data path"
    )


def _cannot_run() -> str:
    """Why the shim cannot be measured here, or ""."""
    if os.geteuid() != 0:
        return "the shim mounts FUSE and needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: load the fuse module"
    try:
        import inotify_simple  # noqa: F401
    except ImportError:
        return "inotify_simple is not installed (pip install -e '.[test]')"
    return ""


def _make_files(d: Path, names: list[str]) -> None:
    for name in names:
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"scoutfs-notify\n")
        os.close(fd)


def _access(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)


class OpenStamps:
    """IN_OPEN on one directory; a thread stamps the first event per name (perf_counter_ns)."""

    def __init__(self, directory: Path) -> None:
        from inotify_simple import INotify, flags

        self._inotify = INotify()
        self._directory = str(directory)
        self._inotify.add_watch(self._directory, flags.OPEN)
        self.first: dict[str, int] = {}
        self.overflows = 0
        self.last = 0
        # IN_ACCESS events, counted while ``count_accesses`` has them watched
        self.accesses = 0
        self.last_access = 0
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from inotify_simple import flags

        first = self.first
        while not self._stop:
            events = self._inotify.read(timeout=100)
            now = time.perf_counter_ns()
            accesses = 0
            for ev in events:
                if ev.mask & flags.Q_OVERFLOW:
                    self.overflows += 1
                elif ev.mask & flags.ACCESS:
                    accesses += 1
                elif ev.name and ev.name not in first:
                    first[ev.name] = now
            if events:
                self.last = now
            if accesses:
                self.accesses += accesses
                self.last_access = now

    @contextlib.contextmanager
    def count_accesses(self) -> Iterator[None]:
        """IN_ACCESS watched too, and counted from zero, for the block."""
        from inotify_simple import flags

        self.accesses = 0
        self.last_access = 0
        # a second add_watch on the same directory replaces the mask
        self._inotify.add_watch(self._directory, flags.OPEN | flags.ACCESS)
        try:
            yield
        finally:
            self._inotify.add_watch(self._directory, flags.OPEN)

    def wait(self, names: list[str]) -> None:
        """Until every name has its event, or nothing came for QUIET s (GRACE at most)."""
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline:
            if all(n in self.first for n in names):
                return
            if time.perf_counter_ns() - self.last > QUIET * 1e9:
                # nothing is arriving; give stragglers one more QUIET period
                time.sleep(QUIET)
                if time.perf_counter_ns() - self.last > QUIET * 1e9:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self._inotify.close()


def _paced(d: Path, names: list[str], rate: float) -> tuple[dict[str, int], float]:
    """Access each name once at ``rate`` per second; (start stamps, achieved rate)."""
    stamps: dict[str, int] = {}
    interval = 1e9 / rate
    start = time.perf_counter_ns()
    base = str(d) + "/"
    for i, name in enumerate(names):
        ahead = start + i * interval - time.perf_counter_ns()
        if ahead > 0:
            time.sleep(ahead / 1e9)
        stamps[name] = time.perf_counter_ns()
        _access(base + name)
    took = time.perf_counter_ns() - start
    return stamps, len(names) / (took / 1e9)


def _run_once(
    watch: OpenStamps, d: Path, names: list[str], rate: float
) -> tuple[list[float], int, float, float]:
    """(latencies in ms, names without an event, achieved access rate, delivered events/s)."""
    watch.first.clear()
    stamps, achieved = _paced(d, names, rate)
    watch.wait(names)
    got = [n for n in names if n in watch.first]
    lat = [(watch.first[n] - stamps[n]) / 1e6 for n in got]
    delivered = 0.0
    if got:
        span = (max(watch.first[n] for n in got) - min(stamps.values())) / 1e9
        delivered = len(got) / max(span, 1e-9)
    return lat, len(names) - len(got), achieved, delivered


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


class Names:
    """File names for runs: distinct within a run, taken round a pool of ``size``.

    A file comes round again only after the rest of the pool, long after the
    shim closed its synthetic open (``--close-after``), so its access raises
    IN_OPEN again; a pool the size of the largest run keeps the number of
    files (and the cleanup) small.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.n = 0

    def all(self) -> list[str]:
        return [f"f{i:06d}" for i in range(self.size)]

    def take(self, count: int) -> list[str]:
        if count > self.size:
            raise ValueError(f"a run of {count} files from a pool of {self.size}")
        out = [f"f{(self.n + i) % self.size:06d}" for i in range(count)]
        self.n += count
        return out


# the shim's threads, by what they do: the main thread runs trio and pyfuse3 (every
# FUSE request, the records from the daemon), trio's thread pool closes synthetic
# opens and walks BACKING for the resolver, and the rest are the replay threads
# (compat/inotify_shim/replay.py)
_SHIM_THREADS = ("trio", "replay", "closes")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s live threads, summed per kind of _SHIM_THREADS."""
    out = dict.fromkeys(_SHIM_THREADS, 0.0)
    for tid, (comm, cpu) in thread_cpu_seconds(pid).items():
        kind = "trio" if tid == pid else "closes" if comm.startswith("Trio") else "replay"
        out[kind] += cpu
    return out


def _shim_stats(setup: dict) -> dict[str, int]:
    """The shim's integer counters now ({} if its stats socket does not answer)."""
    try:
        doc = read_stats(str(shim_stats_path(setup["shim"].mountpoint)))
    except OSError:
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool)}


class Used:
    """What the shim and the daemon used, and the shim's counters, over a block."""

    def __init__(self, setup: dict) -> None:
        self._setup = setup
        shim = setup["shim"]
        self._pids = {"shim": shim.proc.pid, "daemon": shim.daemon_pid}
        self.use = {k: Usage() for k in self._pids}
        self.stats: dict[str, int] = {}
        # the shim's CPU seconds per kind of thread (threads alive at both readings)
        self.threads = dict.fromkeys(_SHIM_THREADS, 0.0)
        self.seconds = 0.0
        # from the setup: one LOOKUP's CPU in the shim, and the profile's text
        self.lookup_us: float = setup.get("lookup_us", 0.0)
        self.profile: str = setup.get("profile", "")

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        before = {k: Usage.read(pid) for k, pid in self._pids.items()}
        threads = _thread_cpu(self._pids["shim"])
        stats = _shim_stats(self._setup)
        t0 = time.monotonic()
        yield
        self.seconds += time.monotonic() - t0
        for k, pid in self._pids.items():
            self.use[k] = self.use[k] + (Usage.read(pid) - before[k])
        for k, v in _thread_cpu(self._pids["shim"]).items():
            self.threads[k] += max(v - threads[k], 0.0)
        for k, v in _shim_stats(self._setup).items():
            self.stats[k] = self.stats.get(k, 0) + v - stats.get(k, 0)


def _latency_runs(
    cfg: Config, setup: dict, names: Names, rate: int, count: int
) -> tuple[dict[str, list], Used]:
    """Runs of ``count`` accesses at ``rate``/s on both arms; (runs, what the overlay's used)."""
    runs: dict[str, list] = {"overlay": [], "local": []}
    used = Used(setup)
    for _ in range(cfg.repeats):
        batch = names.take(count)
        with used.measure():
            runs["overlay"].append(_run_once(setup["overlay"], setup["backing"], batch, rate))
        runs["local"].append(_run_once(setup["local"], setup["local_dir"], batch, rate))
    return runs, used


ACCESS_CPU_COUNT = 5000


def _lookups(cfg: Config, stage: Stage, setup: dict) -> None:
    """The shim's CPU for one FUSE request: a stat of each never-seen probe name through
    the overlay is one LOOKUP (the kernel has no entry for it), and nothing else runs."""
    mnt = str(setup["shim"].mountpoint) + "/"
    local = str(setup["local_dir"]) + "/"
    probes = setup["probes"]
    pid = setup["shim"].proc.pid
    before = Usage.read(pid)
    for name in probes:
        os.lstat(mnt + name)
    use = Usage.read(pid) - before
    t0 = time.thread_time()
    for name in probes:
        os.lstat(local + name)
    local_us = (time.thread_time() - t0) / len(probes) * 1e6
    us = use.cpu / len(probes) * 1e6
    setup["lookup_us"] = us
    stage.add(
        Figure(
            STAGE,
            "lookup_cpu_us",
            us,
            "us",
            local_us,
            "the caller's own CPU for the same lstat on the local directory",
            note=f"CPU of the shim per FUSE LOOKUP: lstat of {len(probes):,} names never looked "
            f"up before, through the overlay, one at a time; the shim's threads woke "
            f"{use.voluntary / len(probes):.1f} times per LOOKUP. A replay of a file the kernel "
            f"has no entry for costs {REPLAY_REQUESTS} requests (LOOKUP, OPEN, RELEASE)",
        )
    )


def _py_spy() -> str | None:
    """py-spy (a developer's tool, not a dependency) if installed beside this Python."""
    for cand in (str(Path(sys.executable).parent / "py-spy"), shutil.which("py-spy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


# leaf frames that are trio waiting in epoll_wait, which py-spy samples as active
_WAITING = ("EpollIOManager.get_events ", "EpollIOManager._epoll_wait ")


def _top_frames(raw: Path) -> tuple[int, str]:
    """(samples, the PROFILE_TOP functions by own samples) from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            leaf = stack.rsplit(";", 1)[-1]
            if leaf.startswith(_WAITING):
                continue
            # "function (path/file.py:line)" -> "function (file.py)"
            fn, _, where = leaf.partition(" (")
            own[f"{fn} ({where.rsplit('/', 1)[-1].split(':')[0]})"] += int(count)
    total = sum(own.values())
    top = ", ".join(f"{n / max(total, 1):.0%} {fn}" for fn, n in own.most_common(PROFILE_TOP))
    return total, top


def _profile(cfg: Config, stage: Stage, setup: dict, names: Names) -> None:
    """py-spy on the shim and the daemon while accesses run at LATENCY_RATE, before the
    figures (so that its sampling weighs on none of them); its top frames go in the notes."""
    spy = _py_spy()
    if spy is None:
        setup["profile"] = "none taken (py-spy is not installed beside this Python)"
        stage.notes.append("profile: " + setup["profile"])
        return
    seconds = PROFILE_SECONDS_QUICK if cfg.quick else PROFILE_SECONDS
    work = setup["backing"].parent
    pids = {"shim": setup["shim"].proc.pid, "daemon": setup["shim"].daemon_pid}
    spies = {
        who: subprocess.Popen(
            [
                spy,
                "record",
                "--nonblocking",
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(work / f"profile-{who}.txt"),
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for who, pid in pids.items()
    }
    time.sleep(0.5)  # attached
    _run_once(
        setup["overlay"], setup["backing"], names.take(int(LATENCY_RATE * seconds)), LATENCY_RATE
    )
    texts = []
    for who, proc in spies.items():
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
            samples, top = _top_frames(work / f"profile-{who}.txt")
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            texts.append(f"{who}: no profile ({exc})")
            continue
        texts.append(f"{who} ({samples:,} samples, own time): {top}")
    setup["profile"] = (
        f"py-spy --nonblocking at 200 Hz over {seconds:g} s of accesses at "
        f"{LATENCY_RATE:,}/s, idle and trio's epoll waits left out (a replay thread "
        "blocked in open() on the overlay's answer counts as busy); " + "; ".join(texts)
    )
    stage.notes.append("profile: " + setup["profile"])


def _access_cpu_us(d: Path, names: list[str]) -> float:
    """CPU of this thread per access (open, read 1 byte, close) of ``names`` on ``d``."""
    base = str(d) + "/"
    paths = [base + n for n in names]
    t0 = time.thread_time()
    for i in range(ACCESS_CPU_COUNT):
        _access(paths[i % len(paths)])
    return (time.thread_time() - t0) / ACCESS_CPU_COUNT * 1e6


def _latency(cfg: Config, stage: Stage, setup: dict, names: Names) -> None:
    count = cfg.pick(3 * LATENCY_RATE, LATENCY_RATE)
    runs, used = _latency_runs(cfg, setup, names, LATENCY_RATE, count)
    access_us = _access_cpu_us(setup["local_dir"], setup["repeat_names"])
    access_name = "CPU of the access itself (open, read 1 byte, close) on the local directory"
    events = sum(len(r[0]) for r in runs["overlay"])
    why = _why_cpu(used, events, f"{cfg.repeats} runs of {count:,} accesses at {LATENCY_RATE:,}/s")
    n = max(events, 1)
    shim_us = used.use["shim"].cpu / n * 1e6
    daemon = used.use["daemon"]
    daemon_us = daemon.cpu / n * 1e6
    stage.add(
        Figure(
            STAGE,
            "shim_cpu_us_per_event",
            shim_us,
            "us",
            access_us,
            access_name,
            target=f"<= {SHIM_CPU_TARGET_US} us",
            met=shim_us <= SHIM_CPU_TARGET_US,
            why="" if shim_us <= SHIM_CPU_TARGET_US else why,
            note=(
                "CPU of the shim process (all threads) per event replayed during the latency "
                f"runs at {LATENCY_RATE}/s, so at most "
                f"{events / max(used.use['shim'].cpu, 1e-9):,.0f} events/s on a whole core"
            ),
        )
    )
    stage.add(
        Figure(
            STAGE,
            "daemon_cpu_us_per_access",
            daemon_us,
            "us",
            access_us,
            access_name,
            target=f"<= {DAEMON_CPU_TARGET_US} us",
            met=daemon_us <= DAEMON_CPU_TARGET_US,
            why=""
            if daemon_us <= DAEMON_CPU_TARGET_US
            else (
                f"at {LATENCY_RATE}/s the daemon woke {daemon.voluntary / n:.2f} times per "
                f"access and used {daemon.user / n * 1e6:.0f} us user and "
                f"{daemon.system / n * 1e6:.0f} us system CPU per access, so its cost is per "
                "wakeup (trio's loop, the fanotify read, one publish and one send to the "
                "shim: notifyd/source_fanotify.py, notifyd/broadcast.py), not per record; the "
                "fanotify stage's `cpu_us_per_record` is the same source under a "
                "workload that fills each wakeup. " + _why_daemon_wakeups(daemon)
            ),
            note=f"CPU of scoutfs-notifyd (fanotify source, one client: the shim) per access "
            f"at {LATENCY_RATE}/s during the latency runs",
        )
    )
    _latency_figures(stage, runs, count, LATENCY_RATE, "", LATENCY_TARGET_MS, why)
    # the same at a tenth of the rate: the path's own latency, without a backlog
    slow = LATENCY_RATE // 10
    count = cfg.pick(3 * slow, slow)
    runs, _ = _latency_runs(cfg, setup, names, slow, count)
    _latency_figures(stage, runs, count, slow, f"_at_{slow}_per_s", None, "")
    count = cfg.pick(3 * FAST_RATE, FAST_RATE // 2)
    runs, used = _latency_runs(cfg, setup, names, FAST_RATE, count)
    events = sum(len(r[0]) for r in runs["overlay"])
    why = _why_cpu(used, events, f"{cfg.repeats} runs of {count:,} accesses at {FAST_RATE:,}/s")
    _latency_figures(stage, runs, count, FAST_RATE, f"_at_{FAST_RATE}_per_s", FAST_TARGET_MS, why)


def _latency_figures(
    stage: Stage,
    runs: dict[str, list],
    count: int,
    rate: int,
    suffix: str,
    target_ms: float | None,
    why: str,
) -> None:
    for q in (50, 99):
        value = median(_pct(r[0], q) for r in runs["overlay"])
        base = median(_pct(r[0], q) for r in runs["local"])
        lost = sum(r[1] for r in runs["overlay"])
        achieved = median(r[2] for r in runs["overlay"])
        fig = Figure(
            STAGE,
            f"latency_p{q}_ms{suffix}",
            value,
            "ms",
            base,
            "the same access on a local directory watched directly",
            runs=[_pct(r[0], q) for r in runs["overlay"]],
            note=f"access on BACKING -> IN_OPEN on the overlay, {count} distinct files at "
            f"{rate}/s a run ({achieved:,.0f}/s made); {lost} without an event",
        )
        if q == 99 and target_ms is not None:
            fig.target = f"< {target_ms:g} ms at {rate} distinct files/s, none lost"
            fig.met = value < target_ms and lost == 0
            fig.why = why
            if lost:
                fig.why = f"{lost} accesses got no IN_OPEN within the wait; " + why
            if base >= target_ms:
                fig.why += (
                    f". The direct watch's own p99 here ({base:.1f} ms) is above the target "
                    "too: this machine's load alone misses it"
                )
        stage.add(fig)


REPEAT_FILES = 64
REPEAT_SECONDS = 2.0
REPEAT_SECONDS_QUICK = 0.5
REPEAT_TARGET = 50000  # IN_ACCESS/s


def _repeat_once(watch: OpenStamps, d: Path, names: list[str], seconds: float) -> dict:
    """Open ``names`` on ``d`` (and wait for their IN_OPEN), then 1-byte preads of them,
    round robin so that no two events in a row are alike, for ``seconds``."""
    base = str(d) + "/"
    watch.first.clear()
    fds = [os.open(base + n, os.O_RDONLY) for n in names]
    try:
        watch.wait(names)
        opened = sum(n in watch.first for n in names)
        with watch.count_accesses():
            reads = 0
            t0 = time.perf_counter_ns()
            end = t0 + int(seconds * 1e9)
            while time.perf_counter_ns() < end:
                for fd in fds:
                    os.pread(fd, 1, 0)
                reads += len(fds)
            made = time.perf_counter_ns()
            # until nothing has come for QUIET s
            seen = -1
            while watch.accesses != seen:
                seen = watch.accesses
                time.sleep(QUIET)
            got, last = watch.accesses, watch.last_access
    finally:
        for fd in fds:
            os.close(fd)
    return dict(
        opened=opened,
        reads=reads,
        read_rate=reads / ((made - t0) / 1e9),
        events=got,
        rate=got / max((last - t0) / 1e9, 1e-9),
        drain=max(last - made, 0) / 1e9,
    )


def _repeated(cfg: Config, stage: Stage, setup: dict) -> None:
    names = setup["repeat_names"]
    seconds = REPEAT_SECONDS_QUICK if cfg.quick else REPEAT_SECONDS
    over, local = [], []
    used = Used(setup)
    for _ in range(cfg.repeats):
        with used.measure():
            over.append(_repeat_once(setup["overlay"], setup["backing"], names, seconds))
        local.append(_repeat_once(setup["local"], setup["local_dir"], names, seconds))
    value = median(r["rate"] for r in over)
    events = sum(r["events"] for r in over)
    n = max(events, 1)
    shim, daemon = used.use["shim"], used.use["daemon"]
    st = used.stats
    reads = sum(r["reads"] for r in over)
    why = (
        f"the reader made {median(r['read_rate'] for r in over):,.0f} reads/s on BACKING and "
        f"got {events:,} IN_ACCESS for {reads:,} reads; the daemon delivered "
        f"{st.get('submitted', 0):,} records to the shim, at most "
        f"{st.get('submitted', 0) / (len(over) * seconds):,.0f} IN_ACCESS/s over the "
        f"{len(over) * seconds:g} s of reading (fanotify merges an event into an unread one of "
        "the same file, so a daemon that falls behind gets fewer records than there were "
        "reads; the shim replays each READ of a held open, and collapses a READ only into "
        "one still pending: "
        f"{st.get('collapsed', 0):,} collapsed, {st.get('replayed', 0):,} replayed, "
        f"{st.get('overload', 0):,} lost to overload), the last of them "
        f"{median(r['drain'] for r in over):.2f} s after the reads stopped. Per IN_ACCESS "
        f"the shim used {shim.cpu / n * 1e6:.0f} us of CPU and the daemon "
        f"{daemon.cpu / n * 1e6:.0f} us: together at most "
        f"{1 / max((shim.cpu + daemon.cpu) / n, 1e-9):,.0f} IN_ACCESS/s on one core, on "
        f"{os.cpu_count()} cores {shim.idle_share():.0%} idle during the runs; the reader "
        "here shares them too"
    )
    stage.add(
        Figure(
            STAGE,
            "repeated_reads_in_access_per_s",
            value,
            "IN_ACCESS/s",
            median(r["rate"] for r in local),
            "the same reads on a local directory watched directly",
            target=f">= {REPEAT_TARGET:,} IN_ACCESS/s",
            met=value >= REPEAT_TARGET,
            why="" if value >= REPEAT_TARGET else why,
            runs=[r["rate"] for r in over],
            note=f"{len(names)} files opened on BACKING (each got its IN_OPEN on the overlay: "
            f"{min(r['opened'] for r in over)} of {len(names)} at least), then 1-byte "
            f"preads round robin for {seconds:g} s; IN_ACCESS counted on the overlay from "
            "the first read to the last event; reads made/s: overlay "
            f"{median(r['read_rate'] for r in over):,.0f}, local "
            f"{median(r['read_rate'] for r in local):,.0f}; local IN_ACCESS "
            f"{median(r['events'] for r in local):,.0f} for "
            f"{median(r['reads'] for r in local):,.0f} reads a run",
        )
    )


SUSTAINED_RATES = (1000, 2000, 5000, 10000, 20000)
SUSTAINED_SECONDS = 1.0
SUSTAINED_SECONDS_QUICK = 0.5
SUSTAINED_RATES_QUICK = (1000, 5000)
# ramps are long (every step waits for its last events): at most this many
MAX_RAMPS = 3


def _ramp(setup: dict, names: Names, rates: tuple[int, ...], seconds: float, used: Used) -> tuple:
    """One ramp of rising rates on both arms: (best overlay, best local, overlay steps,
    overlay events); what the overlay's arm used is added to ``used``."""
    best = {"overlay": 0.0, "local": 0.0}
    steps = []
    overlay_lost = False
    events = 0
    for rate in rates:
        batch = names.take(int(rate * seconds))
        arms = [("local", setup["local"], setup["local_dir"])]
        if not overlay_lost:
            # past the first step with losses the shim is only further behind
            arms.insert(0, ("overlay", setup["overlay"], setup["backing"]))
        for arm, watch, d in arms:
            if arm == "overlay":
                with used.measure():
                    _, lost, achieved, delivered = _run_once(watch, d, batch, rate)
                events += len(batch) - lost
            else:
                _, lost, achieved, delivered = _run_once(watch, d, batch, rate)
            if arm == "overlay":
                steps.append(
                    f"{rate}/s asked, {achieved:,.0f}/s made, {delivered:,.0f}/s delivered, "
                    f"{lost} lost"
                )
                overlay_lost = lost > 0
            if lost == 0:
                best[arm] = max(best[arm], delivered)
    return best["overlay"], best["local"], steps, events


def _sustained(cfg: Config, stage: Stage, setup: dict, names: Names) -> None:
    rates = SUSTAINED_RATES_QUICK if cfg.quick else SUSTAINED_RATES
    seconds = SUSTAINED_SECONDS_QUICK if cfg.quick else SUSTAINED_SECONDS
    used = Used(setup)
    ramps = [_ramp(setup, names, rates, seconds, used) for _ in range(min(cfg.repeats, MAX_RAMPS))]
    events = sum(r[3] for r in ramps)
    value = median(r[0] for r in ramps)
    # the steps of the ramp whose best is the median (the upper one of an even count)
    shown = sorted(ramps, key=lambda r: r[0])[len(ramps) // 2]
    fig = Figure(
        STAGE,
        "sustained_distinct_events_per_s",
        value,
        "events/s",
        median(r[1] for r in ramps),
        "the same accesses on a local directory watched directly",
        target=f">= {SUSTAINED_TARGET:,} distinct events/s with none lost, and >= "
        f"{SUSTAINED_TARGET_RATIO:g} of local inotify",
        met=value >= SUSTAINED_TARGET
        and value >= SUSTAINED_TARGET_RATIO * median(r[1] for r in ramps),
        why=_why_cpu(used, events, f"the overlay's steps of {len(ramps)} ramps"),
        runs=[r[0] for r in ramps],
        note="the best delivered rate (events over first access to last event) of a step with "
        f"no event lost, median of {len(ramps)} ramps of {seconds:g} s steps on distinct files; "
        "overlay, median ramp: "
        + "; ".join(shown[2])
        + f"; inotify queue overflows at this reader: overlay {setup['overlay'].overflows}, "
        f"local {setup['local'].overflows}",
    )
    stage.add(fig)


# /proc/kpageflags: a page that is part of a folio but not its first
_KPF_COMPOUND_TAIL = 1 << 16
# /proc/self/pagemap: the page is present; the low 55 bits are its frame number
_PM_PRESENT = 1 << 63
_PM_PFN = (1 << 55) - 1


def _folio_pages(path: Path, limit: int = 64 << 20) -> float | None:
    """Mean pages per folio of the first ``limit`` bytes of ``path`` in the page
    cache (None if none is cached or the kernel does not tell).

    The file is mapped and each page touched, which maps the cached pages
    without reading the file again; their frame numbers (/proc/self/pagemap,
    root only) then give each page's flags in /proc/kpageflags.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(os.fstat(fd).st_size, limit) // PAGE * PAGE
        if not size:
            return None
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            for off in range(0, size, PAGE):
                m[off]  # a read maps the cached page
            # the mapping's address: the only one of this inode this long
            st = os.fstat(fd)
            start = None
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    if fields[4] == str(st.st_ino) and hi - lo == size:
                        start = lo
            if start is None:
                return None
            with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
                pm.seek(start // PAGE * 8)
                entries = memoryview(pm.read(size // PAGE * 8)).cast("Q")
                pages = tails = 0
                for entry in entries:
                    if not entry & _PM_PRESENT or not entry & _PM_PFN:
                        continue
                    kf.seek((entry & _PM_PFN) * 8)
                    pages += 1
                    tails += bool(int.from_bytes(kf.read(8), "little") & _KPF_COMPOUND_TAIL)
    except OSError:
        return None
    finally:
        os.close(fd)
    return pages / (pages - tails) if pages > tails else None


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _seq(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    total = 0
    t0 = time.perf_counter()
    try:
        while n := len(os.read(fd, SEQ_CHUNK)):
            total += n
    finally:
        os.close(fd)
    return total / (time.perf_counter() - t0) / 1e6


def _rand(path: Path, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        for off in offsets:
            os.pread(fd, RAND_CHUNK, off)
    finally:
        os.close(fd)
    return len(offsets) * RAND_CHUNK / (time.perf_counter() - t0) / 1e6


def _throughput(cfg: Config, stage: Stage, setup: dict) -> None:
    size = setup["big_size"]
    rng = random.Random(7)
    offsets = [rng.randrange(size // RAND_CHUNK) * RAND_CHUNK for _ in range(cfg.pick(2048, 256))]
    paths = {"overlay": setup["mnt"] / "big.bin", "backing": setup["backing"] / "big.bin"}
    res: dict[tuple[str, str, str], list[float]] = {}
    # what the shim used serving the overlay's reads, and how many MiB they were
    use: dict[tuple[str, str], Usage] = {}
    mib: dict[tuple[str, str], float] = {}
    # the reading thread's own CPU, by arm, kind and temperature
    reader_cpu: dict[tuple[str, str, str], float] = {}
    # mean pages per page-cache folio after the last warm sequential pass, by arm
    folios: dict[str, float | None] = {}
    pid = setup["shim"].proc.pid
    for r in range(cfg.repeats):
        for kind, fn in (("seq", _seq), ("rand", lambda p: _rand(p, offsets))):
            # the two arms back to back, in turns first: the disk is shared, and
            # whatever else loads it should weigh on both alike
            arms = list(paths.items())
            for arm, path in arms if r % 2 else arms[::-1]:
                _drop_caches()
                for temp in ("cold", "warm"):
                    before = Usage.read(pid)
                    t0 = time.thread_time()
                    res.setdefault((arm, kind, temp), []).append(fn(path))
                    reader_cpu[(arm, kind, temp)] = reader_cpu.get((arm, kind, temp), 0.0) + (
                        time.thread_time() - t0
                    )
                    if arm == "overlay":
                        key = (kind, temp)
                        use[key] = use.get(key, Usage()) + (Usage.read(pid) - before)
                        read = size if kind == "seq" else len(offsets) * RAND_CHUNK
                        mib[key] = mib.get(key, 0.0) + read / (1 << 20)
                if kind == "seq" and r == cfg.repeats - 1:
                    # the folios the warm pass just read (their size depends on
                    # how they were read in: measured before any other read)
                    folios[arm] = _folio_pages(path)
    known_folios = (
        (folios["overlay"], folios["backing"])
        if folios.get("overlay") is not None and folios.get("backing") is not None
        else None
    )
    seq_mib = size / (1 << 20) * cfg.repeats
    for kind, what in (("seq", "1 MiB sequential reads"), ("rand", "4 KiB random preads")):
        for temp in ("cold", "warm"):
            over, back = res[("overlay", kind, temp)], res[("backing", kind, temp)]
            paired = median(o / b for o, b in zip(over, back, strict=True))
            fig = Figure(
                STAGE,
                f"read_{kind}_{temp}_mb_s",
                median(over),
                "MB/s",
                median(back),
                "the same reads on BACKING directly",
                runs=over,
                note=f"{what} of a {size >> 20} MiB file"
                + (
                    ", after echo 3 > /proc/sys/vm/drop_caches"
                    if temp == "cold"
                    else ", right after the cold pass"
                )
                + f"; median of the per-run overlay/BACKING ratios {paired:.3g}",
            )
            if kind == "seq":
                # judged on the paired ratios, steadier than a ratio of medians
                fig.target = f">= {SEQ_TARGET:.0%} of BACKING (median of per-run ratios)"
                fig.met = paired >= SEQ_TARGET
                if not fig.met:
                    fig.why = _why_seq(
                        use[(kind, temp)],
                        mib[(kind, temp)],
                        paired,
                        median(back),
                        reader=(
                            reader_cpu[("overlay", kind, temp)] / seq_mib * 1e3,
                            reader_cpu[("backing", kind, temp)] / seq_mib * 1e3,
                        ),
                        folios=known_folios if temp == "warm" else None,
                    )
            stage.add(fig)


@contextlib.contextmanager
def _pipeline(cfg: Config, tmp: Path, backing: Path, tag: str) -> Iterator[tuple[Path, object]]:
    """The real daemon and shim over ``backing`` (a mount of its own); yields (overlay, shim)."""
    work = tmp / tag
    work.mkdir()
    sock = work / "notify.sock"
    args = ["--source", "fanotify", str(backing), "--socket", str(sock), "--log-level", "warning"]
    with (
        notifyd(cfg.env, work, args) as daemon,
        run_shim(backing, work / "mnt", sock, log=work / "shim.log") as shim,
    ):
        shim.daemon_pid = daemon.pid
        yield work / "mnt", shim


@contextlib.contextmanager
def _events_setup(cfg: Config, tmp: Path, names: Names) -> Iterator[dict]:
    """BACKING and the local directory on tmpfs mounts of their own: many small files
    come and go in no time, and only this benchmark's accesses reach the daemon."""
    backing, local_dir = tmp / "backing", tmp / "local"
    repeat = [f"r{i:03d}" for i in range(REPEAT_FILES)]
    probes = [f"p{i:05d}" for i in range(LOOKUP_PROBES_QUICK if cfg.quick else LOOKUP_PROBES)]
    with contextlib.ExitStack() as stack:
        for d in (backing, local_dir):
            d.mkdir()
            stack.enter_context(tmpfs(d))
            _make_files(d, names.all() + repeat + probes)
        mnt, shim = stack.enter_context(_pipeline(cfg, tmp, backing, "events"))
        overlay = OpenStamps(mnt)
        stack.callback(overlay.close)
        local = OpenStamps(local_dir)
        stack.callback(local.close)
        # the first miss walks BACKING into the shim's inode index: not measured
        _run_once(overlay, backing, names.all()[:1], 10)
        yield dict(
            backing=backing,
            local_dir=local_dir,
            overlay=overlay,
            local=local,
            shim=shim,
            repeat_names=repeat,
            probes=probes,
        )


@contextlib.contextmanager
def _reads_setup(cfg: Config, tmp: Path) -> Iterator[dict]:
    """One big file on the disk (so that cold means cold), BACKING bind-mounted onto itself."""
    backing = tmp / "disk"
    backing.mkdir()
    big_size = cfg.pick(256, 16) << 20
    with open(backing / "big.bin", "wb") as f:
        for _ in range(big_size >> 20):
            f.write(os.urandom(1 << 20))
    with bind_self(backing), _pipeline(cfg, tmp, backing, "reads") as (mnt, shim):
        yield dict(backing=backing, mnt=mnt, big_size=big_size, shim=shim)


def _shim_losses(mnt: Path) -> str:
    """The shim's own count of records it did not replay, from its stats socket."""
    try:
        doc = read_stats(str(shim_stats_path(mnt)))
    except OSError as exc:
        return f"shim stats unavailable: {exc}"
    return (
        f"shim stats: {doc['submitted']:,} records taken, {doc['replayed']:,} replayed, "
        f"{doc['collapsed']:,} collapsed; lost: {doc['gap']:,} to seq gaps, "
        f"{doc['overload']:,} on overload, {doc['unresolved']:,} unresolved, "
        f"{doc['gone']:,} gone, {doc['failed']:,} failed; READs by {doc['read_by']}"
    )


def run(cfg: Config) -> Stage:
    stage = Stage(
        STAGE,
        "inotify shim",
        method=(
            "The real daemon (`--source fanotify`) watches BACKING, a mount of its own (so "
            "its mount mark sees only this benchmark): a tmpfs for the event figures, a "
            "directory on the disk bind-mounted onto itself for the reads; the real shim "
            "(`scoutfs-notify-shim`, started by `compat/procs.run_shim`) mounts the "
            "overlay. A reader thread here stamps the first IN_OPEN per name on the overlay "
            "directory; the access (open, read 1 byte, close) is made on BACKING, paced, "
            "each to a different file (a pool the size of the largest run, used round). "
            "Baseline: the same accesses to an identical local tmpfs directory watched "
            f"directly by the same reader. Latency at {LATENCY_RATE:,}, "
            f"{LATENCY_RATE // 10:,} and {FAST_RATE:,} accesses/s. Sustained rate: steps of "
            "rising rates; the figure is the best delivered rate of a step in which no file "
            "went without its event. Repeated reads: files opened on BACKING (so that the "
            "shim holds them open for replay), then 1-byte preads of them round robin at "
            "full speed; IN_ACCESS counted on the overlay against the same reads watched "
            "locally. CPU and context switches are read from /proc for the shim's and the "
            "daemon's processes around the overlay's runs; the reasons given for missed "
            "targets are computed from them, with the shim's CPU for one FUSE LOOKUP (a "
            "stat of never-seen names through the overlay) and, where py-spy is installed, "
            "a profile of the shim and the daemon taken before the figures. Reads: one file "
            "on BACKING (the daemon and shim "
            "running), read through the overlay vs directly; cold = after dropping the page "
            "cache, warm = the pass right after."
        ),
    )
    rates = SUSTAINED_RATES_QUICK if cfg.quick else SUSTAINED_RATES
    seconds = SUSTAINED_SECONDS_QUICK if cfg.quick else SUSTAINED_SECONDS
    names = Names(
        max(
            cfg.pick(3 * LATENCY_RATE, LATENCY_RATE),
            cfg.pick(3 * FAST_RATE, FAST_RATE // 2),
            int(max(rates) * seconds),
        )
    )
    why = _cannot_run()
    if why:
        stage.skipped = why
        return stage
    # the reader thread stamps events: let it have the GIL soon after it wakes
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH)
    try:
        with tempfile.TemporaryDirectory(prefix="nfyb-shim-", dir=cfg.workdir) as tmp:
            with _events_setup(cfg, Path(tmp), names) as setup:
                _lookups(cfg, stage, setup)
                _profile(cfg, stage, setup, names)
                _latency(cfg, stage, setup, names)
                _sustained(cfg, stage, setup, names)
                _repeated(cfg, stage, setup)
                stage.notes.append("events: " + _shim_losses(setup["shim"].mountpoint))
            with _reads_setup(cfg, Path(tmp)) as setup:
                _throughput(cfg, stage, setup)
    finally:
        sys.setswitchinterval(switch)
    return stage
