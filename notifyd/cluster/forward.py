"""scoutfs-notify-forward: publish one mount's records to NATS JetStream.

An ordinary client of the local daemon's socket, in its own asyncio process
(nats-py is asyncio-only; the trio daemon never sees it).  Two tasks share a
bounded backlog:

- the reader reads every message the daemon sends straight into the payload
  being built (contiguous records of one epoch, up to MAX_BATCH_RECORDS),
  never waiting on NATS, so the daemon never waits on us; past ``--backlog``
  records a message is dropped and counted;
- the publisher sends the backlog in order, one message in flight at a time
  (see ``_pump`` for why), and re-sends a message whose ack did not come
  under the same ``Nats-Msg-Id`` (the stream drops the copy).

A ``seq`` jump between two published messages (the ring, the daemon's queue
for us, our backlog bound, or records made while no forwarder ran) becomes
the next message's ``Scoutfs-Notify-Lost`` header (wire.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from .. import abi, inherited, ioctls, libc, paths
from ..metrics import ForwardMetrics, MetricsServer, listen_arg
from ..peer import UntrustedPeerError, peer_cred
from ..sdnotify import sd_notify
from ..stats import read_stats
from . import wire
from .server import (
    ClusterError,
    Credentials,
    add_connection_args,
    connect,
    credentials_from_args,
)

__all__ = [
    "Forwarder",
    "Identity",
    "batch_records",
    "build_parser",
    "daemon_message_records",
    "identify",
    "main",
    "parse_args",
]

log = logging.getLogger("scoutfs-notify-forward")

_SEQ_AT = struct.Struct("<Q").unpack_from

# Records held while NATS is slow or away: 64 MiB of records.
DEFAULT_BACKLOG = 1 << 20
# Records per message at most: just under NATS's default max_payload (1 MiB),
# so a backlog goes out in few messages (each costs a round trip to its ack).
# A server with a smaller max_payload gets smaller messages (batch_records).
MAX_BATCH_RECORDS = 16320
# Room left in max_payload for the headers (wire.headers_for: about 200 bytes).
HEADER_ROOM = 1024
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_AGE = "7d"
# JetStream drops a message whose Nats-Msg-Id it stored this recently.  It
# must outlast a re-send after a failover (seconds), and costs memory per id.
DUPLICATE_WINDOW = 120.0
# How long one publish waits for its ack before it is re-sent.
PUBLISH_TIMEOUT = 5.0
# Between re-sends while NATS does not answer.
RETRY_DELAY = 0.5
# Records the daemon is asked to put in one message (abi.MESSAGE_REQUEST),
# at most: near its largest, so a flood costs both sides a datagram per
# ~1000 records, not per 64 (see daemon_message_records).  A daemon from
# before the request sends 64.
DAEMON_MESSAGE_RECORDS = abi.LARGE_MESSAGE_RECORDS
# Messages read from the daemon's socket before the publisher gets a turn
# (up to 8192 records), so an ack that came is acted on without waiting
# behind a long run of reads (with 1024 messages of 64, it could wait
# behind 1024 of them).
READ_BURST = 8
# Payload buffers (one message each, up to 1 MiB) kept for reuse once the
# stream holds their message: the chunk being filled and the message in
# flight take turns.  A fresh megabyte per message costs more than reading
# it (mapped, zeroed and faulted in page by page, then unmapped).
SPARE_CHUNKS = 4
# Between looks at the daemon's stats for our connection (see _wait_accepted).
ACCEPT_POLL = 0.05
# Payload buffers, their joins and nats-py's copy of each message are up to a
# megabyte each, made and freed at every publish: kept in the heap (at most
# HEAP_RETAINED bytes of it free), they cost no page faults.  That cut the
# forwarder's CPU by a quarter in bench/cluster.py's flood.
HEAP_LARGEST = 4 << 20
HEAP_RETAINED = 64 << 20
# Reconnect backoff to the local daemon's socket: what a restarted daemon
# reads before we are back is lost (and reported), so retry often.
DAEMON_BACKOFF_MIN = 0.1
DAEMON_BACKOFF_MAX = 1.0
# On SIGTERM, how long the backlog may take to go out before we exit anyway.
DRAIN_ON_EXIT = 5.0

_NATS_ERRORS = (
    asyncio.TimeoutError,
    nats.errors.Error,
    nats.js.errors.Error,
    OSError,
)

DESCRIPTION = f"""\
Publish the access records scoutfs-notifyd serves for PATH (a scoutfs mount,
or a directory the fanotify source watches) to a NATS JetStream stream, so
that watchers on every node see them (scoutfs-notify watch --nats URL).

