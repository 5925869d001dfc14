"""Client library: subscribe to a notifyd socket and read records.

Three flavours over the same decoding: :class:`Subscriber` (blocking),
:class:`AsyncSubscriber` (trio) and :class:`AsyncioSubscriber` (asyncio).  All
yield :class:`~notifyd.abi.Record`
values, interleaved with :class:`Gap` values where ``seq`` jumped, i.e.
records were lost in the kernel ring, the source, or this client's queue.
Reconnecting is left to the caller: after a reconnect the stream resumes at
the newest records, so the caller should expect a gap.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Generic, NamedTuple, Self, TypeVar

import trio

from . import abi

__all__ = ["AsyncSubscriber", "AsyncioSubscriber", "Gap", "SeqTracker", "Subscriber"]

# How long to wait before connecting again while the daemon's accept queue is full.
CONNECT_RETRY = 0.01


class Gap(NamedTuple):
    """Records lost between two seqs a client saw."""

    last_seq: int
    next_seq: int

    @property
    def lost(self) -> int:
        return self.next_seq - self.last_seq - 1


class SeqTracker:
    """Turns a stream of batches into records and gaps."""

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.lost = 0

    def events(self, batch: bytes | bytearray | memoryview) -> list[abi.Record | Gap]:
        out: list[abi.Record | Gap] = []
        last = self.last_seq
        for rec in abi.decode(batch):
            if last is not None and rec.seq != last + 1 and rec.seq > last:
                gap = Gap(last, rec.seq)
                self.lost += gap.lost
                out.append(gap)
            out.append(rec)
            last = rec.seq
        self.last_seq = last
        return out


def _check_message(msg: bytes) -> bytes:
    if not msg or len(msg) > abi.MAX_MESSAGE_BYTES or len(msg) % abi.RECORD_SIZE:
        raise abi.ABIError(f"malformed message of {len(msg)} bytes from notifyd")
    return msg


class Subscriber:
    """A blocking subscription: ``for ev in Subscriber(path): ...``.

    Iteration ends when the daemon closes the connection.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    self.sock.connect(self.path)
                    break
                except BlockingIOError:
                    # the daemon's accept queue is full (a burst of connections);
                    # a blocking connect waits for room, and so does this one
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"{self.path}: the accept queue stayed full") from None
                    time.sleep(CONNECT_RETRY)
        except BaseException:
            self.sock.close()
            raise
        self.tracker = SeqTracker()

    def recv_batch(self) -> bytes | None:
        """Return one message of whole records, or None at end of stream."""
        msg = self.sock.recv(abi.MAX_MESSAGE_BYTES)
        return _check_message(msg) if msg else None

    def __iter__(self) -> Iterator[abi.Record | Gap]:
        while (batch := self.recv_batch()) is not None:
            yield from self.tracker.events(batch)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# the socket of a subscription: trio's, or a plain one read by asyncio
_Sock = TypeVar("_Sock", socket.socket, trio.socket.SocketType)


class _AsyncSubscription(Generic[_Sock]):
    """What the trio and asyncio subscribers share: iteration and closing.

    A subclass gives ``sock`` (with ``close()``), ``tracker`` and
    ``recv_batch()``, the one part that differs between event loops.
    """

    sock: _Sock
    tracker: SeqTracker

    async def recv_batch(self) -> bytes | None:
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[abi.Record | Gap]:
        while (batch := await self.recv_batch()) is not None:
            for ev in self.tracker.events(batch):
                yield ev

    async def aclose(self) -> None:
        self.sock.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSubscriber(_AsyncSubscription[trio.socket.SocketType]):
    """A trio subscription: ``async with await AsyncSubscriber.connect(p) as s``."""

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path
        self.tracker = SeqTracker()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> AsyncSubscriber:
        # An AF_UNIX connect never is "in progress": it succeeds, fails, or (non-
        # blocking, accept queue full) says EAGAIN, which trio's connect would take
        # for success.  So the attempt is made here, again until there is room.
        raw = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            while True:
                try:
                    raw.connect(os.fspath(path))
                    break
                except BlockingIOError:
                    await trio.sleep(CONNECT_RETRY)
        except BaseException:
            raw.close()
            raise
        return cls(trio.socket.from_stdlib_socket(raw), os.fspath(path))

    async def recv_batch(self) -> bytes | None:
        """Return one message of whole records, or None at end of stream."""
        msg = await self.sock.recv(abi.MAX_MESSAGE_BYTES)
        return _check_message(msg) if msg else None


class AsyncioSubscriber(_AsyncSubscription[socket.socket]):
    """An asyncio subscription: ``async with await AsyncioSubscriber.connect(p) as s``.

    The same records and gaps as :class:`Subscriber`, from the same
    :class:`SeqTracker`; the socket is read with the running loop's
    ``sock_recv``, so other tasks run while no record is there.
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.tracker = SeqTracker()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> AsyncioSubscriber:
        # here, not at the top: the daemon and trio clients import this
        # module, and asyncio is a quarter of the daemon's start-up
        import asyncio

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, os.fspath(path))

    async def recv_batch(self) -> bytes | None:
        """Return one message of whole records, or None at end of stream."""
        import asyncio

        msg = await asyncio.get_running_loop().sock_recv(self.sock, abi.MAX_MESSAGE_BYTES)
        return _check_message(msg) if msg else None
