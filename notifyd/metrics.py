"""Prometheus metrics for the daemon, the shim and the forwarder (``--metrics ADDR:PORT``).

``prometheus_client`` serves the text format from its own HTTP thread, so a
scrape never blocks the trio loop.  What a scrape reports is read *inside*
the trio thread (``trio.from_thread.run_sync``): the counters live in
objects only trio touches, and a snapshot taken there is consistent.  Only
the histograms are fed directly, from small hooks on the hot paths
(``prometheus_client`` metrics are thread-safe).

The forwarder runs asyncio instead: its snapshot is taken in the event
loop's thread (``call_soon_threadsafe``), for the same reason.

Names follow Prometheus conventions: ``scoutfs_notify_`` prefix, ``_total``
for counters, the unit in the name (``_seconds``, ``_records``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import trio
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from . import abi, ioctls
from .client import Gap

__all__ = [
    "DEFAULT_HOST",
    "DaemonMetrics",
    "ForwardMetrics",
    "MetricsServer",
    "ShimMetrics",
    "kmod_counters_dir",
    "listen_arg",
    "parse_listen",
    "serve_metrics",
]

log = logging.getLogger(__name__)

# The *_created samples (when each series began) double every scrape of a
# histogram and say nothing a process start time does not.
disable_created_metrics()  # type: ignore[no-untyped-call]

# A bare port listens here: metrics say what a mount's users do, so they are
# not for the network unless the admin says so.
DEFAULT_HOST = "127.0.0.1"
# Where scoutfs puts a mount's counters (one directory per mount: f.<fsid>.r.<rid>).
SYSFS_SCOUTFS = Path("/sys/fs/scoutfs")

# Records per drained batch: the kernel ring holds 1024, the fanotify source
# reads up to its buffer.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Record time to synthetic access: sub-millisecond when idle (FINDINGS), up
# to the replay queue's depth under load.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A JetStream publish to its ack: a millisecond on a quiet local server, up
# to the publish timeout (5 s) while a cluster elects a new leader.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# A scrape waits this long for the forwarder's event loop, then reports
# nothing of it rather than hang the scraper.
LOOP_WAIT = 10.0


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a bare port is loopback.

    Raises ValueError with the message to print.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{text!r}: give PORT or ADDR:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def listen_arg(text: str) -> tuple[str, int]:
    """:func:`parse_listen` as an argparse ``type``."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class MetricsServer:
    """``prometheus_client``'s HTTP server for ``registry``, in its own thread.

    Raises OSError if ``listen`` cannot be bound.  ``address`` is what was
    bound (port 0 picks one); :meth:`close` stops the thread.
    """

    def __init__(self, listen: tuple[str, int], registry: CollectorRegistry) -> None:
        host, port = listen
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        bound = self._server.server_address
        self.address = (str(bound[0]), int(bound[1]))
        log.info("metrics on http://%s:%d/metrics", _show_host(self.address[0]), self.address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


async def serve_metrics(
    listen: tuple[str, int],
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``registry`` on ``http://HOST:PORT/metrics`` until cancelled.

    Reports the address bound to ``task_status``; raises OSError if it cannot bind.
    """
    server = MetricsServer(listen, registry)
    try:
        task_status.started(server.address)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _TrioCollector(Collector):
    """A collector whose metrics are made by ``make`` in the trio thread."""

    def __init__(self, make: Callable[[], list[Metric]]) -> None:
        self._make = make
        self._token = trio.lowlevel.current_trio_token()

    def collect(self) -> Iterable[Metric]:
        try:
            return trio.from_thread.run_sync(self._make, trio_token=self._token)
        except trio.RunFinishedError:
            return []


def _counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=list(labels))
    m.add_metric(list(labels.values()), value)
    return m


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


# One program's counters: (name, help, the key of its value in the program's counters).
CounterTable = tuple[tuple[str, str, str], ...]


def _counters(table: CounterTable, values: Mapping[str, float]) -> list[Metric]:
    return [_counter(name, doc, values.get(key, 0)) for name, doc, key in table]


def _losses(name: str, doc: str, by_cause: Mapping[str, float]) -> CounterMetricFamily:
    """One counter family of records lost, labelled by cause."""
    lost = CounterMetricFamily(name, doc, labels=["cause"])
    for cause, value in by_cause.items():
        lost.add_metric([cause], value)
    return lost


# --- the daemon ----------------------------------------------------------------


def kmod_counters_dir(mount: str, sysfs: Path = SYSFS_SCOUTFS) -> Path | None:
    """The sysfs counters directory of the scoutfs mount at ``mount``, or None.

    scoutfs names a mount's directory after short fsid and rid; the full ids
    are in its ``fsid`` and ``rid`` files, which this matches against
    ``SCOUTFS_IOC_STATFS_MORE`` (two mounts of one filesystem differ by rid).
    """
    try:
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fsid, rid = ioctls.statfs_more(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        entries = list(sysfs.iterdir())
    except OSError:
        return None
    for d in entries:
        try:
            ids = (int((d / "fsid").read_text(), 16), int((d / "rid").read_text(), 16))
        except (OSError, ValueError):
            continue
        if ids == (fsid, rid) and (d / "counters").is_dir():
            return d / "counters"
    return None


def _kmod_counters(counters: Path) -> Iterator[Metric]:
    """The module's ``notify_*`` counters, each as ``scoutfs_notify_kmod_<rest>_total``."""
    for f in sorted(counters.glob("notify_*")):
        try:
            value = int(f.read_text())
        except (OSError, ValueError):
            continue  # the mount is going away
        name = f.name.removeprefix("notify_")
        yield _counter(
            f"scoutfs_notify_kmod_{name}",
            f"scoutfs kernel counter {f.name} of this mount (sysfs)",
            value,
        )


DAEMON_COUNTERS: CounterTable = (
    ("scoutfs_notify_records_drained", "Records read from the source", "records"),
    (
        "scoutfs_notify_records_relayed",
        "Records handed to the clients' queues (each record once)",
        "records_published",
    ),
    ("scoutfs_notify_clients_accepted", "Client connections accepted", "clients_total"),
    (
        "scoutfs_notify_clients_refused",
        "Client connections refused (--max-clients)",
        "clients_refused",
    ),
)


class DaemonMetrics:
    """The daemon's metrics, from its stats snapshot and a hook on publish.

    Args:
        snapshot: the daemon's stats document (the one ``<socket>.stats`` serves).
        kmod_counters: the mount's sysfs counters directory (scoutfs source), or None.

    Must be made in the trio thread that owns what ``snapshot`` reads.
    """

    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], kmod_counters: Path | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = snapshot
        self._kmod = kmod_counters
        self.batch_records = Histogram(
            "scoutfs_notify_drain_batch_records",
            "Records per batch drained from the source (kernel ring or fanotify)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_TrioCollector(self._collect))

    def wrap_publish(self, publish: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``publish`` that also observes each batch's size."""
        observe = self.batch_records.observe

        def publish_and_observe(batch: bytes) -> None:
            observe(len(batch) // abi.RECORD_SIZE)
            publish(batch)

        return publish_and_observe

    def _collect(self) -> list[Metric]:
        st = self._snapshot()
        out = _counters(DAEMON_COUNTERS, st)
        out += [
            _gauge("scoutfs_notify_clients", "Clients connected now", len(st.get("clients", []))),
            _gauge("scoutfs_notify_last_seq", "seq of the last record drained", st.get("seq") or 0),
        ]
        by_cause: dict[str, float] = {}
        if st.get("source") == "scoutfs":
            by_cause["ring_full"] = st.get("ring_dropped", 0)
        if st.get("source") == "fanotify":
            by_cause["fanotify_overflow"] = st.get("source_overflows", 0)
        by_cause["client_queue"] = st.get("client_records_dropped", 0)
        out.append(
            _losses(
                "scoutfs_notify_records_lost",
                "Records lost, by cause: ring_full (the kernel ring was full; the kernel's own "
                "count), fanotify_overflow (FAN_Q_OVERFLOW: at least one each), client_queue "
                "(a slow client's queue was full; counted once per client)",
                by_cause,
            )
        )
        if self._kmod is not None:
            out += _kmod_counters(self._kmod)
        return out


# --- the shim ----------------------------------------------------------------

# Inodes whose oldest unreplayed record time is kept for the latency: a bound
# for records that are never replayed (lost to overload, file gone).
PENDING_LIMIT = 65536


SHIM_COUNTERS: CounterTable = (
    ("scoutfs_notify_shim_records_received", "Records received from the daemon", "received"),
    (
        "scoutfs_notify_shim_records_own",
        "Records of the shim's own accesses to BACKING (not replayed)",
        "own",
    ),
    (
        "scoutfs_notify_shim_events_replayed",
        "Synthetic accesses made (each raises IN_OPEN or IN_ACCESS)",
        "replayed",
    ),
    (
        "scoutfs_notify_shim_reads_collapsed",
        "READ records merged into a READ already waiting (one IN_ACCESS for both)",
        "collapsed",
    ),
)


class ShimMetrics:
    """The shim's metrics: records in, events replayed, losses, replay latency.

    Made before trio runs (so the server can be bound first), then
    :meth:`attach`-ed to the replayer's counters (``replayed``, ``collapsed``,
    and the losses ``overload``, ``unresolved``, ``gone``, ``failed``).
    Hooks: :meth:`on_event` for every record or gap from the daemon,
    :meth:`on_replayed` when a file's pending records have been replayed,
    :meth:`on_lost` when they were all dropped without an event.
    Latency is measured from the time of the oldest record a replay answers
    (``time_ns``, CLOCK_REALTIME at emit) to the end of that synthetic access.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._replay_stats: Callable[[], dict[str, int]] = dict
        self.records_in = 0
        self.records_own = 0
        self.gap_lost = 0
        self._pending: OrderedDict[int, int] = OrderedDict()
        self.latency = Histogram(
            "scoutfs_notify_shim_replay_latency_seconds",
            "From a record's time to the end of its synthetic access through the overlay",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def attach(self, replay_stats: Callable[[], dict[str, int]]) -> None:
        """Report ``replay_stats()``; call from the trio thread that owns the replayer."""
        self._replay_stats = replay_stats
        self.registry.register(_TrioCollector(self._collect))

    def on_event(self, ev: abi.Record | Gap, own: bool) -> None:
        """Count a record (``own``: the shim's own access, not replayed) or a gap."""
        if isinstance(ev, Gap):
            self.gap_lost += ev.lost
            return
        self.records_in += 1
        if own:
            self.records_own += 1
        elif ev.type in abi.INOTIFY_TYPES and ev.ino not in self._pending:
            # only what the replayer takes is pending: a type it skips (docs/ABI.md:
            # consumers skip types they do not know) would never be replayed nor
            # lost, and would stay until evicted, timing a later replay from itself
            self._pending[ev.ino] = ev.time_ns
            if len(self._pending) > PENDING_LIMIT:
                self._pending.popitem(last=False)

    def on_replayed(self, ino: int) -> None:
        """The pending records of ``ino`` have raised their events."""
        t = self._pending.pop(ino, None)
        if t is not None:
            self.latency.observe(max(0, time.time_ns() - t) / 1e9)

    def on_lost(self, ino: int) -> None:
        """No record of ``ino`` is waiting any more: the ones pending raised no event.

        Their time is forgotten, so that the next replay of the file is timed
        from the records it answers, not from the lost ones.
        """
        self._pending.pop(ino, None)

    def _collect(self) -> list[Metric]:
        st = self._replay_stats()
        mine = {"received": self.records_in, "own": self.records_own}
        out = _counters(SHIM_COUNTERS, {**st, **mine})
        causes = ("overload", "unresolved", "gone", "failed")
        out.append(
            _losses(
                "scoutfs_notify_shim_records_lost",
                "Records that raised no event, by cause: gap (lost before the shim: kernel "
                "ring, source or its client queue), overload (too many files waiting), "
                "unresolved (no file has the inode), gone (deleted before its replay), failed "
                "(other errors)",
                {"gap": self.gap_lost} | {c: st.get(c, 0) for c in causes},
            )
        )
        return out


# --- the forwarder -------------------------------------------------------------


class _AsyncioCollector(Collector):
    """A collector whose metrics are made by ``make`` in ``loop``'s thread."""

    def __init__(self, make: Callable[[], list[Metric]], loop: asyncio.AbstractEventLoop) -> None:
        self._make = make
        self._loop = loop

    def collect(self) -> Iterable[Metric]:
        fut: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self._make())
            except Exception as exc:
                fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the forwarder is exiting
            return []
        try:
            return fut.result(timeout=LOOP_WAIT)
        except TimeoutError:
            log.warning("metrics: the event loop did not answer in %.0f s", LOOP_WAIT)
            return []


FORWARD_COUNTERS: CounterTable = (
    ("scoutfs_notify_forward_records_received", "Records received from the daemon", "received"),
    (
        "scoutfs_notify_forward_records_published",
        "Records in messages JetStream acknowledged",
        "published",
    ),
    (
        "scoutfs_notify_forward_messages_published",
        "Messages JetStream acknowledged (each a batch of records)",
        "messages",
    ),
    (
        "scoutfs_notify_forward_messages_duplicate",
        "Acknowledged messages the stream already held (a re-send after a lost ack)",
        "duplicates",
    ),
    (
        "scoutfs_notify_forward_records_lost_published",
        "Records declared lost in published Scoutfs-Notify-Lost headers (every seq "
        "jump in the stream, including those before this process started)",
        "lost_reported",
    ),
    (
        "scoutfs_notify_forward_nats_reconnects",
        "Reconnections to NATS after a lost connection",
        "reconnects",
    ),
)


class ForwardMetrics:
    """The forwarder's metrics: records in and out, losses by cause, backlog, NATS.

    Made before the forwarder connects (so the server is bound first), then
    :meth:`attach`-ed, from the event loop's thread, to a ``snapshot`` of
    its counters: ``received``, ``published``, ``messages``, ``duplicates``,
    ``lost_daemon``, ``dropped_backlog``, ``lost_reported``,
    ``backlog_records`` and ``reconnects``.  :attr:`publish_seconds` is fed
    directly from the publisher (one observation per acknowledged publish).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._snapshot: Callable[[], dict[str, int]] = dict
        self.publish_seconds = Histogram(
            "scoutfs_notify_forward_publish_seconds",
            "From sending one message to JetStream to its acknowledgement (each try that "
            "was acknowledged)",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )

    def attach(self, snapshot: Callable[[], dict[str, int]]) -> None:
        """Report ``snapshot()``; call from the event loop that owns the counters."""
        self._snapshot = snapshot
        self.registry.register(_AsyncioCollector(self._collect, asyncio.get_running_loop()))

    def _collect(self) -> list[Metric]:
        st = self._snapshot()
        out = _counters(FORWARD_COUNTERS, st)
        out += [
            _losses(
                "scoutfs_notify_forward_records_lost",
                "Records that did not reach the stream, by cause: daemon_gap (a seq jump in "
                "what the daemon sent: its ring, its queue for the forwarder, or while "
                "disconnected from it), backlog (dropped past --backlog while NATS was slow "
                "or away)",
                {"daemon_gap": st.get("lost_daemon", 0), "backlog": st.get("dropped_backlog", 0)},
            ),
            _gauge(
                "scoutfs_notify_forward_backlog_records",
                "Records waiting to be published now",
                st.get("backlog_records", 0),
            ),
        ]
        return out
