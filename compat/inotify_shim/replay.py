"""Synthetic accesses through the overlay, so the kernel raises inotify events.

A FUSE server cannot inject an inotify event; but an open or a read made
*through* the overlay raises one, on the right name, for every watcher.  So
for each record a worker thread opens the file through the mount point
(IN_OPEN), reads nothing (IN_ACCESS) and, once the file has been quiet for
``close_after`` seconds, closes it (IN_CLOSE_NOWRITE).  The overlay answers
those requests without touching BACKING: it knows them by the requesting
thread id, registered in :class:`ReplayThreads` for the duration.

The read is a vectored read of zero bytes: the kernel raises IN_ACCESS for
any vectored read that does not fail, and with nothing to read it never asks
the filesystem, so it costs no FUSE request.  That is a detail of the VFS
(``do_iter_read``), so the first READ replayed checks it with an inotify
watch of its own, and the replayer falls back to a one-byte read (one READ
request, answered by the overlay without touching BACKING) where it does
not hold.  A replayed open therefore costs LOOKUP (when the kernel has no
fresh entry for the name), OPEN, and RELEASE once the file is quiet.

Why threads: the mount point is served by the trio thread, and an ``open``
of it from that same thread waits forever for its own reply.  The trio
thread hands files to the worker threads once per message (:meth:`Replayer.flush`)
through a plain queue, and collects the finished jobs when it next runs
anyway; each FUSE request already costs it a wakeup, and on these machines
a wakeup (a context switch, the GIL handed over) costs as much as the
Python around it.

Load: each file has one slot.  Records for a file that is already waiting
append to its action list, where a READ after a READ collapses (inotify
merges identical adjacent events anyway).  A READ for a file whose
synthetic open is held and idle is not queued there: it goes to one reader
thread in arrival order (:meth:`Replayer._read_held`).  The queue of waiting
files is bounded; past it records are dropped and counted, never queued
without bound.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import queue
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import pyfuse3
import trio

from notifyd import abi, libc

from .resolve import Resolver

__all__ = [
    "Announce",
    "Looks",
    "ReplayStats",
    "ReplayThreads",
    "Replayer",
    "zero_read_raises_access",
]

log = logging.getLogger(__name__)

OPEN = abi.TYPE_OPEN
READ = abi.TYPE_READ

# A file's pending actions beyond this are dropped: eight opens of one file
# queued behind a slow replay say all a watcher can use.
MAX_ACTIONS = 8

# Losses are logged when they happen, but at most this often (seconds).
LOSS_WARN_INTERVAL = 5.0

# A watcher told of a new directory has added its watch once it has not
# looked the directory up for this long (seconds): inotifywait lists it and
# then adds the watch, a few system calls apart.
NEW_DIR_QUIET = 0.03

# Files one worker takes per trip to its thread: amortises the hand-off.
BATCH = 16

_SYNTHETIC_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC

# <sys/inotify.h>
_IN_ACCESS = 0x00000001
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
# struct inotify_event: wd mask cookie len, then len bytes of name
_INOTIFY_EVENT = struct.Struct("=iIII")


def _read_nothing(fd: int) -> None:
    os.preadv(fd, [bytearray(0)], 0)


def _read_a_byte(fd: int) -> None:
    os.pread(fd, 1, 0)


def zero_read_raises_access(path: str, fd: int) -> bool:
    """Whether a zero-length ``preadv`` of ``fd`` raises IN_ACCESS on ``path``.

    ``fd`` must be open on ``path``; the read it makes is the replay's own
    IN_ACCESS when the answer is yes.  The event is queued before the read
    returns, so no waiting is involved.
    """
    ifd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    try:
        libc.inotify_add_watch(ifd, path, _IN_ACCESS)
        _read_nothing(fd)
        try:
            buf = os.read(ifd, 4096)
        except BlockingIOError:
            return False
    finally:
        os.close(ifd)
    off = 0
    while off + _INOTIFY_EVENT.size <= len(buf):
        _wd, mask, _cookie, name_len = _INOTIFY_EVENT.unpack_from(buf, off)
        if mask & _IN_ACCESS:
            return True
        off += _INOTIFY_EVENT.size + name_len
    return False


class ReplayThreads:
    """Thread ids making synthetic accesses now, each with the file it expects.

    Written by replay threads, read by the overlay's ``open`` on the trio
    thread; single dict operations are atomic under the GIL.  An id is only
    registered while its thread is alive and replaying, so a recycled thread
    id can never turn someone else's open into a synthetic one.
    """

    def __init__(self) -> None:
        self._expect: dict[int, tuple[int, str]] = {}
        self._announce: dict[int, Announce] = {}
        # inode -> set once a thread that is not ours has looked it up
        self._awaited: dict[int, Looks] = {}

    def expected(self, tid: int) -> tuple[int, str] | None:
        """(inode, BACKING path) thread ``tid`` is opening, if it is a replay thread."""
        return self._expect.get(tid)

    def expect(self, ino: int, backing_path: str) -> None:
        self._expect[threading.get_native_id()] = (ino, backing_path)

    def done(self) -> None:
        self._expect.pop(threading.get_native_id(), None)

    # --- directories made known to watchers (see .announce) -------------------

    def announcing(self, tid: int) -> Announce | None:
        """The directory thread ``tid`` is making the kernel see as created, if any."""
        return self._announce.get(tid)

    def announce(self, what: Announce) -> Looks:
        """Register this thread's synthetic ``mkdir``; :meth:`looked_up` counts on it."""
        self._announce[threading.get_native_id()] = what
        looks = self._awaited[what.ino] = Looks()
        return looks

    def announced(self, ino: int) -> None:
        """This thread's synthetic ``mkdir`` is over; stop counting lookups of ``ino``."""
        self._announce.pop(threading.get_native_id(), None)
        self._awaited.pop(ino, None)

    def looked_up(self, ino: int, tid: int) -> bool:
        """The overlay answers a LOOKUP of ``ino`` for thread ``tid``.

        Returns whether ``ino`` is being announced: its entry must then not be
        cached, so that every path walk through it by a watcher is seen.
        """
        if not self._awaited:
            return False
        looks = self._awaited.get(ino)
        if looks is None:
            return False
        if tid not in self._expect and tid not in self._announce:
            looks.add()
        return True


