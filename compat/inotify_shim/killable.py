"""Calls that wait on BACKING, answered EINTR once the process waiting for them is killed.

pyfuse3 does not take FUSE_INTERRUPT.  A request the overlay has read is not
given up by the kernel when its caller gets a fatal signal: the caller waits
for the answer uninterruptibly (fs/fuse/dev.c, ``request_wait_answer``: only
a request not yet read by the server is withdrawn), in D state, for as long
as BACKING takes, which for data never staged on scoutfs is for ever.  On
BACKING itself it would die at once.

So a call that may wait runs in a task of its own (:meth:`KillableCalls.run`),
which holds all the call uses (its thread, its waiting-call slot, its fds)
until the call ends; the request's task only waits for it.  Every
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
reused meanwhile would lead it to another file.
Calls that do not wait cost nothing here: they never come this way, and
those that do pay one task and no system call until they have waited.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

__all__ = ["CHECK_EVERY", "Caller", "KillableCalls", "caller_gone"]

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
# to find it by (see _request_tid; -1: not known, 0 for a size: any)
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


class _Call(Generic[R]):
    """One call that may wait: run in a task of its own, its request waiting for it."""

    __slots__ = ("abandoned", "caller", "done", "error", "request_task", "scope", "since", "value")

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.since = _now()
        self.request_task = trio.lowlevel.current_task()
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        self.abandoned = False
        self.value: R | None = None
        self.error: BaseException | None = None

    async def keep(
        self, run: Callable[[], Awaitable[R]], discard: Callable[[R], None] | None
    ) -> None:
        # A system task: it must not raise, and it ends with the call
        with self.scope:
            try:
                self.value = await run()
            except BaseException as exc:  # handed to the request
                self.error = exc
        self.done.set()
        if not self.abandoned:
            return
        if self.error is None and discard is not None:
            try:
                discard(self.value)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("dropping the result of a call whose caller was killed: %s", exc)
        elif self.error is not None and not isinstance(
            self.error, (OSError, FUSEError, trio.Cancelled)
        ):
            log.error(
                "a call whose caller was killed failed",
                exc_info=(type(self.error), self.error, self.error.__traceback__),
            )

    def abandon(self) -> None:
        """Answer without the call: a wait for a thread not started yet is given up
        (nothing of the call runs then), a thread running goes on to its end."""
        self.abandoned = True
        self.scope.cancel()

    def result(self) -> R:
        if self.error is not None:
            # the traceback stays the call's own
            raise self.error
        return self.value  # type: ignore[return-value]


class KillableCalls:
    """The calls that may wait, and the watcher of their callers."""

    def __init__(self) -> None:
        self._calls: set[_Call[object]] = set()
        self._watching = False

    async def run(
        self,
        run: Callable[[], Awaitable[R]],
        caller: Caller,
        discard: Callable[[R], None] | None = None,
    ) -> R:
        """``await run()``, or FUSEError(EINTR) once ``caller`` is killed or gone.

        ``run`` must hold everything it uses until it ends (a thread it
        started may go on after the request is answered): its own fds, not
        the request's (``_pass_fd``).  ``discard`` drops its result if it
        ends after the request was answered (closes an fd it opened).
        """
        call: _Call[R] = _Call(caller)
        trio.lowlevel.spawn_system_task(call.keep, run, discard, name="overlay call")
        self._calls.add(call)  # type: ignore[arg-type]
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watch, name="overlay callers")
        try:
            await call.done.wait()
        except BaseException:
            # cancelled (the session ends): the call ends on its own
            call.abandon()
            raise
        finally:
            self._calls.discard(call)
        if call.abandoned:
            raise FUSEError(errno.EINTR)
        return call.result()

    async def _watch(self) -> None:
        try:
            while self._calls:
                await trio.sleep(CHECK_EVERY)
                # every request task is parked now: _request_tid reads their requests
                now = _now()
                for call in list(self._calls):
                    if call.done.is_set() or now - call.since < CHECK_EVERY:
                        continue
                    if _killed(call):
                        call.abandon()
                        call.done.set()
        finally:
            self._watching = False


def _killed(call: _Call[object]) -> bool:
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


# index (in 8-byte words) of the request in pyfuse3's _Container, once seen
_req_word: int | None = None
_warned = False


def _request_tid(task: trio.lowlevel.Task, fh: int, off: int, size: int) -> int:
    """The thread id in the header of the request ``task`` serves; 0 if not found.

    pyfuse3 hands READ, WRITE, READDIR, FSYNC and FSYNCDIR no RequestContext,
    though libfuse has one for every request (``fuse_req_ctx``).  The
    request is in the ``_Container`` that pyfuse3's coroutine for it (the
    one ``task`` awaits) keeps; the offset of the request pointer in it is
    not public, so it is taken only where the fields around it are the ones
    this request was given (``off`` and ``size``, then ``flags``/``mode`` and
    the request before them, pyfuse3 3.x's order) and ``fh``, the last field,
    is the request's; else 0 and the call is not watched, as before.  Only
    from another task while ``task`` is parked: a running coroutine shows
    no ``cr_await``.
    """
    global _req_word, _warned
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
    if off >= 0:
        for i in range(5, len(words) - 2):
            # pyfuse3 leaves a WRITE's size 0 (fuse_write_buf); a listing's is not known
            sized = words[i + 1] in (size, 0) if size else 0 < words[i + 1] <= 1 << 24
            if words[i] == off % _WORD and sized and words[i - 2]:
                if _req_word not in (None, i - 2):
                    return _not_found("the request moved in the container")
                _req_word = i - 2
                break
        else:
            return _not_found("no offset and size in the container")
    if _req_word is None:
        return 0  # not seen yet (a READ, WRITE or READDIR that waited shows it)
    fuse_req_ctx = _fuse_req_ctx()
    req = words[_req_word]
    if fuse_req_ctx is None or not req:
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
