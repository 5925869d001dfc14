"""Calls that wait on BACKING, answered EINTR once the process waiting for them is killed.

pyfuse3 does not take FUSE_INTERRUPT.  A request the overlay has read is not
given up by the kernel when its caller gets a fatal signal: the caller waits
for the answer uninterruptibly (fs/fuse/dev.c, ``request_wait_answer``: only
a request not yet read by the server is withdrawn), in D state, for as long
as BACKING takes, which for data never staged on scoutfs is for ever.  On
BACKING itself it would die at once.

So a call that may wait (:meth:`KillableCalls.run`) keeps a list of what it
holds (:class:`Hold`: its waiting-call slots, its fds, counts) and runs its
thread so that it can be given up (:func:`thread`).  Every
:data:`CHECK_EVERY` seconds a watcher looks at the callers of the calls
that have waited that long: a caller with SIGKILL pending, or gone, has its
request answered EINTR at once, and the call is left to end on its own.

A call so left keeps its thread, its slot among the waiting calls (per
user and all users together) and its fds until BACKING answers it: its
thread still waits on BACKING, and those limits are there to bound what
waits on BACKING, calls that never end above all.  Were the slot freed with
the answer, a user who kills and starts again their own readers of data
never staged would pile up threads waiting for ever, past every limit,
until none is left for anyone.  The fds stay open for the same thread,
which may not have reached its system call yet: a number closed and
reused meanwhile would lead it to another file.  So the thread gives them
back when it ends, if its request was answered first.

A signal the caller handles (what FUSE_INTERRUPT is for) does not end its
call: the caller gets its answer when BACKING gives it, as before.  An
EINTR from FUSE reaches even a caller whose handler has SA_RESTART as an
error it never sees on BACKING, and each retry of the call would take one
more thread and slot while the one given up still waits on BACKING: a
program with a periodic signal (SIGALRM, SIGCHLD) would soon hold its
user's whole share.

Calls that do not wait cost nothing here: they never come this way, and
those that do pay a cancel scope and no system call until they have waited.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import FUSEError

__all__ = ["CHECK_EVERY", "Caller", "Hold", "KillableCalls", "caller_gone", "thread"]

log = logging.getLogger(__name__)

R = TypeVar("R")

# How long a call waits before its caller is first looked at, and how often
# after that: long enough that the calls that wait only for a disk or a
# thread never cost a look, short enough that a killed process dies about
# as soon as on BACKING (where the kill ends it at once).
CHECK_EVERY = 0.5

# Who waits for a call: the thread id pyfuse3 gives in the RequestContext
# (0: none, nobody to watch), or, for the requests it gives none (READ,
# WRITE, READDIR, FSYNC, FSYNCDIR), ``(fh, offset, size)`` of the request
# to find it by (see _request_tid; a size of -1: not known; FSYNC: 0, 0)
Caller = int | tuple[int, int, int]

_SIGKILL_BIT = 1 << (9 - 1)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _now() -> float:
    # the clock /proc/<tid>/stat gives task start times in (since boot)
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def caller_gone(tid: int, since: float) -> bool:
    """Whether task ``tid``, which made a request at ``since`` (:func:`_now`), is
    killed (SIGKILL pending) or gone: exited, or its id now another task's.

    The kernel turns a fatal signal to any of a process's threads (``kill
    -9``, or SIGINT, SIGTERM... with no handler) into SIGKILL pending on
    every thread, ours among them.  A task that made its request before
    ``since`` started before it: one started later has the id of an exited
    caller (to the clock's tick, 1/CLK_TCK s: the id space would have to
    wrap within it).
    """
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            status = f.read()
        # after status: a task that replaced the caller since is seen as new
        with open(f"/proc/{tid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    try:
        if fields[0] in (b"Z", b"X") or int(fields[19]) / _CLK_TCK > since:
            return True
    except (IndexError, ValueError):
        return False
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"SigPnd", b"ShdPnd") and int(value, 16) & _SIGKILL_BIT:
            return True
    return False


class Hold:
    """What a call holds until it ends, its thread included, given back in reverse.

    The request's task gives it back once the call is answered, unless a
    thread of the call still runs (its caller was killed): then that
    thread gives it back when it ends (:func:`thread`), and ``discard``
    drops what it returns (closes an fd it opened).
    """

    __slots__ = ("_backs", "detached", "discard")

    def __init__(self) -> None:
        self._backs: list[Callable[[], object]] = []
        self.detached = False
        self.discard: Callable[[Any], object] | None = None

    def add(self, give_back: Callable[[], object]) -> None:
        self._backs.append(give_back)

    def release(self) -> None:
        while self._backs:
            give_back = self._backs.pop()
            try:
                give_back()
            except Exception:
                log.exception("giving back what a call held")


class _ThreadState:
    __slots__ = ("abandoned", "finished", "lock", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = self.finished = self.abandoned = False


async def thread(
    hold: Hold, call: Callable[[], R], limiter: trio.CapacityLimiter | None = None
) -> R:
    """``call()`` in a worker thread; given up at once if cancelled, the thread then
    giving ``hold`` back when it ends (see :class:`Hold`)."""
    state = _ThreadState()
    token = trio.lowlevel.current_trio_token()

    def body() -> R:
        with state.lock:
            if state.abandoned:
                # given up before it started: nothing of it runs (and no one
                # takes what it returns)
                return cast(R, None)
            state.started = True
        value: R | None = None
        try:
            value = call()
            return value
        finally:
            with state.lock:
                state.finished = True
                late = state.abandoned
            if late:
                if value is not None and hold.discard is not None:
                    with contextlib.suppress(OSError):
                        hold.discard(value)
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(hold.release)

    try:
        return await trio.to_thread.run_sync(body, limiter=limiter, abandon_on_cancel=True)
    except BaseException:
        with state.lock:
            state.abandoned = True
            hold.detached = state.started and not state.finished
        raise


class _Call:
    """One call that may wait, while its request waits for it."""

    __slots__ = ("caller", "killed", "request_task", "scope", "since")

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.since = _now()
        self.request_task = trio.lowlevel.current_task()
        self.scope = trio.CancelScope()
        self.killed = False


class KillableCalls:
    """The calls that may wait, and the watcher of their callers."""

    def __init__(self) -> None:
        self._calls: set[_Call] = set()
        self._watching = False

    async def run(self, run: Callable[[Hold], Awaitable[R]], caller: Caller) -> R:
        """``await run(hold)``, or FUSEError(EINTR) once ``caller`` is killed or gone.

        ``run`` puts in ``hold`` all it must give back (its own fds, not the
        request's ``_pass_fd`` ones; slots; counts), and runs its thread with
        :func:`thread`: once the request is answered a thread still running
        gives it back when it ends.
        """
        call = _Call(caller)
        hold = Hold()
        self._calls.add(call)
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watch, name="overlay callers")
        try:
            with call.scope:
                return await run(hold)
            raise FUSEError(errno.EINTR)
        finally:
            self._calls.discard(call)
            if not hold.detached:
                hold.release()

    async def _watch(self) -> None:
        try:
            while self._calls:
                await trio.sleep(CHECK_EVERY)
                # every request task is parked now: _request_tid reads their requests
                now = _now()
                for call in list(self._calls):
                    if not call.killed and now - call.since >= CHECK_EVERY and _killed(call):
                        call.killed = True
                        call.scope.cancel()
        finally:
            self._watching = False


def _killed(call: _Call) -> bool:
    if not isinstance(call.caller, int):
        # found once; 0 if it cannot be, and then never looked for again
        call.caller = _request_tid(call.request_task, *call.caller)
    # (a request the kernel makes for itself has no task: 0)
    return call.caller > 0 and caller_gone(call.caller, call.since)


# --- the caller of a request pyfuse3 gives no context ------------------------

# Coroutines a request's task awaits, down to the pyfuse3 one that holds it
_MAX_AWAITS = 8
_WORD = 1 << 64


class _FuseCtx(ctypes.Structure):
    # libfuse's struct fuse_ctx (fuse_lowlevel.h)
    _fields_ = (
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("pid", ctypes.c_int32),
        ("umask", ctypes.c_uint32),
    )


@functools.cache
def _fuse_req_ctx() -> Callable[[int], ctypes._Pointer[_FuseCtx]] | None:
    """libfuse's ``fuse_req_ctx``, from the libfuse pyfuse3 runs on (None if not found)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        paths = {line.split(maxsplit=5)[-1].strip() for line in f if "/libfuse3.so" in line}
    if len(paths) != 1:
        return None
    fn = ctypes.CDLL(paths.pop()).fuse_req_ctx
    fn.restype = ctypes.POINTER(_FuseCtx)
    fn.argtypes = (ctypes.c_void_p,)
    return fn


_warned = False


def _request_tid(task: trio.lowlevel.Task, fh: int, off: int, size: int) -> int:
    """The thread id in the header of the request ``task`` serves; 0 if not found.

    pyfuse3 hands READ, WRITE, READDIR, FSYNC and FSYNCDIR no RequestContext,
    though libfuse has one for every request (``fuse_req_ctx``).  The
    request is in the ``_Container`` that pyfuse3's coroutine for it (the
    one ``task`` awaits) keeps; the offset of the request pointer in it is
    not public, so it is taken only where the fields around it are the ones
    this request was given (``off`` and ``size``, with ``flags``/``mode`` and
    the request before them, pyfuse3 3.x's order), ``fh``, the last field,
    is the request's, and no other word of the container but the request
    is not 0 before ``off``; else 0 and the call is not watched, as before.  Only
    from another task while ``task`` is parked: a running coroutine shows
    no ``cr_await``.
    """
    coro: object = task.coro
    for _ in range(_MAX_AWAITS):
        awaited = getattr(coro, "cr_await", None)
        if awaited is None and coro is not None:
            # the iterator of an awaitable (Cython's coroutine_wrapper) holds its coroutine
            inner = [obj for obj in gc.get_referents(coro) if hasattr(obj, "cr_await")]
            awaited = inner[0] if len(inner) == 1 else None
        coro = awaited
        name = getattr(coro, "__name__", "")
        if isinstance(name, str) and name.startswith("fuse_") and name.endswith("_async"):
            break
    else:
        return _not_found("no pyfuse3 request awaited")
    container_type = getattr(pyfuse3, "_Container", None)
    container = next(
        (
            obj
            for scope in gc.get_referents(coro)
            for obj in gc.get_referents(scope)
            if type(obj) is container_type
        ),
        None,
    )
    if container is None:
        return _not_found("no request container")
    words = (ctypes.c_uint64 * (type(container).__basicsize__ // 8)).from_address(id(container))
    if words[-1] != fh % _WORD:
        return _not_found("the container's last field is not the handle")
    # words 0 and 1 are the object's header, then come rdev and fi: the
    # request is past them
    for i in range(5, len(words) - 2):
        # pyfuse3 leaves a WRITE's size 0 (fuse_write_buf); a listing's is not known
        sized = words[i + 1] in (size, 0) if size >= 0 else 0 < words[i + 1] <= 1 << 24
        if words[i] == off % _WORD and sized and words[i - 2]:
            break
    else:
        return _not_found("no offset and size in the container")
    if any(words[2 : i - 2]) or any(words[i + 2 : -1]):
        return _not_found("more in the container than pyfuse3 3.x puts there")
    fuse_req_ctx = _fuse_req_ctx()
    req = words[i - 2]
    if fuse_req_ctx is None:
        return _not_found("no libfuse3 in the process")
    return int(fuse_req_ctx(req).contents.pid)


def _not_found(why: str) -> int:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "cannot tell who waits for a call (%s): a caller killed while its call waits "
            "on BACKING waits for BACKING",
            why,
        )
    return 0