class Looks:
    """Lookups of an announced directory by threads that are not replaying.

    Counted on the trio thread, waited for by a replay thread.
    """

    def __init__(self) -> None:
        self.count = 0
        self._event = threading.Event()

    def add(self) -> None:
        self.count += 1
        self._event.set()

    def settled(self, first: float, quiet: float) -> bool:
        """Wait up to ``first`` s for a lookup, then until none came for ``quiet`` s.

        A watcher may walk the new directory before it adds its watch
        (inotifywait lists it first): its last lookup, not its first, is the
        sign.  The quiet waits end by ``first`` after the first lookup at the
        latest.  Returns whether any lookup came.
        """
        if not self._event.wait(first):
            return False
        deadline = time.monotonic() + first
        while time.monotonic() < deadline:
            before = self.count
            time.sleep(quiet)
            if self.count == before:
                break
        return True


@dataclasses.dataclass(frozen=True)
class Announce:
    """A directory on BACKING the kernel is told of by a synthetic ``mkdir``.

    ``parent`` is the FUSE inode of its parent, ``name`` its name there,
    ``ino`` the inode BACKING has for it.
    """

    parent: int
    name: bytes
    ino: int


@dataclasses.dataclass
class ReplayStats:
    """What happened to the records handed to the replayer.

    Every record ``submitted`` ends in exactly one of ``replayed``,
    ``collapsed``, ``overload``, ``unresolved``, ``gone`` or ``failed`` (or
    is still pending); ``gap`` counts records the daemon says were lost
    before the shim got them.
    """

    submitted: int = 0  # OPEN and READ records taken from the daemon
    replayed: int = 0  # actions that raised their event
    collapsed: int = 0  # READs merged into a pending READ
    overload: int = 0  # dropped: too many files waiting
    unresolved: int = 0  # no file under BACKING has the inode
    gone: int = 0  # the file disappeared before its replay
    failed: int = 0  # any other error from the synthetic access
    gap: int = 0  # never received: seq gaps in the daemon's stream
    dirs_announced: int = 0  # directories the kernel was told of (IN_CREATE)
    dirs_watched: int = 0  # ... that someone looked up within new_dir_wait
    # the errnos behind ``failed``, by name (EMFILE, EACCES...): what to fix
    failed_by_errno: dict[str, int] = dataclasses.field(default_factory=dict)

    def losses(self) -> tuple[int, ...]:
        return (self.overload, self.unresolved, self.gone, self.failed, self.gap)

    def __str__(self) -> str:
        return ", ".join(f"{getattr(self, f.name)} {f.name}" for f in dataclasses.fields(self))


