"""The cluster consumer (asyncio): every node's records from the stream, gaps as values.

``ClusterSubscriber`` is the cluster twin of :class:`notifyd.client.Subscriber`:
iterate it to get :class:`~notifyd.cluster.wire.ClusterRecord` values (the
record with its fsid and node) and :class:`~notifyd.cluster.wire.ClusterGap`
values where records of a node were lost.  With a durable name a message is
acknowledged only when the iterator is asked for the event after its last
one, i.e. once the caller has dealt with all of its records: a consumer that
stops resumes after what it finished.  Trio programs use
:mod:`notifyd.cluster.bridge`.

Without a durable name the consumer is JetStream's *ordered* push consumer:
the server sends each message as it is stored, with flow control, and the
client library starts the consumer again after the last stream seq it
delivered when a message or heartbeat goes missing (a server gone, the
client's buffer full), so nothing is lost and nothing repeats.  A pull
consumer costs two requests and their replies for every fetch, and at a
trickle a fetch returns one message: the shim receives its own node's
messages too (a subject filter cannot say "all but one node") and drops
them, so at a thousand accesses a second those requests took more of its
process than the replays they had to make room for.  A durable consumer
pulls: it acknowledges what was dealt with, and the server keeps its place.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from . import wire

__all__ = ["ClusterSubscriber", "StartAt"]

log = logging.getLogger(__name__)

# Messages asked for per pull, and how long a pull waits when the stream is idle.
FETCH_BATCH = 64
FETCH_WAIT = 1.0
# An ordered consumer's buffer in the client, past which a message is dropped
# there and the consumer restarted after the last one delivered: flow
# control keeps the server well short of it.  Messages are up to 1 MiB.
PUSH_PENDING_MESSAGES = 16384
PUSH_PENDING_BYTES = 64 << 20
# Heartbeats of an idle ordered consumer; two intervals without a message
# or a heartbeat restart it (its server may be gone: it lives on one only).
PUSH_HEARTBEAT = 2.0
# An ephemeral consumer the server forgets once nobody pulled for this long.
EPHEMERAL_INACTIVE = 60.0
# A durable's message not acked in this long is delivered again (the tracker
# drops the repeat).
ACK_WAIT = 30.0
RETRY_DELAY = 0.5


@dataclass(frozen=True)
class StartAt:
    """Where a new consumer starts: ``new`` (default), ``all``, a stream seq, or a time.

    A durable consumer that already exists continues where it stopped; this
    only applies when it is created.
    """

    new: bool = True
    seq: int | None = None
    time: datetime.datetime | None = None

    @classmethod
    def all(cls) -> StartAt:
        return cls(new=False)

    def consumer_config(self) -> api.ConsumerConfig:
        if self.seq is not None:
            return api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.seq
            )
        if self.time is not None:
            return api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=self.time
            )
        if self.new:
            return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)


class ClusterSubscriber:
    """Records of one filesystem (or all) and one node (or all) from the stream."""

    def __init__(
        self,
        nc: Client,
        *,
        stream: str = wire.DEFAULT_STREAM,
        fsid: str | None = None,
        node: str | None = None,
        durable: str | None = None,
        start: StartAt | None = None,
        exclude_node: str | None = None,
    ) -> None:
        self.nc = nc
        # a node whose messages are dropped unread (the shim's own node: it
        # has them from its daemon); a subject filter cannot say "all but one"
        self.exclude_node = exclude_node
        self.stream = stream
        self.subject = wire.filter_subject(fsid, node)
        self.durable = durable
        self.start = start or StartAt()
        self.tracker = wire.NodeTracker()
        self.malformed = 0
        self.sub: nats.js.JetStreamContext.PullSubscription | None = None
        self.push: nats.js.JetStreamContext.PushSubscription | None = None
        # the ordered consumer's messages not yet taken by batches()
        self._inbox: list[Msg] = []
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._unacked: Msg | None = None
        self._excluded = f".{exclude_node}"

    async def subscribe(self) -> None:
        """Create (or bind to) the consumer; raises nats.js.errors on failure."""
        cfg = self.start.consumer_config()
        cfg.filter_subject = self.subject
        js = self.nc.jetstream()
        if not self.durable and self.start.time is None:
            await self._subscribe_ordered(js, cfg)
            return
        if self.durable:
            cfg.ack_policy = api.AckPolicy.EXPLICIT
            cfg.ack_wait = ACK_WAIT
        else:
            cfg.ack_policy = api.AckPolicy.NONE
            cfg.inactive_threshold = EPHEMERAL_INACTIVE
        self.sub = await js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=cfg
        )

    async def _subscribe_ordered(
        self, js: nats.js.JetStreamContext, cfg: api.ConsumerConfig
    ) -> None:
        """The ordered push consumer, from an explicit stream seq.

        The client library restarts it after the last stream seq it
        delivered, and before the first message that is 0: a consumer that
        lost its server before anything came would start again from the
        stream's beginning.  So "new" becomes the seq after the stream's
        last, and the library is told where its start lies.
        """
        first = 1
        if self.start.seq is not None:
            first = self.start.seq
        elif self.start.new:
            info = await js.stream_info(self.stream)
            first = info.state.last_seq + 1
        if first > 1:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = first
        cfg.inactive_threshold = EPHEMERAL_INACTIVE
        self.push = await js.subscribe(
            self.subject,
            stream=self.stream,
            config=cfg,
            cb=self._pushed,
            ordered_consumer=True,
            idle_heartbeat=PUSH_HEARTBEAT,
            pending_msgs_limit=PUSH_PENDING_MESSAGES,
            pending_bytes_limit=PUSH_PENDING_BYTES,
        )
        # the library's state of the subscription it wraps (nats-py 2.x)
        jsi = self.push._sub._jsi
        assert jsi is not None
        jsi._sseq = first - 1

    async def batches(self) -> AsyncIterator[list[wire.ClusterRecord | wire.ClusterGap]]:
        """The events of one message at a time (possibly none: repeats,
        malformed); without a durable name, of the messages that arrived
        while the caller was busy, up to FETCH_BATCH.

        A durable's message is acked when the next batch is asked for, or by
        :meth:`ack_pending`: after the caller has dealt with it.
        """
        if self.sub is None and self.push is None:
            await self.subscribe()
        if self.push is not None:
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                msgs, self._inbox = self._inbox, []
                self._room.set()
                out: list[wire.ClusterRecord | wire.ClusterGap] = []
                for msg in msgs:
                    out += self._events(msg) or []
                if out:
                    yield out
        assert self.sub is not None
        failing = False
        while True:
            await self.ack_pending()
            try:
                msgs = await self.sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                if isinstance(exc, nats.errors.ConnectionClosedError):
                    raise
                if not failing:
                    log.warning("pulling from %s failed (%s); retrying", self.stream, exc)
                    failing = True
                await asyncio.sleep(RETRY_DELAY)
                continue
            failing = False
            for msg in msgs:
                await self.ack_pending()
                if self.durable:
                    self._unacked = msg
                events = self._events(msg)
                if events is not None:
                    yield events

    async def _pushed(self, msg: Msg) -> None:
        """The ordered consumer's callback: messages wait for batches() together.

        While FETCH_BATCH wait, it waits too: the client library then buffers
        them, and its flow control holds the server back.
        """
        while len(self._inbox) >= FETCH_BATCH:
            self._room.clear()
            await self._room.wait()
        self._inbox.append(msg)
        self._arrived.set()

    def _events(self, msg: Msg) -> list[wire.ClusterRecord | wire.ClusterGap] | None:
        """A message's events; None for one dropped unread or malformed."""
        if self.exclude_node is not None and msg.subject.endswith(self._excluded):
            return None
        try:
            batch = wire.parse_message(msg.subject, msg.headers, msg.data)
        except wire.WireError as exc:
            self.malformed += 1
            log.error("skipping a message: %s", exc)
            return None
        return self.tracker.events(batch)

    async def ack_pending(self) -> None:
        """Acknowledge the durable's last message handed out, if not yet done."""
        msg, self._unacked = self._unacked, None
        if msg is not None:
            await msg.ack()

    async def __aiter__(self) -> AsyncIterator[wire.ClusterRecord | wire.ClusterGap]:
        async for events in self.batches():
            for ev in events:
                yield ev

    async def close(self) -> None:
        subs, self.push, self.sub = (self.push, self.sub), None, None
        for sub in subs:
            if sub is None:
                continue
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, OSError) as exc:
                log.debug("unsubscribing: %s", exc)
