"""The bridge, fed by a stand-in daemon on a real socket: records -> inotify events.

Real shim process, real FUSE mount, real inotifywait; only the record source
is ours, so each test can send exactly the records it needs.  A "sentinel"
record for another file, sent last, proves the records before it were
handled, without waiting on a clock: the rig's shim has one worker, which
takes files in the order their records came, and inotify queues events in
the order they happen, so every event of an earlier record is seen before
the sentinel's.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
from pathlib import Path

import pytest
from shim_support import EVENT_TIMEOUT, feeder, need_fuse, run_shim, shim_stats, wait_for, watch

from notifyd import abi
from notifyd.paths import shim_stats_path
from notifyd.stats import read_stats


@pytest.fixture
def rig(tmp_path: Path):
    """BACKING with a few files, a feeder, and the shim following the feeder."""
    need_fuse()
    backing = tmp_path / "backing"
    (backing / "dir" / "deeper").mkdir(parents=True)
    (backing / "dir" / "f").write_text("hello\n")
    (backing / "dir" / "deeper" / "g").write_text("nested\n")
    (backing / "sentinel").write_text("s\n")
    (backing / "empty").touch()
    mnt = tmp_path / "mnt"
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(backing, mnt, feed.path, "--timeout", "0.2", "--workers", "1") as shim,
    ):
        feed.wait_client()
        yield backing, mnt, feed, shim


def test_open_read_become_open_access_close(rig) -> None:
    backing, mnt, feed, _ = rig
    with watch(mnt) as w:
        feed.access(backing / "dir" / "f")
        feed.access(backing / "dir" / "deeper" / "g", reads=3)
        w.expect("dir/f", "CLOSE_NOWRITE")
        w.expect("dir/deeper/g", "CLOSE_NOWRITE")
        assert w.sequence("dir/f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]
        assert w.sequence("dir/deeper/g") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_records_of_the_shim_itself_are_skipped(rig) -> None:
    backing, mnt, feed, shim = rig
    with watch(mnt) as w:
        feed.access(backing / "dir" / "f", pid=shim.proc.pid)
        feed.access(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        assert w.sequence("dir/f") == []


def test_unknown_types_are_skipped(rig) -> None:
    backing, mnt, feed, _ = rig
    ino = (backing / "dir" / "f").stat().st_ino
    with watch(mnt) as w:
        feed.send([feed.record(7, ino)])
        feed.access(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        assert w.sequence("dir/f") == []


def test_read_of_a_file_empty_by_replay_time_raises_access(rig) -> None:
    backing, mnt, feed, _ = rig
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_READ, (backing / "empty").stat().st_ino)])
        w.expect("empty", "CLOSE_NOWRITE")
        # Known limit (README): a READ with no synthetic open to read on
        # opens one, so IN_OPEN comes first
        assert w.sequence("empty") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_file_deleted_before_replay_is_skipped(rig) -> None:
    backing, mnt, feed, shim = rig
    gone = backing / "dir" / "gone"
    gone.write_text("x")
    ino = gone.stat().st_ino
    gone.unlink()
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_OPEN, ino), feed.record(abi.TYPE_READ, ino)])
        feed.access(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        assert not [p for p, _ in w.seen if p != "sentinel"]
    assert shim.proc.poll() is None


def test_rename_on_backing_replays_on_the_new_name(rig) -> None:
    backing, mnt, feed, _ = rig
    old = backing / "dir" / "old"
    old.write_text("x")
    # the overlay learns the old name: its table now holds a path that goes stale
    assert (mnt / "dir" / "old").read_text() == "x"
    old.rename(backing / "dir" / "new")
    with watch(mnt) as w:
        feed.access(backing / "dir" / "new")
        w.expect("dir/new", "CLOSE_NOWRITE")
        assert w.sequence("dir/new") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_name_reused_by_another_file_is_not_reported(rig) -> None:
    backing, mnt, feed, _ = rig
    victim = backing / "dir" / "v"
    victim.write_text("1")
    ino = victim.stat().st_ino
    assert (mnt / "dir" / "v").read_text() == "1"
    keep = backing / "keep"
    os.link(victim, keep)  # keep the inode alive so the number is not reused
    victim.unlink()
    victim.write_text("2")  # another inode under the old name
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_OPEN, ino)])
        w.expect("keep", "OPEN")
        assert w.sequence("dir/v") == []


def test_hard_link_reported_once(rig) -> None:
    backing, mnt, feed, _ = rig
    a = backing / "dir" / "a"
    a.write_text("x")
    os.link(a, backing / "dir" / "deeper" / "b")
    with watch(mnt) as w:
        feed.access(a)
        feed.access(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        names = {p for p, e in w.seen if "OPEN" in e} - {"sentinel"}
        assert len(names) == 1
        assert names <= {"dir/a", "dir/deeper/b"}


def test_replay_leaves_real_readers_data_alone(rig) -> None:
    backing, mnt, feed, _ = rig
    data = os.urandom(100_000)
    (backing / "big").write_bytes(data)
    assert (mnt / "big").read_bytes() == data
    with watch(mnt) as w:
        feed.access(backing / "big", reads=5)
        w.expect("big", "CLOSE_NOWRITE")
    # the synthetic 1-byte reads must not have shrunk the cached size
    assert (mnt / "big").read_bytes() == data
    assert (mnt / "big").stat().st_size == len(data)


def test_gap_is_logged_with_its_size(rig) -> None:
    backing, mnt, feed, shim = rig
    ino = (backing / "sentinel").stat().st_ino
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_OPEN, ino)])
        feed.send([feed.record(abi.TYPE_READ, ino, skip=5)])
        w.expect("sentinel", "ACCESS")
    shim.wait_log("5 lost before the shim got them (seq gaps from the daemon)")


def test_every_record_not_replayed_is_counted_by_cause(rig) -> None:
    backing, mnt, feed, shim = rig
    gone = backing / "dir" / "gone"
    gone.write_text("x")
    gone_ino = gone.stat().st_ino
    gone.unlink()
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_OPEN, gone_ino)])  # unresolved
        feed.send([feed.record(abi.TYPE_READ, 1 << 60, skip=3)])  # a gap of 3, unresolved
        feed.access(backing / "sentinel", reads=2)  # the second READ collapses
        feed.access(backing / "dir" / "f", pid=shim.proc.pid)  # the shim's own
        w.expect("sentinel", "CLOSE_NOWRITE")
    doc = wait_for(
        lambda: (d := shim_stats(mnt))["own_skipped"] == 2 and d,
        EVENT_TIMEOUT,
        "the shim's own records counted",
    )
    assert doc["connected"] is True
    assert doc["submitted"] == 5
    assert (doc["replayed"], doc["collapsed"]) == (2, 1)
    assert (doc["unresolved"], doc["gap"]) == (2, 3)
    assert (doc["overload"], doc["gone"], doc["failed"]) == (0, 0, 0)
    assert doc["read_by"] == "zero-length read"
    text = subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "stats", "--shim", str(mnt)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^unresolved\s+2$", text, re.M), text
    shim.wait_log("2 with no file under BACKING")


def test_stats_of_a_shim_that_is_not_there(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "stats", "--shim", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "is scoutfs-notify-shim mounted at" in res.stderr
    assert "Traceback" not in res.stderr


def test_many_files_each_reported(rig) -> None:
    backing, mnt, feed, _ = rig
    files = []
    for i in range(200):
        p = backing / "dir" / f"m{i:03d}"
        p.write_text(str(i))
        files.append(p)
    with watch(mnt) as w:
        recs = []
        for p in files:
            ino = p.stat().st_ino
            recs += [feed.record(abi.TYPE_OPEN, ino), feed.record(abi.TYPE_READ, ino)]
        feed.send(recs)
        for p in files:
            w.expect(f"dir/{p.name}", "CLOSE_NOWRITE")
        for p in files:
            assert w.sequence(f"dir/{p.name}") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_overload_drops_and_says_so(tmp_path: Path) -> None:
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    inos = []
    for i in range(300):
        (backing / f"f{i}").write_text("x")
        inos.append((backing / f"f{i}").stat().st_ino)
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(
            backing, tmp_path / "mnt", feed.path, "--max-pending", "1", "--workers", "1"
        ) as shim,
    ):
        feed.wait_client()
        feed.send([feed.record(abi.TYPE_OPEN, ino) for ino in inos])
        shim.wait_log("dropped on overload")
        assert shim.proc.poll() is None


async def test_reads_collapse_while_pending() -> None:
    """Unit test of the intake alone: nothing runs, so everything stays pending."""
    import trio

    from compat.inotify_shim.replay import MAX_ACTIONS, Replayer, ReplayThreads
    from compat.inotify_shim.resolve import Resolver

    limiter = trio.CapacityLimiter(1)
    resolver = Resolver("/nonexistent", lambda ino: None, limiter)
    replayer = Replayer("/nonexistent", resolver, ReplayThreads(), limiter, max_pending=4)
    for rec_type in (abi.TYPE_READ, abi.TYPE_READ, abi.TYPE_OPEN, abi.TYPE_READ, abi.TYPE_READ):
        replayer.submit(rec_type, 42)
    assert replayer.stats.collapsed == 2
    for _ in range(MAX_ACTIONS):
        replayer.submit(abi.TYPE_OPEN, 42)
    # R, O, R were pending: MAX_ACTIONS - 3 more fit, the last 3 drop
    assert replayer.stats.overload == 3
    assert replayer.stats.replayed == 0


def test_storm_of_records_for_gone_files_does_not_stall_the_rest(rig) -> None:
    backing, mnt, feed, shim = rig
    doomed = [backing / f"doomed{i}" for i in range(500)]
    for p in doomed:
        p.write_text("x")
    inos = [p.stat().st_ino for p in doomed]  # 500 distinct: all exist at once
    for p in doomed:
        p.unlink()
    with watch(mnt) as w:
        feed.send([feed.record(abi.TYPE_OPEN, ino) for ino in inos])
        feed.access(backing / "sentinel")
        # one walk of BACKING answers for all 500: a walk each would take
        # 500 x MIN_RESCAN_INTERVAL = 100 s, far past this deadline
        w.expect("sentinel", "CLOSE_NOWRITE")

    def unresolved_logged() -> int:
        found = re.findall(r"(\d+) with no file under BACKING", shim.log())
        return sum(int(n) for n in found)

    wait_for(lambda: unresolved_logged() == 500, EVENT_TIMEOUT, "500 unresolved logged")


def test_two_cats_in_a_row_are_two_opens_and_closes(rig) -> None:
    backing, mnt, feed, _ = rig
    with watch(mnt) as w:
        feed.access(backing / "dir" / "f")
        feed.access(backing / "dir" / "f")
        feed.access(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        # the second cat may be replayed after the sentinel: wait for its close
        while w.sequence("dir/f").count("CLOSE_NOWRITE") < 2:
            w.seen.append(w.events.get(timeout=EVENT_TIMEOUT))
        assert w.sequence("dir/f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"] * 2


def test_zero_length_read_check(tmp_path: Path) -> None:
    from compat.inotify_shim.replay import zero_read_raises_access

    f, other = tmp_path / "f", tmp_path / "other"
    f.write_text("x")
    other.write_text("y")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert zero_read_raises_access(str(f), fd)
        # a kernel where the zero-length read raises nothing looks like this
        # to the check: no IN_ACCESS on the watched path
        assert not zero_read_raises_access(str(other), fd)
    finally:
        os.close(fd)


def test_replayed_reads_checked_once(rig) -> None:
    backing, mnt, feed, shim = rig
    with watch(mnt) as w:
        feed.access(backing / "dir" / "f", reads=2)
        feed.access(backing / "dir" / "deeper" / "g")
        w.expect("dir/deeper/g", "CLOSE_NOWRITE")
        assert w.sequence("dir/f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]
        assert w.sequence("dir/deeper/g") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]
    assert shim.log().count("zero-length reads raise IN_ACCESS here") == 1


@pytest.mark.parametrize("size", [0, 6])
def test_one_byte_reads_when_asked(tmp_path: Path, size: int) -> None:
    """The fallback the check chooses where a zero-length read raises nothing."""
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "f").write_bytes(b"x" * size)
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(backing, tmp_path / "mnt", feed.path, "--read-byte") as shim,
    ):
        feed.wait_client()
        with watch(tmp_path / "mnt") as w:
            feed.access(backing / "f", reads=3)
            w.expect("f", "CLOSE_NOWRITE")
            assert w.sequence("f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]
        assert "zero-length reads" not in shim.log()


def test_the_overlay_leaves_fds_for_replays_at_the_open_file_limit(tmp_path: Path) -> None:
    """More files than the shim may hold fds for: every one is still replayed.

    The kernel keeps the entries it looked up, and the overlay holds an
    O_PATH fd for each; past the open-file limit the replay threads' own
    opens failed with EMFILE ("failed" in the stats) where a root without
    CAP_SYS_RESOURCE cannot raise the limit (a container).  The limit here is
    set on the running shim, so the test does not depend on the machine's.
    """
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    limit = 1024
    files = []
    for i in range(2 * limit):
        p = backing / f"f{i:04d}"
        p.write_text("x")
        files.append(p)
    mnt = tmp_path / "mnt"
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(backing, mnt, feed.path, "--workers", "1") as shim,
    ):
        feed.wait_client()
        import resource

        resource.prlimit(shim.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        with watch(mnt) as w:
            # in bunches, each waited for, so that the synthetic opens held at
            # once stay few: what fills the fd table is the overlay's inodes
            for start in range(0, len(files), 64):
                bunch = files[start : start + 64]
                feed.send([feed.record(abi.TYPE_OPEN, p.stat().st_ino) for p in bunch])
                for p in bunch:
                    w.expect(p.name, "OPEN")
        doc = shim_stats(mnt)
        assert doc["replayed"] == len(files), doc
        assert (doc["failed"], doc["gone"]) == (0, 0), doc


def test_reads_of_held_opens_keep_their_interleaving(tmp_path: Path) -> None:
    """READs of two files held open arrive a, b, a, b: the watcher sees four IN_ACCESS in
    that order, none merged into a pending READ of its file."""
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    a, b = backing / "a", backing / "b"
    a.write_text("a")
    b.write_text("b")
    mnt = tmp_path / "mnt"
    with (
        feeder(tmp_path / "notify.sock") as feed,
        # the longest linger: the READs below must find both synthetic opens held
        run_shim(backing, mnt, feed.path, "--workers", "1", "--close-after", "1") as shim,
        watch(mnt) as w,
    ):
        feed.wait_client()
        feed.access(a)
        feed.access(b)
        w.expect("a", "ACCESS")
        w.expect("b", "ACCESS")
        # the cats' jobs are settled once the stats count them (a READ that finds its
        # file's job still running waits behind it, and may be merged there); read in
        # this process: a `scoutfs-notify stats` could outlast the second of linger
        stats_path = str(shim_stats_path(mnt))
        wait_for(lambda: read_stats(stats_path)["replayed"] == 4, EVENT_TIMEOUT, "the cats")
        # one message, as a busy daemon sends them: a READ for a file that already has
        # one pending would be merged into it, these find their files' opens idle
        feed.send([feed.record(abi.TYPE_READ, p.stat().st_ino) for p in (a, b, a, b)])

        def accesses() -> list[str]:
            return [p for p, names in w.seen if "ACCESS" in names]

        while len(accesses()) < 6:
            try:
                w.seen.append(w.events.get(timeout=EVENT_TIMEOUT))
            except queue.Empty:
                raise AssertionError(f"6 IN_ACCESS expected, saw {accesses()}") from None
        assert accesses() == ["a", "b", "a", "b", "a", "b"]
        doc = shim_stats(mnt)
        assert (doc["replayed"], doc["collapsed"]) == (8, 0), doc
        assert shim.proc.poll() is None


async def test_failed_read_of_a_held_open_is_no_replay(tmp_path: Path) -> None:
    """Unit test of the reader alone: a READ of a held open whose read fails is counted
    failed, by its errno, and not reported to ``on_replayed`` (the metrics' latency of a
    replay) but to ``on_lost``; the READ of the other held open, which works, is."""
    import trio

    from compat.inotify_shim.replay import Replayer, ReplayThreads, _File
    from compat.inotify_shim.resolve import Resolver

    limiter = trio.CapacityLimiter(1)
    resolver = Resolver(str(tmp_path), lambda ino: None, limiter)
    # zero_read=False: READs are 1-byte preads, which a pipe refuses with ESPIPE
    replayer = Replayer(str(tmp_path), resolver, ReplayThreads(), limiter, zero_read=False)
    replayed: list[int] = []
    lost: list[int] = []
    replayer.on_replayed = replayed.append
    replayer.on_lost = lost.append
    (tmp_path / "good").write_text("x")
    good = os.open(tmp_path / "good", os.O_RDONLY)
    bad, bad_w = os.pipe()
    try:
        replayer._files[1] = _File(1, fd=bad)
        replayer._files[2] = _File(2, fd=good)
        # the reader's round ends with a flush(): the sign both READs were made
        flushed = trio.Event()
        replayer.flush = flushed.set  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replayer._read_loop)
            replayer.submit(abi.TYPE_READ, 1)
            replayer.submit(abi.TYPE_READ, 2)
            with trio.fail_after(EVENT_TIMEOUT):
                await flushed.wait()
            nursery.cancel_scope.cancel()
    finally:
        for fd in (good, bad, bad_w):
            os.close(fd)
    assert (replayer.stats.replayed, replayer.stats.failed) == (1, 1)
    assert replayer.stats.failed_by_errno == {"ESPIPE": 1}
    assert replayed == [2]
    # nothing of file 1 waits any more: metrics forget its record's time
    assert lost == [1]


def test_the_replay_open_check_walks_backing_without_following_anything(tmp_path: Path) -> None:
    """Unit test of Overlay._walk, which a replay's OPEN trusts: the BACKING path leads to
    the file only through real directories of BACKING's own mount, never through a
    symlink (on the way or at the end) and never above BACKING."""
    from compat.inotify_shim.overlay import Overlay
    from compat.inotify_shim.replay import ReplayThreads

    backing = tmp_path / "backing"
    (backing / "d" / "e").mkdir(parents=True)
    f = backing / "d" / "e" / "f"
    f.write_text("x")
    (backing / "dlink").symlink_to("d")
    (backing / "d" / "flink").symlink_to("e/f")
    (tmp_path / "outside").write_text("o")
    overlay = Overlay(str(backing), ReplayThreads())
    st = f.stat()
    assert overlay._walk(str(f)) == (st.st_dev, st.st_ino)
    assert overlay._walk(f"{backing}/d/./e//f") == (st.st_dev, st.st_ino)
    # a symlink at the end is the symlink itself, never its target
    link = os.lstat(backing / "d" / "flink")
    assert overlay._walk(f"{backing}/d/flink") == (link.st_dev, link.st_ino)
    for refused in (
        f"{backing}/dlink/e/f",  # a symlinked directory on the way
        f"{backing}/d/../../outside",  # above BACKING
        f"{tmp_path}/outside",  # not under BACKING at all
        f"{backing}/d/e/missing",
    ):
        assert overlay._walk(refused) is None, refused
