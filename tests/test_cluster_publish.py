"""The forwarder's publishing window against a real nats-server (2.15).

The window (several messages awaiting their acks) must keep each node's
records in order and once in the stream.  These tests put the stream in the
states a dropped connection can leave behind (a message stored or not, a
later one stored before it) and check what the forwarder's one-at-a-time
settling makes of them: the unit is the publisher, so it is driven in this
process with a real JetStream, without a daemon.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import nats
from cluster_support import NatsServer

from notifyd import abi
from notifyd.cluster import wire
from notifyd.cluster.forward import Forwarder, Identity, ensure_stream

STREAM = "PUBTEST"
FSID, NODE = "fs", "n1"
SUBJECT = wire.subject_for(FSID, NODE)


def records(first: int, last: int) -> bytes:
    return abi.encode((s, 1, 0, 0, 0, 1, 0, 0, 0, 5, 6, 0) for s in range(first, last + 1))


def feed(fwd: Forwarder, first: int, last: int, per_message: int = 64) -> None:
    """Put seq first..last into the backlog as the daemon would send them."""
    for s in range(first, last + 1, per_message):
        fwd._take("e1", records(s, min(s + per_message - 1, last)))


async def stored(js, subject: str = SUBJECT) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """(stream seq, Scoutfs-Notify-Seq) of every message of ``subject``, in stream order."""
    out = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append((msg.seq, (msg.headers or {})[wire.HDR_SEQ]))
        seq = msg.seq + 1


async def setup(url: str):  # type: ignore[no-untyped-def]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js, STREAM, SUBJECT, 1 << 28, 0, 1)
    fwd = Forwarder(
        js, Identity(FSID, NODE, False), Path("/nonexistent"), STREAM, max_batch=64, window=4
    )
    fwd._recv_epoch = "e1"
    return nc, js, fwd


def run(server: NatsServer, body) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        nc, js, fwd = await setup(server.url)
        try:
            await body(js, fwd)
        finally:
            await nc.close()

    asyncio.run(main())


def test_window_publishes_everything_in_order_once(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            feed(fwd, 1, 64 * 40)
            assert await fwd.drain(30)
            got = await stored(js)
            assert [h for _, h in got] == [f"{s}-{s + 63}" for s in range(1, 64 * 40, 64)]
            assert fwd.counters.published == 64 * 40
            assert fwd.counters.duplicates == 0
            assert fwd.last_stream_seq == got[-1][0]

        run(server, body)
    finally:
        server.stop()


def test_settling_drops_a_message_a_later_one_overtook(tmp_path: Path) -> None:
    """m1's connection dropped, m2 went out on the next one and is stored: m1
    can no longer go in order, so it is dropped (consumers see the gap) and
    m2 is not stored twice."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            feed(fwd, 1, 64)
            assert await fwd.drain(30)  # m0: the last message known stored
            feed(fwd, 65, 192)
            m1, m2 = fwd._next_out(), fwd._next_out()
            # what the lost connection left: m2 stored, m1 not
            await js.publish(SUBJECT, m2.payload, headers=dict(m2.hdrs))
            fwd._inflight = collections.deque([m1, m2])
            fwd._settling = True
            feed(fwd, 193, 256)
            assert await fwd.drain(30)
            got = [h for _, h in await stored(js)]
            assert got == ["1-64", "129-192", "193-256"]
            assert fwd.counters.lost_unordered == 64
            assert fwd.counters.duplicates == 1  # m2's re-send

        run(server, body)
    finally:
        server.stop()


def test_settling_confirms_messages_stored_without_an_ack(tmp_path: Path) -> None:
    """Both messages of the window were stored but no ack came: the re-sends
    are refused or dropped as duplicates, nothing is stored twice or lost."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            feed(fwd, 1, 128)
            m1, m2 = fwd._next_out(), fwd._next_out()
            for m in (m1, m2):
                await js.publish(SUBJECT, m.payload, headers=dict(m.hdrs))
            fwd._inflight = collections.deque([m1, m2])
            fwd._settling = True
            assert await fwd.drain(30)
            assert [h for _, h in await stored(js)] == ["1-64", "65-128"]
            assert fwd.counters.lost_unordered == 0
            assert fwd.counters.published == 128
            assert fwd.counters.duplicates == 2

        run(server, body)
    finally:
        server.stop()


def test_a_window_broken_by_a_dead_server_resumes_in_order(tmp_path: Path) -> None:
    """The server dies with messages in flight and comes back on the same port:
    every record ends up in the stream once, in order, or counted as lost."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            acked = asyncio.Event()
            fwd.observe_publish = lambda _s: acked.set()
            feed(fwd, 1, 64 * 20)
            pump = asyncio.create_task(fwd.publish_forever())
            await asyncio.wait_for(acked.wait(), 30)
            server.kill()
            feed(fwd, 64 * 20 + 1, 64 * 40)
            await asyncio.sleep(0.5)
            server.start()
            pump.cancel()
            assert await fwd.drain(60)
            heads = [h for _, h in await stored(js)]
            firsts = [int(h.split("-")[0]) for h in heads]
            assert firsts == sorted(set(firsts)), heads
            kept = sum(int(h.split("-")[1]) - int(h.split("-")[0]) + 1 for h in heads)
            assert kept + fwd.counters.lost_unordered == 64 * 40

        run(server, body)
    finally:
        server.stop()
