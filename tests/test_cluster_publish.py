"""The forwarder's publisher against a real nats-server (2.15).

Each node's records must be in the stream in order and once.  These tests put
the stream in the states a lost ack or a dead server leave behind and check
what the forwarder makes of them: the unit is the publisher, so it is driven
in this process with a real JetStream, without a daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from cluster_support import NatsServer

from notifyd import abi
from notifyd.cluster import wire
from notifyd.cluster.forward import (
    HEADER_ROOM,
    MAX_BATCH_RECORDS,
    READ_BURST,
    Forwarder,
    Identity,
    batch_records,
    daemon_message_records,
    ensure_stream,
)
from notifyd.cluster.server import ClusterError

STREAM = "PUBTEST"
FSID, NODE = "fs", "n1"
SUBJECT = wire.subject_for(FSID, NODE)


def records(first: int, last: int) -> bytes:
    return abi.encode((s, 1, 0, 0, 0, 1, 0, 0, 0, 5, 6, 0) for s in range(first, last + 1))


def feed(fwd: Forwarder, first: int, last: int, per_message: int = 64) -> None:
    """Put seq first..last into the backlog as the daemon would send them."""
    for s in range(first, last + 1, per_message):
        fwd._take("e1", records(s, min(s + per_message - 1, last)))


@contextlib.contextmanager
def fake_daemon(path: Path, send: Callable[[socket.socket], None]) -> Iterator[None]:
    """A daemon's socket at ``path``: its first client gets what ``send``
    sends to it, from a thread of its own."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    conn: list[socket.socket] = []

    def serve() -> None:
        c, _ = listener.accept()
        conn.append(c)
        send(c)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        for c in conn:
            c.close()
        listener.close()


def watched_forwarder(js, sock_path: Path, total: int) -> tuple[Forwarder, asyncio.Event]:  # type: ignore[no-untyped-def]
    """A forwarder of the daemon's socket at ``sock_path``, and an event set
    once the stream holds ``total`` records from it."""
    fwd = Forwarder(js, Identity(FSID, NODE, False), sock_path, STREAM)
    all_stored = asyncio.Event()

    def observe(_seconds: float) -> None:
        # called before the acked message (_current) is counted
        current = fwd._current.count if fwd._current else 0
        if fwd.counters.published + current == total:
            all_stored.set()

    fwd.observe_publish = observe
    return fwd, all_stored


async def stored_messages(js, subject: str = SUBJECT) -> list:  # type: ignore[no-untyped-def]
    """Every message of ``subject`` in the stream, in stream order."""
    out = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(msg)
        seq = msg.seq + 1


async def stored(js, subject: str = SUBJECT) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """(stream seq, Scoutfs-Notify-Seq) of every message of ``subject``, in stream order."""
    return [(m.seq, (m.headers or {})[wire.HDR_SEQ]) for m in await stored_messages(js, subject)]


async def setup(url: str):  # type: ignore[no-untyped-def]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js, STREAM, SUBJECT, 1 << 28, 0, 1)
    fwd = Forwarder(js, Identity(FSID, NODE, False), Path("/nonexistent"), STREAM, max_batch=64)
    fwd._recv_epoch = "e1"
    return nc, js, fwd


def run(server: NatsServer, body, timeout: float | None = None) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        nc, js, fwd = await setup(server.url)
        try:
            await asyncio.wait_for(body(js, fwd), timeout)
        finally:
            await nc.close()

    asyncio.run(main())


def test_publishes_everything_in_order_once(tmp_path: Path) -> None:
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
            assert fwd.counters.messages == 40

        run(server, body)
    finally:
        server.stop()


