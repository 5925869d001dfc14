"""The three subscribers (blocking, trio, asyncio) give the same records and gaps.

Over a real SEQPACKET socket that a test server feeds with known batches:
records 1, 2, a gap, 4, then a malformed message.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest
import trio

from notifyd import abi
from notifyd.client import AsyncioSubscriber, AsyncSubscriber, Gap, Subscriber


def _rec(seq: int) -> abi.Record:
    return abi.Record(seq, 100 + seq, 0, 0, 0, 1, 0, 0, 0, abi.TYPE_OPEN)


EXPECTED = [_rec(1), _rec(2), Gap(2, 4), _rec(4), _rec(5), Gap(5, 9), _rec(9)]
BATCHES = [[_rec(1), _rec(2)], [_rec(4), _rec(5)], [_rec(9)]]


class Server:
    """Accepts one client, sends BATCHES then a 10-byte message, then closes."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "s.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            for batch in BATCHES:
                conn.send(abi.encode(batch))
            conn.send(b"\0" * 10)

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


def _read_all_blocking(sub: Subscriber, got: list[abi.Record | Gap]) -> None:
    got.extend(sub)


def test_blocking(server) -> None:
    got: list[abi.Record | Gap] = []
    with Subscriber(server.path, timeout=10) as sub, pytest.raises(abi.ABIError):
        _read_all_blocking(sub, got)
    assert got == EXPECTED
    assert sub.tracker.lost == 1 + 3


async def _read_all_trio(
    path: str, got: list[abi.Record | Gap], subs: list[AsyncSubscriber]
) -> None:
    async with await AsyncSubscriber.connect(path) as sub:
        subs.append(sub)
        async for ev in sub:
            got.append(ev)


async def test_trio(server) -> None:
    got: list[abi.Record | Gap] = []
    subs: list[AsyncSubscriber] = []
    with trio.fail_after(10), pytest.raises(abi.ABIError):
        await _read_all_trio(server.path, got, subs)
    assert got == EXPECTED
    assert subs[0].tracker.lost == 1 + 3


def test_asyncio(server) -> None:
    got: list[abi.Record | Gap] = []

    async def main() -> AsyncioSubscriber:
        async with await AsyncioSubscriber.connect(server.path) as sub:
            async for ev in sub:
                got.append(ev)
        return sub

    with pytest.raises(abi.ABIError, match="malformed message of 10 bytes"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert got == EXPECTED


def test_asyncio_end_of_stream_and_no_daemon(tmp_path) -> None:
    async def read_all(path: str) -> list[abi.Record | Gap]:
        async with await AsyncioSubscriber.connect(path) as sub:
            return [ev async for ev in sub]

    with pytest.raises(FileNotFoundError):
        asyncio.run(read_all(str(tmp_path / "none.sock")))
    path = str(tmp_path / "eos.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.send(abi.encode([_rec(3)]))
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert asyncio.run(asyncio.wait_for(read_all(path), 10)) == [_rec(3)]
    finally:
        t.join(10)
        srv.close()