@dataclasses.dataclass(eq=False)
class _File:
    ino: int
    actions: list[int] = dataclasses.field(default_factory=list)
    fd: int | None = None  # the synthetic open, held until quiet
    queued: bool = False
    busy: bool = False  # a worker or the closer owns it
    reading: int = 0  # READs on ``fd`` handed to the reader thread, not done yet
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
        limiter: bounds the threads of the closer and of the final closes (each
            worker has a thread of its own).
        workers: concurrent batches of synthetic accesses.
        max_pending: files that may wait for a worker before records drop.
        close_after: seconds a synthetic open stays open after its last
            action; docs/ABI.md section 5 wants the close within a second.
        max_open: synthetic opens held at once; past it the oldest idle ones go to
            the closer at once, which closes them before its next tick.
        zero_read: raise IN_ACCESS with a zero-length read where the first
            READ shows it works; False always reads one byte.
        kernel_knows: whether the overlay has told the kernel of a BACKING
            inode (it has an entry for it); directories it has not are made
            known to recursive watchers before a replay inside them (see
            :meth:`_announce_dirs`).  None: never.
        new_dir_wait: how long a replay waits, per directory made known,
            for a watcher to look it up (add its watch) before going on.
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
        zero_read: bool = True,
        kernel_knows: Callable[[int], bool] | None = None,
        new_dir_wait: float = 0.2,
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
        # held opens past max_open, taken from _open at once, for the closer to
        # close before its next tick (see _evict_open)
        self._closing: list[_File] = []
        self._closing_ready = trio.Event()
        self._max_pending = max_pending
        # files handed to the worker threads and not collected yet
        self._in_threads = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # jobs the worker threads are done with, collected on the trio thread
        self._done: collections.deque[list[_Job]] = collections.deque()
        self._wake_pending = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._worker_threads: list[threading.Thread] = []
        # files whose path needs the resolver's await, in arrival order; the
        # files behind one wait there too, so that files are taken in order
        self._to_resolve: collections.deque[_File] = collections.deque()
        # files that got records since the last flush()
        self._ready: list[_File] = []
        self._resolve_ready = trio.Event()
        # READs of held, idle synthetic opens, in arrival order (see _read_held)
        self._reads: list[_File] = []
        self._reads_ready = trio.Event()
        # how a READ is replayed; None until the first READ has checked
        self._reader: Callable[[int], None] | None = None if zero_read else _read_a_byte
        self._reader_lock = threading.Lock()
        self._kernel_knows = kernel_knows
        # BACKING's root, for the announcing threads' stats (opened by run())
        self._backing_fd: int | None = None
        self._new_dir_wait = new_dir_wait
        self._warned = self.stats.losses()
        self._next_warn = -math.inf
        # metrics: called with a file's inode once its pending records are replayed,
        # and once every record of it still waiting raised no event (see _lost)
        self.on_replayed: Callable[[int], None] | None = None
        self.on_lost: Callable[[int], None] | None = None

    # --- intake (trio thread) ------------------------------------------------

    def submit(self, rec_type: int, ino: int) -> None:
        """Queue the replay of one OPEN or READ record; never blocks; see :meth:`flush`."""
        if self._done:
            self._collect()
        self.stats.submitted += 1
        f = self._files.get(ino)
        if f is None:
            f = self._files[ino] = _File(ino)
        acts = f.actions
        if rec_type == READ and not acts and f.fd is not None and not f.busy and self._reader:
            # (once the first READ has checked how to read)
            self._read_held(f)
            return
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
        if not (f.queued or f.busy or f.reading):
            self._enqueue(f)

    def _read_held(self, f: _File) -> None:
        """A READ of a file whose synthetic open is held and idle: the reader's.

        Such READs go to one thread in the order they came, one zero-length
        read each on the held fd, never merged: watchers see the same
        interleaving of IN_ACCESS as the accessors made (inotify itself
        merges only adjacent identical events).  Neither the closer nor a
        worker's reopen touches ``f.fd`` while ``f.reading``.
        """
        if len(self._reads) >= self._max_pending:
            self.stats.overload += 1
            self._lost(f)
            self._warn_losses()
            return
        f.reading += 1
        f.close_at = trio.current_time() + self._close_after
        if f.ino in self._open:
            self._open.move_to_end(f.ino)
        self._reads.append(f)
        self._reads_ready.set()

    def _enqueue(self, f: _File) -> None:
        """Make ``f`` wait for :meth:`flush`, which hands it to a worker thread."""
        if self._in_threads + len(self._to_resolve) + len(self._ready) >= self._max_pending:
            self.stats.overload += len(f.actions)
            f.actions.clear()
            self._lost(f)
            self._settle(f)
            self._warn_losses()
            return
        self._open.pop(f.ino, None)
        f.queued = True
        self._ready.append(f)

    def flush(self) -> None:
        """Hand the files that got records to the worker threads (the resolver first
        for a file with no cached path, and for every file behind one).

        Called once a message's records are all submitted, so that an OPEN
        and the READs after it make one job, one trip to a thread.
        """
        ready, self._ready = self._ready, []
        for f in ready:
            f.queued = False
            path = None if f.stale or self._to_resolve else self._resolver.cached(f.ino)
            if path is None:
                f.queued = True
                self._to_resolve.append(f)
                self._resolve_ready.set()
            else:
                self._dispatch(f, path)

    def _dispatch(self, f: _File, path: str) -> None:
        f.busy = True
        actions, f.actions = f.actions, []
        self._in_threads += 1
        self._jobs.put(_Job(f, path, actions))

    def lost_in_gap(self, count: int) -> None:
        """Count ``count`` records the daemon lost before this shim got them."""
        self.stats.gap += count
        self._warn_losses()

    def _warn_losses(self) -> None:
        """Say what was lost since the last warning, at most every LOSS_WARN_INTERVAL."""
        now = trio.current_time()
        losses = self.stats.losses()
        if now < self._next_warn or losses == self._warned:
            return
        self._next_warn = now + LOSS_WARN_INTERVAL
        overload, unresolved, gone, failed, gap = (
            a - b for a, b in zip(losses, self._warned, strict=True)
        )
        self._warned = losses
        log.warning(
            "records not replayed: %d dropped on overload (raise --max-pending or "
            "--workers), %d with no file under BACKING, %d for files gone, %d failed%s, "
            "%d lost before the shim got them (seq gaps from the daemon)",
            overload,
            unresolved,
            gone,
            failed,
            _errnos(self.stats.failed_by_errno) if failed else "",
            gap,
        )

    def snapshot(self) -> dict[str, object]:
        """The counters and the state of the queue, for the stats socket."""
        self._collect()
        doc: dict[str, object] = dataclasses.asdict(self.stats)
        doc["files_waiting"] = self._in_threads + len(self._to_resolve) + len(self._ready)
        doc["synthetic_opens"] = len(self._open)
        if self._reader is None:
            doc["read_by"] = "not checked yet"
        else:
            doc["read_by"] = "zero-length read" if self._reader is _read_nothing else "1-byte read"
        return doc

    def _settle(self, f: _File) -> None:
        """After a worker, the closer or the reader let go of ``f``: requeue, park or forget it."""
        f.busy = False
        if f.reading:
            return  # the reader settles it when its READs are done
        if f.actions:
            self._enqueue(f)
        elif f.fd is not None:
            f.close_at = trio.current_time() + self._close_after
            self._open[f.ino] = f
            self._open.move_to_end(f.ino)
            if len(self._open) > self._max_open:
                self._evict_open()
        elif not f.queued:
            self._files.pop(f.ino, None)

    def _evict_open(self) -> None:
        """Hand the oldest idle held opens past ``max_open`` to the closer now.

        The closer's tick alone would let a burst of replays hold as many
        opens as it makes in a tick; the overlay keeps only so many fds
        free for them.
        """
        excess = len(self._open) - self._max_open
        evicted: list[_File] = []
        for f in self._open.values():
            if len(evicted) >= excess:
                break
            if not f.reading:  # the reader settles it; its READs need the fd
                evicted.append(f)
        for f in evicted:
            del self._open[f.ino]
            f.busy = True
        self._closing += evicted
        self._closing_ready.set()

    # --- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replay until cancelled, then close every synthetic open.

        The overlay must keep serving until this returns: the closes are
        requests to it.
        """
        self._token = trio.lowlevel.current_trio_token()
        if self._kernel_knows is not None:
            self._backing_fd = os.open(self._backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for _ in range(self._workers):
            t = threading.Thread(target=self._worker_loop, name="replay", daemon=True)
            t.start()
            self._worker_threads.append(t)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._resolve_loop)
                nursery.start_soon(self._closer)
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._report_losses)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                # the fds they open must be known before closing what is held
                await trio.to_thread.run_sync(self._stop_workers)
                if self._backing_fd is not None:
                    os.close(self._backing_fd)
                    self._backing_fd = None
                self._collect()
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

    async def _read_loop(self) -> None:
        thread = _WorkerThread()
        try:
            while True:
                await self._reads_ready.wait()
                self._reads_ready = trio.Event()
                files, self._reads = self._reads, []
                fds = [f.fd for f in files]
                errs = [0] * len(files)
                await thread.run(functools.partial(self._read_fds, fds, errs))
                failed = False
                for f, err in zip(files, errs, strict=True):
                    f.reading -= 1
                    if err:
                        # no IN_ACCESS was raised: not a replay
                        self._count_failed(err, 1)
                        self._lost(f)
                        failed = True
                    else:
                        self.stats.replayed += 1
                        if self.on_replayed is not None:
                            self.on_replayed(f.ino)
                    if not f.reading and not f.busy:
                        self._settle(f)
                self.flush()
                if failed:
                    self._warn_losses()
        finally:
            thread.stop()

    def _read_fds(self, fds: list[int | None], errs: list[int]) -> None:
        """Reader thread: one replayed READ on each held fd, in order; ``errs[i]`` is
        set to the errno of the read of ``fds[i]`` if it failed."""
        read = self._reader or _read_a_byte
        for i, fd in enumerate(fds):
            if fd is None:
                errs[i] = errno.EBADF
                continue
            try:
                read(fd)
            except OSError as exc:
                errs[i] = exc.errno or errno.EIO

    def _lost(self, f: _File) -> None:
        """Records of ``f`` raised no event: if none of it is still waiting, tell metrics.

        Their time must not be taken for the latency of a later replay of the
        same file, which answers only the records that came after them.
        """
        if self.on_lost is not None and not (f.actions or f.reading):
            self.on_lost(f.ino)

    def _count_failed(self, err: int, n: int) -> None:
        self.stats.failed += n
        by = self.stats.failed_by_errno
        name = errno.errorcode.get(err, str(err))
        by[name] = by.get(name, 0) + n

    # --- worker threads --------------------------------------------------------

    def _worker_loop(self) -> None:
        """Worker thread: take jobs in batches, leave them for :meth:`_collect`.

        The trio thread is not woken for every batch: it collects finished
        jobs when it next runs anyway (a record arrives, the closer ticks),
        and is woken only when a collected job matters at once (records came
        for its file meanwhile, or metrics time the replay).
        """
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            batch = [job]
            while len(batch) < BATCH:
                try:
                    more = jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    jobs.put(None)  # for the next thread: every one stops
                    break
                batch.append(more)
            try:
                self._run_jobs(batch)
            except BaseException:
                log.exception("replay worker failed; its jobs count as failed")
                for j in batch:
                    j.errno = j.errno or errno.EIO
            self._done.append(batch)
            if self.on_replayed is not None or any(j.file.actions for j in batch):
                self._wake()
        jobs.put(None)

    def _wake(self) -> None:
        """Worker thread: have the trio thread collect soon (once per wakeup)."""
        if self._wake_pending or self._token is None:
            return
        self._wake_pending = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._collect_and_flush)

    def _stop_workers(self) -> None:
        self._jobs.put(None)
        for t in self._worker_threads:
            t.join()
        self._worker_threads.clear()

    def _collect(self) -> None:
        """Trio thread: account for the jobs the worker threads are done with."""
        self._wake_pending = False
        done = self._done
        while done:
            batch = done.popleft()
            self._in_threads -= len(batch)
            for job in batch:
                self._finish(job)

    def _collect_and_flush(self) -> None:
        self._collect()
        self.flush()

    async def _resolve_loop(self) -> None:
        """Files whose path is not cached: resolved here in order, then dispatched."""
        pending = self._to_resolve
        while True:
            if not pending:
                await self._resolve_ready.wait()
                self._resolve_ready = trio.Event()
                continue
            f = pending[0]
            path = None if f.stale else self._resolver.cached(f.ino)
            if path is None:
                path = await self._resolver.resolve(f.ino, f.since, stale=f.stale)
            pending.popleft()
            f.queued = False
            if not f.actions:
                # dropped on overload meanwhile
                self._settle(f)
            elif path is None:
                if f.stale:
                    self.stats.gone += len(f.actions)
                else:
                    self.stats.unresolved += len(f.actions)
                f.actions.clear()
                f.stale = None
                self._lost(f)
                self._warn_losses()
                self._settle(f)
            else:
                self._dispatch(f, path)

    def _finish(self, job: _Job) -> None:
        f = job.file
        self.stats.replayed += job.done
        if job.done and self.on_replayed is not None:
            self.on_replayed(f.ino)
        # names with %r: a user's file name may hold a newline, never a forged log line
        log.debug("replayed %d of %s on %r", job.done, job.actions, job.path)
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
                    self._count_failed(job.errno, len(left))
                    log.debug("synthetic access to %r failed: %s", job.path, os.strerror(job.errno))
                f.stale = None
                self._lost(f)
                self._warn_losses()
        else:
            f.stale = None
        self._settle(f)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Worker thread: the synthetic accesses themselves."""
        try:
            for job in jobs:
                self._threads.expect(job.file.ino, os.path.join(self._backing, job.path))
                _apply(job, self.mountpoint, self._read, self._announce_dirs)
        finally:
            self._threads.done()

    def _announce_dirs(self, rel: str) -> None:
        """Worker thread: make the directories above ``rel`` known to watchers.

        A recursive watcher (``inotifywait -r``, watchdog) watches the
        directories it listed at start and those it is told were created.
        One made on BACKING since is news to it, and to the kernel: the
        overlay has never given the kernel an entry for it.  For each such
        directory, top down, this thread makes a ``mkdir`` through the
        overlay, which answers with BACKING's existing directory without
        touching BACKING: the kernel raises IN_CREATE|IN_ISDIR on the parent,
        and the watcher adds a watch, which the overlay sees as a LOOKUP from
        another thread.  The replay goes on once that LOOKUP came or after
        ``new_dir_wait``.  A directory the kernel already has an entry for is
        left alone: whoever looked it up could watch it.
        """
        knows, root = self._kernel_knows, self._backing_fd
        if knows is None or root is None:
            return
        parts = rel.split("/")[:-1]
        if not parts:
            return
        # From BACKING's fd, through no symlink and into no mount: a user may
        # have swapped a directory on the way for a symlink to a filesystem
        # that never answers, and a stat that followed it would wait as long
        try:
            st = libc.stat_beneath(root, "/".join(parts))
        except (OSError, ValueError):
            return  # gone, renamed or swapped: the open fails and is counted
        if knows(st.st_ino):
            # the kernel's entries pin their parents': every directory above is known too
            return
        parent = pyfuse3.ROOT_INODE
        path = self._backing
        for i, name in enumerate(parts):
            path = os.path.join(path, name)
            try:
                st = libc.stat_beneath(root, "/".join(parts[: i + 1]))
            except (OSError, ValueError):
                return  # gone or renamed: the open fails and is counted
            if not stat.S_ISDIR(st.st_mode):
                return
            if not knows(st.st_ino):
                what = Announce(parent, os.fsencode(name), st.st_ino)
                looks = self._threads.announce(what)
                try:
                    # as root: the walk to the parent must stay in the mount
                    pfd = _walk_mount(os.path.join(self.mountpoint, *parts[:i]), os.O_DIRECTORY)
                    try:
                        os.mkdir(name, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                except FileExistsError:
                    pass  # the kernel learnt of it meanwhile, from someone else
                except OSError as exc:
                    log.debug("announcing %r: %s", path, exc)
                    self._threads.announced(st.st_ino)
                    return
                else:
                    self.stats.dirs_announced += 1
                    if looks.settled(self._new_dir_wait, NEW_DIR_QUIET):
                        self.stats.dirs_watched += 1
                finally:
                    self._threads.announced(st.st_ino)
            parent = st.st_ino

    def _read(self, full: str, fd: int) -> None:
        """Worker thread: one replayed READ on synthetic fd ``fd`` of ``full``."""
        reader = self._reader
        if reader is not None:
            reader(fd)
            return
        with self._reader_lock:
            if self._reader is not None:
                self._reader(fd)
                return
            try:
                works = zero_read_raises_access(full, fd)
            except OSError as exc:
                # no inotify to check with (limits reached): the safe choice
                log.warning("cannot check zero-length reads on %r: %s", full, exc)
                works = False
            if works:
                log.info("zero-length reads raise IN_ACCESS here: a replayed READ costs no request")
                self._reader = _read_nothing
            else:
                log.info("zero-length reads raise no IN_ACCESS here: READs are 1-byte reads")
                self._reader = _read_a_byte
                _read_a_byte(fd)

    async def _closer(self) -> None:
        # polling at a quarter of the linger keeps every close within 1.25x of it
        tick = self._close_after / 4
        while True:
            # or at once for the opens _evict_open took past max_open
            with trio.move_on_after(tick):
                await self._closing_ready.wait()
            self._closing_ready = trio.Event()
            # (a submit() without flush() waits for this tick)
            self._collect_and_flush()
            now = trio.current_time()
            due: list[_File] = []
            excess = len(self._open) - self._max_open
            for f in self._open.values():
                if f.close_at > now and len(due) >= excess:
                    break
                if not f.reading:
                    due.append(f)
            for f in due:
                del self._open[f.ino]
                f.busy = True
            # (already taken from _open, and busy)
            due += self._closing
            self._closing = []
            if not due:
                continue
            fds = [f.fd for f in due if f.fd is not None]
            try:
                await trio.to_thread.run_sync(_close_all, fds, limiter=self._limiter)
            finally:
                for f in due:
                    f.fd = None
                    self._settle(f)


class _WorkerThread:
    """One long-lived thread for one worker's synthetic accesses.

    A hand-off is a queue put and one wakeup of trio: about half the CPU of
    ``trio.to_thread.run_sync`` (thread cache, limiter, task parking), paid
    once per batch, which at a steady 1,000 accesses/s holds one file.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._loop, name="replay", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the thread and wait for it to end, cancelled or not.

        Not abandoned on cancellation: the synthetic fds it opens must be
        recorded before the replayer closes what it holds.
        """
        done = trio.Event()
        errors: list[BaseException] = []

        def job() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(done.set)

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        self._jobs.put(None)


def _errnos(by: dict[str, int]) -> str:
    """`` (EMFILE 3, EACCES 1 since the start)`` from ReplayStats.failed_by_errno."""
    most = sorted(by.items(), key=lambda kv: -kv[1])
    return " (" + ", ".join(f"{name} {n}" for name, n in most) + " since the start)"


# ESTALE: the overlay refused because the name now leads to another inode;
# ELOOP: a directory on the way is a symlink now (never followed)
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESTALE, errno.ELOOP})


