"""The whole bridge: real daemon (fanotify source) -> real shim -> real watchers.

Accesses are made directly on BACKING by this test process; the watchers
(inotifywait, watchdog, a fanotify listener) only look at the overlay.  A
"sentinel" access made last proves everything before it was handled.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_support import EVENT_TIMEOUT, Shim, need_fuse, run_shim, watch

from notifyd import fanotify


@contextlib.contextmanager
def shim_over(daemon, tmp_path: Path) -> Iterator[tuple[Path, Path, Shim, object]]:
    """(BACKING, MOUNTPOINT, shim, daemon) with the shim subscribed to the daemon."""
    need_fuse()
    with run_shim(daemon.backing, tmp_path / "mnt", daemon.socket) as shim:
        shim.wait_log("subscribed to")
        yield daemon.backing, tmp_path / "mnt", shim, daemon


@pytest.fixture
def bridge(fanotify_daemon, tmp_path: Path):
    backing = fanotify_daemon.backing
    (backing / "dir" / "sub").mkdir(parents=True)
    (backing / "dir" / "sub" / "f").write_text("deep\n")
    (backing / "top").write_text("top\n")
    (backing / "sentinel").write_text("s\n")
    with shim_over(fanotify_daemon, tmp_path) as rig:
        yield rig


def cat(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_access_on_backing_is_seen_on_the_overlay(bridge) -> None:
    backing, mnt, _, _ = bridge
    with watch(mnt) as w:
        cat(backing / "dir" / "sub" / "f")
        cat(backing / "top")
        w.expect("dir/sub/f", "CLOSE_NOWRITE")
        w.expect("top", "CLOSE_NOWRITE")
        # the same sequence `cat MOUNTPOINT/dir/sub/f` would have produced
        assert w.sequence("dir/sub/f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]
        assert w.sequence("top") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_access_through_the_overlay_is_reported_once(bridge) -> None:
    backing, mnt, _, _ = bridge
    with watch(mnt) as w:
        assert cat(mnt / "top") == b"top\n"
        cat(backing / "sentinel")
        w.expect("sentinel", "CLOSE_NOWRITE")
        w.drain(1.0)
        assert w.sequence("top") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_a_thousand_distinct_files_each_reported(fanotify_daemon, tmp_path: Path) -> None:
    backing = fanotify_daemon.backing
    names = []
    # made before the shim subscribes, so their OPEN records are not replayed
    for d in range(10):
        (backing / f"many{d}").mkdir()
        for i in range(100):
            (backing / f"many{d}" / f"f{i:03d}").write_text(f"{d}/{i}\n")
            names.append(f"many{d}/f{i:03d}")
    with shim_over(fanotify_daemon, tmp_path) as (_, mnt, _, _), watch(mnt) as w:
        for name in names:
            cat(backing / name)
        for name in names:
            w.expect(name, "CLOSE_NOWRITE", timeout=60)
        for name in names:
            assert w.sequence(name) == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_watchdog_observer_sees_files_opened_on_backing(bridge) -> None:
    from watchdog.events import FileOpenedEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    backing, mnt, _, _ = bridge
    got: queue.Queue[FileOpenedEvent] = queue.Queue()

    class Handler(FileSystemEventHandler):
        def on_opened(self, event: FileOpenedEvent) -> None:
            got.put(event)

    observer = Observer()
    observer.schedule(Handler(), str(mnt), recursive=True)
    observer.start()
    try:
        cat(backing / "dir" / "sub" / "f")
        while True:
            event = got.get(timeout=EVENT_TIMEOUT)
            if event.src_path == str(mnt / "dir" / "sub" / "f"):
                break
        assert isinstance(event, FileOpenedEvent)
    finally:
        observer.stop()
        observer.join()


@contextlib.contextmanager
def fanotify_listener(mountpoint: Path) -> Iterator[queue.Queue[tuple[int, int, str]]]:
    """A mount mark on ``mountpoint`` (FAN_OPEN | FAN_ACCESS, no FID: FUSE's fsid is 0).

    Yields a queue of (mask, pid, path) events.
    """
    fan = fanotify.fanotify_init(
        fanotify.FAN_CLASS_NOTIF | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK,
        os.O_RDONLY | os.O_CLOEXEC,
    )
    out: queue.Queue[tuple[int, int, str]] = queue.Queue()
    stop_r, stop_w = os.pipe()

    def read() -> None:
        while True:
            ready, _, _ = select.select([fan, stop_r], [], [])
            if stop_r in ready:
                return
            try:
                buf = os.read(fan, 65536)
            except BlockingIOError:
                continue
            for ev in fanotify.iter_events(buf):
                if ev.fd == fanotify.FAN_NOFD:
                    continue
                try:
                    out.put((ev.mask, ev.pid, os.readlink(f"/proc/self/fd/{ev.fd}")))
                finally:
                    os.close(ev.fd)

    reader = threading.Thread(target=read)
    try:
        fanotify.fanotify_mark(
            fan,
            fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_MOUNT,
            fanotify.FAN_OPEN | fanotify.FAN_ACCESS,
            mountpoint,
        )
        reader.start()
        yield out
    finally:
        os.write(stop_w, b"x")
        if reader.is_alive():
            reader.join()
        for fd in (fan, stop_r, stop_w):
            os.close(fd)


def test_fanotify_listener_on_the_overlay_sees_the_shim_as_accessor(bridge) -> None:
    backing, mnt, shim, _ = bridge
    target = str(mnt / "dir" / "sub" / "f")
    with fanotify_listener(mnt) as events:
        cat(backing / "dir" / "sub" / "f")
        masks = 0
        while masks & (fanotify.FAN_OPEN | fanotify.FAN_ACCESS) != (
            fanotify.FAN_OPEN | fanotify.FAN_ACCESS
        ):
            mask, pid, path = events.get(timeout=EVENT_TIMEOUT)
            if path != target:
                continue
            masks |= mask
            # the known limit (README): fanotify reports the shim's replay,
            # not the process that made the access on BACKING
            assert pid == shim.proc.pid
            assert pid != os.getpid()


def test_daemon_restart_while_mounted(bridge, notifyd_factory) -> None:
    backing, mnt, shim, daemon = bridge
    with watch(mnt) as w:
        cat(backing / "top")
        w.expect("top", "CLOSE_NOWRITE")
        daemon.stop()
        mark = len(shim.log())
        second = notifyd_factory(backing, socket=daemon.socket)
        shim.wait_log("subscribed to", after=mark)
        cat(backing / "dir" / "sub" / "f")
        w.expect("dir/sub/f", "CLOSE_NOWRITE")
    # stopped here so the shared socket path is gone when the fixture checks
    # that the first daemon left nothing behind
    second.stop()


def make_file(path: Path) -> None:
    """A 6-byte file made without opening it: no OPEN record of its own."""
    os.mknod(path, stat.S_IFREG | 0o644)
    os.truncate(path, 6)


def test_inotifywait_r_follows_directories_made_on_backing(bridge) -> None:
    backing, mnt, _, _ = bridge
    with watch(mnt) as w:
        # `mkdir -p a/b/c; cat a/b/c/f` on BACKING, after the watch started
        (backing / "a" / "b" / "c").mkdir(parents=True)
        make_file(backing / "a" / "b" / "c" / "f")
        cat(backing / "a" / "b" / "c" / "f")
        w.expect("a/b/c/f", "CLOSE_NOWRITE")
        assert w.sequence("a/b/c/f") == ["OPEN", "ACCESS", "CLOSE_NOWRITE"]


def test_watchdog_recursive_observer_follows_directories_made_on_backing(bridge) -> None:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    backing, mnt, _, _ = bridge
    got: queue.Queue[FileSystemEvent] = queue.Queue()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            got.put(event)

    observer = Observer()
    observer.schedule(Handler(), str(mnt), recursive=True)
    observer.start()
    try:
        (backing / "x" / "y" / "z").mkdir(parents=True)
        make_file(backing / "x" / "y" / "z" / "f")
        cat(backing / "x" / "y" / "z" / "f")
        target = str(mnt / "x" / "y" / "z" / "f")
        seen = []
        while "opened" not in seen:
            event = got.get(timeout=EVENT_TIMEOUT)
            if event.src_path == target:
                seen.append(event.event_type)
    finally:
        observer.stop()
        observer.join()
    # watchdog lists a directory it is told was created and reports what it
    # holds as created, as it does after a local `mkdir -p` and `touch`
    assert seen[-1] == "opened"
    assert set(seen) <= {"created", "opened"}, seen


def test_directories_the_watcher_saw_are_not_announced_again(bridge) -> None:
    backing, mnt, _, _ = bridge
    with watch(mnt, "open", "create") as w:
        cat(backing / "dir" / "sub" / "f")
        w.expect("dir/sub/f", "OPEN")
        (backing / "new").mkdir()
        make_file(backing / "new" / "g")
        cat(backing / "new" / "g")
        w.expect("new/g", "OPEN")
    creates = [p for p, e in w.seen if "CREATE" in e]
    # "dir" and "dir/sub" were listed by inotifywait -r at start
    assert creates == ["new"], w.seen


def test_limit_writes_are_not_reported(bridge) -> None:
    """Known limit: records cover opens and reads only (ABI v1), so no IN_MODIFY."""
    backing, mnt, _, _ = bridge
    with watch(mnt, "modify", "open") as w:
        with open(backing / "top", "a") as f:
            f.write("more\n")
        cat(backing / "sentinel")
        w.expect("sentinel", "OPEN")
        w.expect("top", "OPEN")  # the open for append is an OPEN record
        w.drain(1.0)
        assert "MODIFY" not in w.sequence("top")


def test_inotifywait_command_line(bridge) -> None:
    """The README's command, verbatim: `inotifywait -m -r MOUNTPOINT`."""
    backing, mnt, _, _ = bridge
    # `timeout` bounds the blocking reads below if the events never come
    proc = subprocess.Popen(
        ["timeout", str(EVENT_TIMEOUT), "inotifywait", "-m", "-r", str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # killed as a group: `timeout` does not pass SIGKILL on
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        for line in proc.stderr:
            if "Watches established" in line:
                break
        cat(backing / "dir" / "sub" / "f")
        lines = []
        for line in proc.stdout:
            lines.append(line.split())
            if lines[-1][1:] == ["CLOSE_NOWRITE,CLOSE", "f"]:
                break
        assert lines == [
            [f"{mnt}/dir/sub/", "OPEN", "f"],
            [f"{mnt}/dir/sub/", "ACCESS", "f"],
            [f"{mnt}/dir/sub/", "CLOSE_NOWRITE,CLOSE", "f"],
        ]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
