"""Months of uptime: what the processes keep per file, per client or per log line is bounded.

Structural checks, never timings or memory figures: after many distinct
files (or clients), each structure holds at most its documented bound.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from shim_support import EVENT_TIMEOUT

from notifyd import abi

# distinct files a replay test goes through: many times the bounds below
FILES = 2000


def _record(ino: int, rec_type: int, time_ns: int = 0) -> abi.Record:
    return abi.Record(
        seq=1,
        ino=ino,
        time_ns=time_ns,
        pos=0,
        count=1,
        pid=1,
        uid=0,
        gid=0,
        flags=0,
        type=rec_type,
    )


def test_metrics_pending_times_only_records_the_shim_replays() -> None:
    """A record of a type the shim skips (docs/ABI.md: consumers skip types they do not
    know) is never replayed nor lost: its time must not wait in the latency map, where
    it would stay until evicted and time a later replay of the file from itself."""
    from notifyd.metrics import PENDING_LIMIT, ShimMetrics

    m = ShimMetrics()
    unknown = max(abi.TYPE_NAMES) + 1
    for ino in range(FILES):
        m.on_event(_record(ino, unknown), own=False)
    assert len(m._pending) == 0
    assert m.records_in == FILES
    # and however many distinct files are read, the map holds at most its bound
    for ino in range(PENDING_LIMIT + FILES):
        m.on_event(_record(ino, abi.TYPE_OPEN), own=False)
    assert len(m._pending) == PENDING_LIMIT


def test_client_churn_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """A poller connecting once a second for an hour: a few windows' worth of clients
    get their lines, the rest are counted in one line per window."""
    from notifyd.broadcast import CLIENT_LOG_BURST, CLIENT_LOG_INTERVAL, _LogBudget

    now = [0.0]
    budget = _LogBudget(CLIENT_LOG_BURST, CLIENT_LOG_INTERVAL, clock=lambda: now[0])
    clients = 3600
    with caplog.at_level(logging.INFO, logger="notifyd.broadcast"):
        allowed = 0
        for second in range(clients):
            now[0] = float(second)
            allowed += budget.allow()
        budget.flush()
    summaries = [r.getMessage() for r in caplog.records]
    counted = sum(int(line.split()[0]) for line in summaries)
    assert allowed + counted == clients
    # each logged client costs a connect and a disconnect line: a tenth of a line
    # per client at most (before the window was long, two lines per client)
    assert 2 * allowed + len(summaries) <= clients // 10, (allowed, len(summaries))


async def test_replayer_holds_at_most_max_open_synthetic_opens(tmp_path: Path) -> None:
    """Unit test of the parking alone (no closer runs): however many replays end
    before the closer's next tick, at most ``max_open`` opens stay held; the rest
    are handed to the closer at once."""
    from compat.inotify_shim.replay import Replayer, ReplayThreads, _File
    from compat.inotify_shim.resolve import Resolver

    limiter = trio.CapacityLimiter(1)
    resolver = Resolver(str(tmp_path), lambda ino: None, limiter)
    max_open = 16
    replayer = Replayer(str(tmp_path), resolver, ReplayThreads(), limiter, max_open=max_open)
    (tmp_path / "f").write_bytes(b"x")
    fds = [os.open(tmp_path / "f", os.O_RDONLY) for _ in range(3 * max_open)]
    try:
        for ino, fd in enumerate(fds, 1):
            f = replayer._files[ino] = _File(ino, fd=fd, busy=True)
            replayer._settle(f)  # as a worker's replay ends
            assert len(replayer._open) <= max_open
        # the newest are the ones kept; every other one is on its way to be closed
        assert list(replayer._open) == list(range(2 * max_open + 1, 3 * max_open + 1))
        assert len(replayer._closing) == 2 * max_open
        assert all(f.busy for f in replayer._closing)
    finally:
        for fd in fds:
            os.close(fd)


async def test_replayer_forgets_every_file_once_replayed_and_closed(tmp_path: Path) -> None:
    """After FILES distinct files, the replayer held at most ``max_open`` opens at any
    time and keeps no state for any file once their opens closed."""
    from compat.inotify_shim.replay import Replayer, ReplayThreads
    from compat.inotify_shim.resolve import Resolver

    for i in range(FILES):
        (tmp_path / f"f{i}").write_bytes(b"x")
    inos = [os.stat(tmp_path / f"f{i}").st_ino for i in range(FILES)]
    limiter = trio.CapacityLimiter(2)
    resolver = Resolver(str(tmp_path), lambda ino: None, limiter)
    max_pending, max_open = 64, 16
    # the mount point is BACKING itself: synthetic opens of a plain directory
    replayer = Replayer(
        str(tmp_path),
        resolver,
        ReplayThreads(),
        limiter,
        workers=2,
        max_pending=max_pending,
        max_open=max_open,
        close_after=0.05,
    )
    most_open = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(replayer.run)
        with trio.fail_after(EVENT_TIMEOUT * 4):
            for start in range(0, FILES, 32):
                for ino in inos[start : start + 32]:
                    replayer.submit(abi.TYPE_OPEN, ino)
                    replayer.submit(abi.TYPE_READ, ino)
                replayer.flush()
                most_open = max(most_open, len(replayer._open))
                # a daemon's pace: the next message once this one is taken
                while replayer.snapshot()["files_waiting"] > max_pending // 2:
                    most_open = max(most_open, len(replayer._open))
                    await trio.sleep(0.01)
            st = replayer.stats
            while st.replayed + st.collapsed + sum(st.losses()) < 2 * FILES or replayer._files:
                most_open = max(most_open, len(replayer._open))
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert replayer.stats.replayed == 2 * FILES, replayer.stats
    assert most_open <= max_open
    assert not replayer._files
    assert not replayer._open
    assert not replayer._closing


async def test_access_under_a_renamed_directory_walks_backing_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off scoutfs, a directory renamed on BACKING keeps its old name in the overlay's
    table, so every access under it comes back stale.  The index walked after the
    first one knows the new name: later ones use it (checked) instead of walking all of
    BACKING again each, which grew the shim's CPU with every directory renamed."""
    from compat.inotify_shim import resolve

    walks = []
    real_walk = resolve.walk_index

    def counting_walk(backing: str, limit: int) -> tuple[dict[int, str], bool]:
        walks.append(backing)
        return real_walk(backing, limit)

    monkeypatch.setattr(resolve, "walk_index", counting_walk)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_bytes(b"x")
    ino = os.stat(tmp_path / "new" / "f").st_ino
    stale = os.path.join("old", "f")  # what the overlay's table still says

    def known(i: int) -> str | None:
        return str(tmp_path / stale) if i == ino else None

    resolver = resolve.Resolver(str(tmp_path), known, trio.CapacityLimiter(1))
    for _ in range(3):
        path = await resolver.resolve(ino, trio.current_time(), stale=stale)
        assert path == os.path.join("new", "f")
    assert len(walks) == 1
    # an index path that no longer leads to the file is not taken: BACKING is walked
    os.rename(tmp_path / "new", tmp_path / "newer")
    path = await resolver.resolve(ino, trio.current_time(), stale=stale)
    assert path == os.path.join("newer", "f")
    assert len(walks) == 2


def test_shim_latency_is_timed_from_the_records_a_replay_answers() -> None:
    """ShimMetrics alone: a record that raised no event (``on_lost``) is not the start of
    the next replay's latency; that replay is timed from the record it answers."""
    import time

    from notifyd.metrics import ShimMetrics

    m = ShimMetrics()
    hour = 3600 * 10**9
    m.on_event(_record(7, abi.TYPE_READ, time.time_ns() - hour), own=False)
    m.on_lost(7)
    m.on_event(_record(7, abi.TYPE_READ, time.time_ns()), own=False)
    m.on_replayed(7)
    assert m.latency._sum.get() < 60  # type: ignore[attr-defined]