def _apply(
    job: _Job,
    mountpoint: str,
    read: Callable[[str, int], None],
    announce_dirs: Callable[[str], None],
) -> None:
    f = job.file
    full = os.path.join(mountpoint, job.path)
    if f.fd is None:
        announce_dirs(job.path)
    for act in job.actions:
        try:
            if act == OPEN or f.fd is None:
                if f.fd is not None:
                    _close_all([f.fd])  # the previous open ends, as for a second `cat`
                    f.fd = None
                f.fd = _open_regular(full)
            if act == READ:
                read(full, f.fd)
        except OSError as exc:
            job.errno = exc.errno or errno.EIO
            return
        except ValueError:
            # a path no kernel would take (a NUL in it): count it as failed
            job.errno = errno.EINVAL
            return
        job.done += 1


def _walk_mount(path: str, flags: int = 0) -> int:
    """An O_PATH fd on ``path`` (absolute, in the mount), no symlink followed.

    The replay threads act as root on paths learnt earlier: a directory on
    the way may have been swapped for a symlink on BACKING since, and
    following it would lead them anywhere (``/etc``).  The mount point
    itself has no symlink above it (``check_paths`` resolved it).
    """
    return libc.openat2(
        libc.AT_FDCWD,
        path,
        os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | flags,
        libc.RESOLVE_NO_SYMLINKS,
    )


def _open_regular(path: str) -> int:
    """Open ``path`` for a synthetic access, only if it is a regular file.

    The name is first held with O_PATH, which opens nothing (a FIFO's
    blocked writer is not woken), reached without following any symlink,
    checked, then reopened through /proc/self/fd: the check and the open
    are on the very same inode.
    """
    pfd = _walk_mount(path)
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
