"""The relay core in-process: real SEQPACKET sockets, batches published by the test."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from notifyd import abi
from notifyd.broadcast import FLOOD_BYTES, Broadcaster
from notifyd.client import AsyncSubscriber, Gap, SeqTracker


def batch(first: int, n: int = abi.MAX_MESSAGE_RECORDS) -> bytes:
    return abi.encode(
        abi.Record(s, s, 0, 0, 0, 1, 0, 0, 0, abi.TYPE_OPEN) for s in range(first, first + n)
    )


def listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    sock.bind(str(tmp_path / "n.sock"))
    sock.listen(128)
    return sock


# A bound against hangs, not a timing.
UNTIL_BOUND = 20.0


async def until(pred, what: str, poll: float = 0.005) -> None:
    """Wait for ``pred()``, a state of the broadcaster that no event announces."""
    with trio.move_on_after(UNTIL_BOUND):
        while not pred():  # noqa: ASYNC110 - polled state, nothing to wait on
            await trio.sleep(poll)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def collect(sub: AsyncSubscriber, into: list[int], stop_at: int) -> None:
    while into[-1:] != [stop_at]:
        b = await sub.recv_batch()
        assert b is not None, "daemon side closed"
        into.extend(r[0] for r in abi.iter_fields(b))


async def test_sixteen_clients_get_identical_streams(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst)
    nb = 200
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        subs = [await AsyncSubscriber.connect(tmp_path / "n.sock") for _ in range(16)]
        streams: list[list[int]] = [[] for _ in subs]
        for sub, stream in zip(subs, streams, strict=True):
            nursery.start_soon(collect, sub, stream, nb * 64)
        for i in range(nb):
            relay.publish(batch(1 + i * 64))
            await trio.lowlevel.checkpoint()
        await until(lambda: all(s[-1:] == [nb * 64] for s in streams), "all streams")
        for sub in subs:
            await sub.aclose()
        nursery.cancel_scope.cancel()
    assert all(s == list(range(1, nb * 64 + 1)) for s in streams)
    assert relay.stats()["records_published"] == nb * 64
    lst.close()


async def test_a_stalled_client_loses_its_own_records_only(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst, queue_messages=8)
    nb = 1000
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        stalled = await AsyncSubscriber.connect(tmp_path / "n.sock")
        fast = [await AsyncSubscriber.connect(tmp_path / "n.sock") for _ in range(3)]
        streams: list[list[int]] = [[] for _ in fast]
        for sub, stream in zip(fast, streams, strict=True):
            nursery.start_soon(collect, sub, stream, nb * 64)
        for i in range(nb):
            relay.publish(batch(1 + i * 64))
            # the fast readers keep up: each publish lets them run to their next wait
            await until(lambda i=i: all(s[-1:] == [(i + 1) * 64] for s in streams), "fast", poll=0)
        (st_stalled,) = [c for c in relay.stats()["clients"] if c["id"] == 1]
        assert st_stalled["records_dropped"] > 0
        assert all(c["records_dropped"] == 0 for c in relay.stats()["clients"] if c["id"] != 1)
        # the stalled client resumes: what was queued, then a gap, then new records
        tracker = SeqTracker()
        events: list = []

        async def resume() -> None:
            while True:
                b = await stalled.recv_batch()
                assert b is not None
                events.extend(tracker.events(b))

        nursery.start_soon(resume)
        await until(lambda: relay.clients[1].stats()["queued_messages"] == 0, "its queue empty")
        relay.publish(batch(nb * 64 + 1, 1))
        await until(lambda: bool(events) and getattr(events[-1], "seq", 0) == nb * 64 + 1, "resume")
        nursery.cancel_scope.cancel()
    for sub in [stalled, *fast]:
        await sub.aclose()
    assert all(s == list(range(1, nb * 64 + 1)) for s in streams)
    gaps = [e for e in events if isinstance(e, Gap)]
    assert gaps
    assert sum(g.lost for g in gaps) == st_stalled["records_dropped"]
    assert events[0].seq == 1
    lst.close()


async def test_a_large_batch_goes_out_as_messages_of_64(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst, queue_messages=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        sub = await AsyncSubscriber.connect(tmp_path / "n.sock")
        await until(lambda: len(relay.clients) == 1, "the client")
        # 16 messages into a queue of 4: an empty queue takes any one batch
        relay.publish(batch(1, 1000))
        sizes = []
        with trio.fail_after(20):
            while sum(sizes) < 1000:
                sizes.append(len(await sub.recv_batch()) // abi.RECORD_SIZE)
        assert sizes == [64] * 15 + [40]
        # a full queue drops a whole batch; once drained, the next one fits
        relay.publish(batch(1001, 64 * 3))
        relay.publish(batch(1193, 64 * 2))
        relay.publish(batch(1321, 1))
        got = []
        with trio.fail_after(20):
            while not got or got[-1] != 1321:
                got += [r[0] for r in abi.iter_fields(await sub.recv_batch())]
        assert got == [*range(1001, 1193), 1321]
        assert relay.clients[1].stats()["records_dropped"] == 128
        await sub.aclose()
        nursery.cancel_scope.cancel()
    lst.close()


async def test_a_client_that_asks_gets_larger_messages_and_nobody_else_does(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst, queue_messages=64)
    asks = {
        "plain": None,
        "large": abi.encode_message_request(1024),
        "odd": abi.encode_message_request(200),  # rounded down to 192
        "huge": abi.encode_message_request(5000),  # at most 1024
        "bad version": abi.MESSAGE_REQUEST.pack(abi.MESSAGE_REQUEST_MAGIC, 2, 1024),
        "bad magic": abi.MESSAGE_REQUEST.pack(b"SNMX", 1, 1024),
        "too long": abi.encode_message_request(1024) + b"\0",
    }
    want_max = {"plain": 64, "large": 1024, "odd": 192, "huge": 1024}
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        subs = {}
        for name, ask in asks.items():
            subs[name] = await AsyncSubscriber.connect(tmp_path / "n.sock")
            if ask is not None:
                await subs[name].sock.send(ask)
        await until(lambda: len(relay.clients) == len(asks), "every client")
        asked = {"large": 1024, "odd": 192, "huge": 1024}
        await until(
            lambda: all(
                c.step == asked.get(name, 64) * abi.RECORD_SIZE
                for name, c in zip(asks, relay.clients.values(), strict=True)
            ),
            "the requests to be read",
        )
        relay.publish(batch(1, 2500))
        relay.publish(batch(2501, 10))
        for name, sub in subs.items():
            sizes, seqs = [], []
            with trio.fail_after(20):
                while seqs[-1:] != [2510]:
                    msg = await sub.sock.recv(abi.LARGE_MESSAGE_BYTES)
                    sizes.append(len(msg) // abi.RECORD_SIZE)
                    seqs += [r[0] for r in abi.iter_fields(msg)]
            assert seqs == list(range(1, 2511)), name
            top = want_max.get(name, 64)
            # each batch cut into messages of the client's size, never merged
            assert sizes == [top] * (2500 // top) + [2500 % top] + [10], name
        stats = relay.stats()["clients"]
        assert [c["message_records"] for c in stats] == [asked.get(n, 64) for n in asks]
        assert all(c["records_dropped"] == 0 for c in stats)
        assert all(c["queued_messages"] == 0 for c in stats)
        for sub in subs.values():
            await sub.aclose()
        nursery.cancel_scope.cancel()
    lst.close()


async def test_connect_then_publish_is_never_missed(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        for i in range(50):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.settimeout(20)
            c.connect(str(tmp_path / "n.sock"))
            # no checkpoint between connect() and publish: the accept loop never ran
            relay.publish(batch(1 + i, 1))
            got = await trio.to_thread.run_sync(c.recv, 4096)
            assert abi.decode(got)[0].seq == 1 + i
            c.close()
        nursery.cancel_scope.cancel()
    lst.close()


async def test_garbage_is_ignored_and_floods_disconnect(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        chatty = await AsyncSubscriber.connect(tmp_path / "n.sock")
        flood = await AsyncSubscriber.connect(tmp_path / "n.sock")
        await until(lambda: len(relay.clients) == 2, "2 clients")
        await chatty.sock.send(b"\xff" * 100)
        await chatty.sock.send(b"hello?")

        async def flood_until_closed() -> None:
            for _ in range(4 * FLOOD_BYTES // 4096):
                with trio.fail_after(20):
                    await flood.sock.send(b"x" * 4096)
            # the daemon closes after FLOOD_BYTES; the next recv sees the end
            with trio.fail_after(20):
                assert await flood.recv_batch() is None
                raise BrokenPipeError

        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            await flood_until_closed()
        await until(lambda: len(relay.clients) == 1, "the flooder gone")
        relay.publish(batch(1, 3))
        with trio.fail_after(20):
            got = await chatty.recv_batch()
        assert [r.seq for r in abi.decode(got)] == [1, 2, 3]
        await chatty.aclose()
        await flood.aclose()
        nursery.cancel_scope.cancel()
    lst.close()


async def test_connect_disconnect_cycles_leak_no_fds(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        before = len(os.listdir("/proc/self/fd"))
        for i in range(1000):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(str(tmp_path / "n.sock"))
            if i % 3 == 0:
                relay.publish(batch(1 + i, 1))
            if i % 5 == 0:
                await trio.lowlevel.checkpoint()
            c.close()
        await until(lambda: not relay.clients, "all disconnects seen")
        assert len(os.listdir("/proc/self/fd")) == before
        assert relay.stats()["clients_total"] == 1000
        nursery.cancel_scope.cancel()
    lst.close()


async def test_clients_beyond_the_limit_are_refused(tmp_path) -> None:
    lst = listener(tmp_path)
    relay = Broadcaster(lst, max_clients=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        subs = [await AsyncSubscriber.connect(tmp_path / "n.sock") for _ in range(3)]
        await until(lambda: relay.stats()["clients_refused"] == 1, "the refusal")
        with trio.fail_after(20):
            assert await subs[2].recv_batch() is None
        assert len(relay.clients) == 2
        for s in subs:
            await s.aclose()
        nursery.cancel_scope.cancel()
    lst.close()