Subject: {wire.SUBJECT_PREFIX}.<fsid>.<node>, one message per batch of whole
64-byte records.  On scoutfs <fsid> is the filesystem's fsid and <node> the
mount's rid (16 hex digits, SCOUTFS_IOC_STATFS_MORE); elsewhere <fsid> is
--fsid (default: the name of the socket's directory, local-<hash>) and <node>
is --node (default: the hostname).

The forwarder never makes the daemon wait: while NATS is unreachable it keeps
up to --backlog records and publishes them in order once NATS is back; past
that bound it drops records and the next message says how many
(Scoutfs-Notify-Lost), as does any seq gap it sees.  It creates the stream
when missing and otherwise uses the one an admin made.  Needs nats-server
{".".join(map(str, (2, 10)))} or later with JetStream.

Credentials come from files or the environment, never from arguments: the
stream carries pids and uids, so run NATS with authentication.
"""


@dataclass
class Identity:
    """Who this forwarder publishes as."""

    fsid: str
    node: str
    # the seq space: the rid on scoutfs (a remount restarts seq and draws a
    # new rid); the socket's ctime for the fanotify source (a daemon restart
    # restarts seq and makes a new socket)
    scoutfs: bool

    @property
    def subject(self) -> str:
        return wire.subject_for(self.fsid, self.node)


def identify(path: str, socket_path: Path, fsid: str | None, node: str | None) -> Identity:
    """Work out fsid and node for PATH; raise ClusterError on a bad name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ClusterError(f"cannot open {path}: {exc.strerror}") from None
    scoutfs_ids: tuple[int, int] | None
    try:
        scoutfs_ids = ioctls.statfs_more(fd)
    except ioctls.NotScoutfsError:
        scoutfs_ids = None
    finally:
        os.close(fd)
    try:
        if scoutfs_ids is not None:
            real_fsid, rid = scoutfs_ids
            if fsid and fsid != f"{real_fsid:016x}":
                raise ClusterError(
                    f"{path} is scoutfs {real_fsid:016x}: --fsid is for other sources"
                )
            if node and node != f"{rid:016x}":
                raise ClusterError(f"{path} is scoutfs: its node is the mount's rid {rid:016x}")
            return Identity(f"{real_fsid:016x}", f"{rid:016x}", True)
        fsid = fsid or socket_path.parent.name
        node = node or socket.gethostname().split(".")[0]
        return Identity(wire.check_token("fsid", fsid), wire.check_token("node", node), False)
    except wire.WireError as exc:
        raise ClusterError(str(exc)) from None


def batch_records(max_payload: int) -> int:
    """Records per message for a server announcing ``max_payload`` bytes.

    Raises:
        ClusterError: too small for one message of the daemon's.
    """
    fit = min(MAX_BATCH_RECORDS, (max_payload - HEADER_ROOM) // abi.RECORD_SIZE)
    if fit < abi.MAX_MESSAGE_RECORDS:
        raise ClusterError(
            f"the NATS server's max_payload is {max_payload} bytes: the forwarder needs "
            f"at least {abi.MAX_MESSAGE_BYTES + HEADER_ROOM}"
        )
    return fit


def daemon_message_records(max_batch: int) -> int:
    """Records to ask the daemon for per message, for messages of ``max_batch`` records.

    A message to the stream holds whole daemon messages, so the size asked
    for divides ``max_batch`` where it can: 960 for 16,320 (17 to a message),
    where 1024 would fill only 15,360.
    """
    units = max_batch // abi.MAX_MESSAGE_RECORDS
    top = DAEMON_MESSAGE_RECORDS // abi.MAX_MESSAGE_RECORDS
    best = max(d for d in range(1, min(top, units) + 1) if units % d == 0)
    return best * abi.MAX_MESSAGE_RECORDS


def daemon_epoch(sock: socket.socket) -> str:
    """The fanotify source's seq space: the daemon process serving ``sock``.

    Each fanotify daemon numbers its records from 1, so its seq space is the
    process: the boot, its pid and its start time (the pid alone is reused).
    Not the socket's ctime: a daemon binds its socket again when it was
    removed, and that must not look like a new seq space.

    Raises:
        OSError: the daemon is gone already.
    """
    pid = peer_cred(sock)[0]
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        # field 22, starttime; the fields after the command's ")" start at 3
        start = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        boot = f.read().strip().replace("-", "")[:12]
    return f"{boot}-{pid:x}-{start:x}"


def _listed(doc: dict[str, object], pid: int) -> bool:
    clients = doc.get("clients")
    return isinstance(clients, list) and any(
        isinstance(c, dict) and c.get("pid") == pid for c in clients
    )


@dataclass
class Counters:
    received: int = 0
    published: int = 0
    messages: int = 0
    dropped_backlog: int = 0
    # seq jumps in what the daemon sent (its ring, its queue for us, or while
    # we were not connected to it)
    lost_daemon: int = 0
    lost_reported: int = 0
    duplicates: int = 0


Payload = bytes | memoryview


@dataclass
class _Item:
    epoch: str
    first: int
    last: int
    payload: Payload
    # the chunk the payload is a view of, reused once the stream holds it
    chunk: bytearray | None = None


@dataclass
class _Out:
    """One message of the batch being published."""

    epoch: str
    first: int
    last: int
    payload: Payload
    count: int
    lost: int
    hdrs: dict[str, str]
    chunk: bytearray | None = None


@dataclass
class Forwarder:
    """The reader and publisher of one mount (see the module docstring)."""

    js: JetStreamContext
    ident: Identity
    socket_path: Path
    stream: str
    backlog_limit: int = DEFAULT_BACKLOG
    max_batch: int = MAX_BATCH_RECORDS
    counters: Counters = field(default_factory=Counters)
    # the seq space and last seq the stream holds from us (resume point)
    last_epoch: str | None = None
    last_seq: int | None = None
    # --metrics: called with the seconds from each publish to its ack
    observe_publish: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        self.backlog: collections.deque[_Item] = collections.deque()
        self.backlog_records = 0
        self.wakeup = asyncio.Event()
        self.connected = asyncio.Event()
        self._dropping = False
        # the last record received from the daemon, for lost_daemon
        self._recv_epoch: str | None = None
        self._recv_seq = 0
        # the message being published, until the stream holds it
        self._current: _Out | None = None
        # the chunk the socket is read into: the next message's payload
        self._chunk_size = self.max_batch * abi.RECORD_SIZE
        self._spare: list[bytearray] = []
        self._chunk = bytearray(self._chunk_size)
        self._view = memoryview(self._chunk)
        self._used = 0
        self._chunk_epoch = ""
        self._chunk_first = self._chunk_last = 0
        # the daemon's socket still held messages when the last read burst
        # ended: the partly filled chunk waits for them (see _pending)
        self._more = False
        self._peek = bytearray(1)
        # what a message from the daemon may hold: what we ask for
        self._message_records = daemon_message_records(self.max_batch)

    async def resume_point(self) -> None:
        """Read the last message the stream holds from this node."""
        try:
            msg = await self.js.get_last_msg(self.stream, self.ident.subject)
        except nats.js.errors.NotFoundError:
            log.info("no earlier message of %s in %s", self.ident.subject, self.stream)
            return
        hdrs = msg.headers or {}
        seq_range = hdrs.get(wire.HDR_SEQ, "")
        try:
            last = int(seq_range.rpartition("-")[2])
        except ValueError:
            log.warning("last message of %s has no %s header", self.ident.subject, wire.HDR_SEQ)
            return
        self.last_epoch, self.last_seq = hdrs.get(wire.HDR_EPOCH), last
        log.info(
            "the stream holds %s up to seq %d (epoch %s)", self.ident.subject, last, self.last_epoch
        )

    async def read_daemon(self) -> None:
        """Take every message from the daemon into the backlog; reconnect forever."""
        loop = asyncio.get_running_loop()
        backoff = DAEMON_BACKOFF_MIN
        logged: int | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, os.fspath(self.socket_path))
                epoch = self.ident.node if self.ident.scoutfs else daemon_epoch(sock)
                if self._message_records > abi.MAX_MESSAGE_RECORDS:
                    sock.send(abi.encode_message_request(self._message_records))
            except OSError as exc:
                sock.close()
                if exc.errno != logged:
                    log.warning(
                        "waiting for scoutfs-notifyd at %s (%s)", self.socket_path, exc.strerror
                    )
                    logged = exc.errno
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, DAEMON_BACKOFF_MAX)
                continue
            log.info("subscribed to %s (epoch %s)", self.socket_path, epoch)
            backoff, logged = DAEMON_BACKOFF_MIN, None
            accepted = asyncio.create_task(self._wait_accepted())
            try:
                await self._drain_socket(loop, sock, epoch)
            except OSError as exc:
                log.warning("connection to %s failed: %s", self.socket_path, exc)
            else:
                log.warning("scoutfs-notifyd closed %s; reconnecting", self.socket_path)
            finally:
                accepted.cancel()
                sock.close()
            self.connected.clear()
            await asyncio.sleep(backoff)

    async def _wait_accepted(self) -> None:
        """Set ``connected`` once the daemon has accepted our connection.

        connect() returns as soon as the connection waits in the daemon's
        listen queue, before the daemon serves it; the daemon's stats socket
        lists the clients it accepted, with their pids.  A record from the
        daemon proves it too (:meth:`_took`).
        """
        stats = os.fspath(paths.stats_path_for(self.socket_path))
        pid = os.getpid()
        logged = False
        while not self.connected.is_set():
            try:
                doc = await asyncio.to_thread(read_stats, stats, ACCEPT_POLL * 10)
            except (OSError, ValueError, UntrustedPeerError) as exc:
                if not logged:
                    log.warning("cannot read the daemon's stats at %s yet (%s)", stats, exc)
                    logged = True
            else:
                if _listed(doc, pid):
                    log.info("scoutfs-notifyd accepted our connection")
                    self.connected.set()
                    return
            await asyncio.sleep(ACCEPT_POLL)

    async def _drain_socket(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, epoch: str
    ) -> None:
        """Read messages until the daemon closes the connection.

        The socket stays registered with the loop for the whole connection
        and :meth:`_readable` reads what it holds, up to READ_BURST messages,
        each time the loop finds it readable: no future, task switch or
        epoll_ctl per wake-up (those cost more than the reads when the
        daemon's messages come one or two at a time).  Between two bursts
        the loop runs everything else that is ready, the publisher too.
        """
        closed: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, self._readable, sock, epoch, closed)
        try:
            await closed
        finally:
            loop.remove_reader(fd)

    def _readable(self, sock: socket.socket, epoch: str, closed: asyncio.Future[None]) -> None:
        if closed.done():
            return
        recv_into = sock.recv_into
        room = self._message_records * abi.RECORD_SIZE
        self._more = True
        dry = True
        # the messages of a burst lie back to back at the chunk's end, from
        # start to pos, and are accounted for together (_took_burst)
        start = pos = self._used
        for _ in range(READ_BURST):
            if self._chunk_size - pos < room:
                self._took_burst(epoch, start, pos)
                self._close_chunk()
                start = pos = self._used
            try:
                n = recv_into(self._view[pos:], room)
            except BlockingIOError:
                break
            except OSError as exc:
                closed.set_exception(exc)
                break
            if not n:
                closed.set_result(None)
                break
            if n % abi.RECORD_SIZE:
                self._took_burst(epoch, start, pos)
                log.error(
                    "skipping a malformed message from the daemon: %d bytes, not whole records", n
                )
                start = pos = self._used
                continue
            pos += n
        else:
            # a whole burst: if the socket holds more, the loop calls again
            dry = not self._socket_holds_more(sock)
        self._took_burst(epoch, start, pos)
        if dry:
            # read dry (or closed): what the chunk holds goes out now
            self._more = False
            if self._used:
                self.wakeup.set()

    def _socket_holds_more(self, sock: socket.socket) -> bool:
        """Whether a message waits in ``sock`` (after a burst that read its
        fill): if none does, no wake-up will come for the chunk to go out."""
        try:
            sock.recv_into(self._peek, 1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            pass  # the next read says what
        return True

    def _took_burst(self, epoch: str, start: int, end: int) -> None:
        """Account for the whole records the socket put at chunk[start:end].

        The daemon's seqs rise within an epoch (docs/ABI.md), so a burst
        whose last seq is its first plus its count, following the last
        record received, has no gap: it is taken as it lies, at a cost per
        burst rather than per message.  Anything else (a gap, a new epoch,
        a full backlog) goes through :meth:`_took` a contiguous run at a time.
        """
        if end == start:
            return
        chunk = self._chunk
        n = (end - start) // abi.RECORD_SIZE
        first = _SEQ_AT(chunk, start)[0]
        last = _SEQ_AT(chunk, end - abi.RECORD_SIZE)[0]
        if (
            epoch == self._recv_epoch
            and first == self._recv_seq + 1
            and last == first + n - 1
            and not self._dropping
            and self.unpublished + n <= self.backlog_limit
            and (start == 0 or (epoch == self._chunk_epoch and first == self._chunk_last + 1))
        ):
            self.counters.received += n
            self._recv_seq = last
            self._kept(epoch, first, last, start, end)
            return
        raw = bytes(self._view[start:end])
        self._used = start
        run = 0
        prev = first - 1
        for i in range(n):
            seq = _SEQ_AT(raw, i * abi.RECORD_SIZE)[0]
            if seq != prev + 1 and i > run:
                self._take_run(epoch, raw[run * abi.RECORD_SIZE : i * abi.RECORD_SIZE])
                run = i
            prev = seq
        self._take_run(epoch, raw[run * abi.RECORD_SIZE :])

    def _take(self, epoch: str, msg: bytes) -> None:
        """Take one message given as bytes (the socket path reads into the chunk)."""
        self._take_run(epoch, msg)
        self.wakeup.set()

    def _take_run(self, epoch: str, msg: bytes) -> None:
        if self._chunk_size - self._used < len(msg):
            self._close_chunk()
        self._chunk[self._used : self._used + len(msg)] = msg
        self._took(epoch, len(msg))

    def _took(self, epoch: str, size: int) -> None:
        """Account for the message of ``size`` bytes just written at the chunk's end.

        Records go straight into the chunk that becomes a message's payload:
        no object per socket message, and no join of many small payloads.
        """
        at = self._used
        if size % abi.RECORD_SIZE or not size:
            log.error(
                "skipping a malformed message from the daemon: %d bytes, not whole records", size
            )
            return
        unpack = _SEQ_AT
        first = unpack(self._chunk, at)[0]
        last = unpack(self._chunk, at + size - abi.RECORD_SIZE)[0]
        n = size // abi.RECORD_SIZE
        if epoch != self._recv_epoch:
            log.debug("first records of epoch %s: seq %d-%d", epoch, first, last)
        self.counters.received += n
        if epoch == self._recv_epoch and first > self._recv_seq + 1:
            self.counters.lost_daemon += first - self._recv_seq - 1
        elif self._recv_epoch is not None and epoch != self._recv_epoch and first > 1:
            # a restarted daemon: what it read before it served us
            self.counters.lost_daemon += first - 1
        self._recv_epoch, self._recv_seq = epoch, last
        # the message in flight came out of the backlog and still counts
        # against --backlog until the stream holds it
        if self.unpublished + n > self.backlog_limit:
            # the next published message carries the seq jump as its Lost header
            self.counters.dropped_backlog += n
            if not self._dropping:
                log.warning(
                    "backlog full (%d records, --backlog): dropping records until NATS catches up",
                    self.unpublished,
                )
                self._dropping = True
            return
        if self._dropping and self.unpublished < self.backlog_limit // 2:
            self._dropping = False
        if at and (epoch != self._chunk_epoch or first != self._chunk_last + 1):
            # not contiguous with the chunk: the chunk ends before this message
            msg = bytes(self._view[at : at + size])
            self._close_chunk()
            self._chunk[:size] = msg
            at = 0
        self._kept(epoch, first, last, at, at + size)

    def _kept(self, epoch: str, first: int, last: int, start: int, end: int) -> None:
        """Records first..last, at chunk[start:end], follow on what the chunk holds."""
        if not start:
            self._chunk_epoch, self._chunk_first = epoch, first
        self._chunk_last = last
        self._used = end
        self.backlog_records += (end - start) // abi.RECORD_SIZE
        if not self.connected.is_set():
            self.connected.set()  # a record: the daemon serves us

    def _new_chunk(self) -> None:
        # the one closed is a message's payload now
        self._chunk = self._spare.pop() if self._spare else bytearray(self._chunk_size)
        self._view = memoryview(self._chunk)
        self._used = 0

    def _reuse(self, chunk: bytearray | None) -> None:
        """Take back the chunk of a message the stream holds (or that was copied out)."""
        if chunk is not None and len(self._spare) < SPARE_CHUNKS:
            self._spare.append(chunk)

    def _close_chunk(self) -> None:
        """Queue what the chunk holds as one message and start a new chunk."""
        used = self._used
        if not used:
            return
        item = _Item(self._chunk_epoch, self._chunk_first, self._chunk_last, b"")
        if used < self._chunk_size // 4:
            # a small message (NATS is keeping up): copy it out and keep the chunk
            item.payload = bytes(self._view[:used])
            self._used = 0
        else:
            # the chunk itself becomes the payload: no copy of up to a
            # megabyte; it is read into again once the stream holds it
            item.payload, item.chunk = self._view[:used], self._chunk
            self._new_chunk()
        self.backlog.append(item)
        self.wakeup.set()

    def _next_batch(self) -> _Item:
        """Pop contiguous messages of one epoch as one."""
        if not self.backlog:
            self._close_chunk()
        head = self.backlog.popleft()
        parts = [head]
        last, count = head.last, len(head.payload) // abi.RECORD_SIZE
        while self.backlog:
            nxt = self.backlog[0]
            n = len(nxt.payload) // abi.RECORD_SIZE
            if nxt.epoch != head.epoch or nxt.first != last + 1 or count + n > self.max_batch:
                break
            parts.append(self.backlog.popleft())
            last = nxt.last
            count += n
        self.backlog_records -= count
        if len(parts) == 1:
            return head
        joined = _Item(head.epoch, head.first, last, b"".join(p.payload for p in parts))
        for p in parts:
            self._reuse(p.chunk)
        return joined

    @property
    def unpublished(self) -> int:
        """Records read from the daemon that the stream does not hold yet."""
        return self.backlog_records + (self._current.count if self._current else 0)

    def _pending(self) -> bool:
        """Records wait for publishing: queued messages, or a partly filled
        chunk once the daemon's socket was read dry.

        While the daemon sends faster than we publish, an ack that comes
        finds the socket still holding messages: the chunk fills before it
        goes out, so a flood is published in full messages rather than one
        full and one remnant per ack (each message costs a round trip).  A
        trickle reads the socket dry at every wake-up and goes out at once.
        """
        return bool(self.backlog) or (self._used > 0 and not self._more)

    def _next_out(self) -> _Out:
        """The next message to publish, its Lost header set against the one before."""
        item = self._next_batch()
        epoch, first, last = item.epoch, item.first, item.last
        count = len(item.payload) // abi.RECORD_SIZE
        lost = 0
        if self.last_epoch == epoch and self.last_seq is not None and first > self.last_seq + 1:
            lost = first - self.last_seq - 1
        elif (
            self.last_epoch is not None
            and self.last_epoch != epoch
            and first > 1
            # a daemon process (daemon_epoch); an epoch of the socket's ctime,
            # from a forwarder before that, may be this same daemon: no claim
            and "-" in self.last_epoch
        ):
            # a new seq space (remount, daemon restart) that a forwarder of this
            # node published before: its records below ``first`` were made
            # before we were connected to the new daemon, and are lost
            lost = first - 1
        self.last_epoch, self.last_seq = epoch, last
        hdrs = wire.headers_for(self.ident.fsid, self.ident.node, epoch, first, last, lost)
        return _Out(epoch, first, last, item.payload, count, lost, hdrs, item.chunk)

    async def publish_forever(self) -> None:
        """Publish the backlog until cancelled; see :meth:`_pump`."""
        await self._pump(until_empty=False)

    async def drain(self, seconds: float) -> bool:
        """Publish what the backlog holds, for at most ``seconds``.

        The reader has stopped: a partly filled chunk goes out too.
        """
        self._more = False
        try:
            async with asyncio.timeout(seconds):
                await self._pump(until_empty=True)
        except TimeoutError:
            return False
        return True

    async def _pump(self, until_empty: bool) -> None:
        """Publish one message at a time until the stream holds it, then the next.

        Why one: each node's records must be in the stream in order and once.
        A message whose ack did not come is re-sent under the same
        Nats-Msg-Id, which the stream drops if the first attempt was stored
        after all; with nothing else in flight, nothing can get in before it.
        Several messages awaiting their acks cannot give this with nats-py: a
        connection that drops between two of them loses the first while the
        second, still in nats-py's buffer, goes out on the next connection
        and is stored first (seen in tests/test_cluster_stream.py's server
        kill).  JetStream's atomic batches (nats-server 2.12) would keep a
        batch whole, but took 12 to 41 ms per batch on 2.15.1 (docs/ABI.md).
        """
        while True:
            if self._current is None:
                if not self._pending():
                    if until_empty:
                        return
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                self._current = self._next_out()
            # kept until stored: a publisher cancelled on SIGTERM left it to drain()
            await self._publish(self._current)
            self._current = None

    async def _publish(self, out: _Out) -> None:
        """Publish ``out`` until the stream holds it."""
        failing = False
        while True:
            log.debug(
                "publishing seq %d-%d (%d records, lost %d)",
                out.first,
                out.last,
                out.count,
                out.lost,
            )
            sent = time.monotonic()
            try:
                ack = await self.js.publish(
                    self.ident.subject,
                    # a memoryview does: nats-py takes its len and copies it out
                    cast(bytes, out.payload),
                    timeout=PUBLISH_TIMEOUT,
                    stream=self.stream,
                    headers=dict(out.hdrs),
                )
            except _NATS_ERRORS as exc:
                if not failing:
                    log.warning(
                        "publishing seq %d-%d failed (%s); retrying, %d records in the backlog",
                        out.first,
                        out.last,
                        str(exc) or type(exc).__name__,
                        self.unpublished,
                    )
                    failing = True
                await asyncio.sleep(RETRY_DELAY)
                continue
            break
        if failing:
            log.info("published seq %d-%d after retrying", out.first, out.last)
        if self.observe_publish is not None:
            self.observe_publish(time.monotonic() - sent)
        if ack.duplicate:
            self.counters.duplicates += 1
        self._record_published(out)

    def _record_published(self, out: _Out) -> None:
        if out.lost:
            self.counters.lost_reported += out.lost
            log.warning(
                "published a loss marker: %d records of %s lost before seq %d",
                out.lost,
                self.ident.node,
                out.first,
            )
        self.counters.published += out.count
        self.counters.messages += 1
        # nats-py copied the payload into its own buffer on each send; no
        # re-send needs it now
        self._reuse(out.chunk)
        out.chunk = None


async def ensure_stream(
    js: JetStreamContext, name: str, subject: str, max_bytes: int, max_age: float, replicas: int
) -> None:
    """Create the stream if missing; check that it takes ``subject``."""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        cfg = api.StreamConfig(
            name=name,
            subjects=[f"{wire.SUBJECT_PREFIX}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_bytes=max_bytes,
            max_age=max_age,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW,
        )
        try:
            info = await js.add_stream(cfg)
        except nats.js.errors.APIError as exc:
            raise ClusterError(f"cannot create the stream {name}: {exc.description}") from None
        log.info(
            "created the stream %s (R%d, max %d bytes, max age %.0f s)",
            name,
            replicas,
            max_bytes,
            max_age,
        )
        return
    try:
        found = await js.find_stream_name_by_subject(subject)
    except nats.js.errors.NotFoundError:
        found = None
    if found != name:
        raise ClusterError(
            f"the stream {name} exists but does not take {subject} "
            f"(subjects {info.config.subjects}): add {wire.SUBJECT_PREFIX}.> to it"
        )
    if not info.config.duplicate_window:
        log.warning(
            "the stream %s has no duplicate window: re-sent batches may be stored twice", name
        )
    log.info("using the existing stream %s (R%s)", name, info.config.num_replicas)


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 512M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "s")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


METRICS_EPILOG = """\
Metrics (--metrics), in the Prometheus text format:
  scoutfs_notify_forward_records_received_total    records read from the daemon
  scoutfs_notify_forward_records_published_total   records JetStream acknowledged
  scoutfs_notify_forward_messages_published_total  messages JetStream acknowledged
  scoutfs_notify_forward_messages_duplicate_total  acks saying the stream had it
  scoutfs_notify_forward_records_lost_total{cause="daemon_gap"|"backlog"}
                                                   seq jumps from the daemon; drops
                                                   past --backlog
  scoutfs_notify_forward_records_lost_published_total
                                                   lost records the stream was told of
  scoutfs_notify_forward_backlog_records           records waiting (gauge)
  scoutfs_notify_forward_nats_reconnects_total     reconnections to NATS
  scoutfs_notify_forward_publish_seconds           publish-to-ack time (histogram)
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of scoutfs-notify-forward (also its man page)."""
    p = argparse.ArgumentParser(
        prog="scoutfs-notify-forward",
        description=DESCRIPTION,
        epilog=METRICS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="the scoutfs mount (or fanotify-watched directory)")
    add_connection_args(p)
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's notify socket (default: the one scoutfs-notifyd derives from PATH)",
    )
    p.add_argument(
        "--node", metavar="NAME", help="the node name off scoutfs (default: the hostname)"
    )
    p.add_argument(
        "--fsid",
        metavar="NAME",
        help="the filesystem name off scoutfs, the same on every node that shares it "
        "(default: the socket directory's name)",
    )
    p.add_argument(
        "--stream",
        default=wire.DEFAULT_STREAM,
        metavar="NAME",
        help="the JetStream stream (default: %(default)s)",
    )
    p.add_argument(
        "--backlog",
        type=_positive,
        default=DEFAULT_BACKLOG,
        metavar="RECORDS",
        help=f"records held while NATS is unreachable (default: {DEFAULT_BACKLOG}, "
        f"{DEFAULT_BACKLOG * abi.RECORD_SIZE >> 20} MiB), besides the message being "
        "sent; past it records are dropped and the loss is published",
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="when creating the stream: its size limit, oldest messages go first (default: 1G)",
    )
    p.add_argument(
        "--max-age",
        type=_duration,
        default=_duration(DEFAULT_MAX_AGE),
        metavar="DURATION",
        help=f"when creating the stream: how long messages are kept, 0 for ever "
        f"(default: {DEFAULT_MAX_AGE})",
    )
    p.add_argument(
        "--replicas",
        type=_positive,
        default=1,
        metavar="N",
        help="when creating the stream: copies on N servers (default: 1; 3 on a 3-server cluster)",
    )
    p.add_argument(
        "--metrics",
        metavar="[ADDR:]PORT",
        type=listen_arg,
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (a bare PORT listens "
        "on 127.0.0.1; default: off); the metrics are listed below",
    )
    p.add_argument("--debug", action="store_true", help="log every publish")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    cred = credentials_from_args(args)
    socket_path = Path(args.socket) if args.socket else paths.default_socket_path(args.path)
    ident = identify(args.path, socket_path, args.fsid, args.node)
    metrics = server = None
    if args.metrics:
        # bound before NATS is tried, so a taken port fails at once
        metrics = ForwardMetrics()
        try:
            server = MetricsServer(args.metrics, metrics.registry)
        except OSError as exc:
            host, port = args.metrics
            raise ClusterError(f"--metrics {host}:{port}: {exc.strerror}") from None
    try:
        return await _run(args, socket_path, ident, cred, metrics)
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)


