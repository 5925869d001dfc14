"""The replayer's and the resolver's timers, on trio's MockClock (autojump).

No FUSE here: the "mount point" is a plain directory, where the synthetic
opens and closes are real ones; only the clock is virtual.  With autojump
the clock moves whenever every task waits, worker threads included, so the
checks bound what the code promises (a close between ``close_after`` and
1.25 x ``close_after`` after the last action; one walk of BACKING per
``MIN_RESCAN_INTERVAL``) instead of reading its state.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from compat.inotify_shim import resolve
from compat.inotify_shim.replay import Replayer, ReplayThreads
from compat.inotify_shim.resolve import MIN_RESCAN_INTERVAL, Resolver
from notifyd import abi

CLOSE_AFTER = 0.4
# virtual seconds between looks at /proc/self/fd
POLL = 0.001
# autojump moves the clock while a worker thread runs (every task waits on
# it), by POLL steps: what a close in a thread may add to the virtual time
SLACK = 0.05


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def open_on(path: Path) -> bool:
    """Whether this process holds an fd on ``path``."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


async def until(check, what: str) -> float:
    """The virtual time at which ``check()`` first holds, looking every POLL."""
    with trio.fail_after(60):
        # polling is the point: /proc/self/fd is what can be observed
        while not check():  # noqa: ASYNC110
            await trio.sleep(POLL)
    return trio.current_time()


@pytest.mark.trio
async def test_a_synthetic_open_closes_after_close_after(tmp_path: Path, autojump_clock) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    limiter = trio.CapacityLimiter(4)
    resolver = Resolver(str(tmp_path), lambda ino: None, limiter)
    replayer = Replayer(str(tmp_path), resolver, ReplayThreads(), limiter, close_after=CLOSE_AFTER)
    async with trio.open_nursery() as nursery:
        await nursery.start(replayer.run)
        for n in (1, 2):
            replayer.submit(abi.TYPE_OPEN, f.stat().st_ino)
            # the linger starts when the replay is settled, on the trio thread
            settled = await until(lambda n=n: replayer.stats.replayed == n, "the replay")
            assert open_on(f)
            await trio.sleep(CLOSE_AFTER - 2 * POLL)
            assert open_on(f)
            closed = await until(lambda: not open_on(f), "the close")
            # the clock jumps while the closing thread runs: SLACK for that
            assert closed - settled <= 1.25 * CLOSE_AFTER + SLACK
        nursery.cancel_scope.cancel()
    assert replayer.stats.replayed == 2


@pytest.mark.trio
async def test_past_max_open_the_oldest_closes_early(tmp_path: Path, autojump_clock) -> None:
    files = [tmp_path / f"f{i}" for i in range(3)]
    for p in files:
        p.write_text("x")
    limiter = trio.CapacityLimiter(4)
    resolver = Resolver(str(tmp_path), lambda ino: None, limiter)
    replayer = Replayer(
        str(tmp_path),
        resolver,
        ReplayThreads(),
        limiter,
        workers=1,
        close_after=1.0,
        max_open=2,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(replayer.run)
        for p in files:
            replayer.submit(abi.TYPE_OPEN, p.stat().st_ino)
            await until(lambda p=p: open_on(p), f"{p.name} open")
        start = trio.current_time()
        # one over the limit: the oldest goes at the next tick, long before its time
        await until(lambda: not open_on(files[0]), "the oldest closed")
        assert trio.current_time() - start <= 0.25 + SLACK
        assert open_on(files[1])
        assert open_on(files[2])
        nursery.cancel_scope.cancel()
    # cancelling the replayer closes what it still held
    assert not any(open_on(p) for p in files)


@pytest.mark.trio
async def test_misses_share_walks_at_most_one_per_interval(
    tmp_path: Path, autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[float] = []
    real_walk = resolve.walk_index

    def counting_walk(backing: str, limit: int) -> tuple[dict[int, str], bool]:
        walks.append(autojump_clock.current_time())
        return real_walk(backing, limit)

    monkeypatch.setattr(resolve, "walk_index", counting_walk)
    (tmp_path / "a").write_text("a")
    ino_a = (tmp_path / "a").stat().st_ino
    resolver = Resolver(str(tmp_path), lambda ino: None, trio.CapacityLimiter(1))
    since = trio.current_time()
    assert await resolver.resolve(ino_a, since) == "a"
    # a miss learnt of before that walk started is answered by it
    assert await resolver.resolve(1 << 60, since) is None
    assert len(walks) == 1
    # a later miss needs a walk that starts after it, but not sooner than the interval
    await trio.sleep(MIN_RESCAN_INTERVAL / 10)
    (tmp_path / "b").write_text("b")
    ino_b = (tmp_path / "b").stat().st_ino
    assert await resolver.resolve(ino_b, trio.current_time()) == "b"
    assert len(walks) == 2
    assert walks[1] - walks[0] >= MIN_RESCAN_INTERVAL
    # five misses at once cost one walk
    await trio.sleep(MIN_RESCAN_INTERVAL / 10)
    now = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(resolver.resolve, (1 << 60) + i, now)
    assert len(walks) == 3
    assert walks[2] - walks[1] >= MIN_RESCAN_INTERVAL
