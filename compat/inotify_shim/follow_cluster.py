"""``scoutfs-notify-shim --nats URL``: replay accesses made on the other nodes too.

The shim's own node keeps coming from the local daemon's socket (follow.py:
lower latency, and it works while NATS is away); from the cluster stream it
takes every *other* node's records of its own filesystem only, so each
record is replayed once.  Its own node's messages are dropped in the
consumer's asyncio thread, unread (``exclude_node``): they would cost a
hand-off to trio each, and the replays on this overlay make one such record
per replayed access.  ``ino`` is cluster-wide on scoutfs: it resolves on
the local mount as a local record does.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import NoReturn

import trio

from notifyd import abi, ioctls
from notifyd.cluster.bridge import TrioClusterSubscriber
from notifyd.cluster.server import ClusterError, credentials_from_args
from notifyd.cluster.wire import ClusterGap, WireError, check_token

from .replay import Replayer

__all__ = ["check_cluster_args", "cluster_identity", "follow_cluster"]

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0


def cluster_identity(
    backing: str, socket_path: str, fsid: str | None, node: str | None
) -> tuple[str, str]:
    """(fsid, own node) as this node's forwarder publishes them."""
    fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        real_fsid, rid = ioctls.statfs_more(fd)
        return f"{real_fsid:016x}", f"{rid:016x}"
    except ioctls.NotScoutfsError:
        pass
    finally:
        os.close(fd)
    try:
        fsid = check_token("fsid", fsid or Path(socket_path).parent.name)
        node = check_token("node", node or socket.gethostname().split(".")[0])
    except WireError as exc:
        raise ClusterError(str(exc)) from None
    return fsid, node


def check_cluster_args(args: argparse.Namespace, backing: str, socket_path: str) -> str | None:
    """Why the cluster options cannot work (for an error before mounting), or None."""
    if not args.nats:
        return None
    try:
        credentials_from_args(args)
        cluster_identity(backing, socket_path, args.fsid, args.node)
    except (ClusterError, OSError) as exc:
        return str(exc)
    return None


async def follow_cluster(
    args: argparse.Namespace,
    backing: str,
    socket_path: str,
    replayer: Replayer,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Replay other nodes' records of BACKING's filesystem until cancelled."""
    cred = credentials_from_args(args)
    fsid, own = cluster_identity(backing, socket_path, args.fsid, args.node)
    task_status.started()
    backoff = BACKOFF_MIN
    submit = replayer.submit
    while True:
        try:
            async with TrioClusterSubscriber(
                args.nats,
                cred,
                stream=args.stream,
                fsid=fsid,
                name="scoutfs-notify-shim",
                exclude_node=own,
            ) as sub:
                log.info(
                    "following the other nodes of %s on %s (this node, %s, from %s)",
                    fsid,
                    args.nats,
                    own,
                    socket_path,
                )
                backoff = BACKOFF_MIN
                async for events in sub.batches():
                    for ev in events:
                        if isinstance(ev, ClusterGap):
                            log.warning(
                                "lost %d records of node %s before seq %d: their events "
                                "will not appear",
                                ev.lost,
                                ev.node,
                                ev.next_seq,
                            )
                            continue
                        rec = ev.record
                        if rec.type in abi.INOTIFY_TYPES:
                            submit(rec.type, rec.ino)
                    # once per message, as follow.py does: an OPEN and the
                    # READs after it make one job
                    replayer.flush()
        except ClusterError as exc:
            log.warning("cluster stream: %s; retrying", exc)
        except Exception as exc:  # never fatal: the overlay keeps serving
            log.warning("cluster stream failed: %s; retrying", exc)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)
