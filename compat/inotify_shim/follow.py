"""Follow the daemon's socket and hand each record to the replayer.

The shim serves files whether or not a daemon is running: this task connects
when it can, and reconnects with backoff when the daemon restarts.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from typing import NoReturn

import trio

from notifyd import abi
from notifyd.client import AsyncSubscriber, Gap
from notifyd.peer import UntrustedPeerError, check_peer

from .replay import Replayer

__all__ = ["FollowState", "follow"]

log = logging.getLogger(__name__)

# Reconnect backoff: quick at first (a daemon restart takes well under a
# second), capped so a daemon that never comes costs nothing.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0

_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED})
# what waiting_logged holds once an untrusted server was reported (not an errno)
_UNTRUSTED = -1


@dataclasses.dataclass
class FollowState:
    """The connection to the daemon, for the stats socket."""

    connected: bool = False
    connections: int = 0
    own_skipped: int = 0  # records of the shim's own passthrough accesses

    def snapshot(self) -> dict[str, object]:
        return dataclasses.asdict(self)


async def follow(
    socket_path: str,
    replayer: Replayer,
    own_pid: int | None = None,
    *,
    state: FollowState | None = None,
    on_event: Callable[[abi.Record | Gap, bool], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Replay every record from ``socket_path`` until cancelled.

    Records from ``own_pid`` (default: this process) are skipped: they are
    the shim's own passthrough accesses to BACKING, for which the kernel has
    already raised the events on the overlay.  ``on_event`` (metrics) sees
    every record and gap, with whether the record is the shim's own.
    """
    own = os.getpid() if own_pid is None else own_pid
    state = state or FollowState()
    backoff = BACKOFF_MIN
    waiting_logged: int | None = None  # the errno last reported while waiting
    task_status.started()
    while True:
        try:
            sub = await AsyncSubscriber.connect(socket_path)
        except OSError as exc:
            # never fatal: the overlay keeps serving files while we retry
            if exc.errno != waiting_logged:
                level = logging.INFO if exc.errno in _ABSENT_ERRNOS else logging.WARNING
                log.log(level, "waiting for scoutfs-notifyd at %s (%s)", socket_path, exc.strerror)
                waiting_logged = exc.errno
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        try:
            check_peer(sub.sock, socket_path)
        except UntrustedPeerError as exc:
            # a squatter's records would make the shim open files as root
            if waiting_logged != _UNTRUSTED:
                log.error("%s", exc)
                waiting_logged = _UNTRUSTED
            await sub.aclose()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        log.info("subscribed to %s", socket_path)
        backoff = BACKOFF_MIN
        waiting_logged = None
        state.connected = True
        state.connections += 1
        try:
            async with sub:
                await _pump(sub, replayer, own, state, on_event)
        except abi.ABIError as exc:
            log.error("dropping the connection to %s: %s", socket_path, exc)
        except OSError as exc:
            log.warning("connection to %s failed: %s", socket_path, exc)
        else:
            log.warning("scoutfs-notifyd closed %s; reconnecting", socket_path)
        finally:
            state.connected = False
        await trio.sleep(backoff)


async def _pump(
    sub: AsyncSubscriber,
    replayer: Replayer,
    own: int,
    state: FollowState,
    on_event: Callable[[abi.Record | Gap, bool], None] | None = None,
) -> None:
    submit = replayer.submit
    types = abi.INOTIFY_TYPES
    # a message at a time, its records in a plain loop: no async generator step
    # (and no trio checkpoint) per record
    while (batch := await sub.recv_batch()) is not None:
        for ev in sub.tracker.events(batch):
            if on_event is not None:
                on_event(ev, isinstance(ev, abi.Record) and ev.pid == own)
            if isinstance(ev, Gap):
                log.debug("seq gap: records %d to %d lost", ev.last_seq + 1, ev.next_seq - 1)
                replayer.lost_in_gap(ev.lost)
                continue
            if ev.type not in types:
                continue
            if ev.pid == own:
                state.own_skipped += 1
                continue
            submit(ev.type, ev.ino)
        replayer.flush()