async def _run(
    args: argparse.Namespace,
    socket_path: Path,
    ident: Identity,
    cred: Credentials,
    metrics: ForwardMetrics | None,
) -> int:
    nc: Client = await connect(args.nats, cred, name=f"scoutfs-notify-forward {ident.node}")
    try:
        js = nc.jetstream()
        await ensure_stream(
            js, args.stream, ident.subject, args.max_bytes, args.max_age, args.replicas
        )
        fwd = Forwarder(
            js,
            ident,
            socket_path,
            args.stream,
            backlog_limit=args.backlog,
            max_batch=batch_records(nc.max_payload),
        )
        if metrics is not None:
            fwd.observe_publish = metrics.publish_seconds.observe
            metrics.attach(
                lambda: {
                    **dataclasses.asdict(fwd.counters),
                    "backlog_records": fwd.unpublished,
                    "reconnects": nc.stats["reconnects"],
                }
            )
        await fwd.resume_point()
        log.info(
            "forwarding %s as %s to %s on %s",
            socket_path,
            ident.subject,
            args.stream,
            nc.connected_url.netloc if nc.connected_url else args.nats,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reader = asyncio.create_task(fwd.read_daemon())
        publisher = asyncio.create_task(fwd.publish_forever())
        connected = asyncio.create_task(fwd.connected.wait())
        stopped = asyncio.create_task(stop.wait())
        tasks = {reader, publisher, stopped}
        await asyncio.wait({connected, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        if connected.done():
            sd_notify("READY=1")
        else:
            connected.cancel()
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        sd_notify("STOPPING=1")
        for task in tasks:
            task.cancel()
        for task in (reader, publisher):
            # a task that ended by itself failed: say why instead of draining
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not await fwd.drain(DRAIN_ON_EXIT):
            log.warning("exiting with %d records not published", fwd.unpublished)
        c = fwd.counters
        log.info(
            "stopping: %d records received, %d published in %d messages, %d dropped "
            "(backlog), %d reported lost, %d duplicate acks",
            c.received,
            c.published,
            c.messages,
            c.dropped_backlog,
            c.lost_reported,
            c.duplicates,
        )
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        logging.getLogger("nats").setLevel(logging.WARNING)
    inherited.close_inherited(log)
    if not libc.keep_heap(HEAP_LARGEST, HEAP_RETAINED):
        log.debug("no glibc mallopt(): megabyte buffers come and go with the C library's defaults")
    try:
        return asyncio.run(run(args))
    except ClusterError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
