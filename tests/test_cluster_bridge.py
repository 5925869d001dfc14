"""The trio side of the cluster consumer (notifyd/cluster/bridge.py) against a real nats-server.

The shim takes every node's messages but its own through this bridge: its own
node's messages must never cross to trio, and a trio side slower than the
stream must get every message in order (the asyncio side waits for credits,
it never overfills the channel).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import trio
from cluster_support import NatsServer

from notifyd import abi
from notifyd.cluster import bridge, wire
from notifyd.cluster.consume import StartAt
from notifyd.cluster.forward import ensure_stream
from notifyd.cluster.server import Credentials

STREAM = "BRIDGETEST"
FSID = "fs"


def publish_all(url: str, messages: list[tuple[str, int]]) -> None:
    """Publish one record per (node, seq), in this order, as forwarders would."""

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_stream(js, STREAM, wire.subject_for(FSID, "x"), 1 << 28, 0, 1)
        for node, seq in messages:
            payload = abi.encode([(seq, 1, 0, 0, 0, 1, 0, 0, 0, 5, 6, 0)])
            hdrs = wire.headers_for(FSID, node, "e1", seq, seq, 0)
            await js.publish(wire.subject_for(FSID, node), payload, stream=STREAM, headers=hdrs)
        await nc.close()

    asyncio.run(main())


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = NatsServer(tmp_path, "bridge")
    s.start()
    yield s
    s.stop()


@pytest.mark.trio
async def test_own_node_never_crosses_and_a_slow_trio_side_gets_all_in_order(
    server: NatsServer,
) -> None:
    count = bridge.CHANNEL_MESSAGES * 8
    # own node's messages between every other one; the last message is the
    # other node's, so once it arrived every own message before it was dropped
    messages = [m for seq in range(1, count + 1) for m in (("own", seq), ("other", seq))]
    await trio.to_thread.run_sync(publish_all, server.url, messages)
    got: list[tuple[str, int]] = []
    with trio.fail_after(60):
        async with bridge.TrioClusterSubscriber(
            server.url,
            Credentials(),
            stream=STREAM,
            fsid=FSID,
            start=StartAt.all(),
            exclude_node="own",
        ) as sub:
            async for events in sub.batches():
                # slower than the stream: the asyncio side runs out of credits
                await trio.sleep(0.001)
                got.extend((ev.node, ev.record.seq) for ev in events)
                if got[-1] == ("other", count):
                    break
    assert got == [("other", seq) for seq in range(1, count + 1)]