def test_a_message_stored_without_an_ack_is_not_stored_again(tmp_path: Path) -> None:
    """The message was stored but its ack was lost: the re-send under the same
    Nats-Msg-Id is dropped by the stream, the forwarder counts it once."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            feed(fwd, 1, 64 * 2)
            out = fwd._next_out()
            # the first attempt, whose ack the forwarder never saw
            await js.publish(SUBJECT, out.payload, headers=dict(out.hdrs))
            await fwd._publish(out)
            assert await fwd.drain(30)
            assert [h for _, h in await stored(js)] == ["1-64", "65-128"]
            assert fwd.counters.duplicates == 1
            assert fwd.counters.published == 128

        run(server, body)
    finally:
        server.stop()


def test_a_server_dead_while_publishing_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The server goes away with a message in flight and comes back on the same port:
    every record ends up in the stream exactly once, in order."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:

        async def body(js, fwd: Forwarder) -> None:  # type: ignore[no-untyped-def]
            acked = asyncio.Event()
            fwd.observe_publish = lambda _s: acked.set()
            feed(fwd, 1, 64 * 40)
            pump = asyncio.create_task(fwd.publish_forever())
            await asyncio.wait_for(acked.wait(), 30)
            # stopped, not killed: a lone server killed with -9 loses messages
            # it acked and had not yet written (JetStream's file store)
            server.stop()
            feed(fwd, 64 * 40 + 1, 64 * 80)
            server.start()
            pump.cancel()
            assert await fwd.drain(60)
            heads = [h for _, h in await stored(js)]
            assert heads == [f"{s}-{s + 63}" for s in range(1, 64 * 80, 64)]
            assert fwd.counters.published == 64 * 80

        run(server, body)
    finally:
        server.stop()


def test_reused_chunks_keep_every_payload_whole_across_a_dead_server(
    tmp_path: Path,
) -> None:
    """The reader reads a daemon's socket into chunks that are reused once
    their message is stored, and goes on reading while the publisher re-sends
    a message the stopped server never acked: the stream ends up with every
    record once, in order, byte for byte.  A chunk read into again before its
    message was stored repeats or skips records in the payloads (the headers
    alone would not show it)."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    per_half = 64 * 800
    sock_path = tmp_path / "daemon.sock"
    second_half, sent_all = threading.Event(), threading.Event()

    def send(c: socket.socket) -> None:
        for s in range(1, 2 * per_half + 1, 64):
            if s == per_half + 1:
                second_half.wait(60)
            c.sendall(records(s, s + 63))
        sent_all.set()

    try:

        async def body(js, _unused: Forwarder) -> None:  # type: ignore[no-untyped-def]
            # many chunks per half: the spares run out while the server is away
            fwd = Forwarder(js, Identity(FSID, NODE, False), sock_path, STREAM, max_batch=256)
            acked, all_stored = asyncio.Event(), asyncio.Event()

            def observe(_seconds: float) -> None:
                acked.set()
                # called before the acked message (_current) is counted
                current = fwd._current.count if fwd._current else 0
                if fwd.counters.published + current == 2 * per_half:
                    all_stored.set()

            fwd.observe_publish = observe
            reader = asyncio.create_task(fwd.read_daemon())
            pump = asyncio.create_task(fwd.publish_forever())
            await asyncio.wait_for(acked.wait(), 30)
            server.stop()
            second_half.set()
            # sent: in the reader's chunks, but for what the socket still holds
            assert await asyncio.to_thread(sent_all.wait, 60)
            server.start()
            await all_stored.wait()
            pump.cancel()
            reader.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)
            seqs = [r.seq for r in abi.decode(await stored_payloads(js))]
            assert seqs == list(range(1, 2 * per_half + 1))
            assert fwd.counters.lost_reported == 0

        with fake_daemon(sock_path, send):
            run(server, body, timeout=120)
    finally:
        server.stop()


async def stored_payloads(js) -> bytes:  # type: ignore[no-untyped-def]
    """Every payload of SUBJECT, in stream order, joined."""
    return b"".join(m.data for m in await stored_messages(js))


def test_messages_fit_the_servers_max_payload() -> None:
    assert batch_records(1 << 20) == MAX_BATCH_RECORDS
    assert batch_records(1 << 20) * abi.RECORD_SIZE + HEADER_ROOM <= 1 << 20
    assert batch_records(64 << 10) == ((64 << 10) - HEADER_ROOM) // abi.RECORD_SIZE
    with pytest.raises(ClusterError, match="max_payload is 4096 bytes"):
        batch_records(4096)


