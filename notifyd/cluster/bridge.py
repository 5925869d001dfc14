"""The cluster consumer for trio programs: asyncio in a thread of its own, a channel between.

nats-py needs an asyncio loop; a trio program (the shim) must not run one
in its own thread.  :class:`TrioClusterSubscriber` starts a thread that runs
``asyncio.run`` with a :class:`~notifyd.cluster.consume.ClusterSubscriber`
and hands each message's events to trio through a memory channel.  A
message costs one wake-up of each thread: the asyncio side puts it in the
channel from trio's thread (``run_sync_soon``, never blocking), and the trio
side gives back a credit once it took it out.  The asyncio side holds fewer
credits than the channel has room, so a put never fails, and waits for a
credit while trio is behind: no unbounded queue.  Events and gaps are the
same values the asyncio consumer yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from types import TracebackType

import trio

from .consume import ClusterSubscriber, StartAt
from .server import Credentials, connect
from .wire import DEFAULT_STREAM, ClusterGap, ClusterRecord

__all__ = ["TrioClusterSubscriber"]

log = logging.getLogger(__name__)

# Messages (each up to MAX_BATCH_RECORDS records) queued between the threads.
CHANNEL_MESSAGES = 16

Events = list[ClusterRecord | ClusterGap]


class TrioClusterSubscriber:
    """``async with TrioClusterSubscriber(url, cred, fsid=...) as sub: async for ev in sub``.

    Entering connects (raising ClusterError as the asyncio side does: bad
    server, no JetStream, no connection); leaving cancels the asyncio side
    and joins its thread.
    """

    def __init__(
        self,
        url: str,
        cred: Credentials,
        *,
        stream: str = DEFAULT_STREAM,
        fsid: str | None = None,
        node: str | None = None,
        start: StartAt | None = None,
        name: str = "scoutfs-notify",
        exclude_node: str | None = None,
    ) -> None:
        self.url = url
        self.cred = cred
        self.stream = stream
        self.fsid = fsid
        self.node = node
        self.start = start or StartAt()
        self.name = name
        self.exclude_node = exclude_node
        self._send, self._recv = trio.open_memory_channel[Events | BaseException](CHANNEL_MESSAGES)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        # the asyncio side's right to put a message: one slot of the channel
        # stays free for the first item and for an exception at the end
        self._credits: asyncio.Semaphore | None = None

    async def __aenter__(self) -> TrioClusterSubscriber:
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._thread_main, args=(token,), name="nats-consumer", daemon=True
        )
        self._thread.start()
        first = await self._recv.receive()
        if isinstance(first, BaseException):
            await self.aclose()
            raise first
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._recv.close()
        if self._loop is not None and self._task is not None:
            # RuntimeError: the loop has already finished
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)
            self._thread = None

    async def batches(self) -> AsyncIterator[Events]:
        async for item in self._recv:
            if isinstance(item, BaseException):
                raise item
            self._give_credit()
            yield item

    def _give_credit(self) -> None:
        if self._loop is not None and self._credits is not None:
            # RuntimeError: the asyncio side has finished
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._credits.release)

    async def __aiter__(self) -> AsyncIterator[ClusterRecord | ClusterGap]:
        async for events in self.batches():
            for ev in events:
                yield ev

    # --- the asyncio thread -------------------------------------------------

    def _thread_main(self, token: trio.lowlevel.TrioToken) -> None:
        try:
            asyncio.run(self._amain(token))
        except BaseException as exc:  # handed to trio, never lost in this thread
            self._deliver(token, exc)

    def _deliver(self, token: trio.lowlevel.TrioToken, item: Events | BaseException) -> bool:
        """Hand ``item`` to trio, waiting for room (an exception, the last item)."""
        try:
            trio.from_thread.run(self._send.send, item, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return False
        return True

    def _put(self, item: Events) -> None:
        """In trio's thread: the channel has room (the caller held a credit)."""
        # the trio side closed the channel: its aclose() cancels this side
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send.send_nowait(item)

    async def _amain(self, token: trio.lowlevel.TrioToken) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        nc = await connect(self.url, self.cred, name=self.name)
        try:
            sub = ClusterSubscriber(
                nc,
                stream=self.stream,
                fsid=self.fsid,
                node=self.node,
                start=self.start,
                exclude_node=self.exclude_node,
            )
            await sub.subscribe()
            credits = self._credits = asyncio.Semaphore(CHANNEL_MESSAGES - 1)
            put = self._put
            # the first item tells __aenter__ the subscription stands
            token.run_sync_soon(put, [])
            async for events in sub.batches():
                if events:
                    await credits.acquire()
                    token.run_sync_soon(put, events)
        except asyncio.CancelledError:
            pass
        finally:
            try:
                await nc.close()
            except Exception as exc:  # closing after a failure: only worth a debug line
                log.debug("closing the NATS connection: %s", exc)
