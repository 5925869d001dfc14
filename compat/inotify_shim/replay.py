"""Synthetic accesses through the overlay, so the kernel raises inotify events.

A FUSE server cannot inject an inotify event; but an open or a read made
*through* the overlay raises one, on the right name, for every watcher.  So
for each record a worker thread opens the file through the mount point
(IN_OPEN), reads one byte (IN_ACCESS) and, once the file has been quiet for
``close_after`` seconds, closes it (IN_CLOSE_NOWRITE).  The overlay answers
those requests without touching BACKING: it knows them by the requesting
thread id, registered in :class:`ReplayThreads` for the duration.

Why threads: the mount point is served by the trio thread, and an ``open``
of it from that same thread waits forever for its own reply.

Load: each file has one slot.  Records for a file that is already waiting
append to its action list, where a READ after a READ collapses (inotify
merges identical adjacent events anyway).  The queue of waiting files is
bounded; past it records are dropped and counted, never queued without
bound.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import stat
import threading
from collections import OrderedDict

import trio

from notifyd import abi

from .resolve import Resolver

__all__ = ["ReplayStats", "ReplayThreads", "Replayer"]

log = logging.getLogger(__name__)

OPEN = abi.TYPE_OPEN
READ = abi.TYPE_READ

# A file's pending actions beyond this are dropped: eight opens of one file
# queued behind a slow replay say all a watcher can use.
MAX_ACTIONS = 8

# Losses are logged when they happen, but at most this often (seconds).
LOSS_WARN_INTERVAL = 5.0

# Files one worker takes per trip to its thread: amortises the hand-off.
BATCH = 16

_SYNTHETIC_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class ReplayThreads:
    """Thread ids making synthetic accesses now, each with the file it expects.

    Written by replay threads, read by the overlay's ``open`` on the trio
    thread; single dict operations are atomic under the GIL.  An id is only
    registered while its thread is alive and replaying, so a recycled thread
    id can never turn someone else's open into a synthetic one.
    """

    def __init__(self) -> None:
        self._expect: dict[int, tuple[int, str]] = {}

    def expected(self, tid: int) -> tuple[int, str] | None:
        """(inode, BACKING path) thread ``tid`` is opening, if it is a replay thread."""
        return self._expect.get(tid)

    def expect(self, ino: int, backing_path: str) -> None:
        self._expect[threading.get_native_id()] = (ino, backing_path)

    def done(self) -> None:
        self._expect.pop(threading.get_native_id(), None)


@dataclasses.dataclass
class ReplayStats:
    """What happened to the records handed to the replayer."""

    replayed: int = 0  # actions that raised their event
    collapsed: int = 0  # READs merged into a pending READ
    overload: int = 0  # dropped: too many files waiting
    unresolved: int = 0  # no file under BACKING has the inode
    gone: int = 0  # the file disappeared before its replay
    failed: int = 0  # any other error from the synthetic access

    def losses(self) -> tuple[int, ...]:
        return (self.overload, self.unresolved, self.gone, self.failed)

    def __str__(self) -> str:
        return ", ".join(f"{getattr(self, f.name)} {f.name}" for f in dataclasses.fields(self))


@dataclasses.dataclass(eq=False)
class _File:
    ino: int
    actions: list[int] = dataclasses.field(default_factory=list)
    fd: int | None = None  # the synthetic open, held until quiet
    queued: bool = False
    busy: bool = False  # a worker or the closer owns it
    close_at: float = 0.0
    stale: str | None = None  # a path that led elsewhere; retried once
    since: float = 0.0  # when its oldest pending action arrived (trio clock)


@dataclasses.dataclass(eq=False)
class _Job:
    file: _File
    path: str
    actions: list[int]
    done: int = 0
    errno: int = 0


class Replayer:
    """Turns records into synthetic accesses under ``mountpoint``.

    Args:
        mountpoint: where the overlay is mounted.
        resolver: inode -> path relative to BACKING (= to the mount point).
        threads: the registry the overlay consults at open.
        limiter: bounds the replay threads (one per worker, plus the closer).
        workers: concurrent batches of synthetic accesses.
        max_pending: files that may wait for a worker before records drop.
        close_after: seconds a synthetic open stays open after its last
            action; docs/ABI.md section 5 wants the close within a second.
        max_open: synthetic opens held at once; the oldest close early.
    """

    def __init__(
        self,
        mountpoint: str,
        resolver: Resolver,
        threads: ReplayThreads,
        limiter: trio.CapacityLimiter,
        *,
        workers: int = 4,
        max_pending: int = 8192,
        close_after: float = 0.25,
        max_open: int = 512,
    ) -> None:
        if not 0 < close_after <= 1:
            raise ValueError("close_after must be in (0, 1] seconds (docs/ABI.md section 5)")
        self.mountpoint = mountpoint
        self.stats = ReplayStats()
        self._resolver = resolver
        self._backing = resolver.backing
        self._threads = threads
        self._limiter = limiter
        self._workers = workers
        self._close_after = close_after
        self._max_open = max_open
        self._files: dict[int, _File] = {}
        # files holding a synthetic open, oldest activity first
        self._open: OrderedDict[int, _File] = OrderedDict()
        self._send, self._recv = trio.open_memory_channel[_File](max_pending)
        self._warned = self.stats.losses()
        self._next_warn = -math.inf

    # --- intake (trio thread) ------------------------------------------------

    def submit(self, rec_type: int, ino: int) -> None:
        """Queue the replay of one OPEN or READ record; never blocks."""
        f = self._files.get(ino)
        if f is None:
            f = self._files[ino] = _File(ino)
        acts = f.actions
        if rec_type == READ and acts and acts[-1] == READ:
            self.stats.collapsed += 1
            return
        if not acts:
            f.since = trio.current_time()
        elif len(acts) >= MAX_ACTIONS:
            self.stats.overload += 1
            self._warn_losses()
            return
        acts.append(rec_type)
        if not (f.queued or f.busy):
            self._enqueue(f)

    def _enqueue(self, f: _File) -> None:
        try:
            self._send.send_nowait(f)
        except trio.WouldBlock:
            self.stats.overload += len(f.actions)
            f.actions.clear()
            self._settle(f)
            self._warn_losses()
            return
        f.queued = True

    def _warn_losses(self) -> None:
        """Say what was lost since the last warning, at most every LOSS_WARN_INTERVAL."""
        now = trio.current_time()
        losses = self.stats.losses()
        if now < self._next_warn or losses == self._warned:
            return
        self._next_warn = now + LOSS_WARN_INTERVAL
        overload, unresolved, gone, failed = (
            a - b for a, b in zip(losses, self._warned, strict=True)
        )
        self._warned = losses
        log.warning(
            "records not replayed: %d dropped on overload (raise --max-pending or "
            "--workers), %d with no file under BACKING, %d for files gone, %d failed",
            overload,
            unresolved,
            gone,
            failed,
        )

    def _settle(self, f: _File) -> None:
        """After a worker or the closer let go of ``f``: requeue, park or forget it."""
        f.busy = False
        if f.actions:
            self._enqueue(f)
        elif f.fd is not None:
            f.close_at = trio.current_time() + self._close_after
            self._open[f.ino] = f
            self._open.move_to_end(f.ino)
        elif not f.queued:
            self._files.pop(f.ino, None)

    # --- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replay until cancelled, then close every synthetic open.

        The overlay must keep serving until this returns: the closes are
        requests to it.
        """
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._workers):
                    nursery.start_soon(self._worker)
                nursery.start_soon(self._closer)
                nursery.start_soon(self._report_losses)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                fds = [f.fd for f in self._files.values() if f.fd is not None]
                await trio.to_thread.run_sync(_close_all, fds)
                for f in self._files.values():
                    f.fd = None
                log.info("replay stopped: %s", self.stats)

    async def _report_losses(self) -> None:
        # the tail of a burst of losses, which no later loss would report
        while True:
            await trio.sleep(LOSS_WARN_INTERVAL)
            self._warn_losses()

    async def _worker(self) -> None:
        async for first in self._recv:
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            jobs = []
            for f in batch:
                f.queued = False
                f.busy = True
                self._open.pop(f.ino, None)
                job = await self._job(f)
                if job is not None:
                    jobs.append(job)
                else:
                    self._settle(f)
            if jobs:
                await trio.to_thread.run_sync(self._run_jobs, jobs, limiter=self._limiter)
                for job in jobs:
                    self._finish(job)

    async def _job(self, f: _File) -> _Job | None:
        actions, f.actions = f.actions, []
        path = None if f.stale else self._resolver.cached(f.ino)
        if path is None:
            path = await self._resolver.resolve(f.ino, f.since, stale=f.stale)
        if path is None:
            if f.stale:
                self.stats.gone += len(actions)
            else:
                self.stats.unresolved += len(actions)
            f.stale = None
            self._warn_losses()
            return None
        return _Job(f, path, actions)

    def _finish(self, job: _Job) -> None:
        f = job.file
        self.stats.replayed += job.done
        log.debug("replayed %d of %s on %s", job.done, job.actions, job.path)
        left = job.actions[job.done :]
        if left:
            if job.errno in _GONE_ERRNOS and f.stale is None:
                # renamed or deleted since we learnt the path: look again once
                f.stale = job.path
                f.since = trio.current_time()
                f.actions[:0] = left
            else:
                if job.errno in _GONE_ERRNOS:
                    self.stats.gone += len(left)
                else:
                    self.stats.failed += len(left)
                    log.debug("synthetic access to %s failed: %s", job.path, os.strerror(job.errno))
                f.stale = None
                self._warn_losses()
        else:
            f.stale = None
        self._settle(f)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Worker thread: the synthetic accesses themselves."""
        try:
            for job in jobs:
                self._threads.expect(job.file.ino, os.path.join(self._backing, job.path))
                _apply(job, self.mountpoint)
        finally:
            self._threads.done()

    async def _closer(self) -> None:
        # polling at a quarter of the linger keeps every close within 1.25x of it
        tick = self._close_after / 4
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            due: list[_File] = []
            excess = len(self._open) - self._max_open
            for f in self._open.values():
                if f.close_at > now and len(due) >= excess:
                    break
                due.append(f)
            if not due:
                continue
            for f in due:
                del self._open[f.ino]
                f.busy = True
            fds = [f.fd for f in due if f.fd is not None]
            try:
                await trio.to_thread.run_sync(_close_all, fds, limiter=self._limiter)
            finally:
                for f in due:
                    f.fd = None
                    self._settle(f)


# ESTALE: the overlay refused because the name now leads to another inode
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESTALE})


def _apply(job: _Job, mountpoint: str) -> None:
    f = job.file
    full = os.path.join(mountpoint, job.path)
    for act in job.actions:
        try:
            if act == OPEN or f.fd is None:
                if f.fd is not None:
                    _close_all([f.fd])  # the previous open ends, as for a second `cat`
                    f.fd = None
                f.fd = _open_regular(full)
            if act == READ:
                os.pread(f.fd, 1, 0)
        except OSError as exc:
            job.errno = exc.errno or errno.EIO
            return
        except ValueError:
            # a path no kernel would take (a NUL in it): count it as failed
            job.errno = errno.EINVAL
            return
        job.done += 1


def _open_regular(path: str) -> int:
    """Open ``path`` for a synthetic access, only if it is a regular file.

    The name is first held with O_PATH, which opens nothing (a FIFO's
    blocked writer is not woken), checked, then reopened through
    /proc/self/fd: the check and the open are on the very same inode.
    """
    pfd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            # another kind of file took the name: as for a name reused
            raise OSError(errno.ESTALE, "not a regular file", path)
        # O_NOFOLLOW would refuse the magic link itself
        return os.open(f"/proc/self/fd/{pfd}", _SYNTHETIC_OPEN_FLAGS & ~os.O_NOFOLLOW)
    finally:
        os.close(pfd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            # the mount may be going away under us; the fd is released anyway
            log.debug("closing synthetic fd %d: %s", fd, exc)
