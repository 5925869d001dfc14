"""The fanotify source in-process, on real fanotify marks over temporary directories."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from notifyd import abi, fanotify
from notifyd.client import Gap, SeqTracker
from notifyd.source_fanotify import FanotifySource

# A bound on waiting for events that should come, not a timing.
TIMEOUT = 20.0

READ_FILES = "import os, sys\nfor p in sys.argv[1:]: open(p, 'rb').read()\nprint(os.getpid())"


def read_in_child(*paths: Path) -> int:
    res = subprocess.run(
        [sys.executable, "-c", READ_FILES, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(res.stdout)


def drain_now(src: FanotifySource) -> bytearray:
    """Convert every event queued right now (the source's loop is not running)."""
    out = bytearray()
    while select.select([src.fileno()], [], [], 0)[0]:
        try:
            out += src.convert(os.read(src.fileno(), 64 * 1024))
        except BlockingIOError:
            break
    return out


async def test_only_other_processes_under_the_watched_dir(tmp_path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    for d in (inside, inside / "sub", outside):
        (d / "f").write_text("data")
    src = FanotifySource(inside)
    src.open()
    got: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, got.append)
            # the daemon's own accesses, a directory listing, and a file outside
            (inside / "f").read_text()
            os.listdir(inside)
            outsider = read_in_child(outside / "f")
            # then the access that must be seen; events are queued in order
            pid = read_in_child(inside / "sub" / "f", inside / "f")
            with trio.fail_after(TIMEOUT):
                while sum(r.type == abi.TYPE_READ for b in got for r in abi.decode(b)) < 2:  # noqa: ASYNC110 - polled list
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        src.close()
    recs = [r for b in got for r in abi.decode(b)]
    assert {r.pid for r in recs} == {pid}, (recs, os.getpid(), outsider)
    want = [os.stat(inside / "sub" / "f").st_ino] * 2 + [os.stat(inside / "f").st_ino] * 2
    assert [r.ino for r in recs] == want
    assert [r.type for r in recs] == [abi.TYPE_OPEN, abi.TYPE_READ] * 2
    assert [r.seq for r in recs] == [1, 2, 3, 4]


def test_uid_unknown_once_the_process_has_gone(tmp_path) -> None:
    (tmp_path / "f").write_text("data")
    src = FanotifySource(tmp_path)
    src.open()
    try:
        # the child has exited and been reaped before its events are read
        pid = read_in_child(tmp_path / "f")
        recs = abi.decode(drain_now(src))
    finally:
        src.close()
    assert [(r.pid, r.uid, r.gid) for r in recs] == [(pid, abi.UNKNOWN_ID, abi.UNKNOWN_ID)] * 2


def test_queue_overflow_is_a_seq_gap(tmp_path) -> None:
    limit_file = Path("/proc/sys/fs/fanotify/max_queued_events")
    if not limit_file.exists():
        pytest.skip(f"{limit_file} missing: this kernel does not report its fanotify queue limit")
    limit = int(limit_file.read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to make it overflow here")
    files = tmp_path / "many"
    files.mkdir()
    for i in range(limit + 100):
        os.close(os.open(files / str(i), os.O_CREAT | os.O_WRONLY, 0o644))
    src = FanotifySource(tmp_path)
    src.open()
    try:
        # distinct files so that fanotify cannot merge the events
        code = "import os, sys\nfor e in os.scandir(sys.argv[1]): os.close(os.open(e.path, 0))"
        subprocess.run([sys.executable, "-c", code, str(files)], check=True)
        out = drain_now(src)
        assert src.overflows == 1
        # the gap shows on the first record after the overflow
        pid = read_in_child(files / "0")
        out += drain_now(src)
    finally:
        src.close()
    events = SeqTracker().events(out)
    gaps = [e for e in events if isinstance(e, Gap)]
    assert len(gaps) == 1
    assert gaps[0].lost == 1
    # an empty file: its open gives an OPEN, its read of 0 bytes no READ
    assert events[-2] == gaps[0]
    assert events[-1].pid == pid
    assert events[-1].type == abi.TYPE_OPEN
    # the queue also held events outside the directory (the child's python startup)
    assert limit // 2 < len(events) - 2 < limit


def test_event_parser_refuses_what_it_cannot_trust() -> None:
    ok = fanotify.METADATA.pack(fanotify.METADATA.size, 3, 0, 24, fanotify.FAN_OPEN, -1, 7)
    assert list(fanotify.iter_events(ok * 2)) == [(fanotify.FAN_OPEN, -1, 7)] * 2
    with pytest.raises(ValueError, match="metadata version 4"):
        list(fanotify.iter_events(fanotify.METADATA.pack(24, 4, 0, 24, 1, -1, 7)))
    with pytest.raises(ValueError, match="truncated fanotify event of 48 bytes"):
        list(fanotify.iter_events(fanotify.METADATA.pack(48, 3, 0, 24, 1, -1, 7)))
    with pytest.raises(ValueError, match="3 trailing bytes"):
        list(fanotify.iter_events(ok + b"abc"))


def test_open_errors_are_clear(tmp_path) -> None:
    from notifyd.errors import DaemonError

    with pytest.raises(DaemonError, match="not a directory"):
        FanotifySource(tmp_path / "missing").open()


def test_a_mount_root_needs_no_path_filter(tmp_path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        (mnt / "f").write_text("data")
        src = FanotifySource(mnt)
        src.open()
        try:
            assert src.whole_mount
            pid = read_in_child(mnt / "f")
            recs = abi.decode(drain_now(src))
        finally:
            src.close()
        ino = os.stat(mnt / "f").st_ino
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert [(r.pid, r.ino, r.type) for r in recs] == [
        (pid, ino, abi.TYPE_OPEN),
        (pid, ino, abi.TYPE_READ),
    ]


# Deeper than PATH_MAX: readlink of the event fd fails with ENAMETOOLONG.
DEEP_LEVELS = 24
DEEP_NAME = "d" * 250

READ_DEEP = """import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for _ in range(int(sys.argv[2])):
    fd = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
f = os.open("f", os.O_RDONLY, dir_fd=fd)
os.read(f, 10)
print(os.getpid(), os.fstat(f).st_ino)
"""


def make_deep(top: Path) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEEP_LEVELS):
        os.mkdir(DEEP_NAME, dir_fd=fd)
        parent, fd = fd, os.open(DEEP_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(parent)
    f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.close(fd)
    os.write(f, b"data")
    os.close(f)


def read_deep(top: Path) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", READ_DEEP, str(top), str(DEEP_LEVELS), DEEP_NAME],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize("where", ["subtree", "mount root"])
def test_paths_longer_than_the_kernel_can_name_still_give_records(tmp_path, where) -> None:
    top = tmp_path / "top"
    top.mkdir()
    if where == "mount root":
        res = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(top)], capture_output=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        make_deep(top)
        assert DEEP_LEVELS * (len(DEEP_NAME) + 1) > 4096
        src = FanotifySource(top)
        src.open()
        try:
            assert src.whole_mount == (where == "mount root")
            pid, ino = read_deep(top)
            recs = abi.decode(drain_now(src))
        finally:
            src.close()
    finally:
        if where == "mount root":
            subprocess.run(["umount", str(top)], check=True)
    mine = [(r.ino, r.type) for r in recs if r.pid == pid and r.ino == ino]
    assert mine == [(ino, abi.TYPE_OPEN), (ino, abi.TYPE_READ)], recs