def test_the_daemon_is_asked_for_messages_that_fill_a_stream_message_whole() -> None:
    for max_payload in (1 << 20, 256 << 10, 64 << 10, 9000, 8 << 20):
        batch = batch_records(max_payload)
        asked = daemon_message_records(batch)
        assert asked % abi.MAX_MESSAGE_RECORDS == 0
        assert abi.MAX_MESSAGE_RECORDS <= asked <= abi.LARGE_MESSAGE_RECORDS
        units = batch // abi.MAX_MESSAGE_RECORDS
        # the largest such size whose whole messages fill the stream message
        assert (units * abi.MAX_MESSAGE_RECORDS) % asked == 0, (max_payload, asked)
        assert all(
            (units * abi.MAX_MESSAGE_RECORDS) % bigger
            for bigger in range(asked + 64, abi.LARGE_MESSAGE_RECORDS + 1, 64)
        ), (max_payload, asked)
    assert daemon_message_records(MAX_BATCH_RECORDS) == 960  # 17 to a message


def test_a_burst_read_from_the_socket_keeps_its_gaps_and_skips_a_malformed_message(
    tmp_path: Path,
) -> None:
    """Messages read in one burst are accounted for together when their seqs
    follow on; a burst with a gap in it, or a message that is not whole
    records, is taken apart: the records are stored once, in order, the gap
    is the Lost header of the message after it, and the bad message alone
    is skipped."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    sock_path = tmp_path / "daemon.sock"
    # all sent before the forwarder reads, so they come in one or two bursts
    messages = [
        records(1, 64),
        records(65, 128),
        records(161, 224),  # 129-160 lost
        records(225, 234),
        b"\0" * 100,  # not whole records
        records(235, 298),
        records(301, 310),  # 299-300 lost
    ]
    want = [*range(1, 129), *range(161, 299), *range(301, 311)]

    def send(c: socket.socket) -> None:
        for m in messages:
            c.sendall(m)

    try:

        async def body(js, _unused: Forwarder) -> None:  # type: ignore[no-untyped-def]
            fwd, all_stored = watched_forwarder(js, sock_path, len(want))
            reader = asyncio.create_task(fwd.read_daemon())
            pump = asyncio.create_task(fwd.publish_forever())
            await all_stored.wait()
            pump.cancel()
            reader.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)
            got = await stored_messages(js)
            seqs = [r.seq for r in abi.decode(b"".join(m.data for m in got))]
            assert seqs == want
            lost = {
                int(m.headers[wire.HDR_SEQ].partition("-")[0]): int(m.headers[wire.HDR_LOST])
                for m in got
                if wire.HDR_LOST in (m.headers or {})
            }
            assert lost == {161: 32, 301: 2}
            assert fwd.counters.received == len(want)
            assert fwd.counters.lost_daemon == fwd.counters.lost_reported == 34

        with fake_daemon(sock_path, send):
            run(server, body, timeout=60)
    finally:
        server.stop()


def test_the_last_of_a_burst_goes_out_when_the_socket_holds_no_more(tmp_path: Path) -> None:
    """A read burst that ends at READ_BURST messages does not know whether the
    socket holds more; when it holds none, no wake-up of the loop will come,
    so the chunk must go out then, not wait for a next message."""
    server = NatsServer(tmp_path, "n1")
    server.start()
    sock_path = tmp_path / "daemon.sock"
    total = 2 * READ_BURST
    accepted, go, sent_all = threading.Event(), threading.Event(), threading.Event()

    def send(c: socket.socket) -> None:
        accepted.set()
        go.wait(30)
        for s in range(1, total + 1):
            c.sendall(records(s, s))
        sent_all.set()

    try:

        async def body(js, _unused: Forwarder) -> None:  # type: ignore[no-untyped-def]
            fwd, all_stored = watched_forwarder(js, sock_path, total)
            pump = asyncio.create_task(fwd.publish_forever())
            reader = asyncio.create_task(fwd.read_daemon())
            assert await asyncio.to_thread(accepted.wait, 30)
            # every message waits in the socket before the first read: the
            # loop that reads is held until they were sent
            go.set()
            assert sent_all.wait(30)
            try:
                await asyncio.wait_for(all_stored.wait(), 20)
            finally:
                pump.cancel()
                reader.cancel()
                await asyncio.gather(pump, reader, return_exceptions=True)
            seqs = [r.seq for r in abi.decode(await stored_payloads(js))]
            assert seqs == list(range(1, total + 1))
            # each record counted once: a count too high holds --backlog room for ever
            assert fwd.counters.received == total
            assert fwd.unpublished == 0

        with fake_daemon(sock_path, send):
            run(server, body, timeout=60)
    finally:
        server.stop()
