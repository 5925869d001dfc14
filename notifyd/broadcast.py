"""The relay core: hand every published batch to every connected client.

A batch is any number of whole records in ``seq`` order (one drain of the
source); it is queued by reference for every client and cut into messages of
up to 64 records (or as many as the client asked for, up to 1024: fewer
messages for a forwarder in a flood) only as each client's sender task sends
it, so the hot path
costs one queue append per client per drain and one send(2) per message, and
never decodes a record.

Each client's queue is bounded in messages.  A batch that does not fit is
dropped for that client alone (its stream shows a ``seq`` gap); nobody else
waits.  An empty queue always takes the next batch, so a client holds at most
its bound plus one batch.

Ordering guarantee: a client whose ``connect()`` returned before a batch is
published receives that batch.  ``publish`` first accepts every connection
already queued on the listening socket, so a consumer that connects and then
makes an access never misses its own record because the accept loop had not
run yet.

Connection churn: a client that closed counts against ``max_clients`` only
until its task reads the end of its stream, and a burst of connect/close
cycles can outrun those tasks.  So before refusing anyone, the broadcaster
asks the kernel which clients have hung up (one ``poll(2)`` over them all)
and forgets those at once; refusals are logged at a bounded rate.

A client that half-closes (``shutdown(SHUT_WR)``, as ``socat ... </dev/null``
does) has only said it will send nothing more: it keeps receiving until it
closes for good or a send fails.  Its socket stays readable (end of input),
so waiting on it would spin; one epoll set for all such clients, asking for
no event at all, still reports ``EPOLLHUP``, which only the full close
raises.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from . import abi
from .droplog import DropLog

__all__ = ["Broadcaster", "Client"]

log = logging.getLogger(__name__)

# Clients have nothing to say but a request for larger messages
# (abi.MESSAGE_REQUEST); other stray bytes are ignored, and this many in all
# get the client disconnected so it cannot make the daemon spin on its input.
FLOOD_BYTES = 64 * 1024

# accept(2) errors that mean "this one connection failed", not "stop serving"
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
# accept(2) errors that mean "out of a resource for now": pause, retry
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# How long to pause accepting after running out of fds or memory.
ACCEPT_CAPACITY_SLEEP = 0.1
# Clients whose connect and disconnect are logged per CLIENT_LOG_INTERVAL;
# clients beyond that are counted in one line, so a connect/close churn cannot
# flood the log.  The window is long: a poller connecting every few seconds for
# months must cost a line per window, not a line or two per connection
# (clients and their counters are on the stats socket at any time).
CLIENT_LOG_BURST = 20
CLIENT_LOG_INTERVAL = 600.0
# Connections the accept loop takes before it lets client tasks run: without
# a bound, a steady stream of connect/close cycles keeps the queue non-empty
# and the loop never yields.
ACCEPT_BATCH = 64


def _accept_queue_bound() -> int:
    """The most connections a listening socket can hold queued (net.core.somaxconn + 1)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read()) + 1
    except (OSError, ValueError):
        return socket.SOMAXCONN + 1


_UCRED = struct.Struct("=iII")


