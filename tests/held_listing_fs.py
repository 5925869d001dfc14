"""A FUSE filesystem whose listings and some files' data are held until the test lets them go.

``python held_listing_fs.py MOUNTPOINT``: the root holds the files ``f``,
``slow`` and ``s000`` to ``s199`` and the directories ``held`` and ``h00`` to
``h39``, each with the files ``a`` and ``b``.  A READDIR of one of those
directories prints ``listing NAME`` on stdout, a READ, WRITE, change of size
or FSYNC of ``slow`` or an ``sNNN`` (which anyone may write) prints
``reading NAME``, ``writing NAME``, ``truncating NAME`` (an open with
``O_TRUNC`` too), ``syncing NAME`` or, at each close, ``flushing NAME``,
and each answers only once a line
arrives on stdin: a call that provably is in progress for as long as the
test wants (reads, writes and truncates wait so on scoutfs for a file whose
data was released, until something stages it; an fsync waits for the disk),
with every other request served meanwhile.  Mounted ``allow_other``, for
root to serve as ``BACKING`` to an overlay acting for other users.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

ROOT, FILE, A, B, SLOW = pyfuse3.ROOT_INODE, 2, 3, 4, 5
HELD = {10 + i: name for i, name in enumerate([b"held"] + [b"h%02d" % i for i in range(40)])}
# files whose data is held: each its own inode, so that the kernel sends
# calls on them at once (it sends one write or change of size of a file at a time)
SLOWS = {SLOW: b"slow", **{1000 + i: b"s%03d" % i for i in range(200)}}
NAMES = {
    ROOT: {
        b"f": FILE,
        **{name: ino for ino, name in SLOWS.items()},
        **{name: ino for ino, name in HELD.items()},
    }
}
NAMES.update({ino: {b"a": A, b"b": B} for ino in HELD})
DATA = b"f\n"


class HeldListing(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.released = trio.Event()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = (stat.S_IFDIR | 0o755) if inode in NAMES else (stat.S_IFREG | 0o644)
        if inode in SLOWS:
            attr.st_mode = stat.S_IFREG | 0o666
        attr.st_nlink = 2 if inode in NAMES else 1
        attr.st_size = len(DATA) if inode == FILE or inode in SLOWS else 0
        attr.st_blksize = 4096
        attr.entry_timeout = attr.attr_timeout = 60
        return attr

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: object = None) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(NAMES[parent][name])
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh in HELD and start_id == 0:
            print("listing", HELD[fh].decode(), flush=True)
            await self.released.wait()
        entries = sorted(NAMES[fh].items())
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:
            # the kernel hands O_TRUNC to the open (atomic_o_trunc)
            await self._held("truncating", inode)
        # f's pages stay cached from one open to the next: a read of them
        # is one that never waits
        return pyfuse3.FileInfo(fh=inode, keep_cache=inode == FILE)

    async def _held(self, what: str, inode: int) -> None:
        if inode in SLOWS:
            print(what, SLOWS[inode].decode(), flush=True)
            await self.released.wait()

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._held("reading", fh)
        return DATA[off : off + size] if fh == FILE or fh in SLOWS else b""

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self._held("writing", fh)
        return len(buf)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: object,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            await self._held("truncating", inode)
        return self._attr(inode)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._held("syncing", fh)

    async def flush(self, fh: int) -> None:
        # every close(2) of a file: a network filesystem writes its dirty data back then
        await self._held("flushing", fh)

    async def release(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: object) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = 255
        return out


async def _serve(fs: HeldListing) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        # any line on stdin, or its end, lets the held listings and reads go
        await trio.to_thread.run_sync(sys.stdin.readline)
        fs.released.set()


def main() -> None:
    fs = HeldListing()
    options = set(pyfuse3.default_options) | {"fsname=held", "allow_other"}
    options.discard("default_permissions")
    pyfuse3.init(fs, sys.argv[1], options)
    try:
        trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    os.umask(0o022)
    main()
