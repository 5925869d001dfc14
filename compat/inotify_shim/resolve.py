"""Inode number -> a path under BACKING, for replaying a record.

Records name files by inode only.  In order of cost:

1. the overlay's own inode table (files the kernel has looked up through it);
2. on scoutfs, ``SCOUTFS_IOC_INO_PATH``, which knows every hard link; the
   first link under BACKING is used (the record does not say which name the
   accessor used, and one event per access is what a watcher expects);
3. elsewhere, an index of BACKING built by walking it with ``scandir`` (inode
   numbers come from ``d_ino``: no stat per file).  A miss rebuilds the index
   unless it was walked after the access, at most once per
   :data:`MIN_RESCAN_INTERVAL` and never past ``limit`` entries, so a storm of
   records for files already gone costs a bounded amount of walking.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable

import trio

from notifyd import libc
from notifyd.ioctls import NotScoutfsError, ino_paths, statfs_more

__all__ = ["Resolver"]

log = logging.getLogger(__name__)

# A miss waits for a walk that started after it; walks start at most this
# often, bounding the cost of records for files that are gone.
MIN_RESCAN_INTERVAL = 0.2

DEFAULT_INDEX_LIMIT = 2_000_000


def _mount_root(path: str) -> str:
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def walk_index(backing: str, limit: int) -> tuple[dict[int, str], bool]:
    """Map inode -> path relative to ``backing`` for every regular file.

    Stays on BACKING's filesystem.  Returns the index and whether ``limit``
    cut it short.
    """
    index: dict[int, str] = {}
    root = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                # from BACKING's fd, through no symlink and into no mount: a
                # directory swapped for a symlink since it was listed must
                # not lead the walk out, and a hung filesystem mounted under
                # BACKING must not stop it (nothing is asked of it)
                fd = libc.openat2(
                    root,
                    rel or ".",
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    libc.RESOLVE_BENEATH | libc.RESOLVE_NO_SYMLINKS | libc.RESOLVE_NO_XDEV,
                )
            except OSError:
                continue  # gone, not a directory any more, or a mount point
            try:
                with os.scandir(fd) as it:
                    for de in it:
                        name = os.path.join(rel, de.name) if rel else de.name
                        try:
                            if de.is_dir(follow_symlinks=False):
                                stack.append(name)
                            elif de.is_file(follow_symlinks=False):
                                index.setdefault(de.inode(), name)
                                if len(index) >= limit:
                                    return index, True
                        except OSError:
                            continue
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        os.close(root)
    return index, False


def _leads_to(backing: str, rel: str, ino: int) -> bool:
    """Whether ``rel`` under ``backing`` is a regular file with inode ``ino`` (no
    symlink followed, no mount crossed)."""
    try:
        root = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = libc.stat_beneath(root, rel)
    except OSError:
        return False
    finally:
        os.close(root)
    return st.st_ino == ino and stat.S_ISREG(st.st_mode)


class Resolver:
    """Finds a path relative to BACKING for an inode number.

    Args:
        backing: the resolved BACKING directory.
        known: the overlay's table, inode -> absolute backing path or None.
        limiter: bounds the threads that walk BACKING or issue ioctls.
        limit: most regular files the walk index holds.
    """

    def __init__(
        self,
        backing: str,
        known: Callable[[int], str | None],
        limiter: trio.CapacityLimiter,
        limit: int = DEFAULT_INDEX_LIMIT,
    ) -> None:
        self.backing = backing
        self._known = known
        self._limiter = limiter
        self._limit = limit
        self._index: dict[int, str] = {}
        # when the walk behind the current index started (trio clock)
        self._walked_at = -math.inf
        self._lock = trio.Lock()
        self._reported: set[int | None] = set()  # INO_PATH errnos logged once each
        self._scoutfs_prefix = self._scoutfs_prefix_of(backing)

    @staticmethod
    def _scoutfs_prefix_of(backing: str) -> str | None:
        """BACKING relative to its scoutfs mount root, or None off scoutfs."""
        try:
            fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            statfs_more(fd)
        except NotScoutfsError:
            return None
        finally:
            os.close(fd)
        rel = os.path.relpath(backing, _mount_root(backing))
        return "" if rel == "." else rel

    @property
    def on_scoutfs(self) -> bool:
        return self._scoutfs_prefix is not None

    def cached(self, ino: int) -> str | None:
        """A relative path without waiting: the inode table, then the index."""
        path = self._known(ino)
        if path is not None:
            rel = os.path.relpath(path, self.backing)
            if rel != "." and not rel.startswith(".."):
                return rel
        return self._index.get(ino)

    async def resolve(self, ino: int, since: float, stale: str | None = None) -> str | None:
        """A relative path for ``ino``, or None when no file has it any more.

        ``since`` is when the caller learnt of the access (trio clock): an
        index walked after that answers without another walk, so a burst of
        records for files already gone costs one walk, not one each.
        ``stale`` is a path that turned out wrong: it is not returned again.
        """
        if self._scoutfs_prefix is not None:
            try:
                return await trio.to_thread.run_sync(
                    self._scoutfs_path, ino, stale, limiter=self._limiter
                )
            except OSError as exc:
                # EPERM without CAP_DAC_READ_SEARCH, or BACKING unmounted:
                # the record is lost (and counted), the shim keeps serving
                if exc.errno not in self._reported:
                    self._reported.add(exc.errno)
                    log.warning("INO_PATH for inode %d under %s: %s", ino, self.backing, exc)
                return None
        path = self.cached(ino)
        if path is not None and path != stale:
            return path
        if stale is not None:
            path = await self._index_path_still_good(ino, stale)
            if path is not None:
                return path
        if self._walked_at < since:
            await self._rescan(since)
        path = self._index.get(ino)
        return None if path == stale else path

    async def _index_path_still_good(self, ino: int, stale: str) -> str | None:
        """The index's path for ``ino`` if it differs from ``stale`` and still leads to it.

        A directory renamed on BACKING keeps its old name in the overlay's
        table (nothing told the kernel), so every access under it comes back
        stale; the index walked since knows the new name.  Checked with one
        open, it spares a walk of all of BACKING per such access.
        """
        path = self._index.get(ino)
        if path is None or path == stale:
            return None
        ok = await trio.to_thread.run_sync(
            _leads_to, self.backing, path, ino, limiter=self._limiter
        )
        return path if ok else None

    def _scoutfs_path(self, ino: int, stale: str | None) -> str | None:
        prefix = self._scoutfs_prefix or ""
        fd = os.open(self.backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            paths = ino_paths(fd, ino)
        finally:
            os.close(fd)
        for path in paths:
            if prefix:
                if not path.startswith(prefix + "/"):
                    continue
                path = path[len(prefix) + 1 :]
            if path != stale:
                return path
        return None

    async def _rescan(self, since: float) -> None:
        async with self._lock:
            if self._walked_at >= since:
                return  # a walk started after `since` finished while we queued
            wait = self._walked_at + MIN_RESCAN_INTERVAL - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            started = trio.current_time()
            index, truncated = await trio.to_thread.run_sync(
                walk_index, self.backing, self._limit, limiter=self._limiter
            )
            if truncated:
                log.warning(
                    "BACKING holds more than %d files: the rest cannot be resolved "
                    "(raise --index-limit)",
                    self._limit,
                )
            self._index = index
            self._walked_at = started
            log.debug("indexed %d files under %s", len(index), self.backing)