class _LogBudget:
    """Allows ``burst`` clients' lines per ``interval``; counts the others and says how many."""

    def __init__(
        self, burst: int, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.used = 0
        self.unlogged = 0
        self._window_end = 0.0

    def allow(self) -> bool:
        now = self.clock()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self.interval
            self.used = 0
        if self.used < self.burst:
            self.used += 1
            return True
        self.unlogged += 1
        return False

    def flush(self) -> None:
        if self.unlogged:
            log.info(
                "%d more clients connected without a log line (more than %d in %.0f s)",
                self.unlogged,
                self.burst,
                self.interval,
            )
            self.unlogged = 0


class Client:
    """One connected consumer and its counters."""

    def __init__(self, sock: socket.socket, queue_messages: int, ident: int) -> None:
        self.sock = sock
        self.id = ident
        self.pid, self.uid, self.gid = _peer_cred(sock)
        self.connected = time.time()
        self.limit = queue_messages
        # bytes per message sent: the client may ask for more (abi.MESSAGE_REQUEST)
        self.step = abi.MAX_MESSAGE_BYTES
        # batches not yet sent completely, the first one from byte `offset` on
        self.queue: deque[bytes] = deque()
        self.offset = 0
        self.queued_messages = 0
        # the sender parks here when its queue is empty
        self.lot = trio.lowlevel.ParkingLot()
        self.sent = 0
        self.dropped = 0
        self.drops = DropLog(log, str(self))
        # why the connection ended, for the disconnect log line
        self.end = "closed"
        # cancelled to end the client early (it hung up before its task noticed)
        self.scope = trio.CancelScope()
        # whether its connect, half-close and disconnect are logged (see _LogBudget)
        self.logged = True

    def __str__(self) -> str:
        return f"client {self.id} (pid {self.pid} uid {self.uid})"

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "connected": self.connected,
            "records_sent": self.sent,
            "records_dropped": self.dropped,
            "queued_messages": self.queued_messages,
            "message_records": self.step // abi.RECORD_SIZE,
        }


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    try:
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return -1, abi.UNKNOWN_ID, abi.UNKNOWN_ID


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` for good (a half-close is not that)."""
    hup = select.poll()
    hup.register(sock, 0)  # POLLHUP is always reported
    return bool(hup.poll(0))


class Broadcaster:
    """Serve one listening SEQPACKET socket and fan batches out to its clients.

    Args:
        listener: a bound, listening, non-blocking ``AF_UNIX``/``SOCK_SEQPACKET``
            socket.  The broadcaster does not close it.
        queue_messages: per-client queue length in messages (up to 64 records each).
        max_clients: connections beyond this are closed at once, with a log line.
    """

    def __init__(
        self, listener: socket.socket, *, queue_messages: int = 256, max_clients: int = 1024
    ) -> None:
        if queue_messages < 1:
            raise ValueError("queue_messages must be at least 1")
        self.listener = listener
        self.queue_messages = queue_messages
        self.max_clients = max_clients
        self.clients: dict[int, Client] = {}
        self.records = 0
        self.messages = 0
        self.clients_total = 0
        self.clients_refused = 0
        # every client's drops, also of clients gone since (a counter for metrics)
        self.client_records_dropped = 0
        self._refusals = DropLog(log, "client limit", unit="connections refused")
        self._client_lines = _LogBudget(CLIENT_LOG_BURST, CLIENT_LOG_INTERVAL)
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # half-closed clients by fd, and the epoll set that reports their hangups
        self._half_closed: dict[int, Client] = {}
        self._hangups: select.epoll | None = None
        # publish() asks this whether connections wait: a poll(0) costs a
        # fraction of an accept(2) that fails with EAGAIN (and its exception)
        self._pending = select.poll()
        self._pending.register(listener, select.POLLIN)
        self._queue_bound = _accept_queue_bound()

    def stats(self) -> dict[str, Any]:
        return {
            "records_published": self.records,
            "messages_published": self.messages,
            "clients_total": self.clients_total,
            "clients_refused": self.clients_refused,
            "client_records_dropped": self.client_records_dropped,
            "clients": [c.stats() for c in self.clients.values()],
        }

    def publish(self, batch: bytes) -> None:
        """Queue a batch of whole records for every client; never blocks."""
        if self._nursery is not None and self._pending.poll(0):
            # as many as the queue can hold: every connection queued before this call
            self.accept_pending(self._queue_bound)
        n = len(batch) // abi.RECORD_SIZE
        if not n:
            return
        msgs = -(-n // abi.MAX_MESSAGE_RECORDS)
        self.records += n
        self.messages += msgs
        for client in self.clients.values():
            if client.queued_messages and client.queued_messages + msgs > client.limit:
                client.dropped += n
                self.client_records_dropped += n
                client.drops.add(n, ", its queue is full")
                continue
            client.queue.append(batch)
            client.queued_messages += msgs
            if client.lot:
                client.lot.unpark()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; clients are served in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._hangups = select.epoll()
            try:
                nursery.start_soon(self._watch_hangups, self._hangups)
                task_status.started()
                while True:
                    listener = self.listener
                    try:
                        await trio.lowlevel.wait_readable(listener)
                    except trio.ClosedResourceError:
                        if listener is self.listener:
                            raise
                        continue  # replace_listener() swapped it
                    if not self.accept_pending(ACCEPT_BATCH):
                        await trio.sleep(ACCEPT_CAPACITY_SLEEP)
            finally:
                self._nursery = None
                self._refusals.flush(f", already serving {self.max_clients}")
                self._client_lines.flush()
                nursery.cancel_scope.cancel()
        self._hangups.close()
        self._hangups = None

    async def _watch_hangups(self, hangups: select.epoll) -> None:
        """End half-closed clients once they close for good."""
        while True:
            await trio.lowlevel.wait_readable(hangups.fileno())
            for fd, _ in hangups.poll(0):
                hangups.unregister(fd)
                client = self._half_closed.pop(fd, None)
                if client is not None:
                    client.scope.cancel()

    def replace_listener(self, sock: socket.socket) -> None:
        """Serve ``sock`` from now on (the old socket's path was removed).

        Connections already queued on the old socket are accepted first; the
        caller closes the old socket afterwards.
        """
        old = self.listener
        if self._nursery is not None:
            self.accept_pending(self._queue_bound)
        self._pending.unregister(old)
        self._pending.register(sock, select.POLLIN)
        self.listener = sock
        trio.lowlevel.notify_closing(old)

    def _forget_hung_up(self) -> int:
        """Forget every client whose peer has closed; return how many."""
        by_fd = {c.sock.fileno(): c for c in self.clients.values()}
        hup = select.poll()
        for fd in by_fd:
            hup.register(fd, 0)  # POLLHUP and POLLERR are always reported
        gone = 0
        for fd, _ in hup.poll(0):
            client = by_fd[fd]
            del self.clients[client.id]
            # its task closes the socket when it next runs; closing it here
            # could pull it from under a task already woken to read it
            client.scope.cancel()
            gone += 1
        return gone

    def accept_pending(self, limit: int | None = None) -> bool:
        """Accept queued connections, at most ``limit``; False if out of fds or memory."""
        assert self._nursery is not None
        if limit is None:
            limit = self._queue_bound
        for _ in range(limit):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                if exc.errno in _ACCEPT_CAPACITY:
                    # clients that hung up free their fds once their tasks run
                    if not self._forget_hung_up():
                        log.warning("cannot accept a client: %s", exc.strerror)
                    return False
                raise
            sock.setblocking(False)
            if _hung_up(sock):
                # closed before it was accepted (a churn): counted, logged within
                # the budget, and dropped without the cost of a client and its task
                self.clients_total += 1
                ident = next(self._ids)
                if self._client_lines.allow():
                    pid, uid, _ = _peer_cred(sock)
                    log.info(
                        "client %d (pid %d uid %d) had closed before it was accepted",
                        ident,
                        pid,
                        uid,
                    )
                sock.close()
                continue
            if len(self.clients) >= self.max_clients and not self._forget_hung_up():
                self.clients_refused += 1
                self._refusals.add(1, f", already serving {self.max_clients}")
                sock.close()
                continue
            client = Client(sock, self.queue_messages, next(self._ids))
            self.clients[client.id] = client
            self.clients_total += 1
            client.logged = self._client_lines.allow()
            if client.logged:
                log.info("%s connected", client)
            self._nursery.start_soon(self._serve_client, client)
        return True

    async def _serve_client(self, client: Client) -> None:
        try:
            if client.scope.cancel_called:
                return  # forgotten before this task ran
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, client, nursery.cancel_scope)
                    client.end = await self._discard_input(client)
                    nursery.cancel_scope.cancel()
        finally:
            self.clients.pop(client.id, None)
            client.queue.clear()
            self._release(client)
            if client.logged:
                log.info(
                    "%s disconnected (%s): %d records sent, %d dropped",
                    client,
                    client.end,
                    client.sent,
                    client.dropped,
                )

    def _release(self, client: Client) -> None:
        """Close a client's socket and forget its fd."""
        fd = client.sock.fileno()
        if self._half_closed.pop(fd, None) is not None and self._hangups is not None:
            self._hangups.unregister(fd)
        trio.lowlevel.notify_closing(client.sock)
        client.sock.close()

    async def _send_loop(self, client: Client, scope: trio.CancelScope) -> None:
        sock = client.sock
        queue = client.queue
        unit = abi.MAX_MESSAGE_BYTES
        while True:
            if not queue:
                await client.lot.park()
                continue
            # a multiple of 64 records: the queue's bound counts 64-record messages
            step = client.step
            view = memoryview(queue[0])
            end = len(view)
            off = client.offset
            while off < end:
                try:
                    sock.send(view[off : off + step])
                except BlockingIOError:
                    client.offset = off
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except (BrokenPipeError, ConnectionResetError) as exc:
                    client.end = exc.strerror or "send failed"
                    scope.cancel()
                    return
                sent = min(step, end - off)
                off += sent
                client.sent += sent // abi.RECORD_SIZE
                client.queued_messages -= -(-sent // unit)
            queue.popleft()
            client.offset = 0

    async def _discard_input(self, client: Client) -> str:
        """Read what the client sends (a request for larger messages, or
        nothing worth keeping); return why the connection ended."""
        sock = client.sock
        received = 0
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(abi.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return "reset"
            if not data:
                return await self._hang_up(client)
            records = abi.decode_message_request(data)
            if records is not None and records * abi.RECORD_SIZE != client.step:
                client.step = records * abi.RECORD_SIZE
                if client.logged:
                    log.info("%s takes messages of up to %d records", client, records)
            received += len(data)
            if received > FLOOD_BYTES:
                log.warning("%s: sent %d bytes, disconnecting a flooding client", client, received)
                return "flood"

    async def _hang_up(self, client: Client) -> str:
        """The client's input ended: wait until it closes for good, if it has not yet."""
        if not _hung_up(client.sock) and self._hangups is not None:
            if client.logged:
                log.info("%s half-closed: it keeps receiving", client)
            fd = client.sock.fileno()
            self._half_closed[fd] = client
            self._hangups.register(fd, 0)
            await trio.sleep_forever()  # until _watch_hangups cancels client.scope
        return "closed"
