"""More attacks on the overlay's safety, each once a hole (issue #14 under attack).

As in ``test_shim_security``: a real uid with no passwd entry, a real shim
mounted with ``--allow-other``, and a root-owned place outside BACKING that
must stay untouched.  Each test here failed against the overlay before its
fix.
"""

from __future__ import annotations

import errno
import json
import os
import select
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from shim_support import EVENT_TIMEOUT, START_TIMEOUT, feeder, need_fuse, run_shim, wait_for
from test_shim_security import ATTACKER, SYSTEM_PYTHON, _as_attacker, top  # noqa: F401

from notifyd import abi, libc

SECRET = "TOPSECRET"

_IN_OPEN = 0x20
_IN_ACCESS = 0x01
_IN_EVENT = struct.Struct("=iIII")


def _attacker_proc(code: str) -> subprocess.Popen[str]:
    """A long-lived attacker process: it says what it did on stdout, waits on stdin."""
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", code],
        user=ATTACKER,
        group=ATTACKER,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _shim_stats(mnt: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "stats", "--shim", str(mnt), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


def _settled(doc: dict[str, object]) -> int:
    return sum(
        int(doc[k])  # type: ignore[call-overload]
        for k in ("replayed", "collapsed", "overload", "unresolved", "gone", "failed")
    )


def test_a_replay_never_follows_a_symlink_out_of_backing(top: Path) -> None:  # noqa: F811
    # The replay threads act as root on a path the overlay's table gives for
    # a record's inode.  A user who holds their file open keeps that path in
    # the table after renaming its directory on BACKING and putting a symlink
    # to a root-only place in its stead; the replay's walk through the mount
    # then followed the symlink and opened the root-only file as root.
    backing, mnt, outside = top / "backing", top / "mnt", top / "outside"
    backing.mkdir()
    os.chmod(backing, 0o777)
    outside.mkdir()
    (outside / "secret").write_text(SECRET)
    os.chmod(outside / "secret", 0o600)
    attack = f"""
import os, sys
b, m, o = {str(backing)!r}, {str(mnt)!r}, {str(outside)!r}
os.mkdir(f"{{b}}/d")
with open(f"{{b}}/d/secret", "w") as f:
    f.write("decoy")
held = open(f"{{m}}/d/secret")
os.rename(f"{{b}}/d", f"{{b}}/d.old")
os.symlink(o, f"{{b}}/d")
print(os.fstat(held.fileno()).st_ino, flush=True)
sys.stdin.read()
"""
    ifd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        libc.inotify_add_watch(ifd, outside / "secret", _IN_OPEN | _IN_ACCESS)
        with (
            feeder(top / "notify.sock") as feed,
            run_shim(backing, mnt, feed.path, "--allow-other", "--timeout", "0.2") as shim,
        ):
            feed.wait_client()
            attacker = _attacker_proc(attack)
            try:
                assert attacker.stdout is not None
                line = attacker.stdout.readline()
                assert line, attacker.stderr.read() if attacker.stderr else ""
                ino = int(line)
                # the kernel sees the symlink once its entry for "d" expired
                wait_for(lambda: (mnt / "d").is_symlink(), START_TIMEOUT, "the overlay's symlink")
                feed.send([feed.record(abi.TYPE_OPEN, ino), feed.record(abi.TYPE_READ, ino)])
                # the sentinel: both records have ended, one way or another
                doc = wait_for(
                    lambda: d if _settled(d := _shim_stats(mnt)) == 2 else None,
                    EVENT_TIMEOUT,
                    "the records to be replayed or refused",
                )
            finally:
                attacker.kill()
                attacker.wait()
            alive = shim.proc.poll() is None
        events = []
        if select.select([ifd], [], [], 0)[0]:
            buf = os.read(ifd, 4096)
            events = [_IN_EVENT.unpack_from(buf, 0)[1]]
    finally:
        os.close(ifd)
    assert events == [], f"root opened {outside / 'secret'} for a replay: {doc}"
    # the path that led out is dropped and the file found again where it is
    assert doc["failed"] == 0, doc
    assert alive


def test_a_lease_on_backing_does_not_stall_the_overlay(top: Path) -> None:  # noqa: F811
    # A user may take a lease on their own file on BACKING.  An open that
    # conflicts with it waits until the holder lets go, or for
    # /proc/sys/fs/lease-break-time (45 s): made on the overlay's one
    # serving thread, that wait stopped the overlay for every user, and the
    # holder could repeat it forever.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    os.chmod(backing, 0o777)
    holder_code = f"""
import fcntl, os, signal, sys
p = {str(backing / "leased")!r}
with open(p, "w") as f:
    f.write("mine")
fd = os.open(p, os.O_RDONLY)
signal.signal(signal.SIGIO, lambda *a: print("asked to let go", flush=True))
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
sys.stdin.read()
"""
    reader_code = f"print(open({str(mnt / 'leased')!r}).read(), flush=True)"
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        holder = _attacker_proc(holder_code)
        reader = None
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "leased\n", holder.stderr
            reader = _attacker_proc(reader_code)
            # the overlay's open of the file asked the holder to let go
            assert holder.stdout.readline() == "asked to let go\n"
            # the overlay serves others while that open waits for the lease
            listing = sorted(os.listdir(mnt))
            assert (mnt / "leased").stat().st_size == 4
            # the sentinel: the lease is still being broken, neither let go
            # by its holder nor timed out by the kernel
            lease_held = _lease_breaking(backing / "leased")
            holder.communicate("", timeout=START_TIMEOUT)
            out, err = reader.communicate(timeout=START_TIMEOUT)
        finally:
            for p in (holder, reader):
                if p is not None:
                    p.kill()
                    p.wait()
    assert listing == ["leased"]
    assert lease_held, "the overlay answered only once the lease was broken"
    # once the holder let go, the waiting open went on
    assert out == "mine\n", err


def _lease_breaking(path: Path) -> bool:
    # /proc/locks: "1: LEASE  BREAKING  READ  <pid> <maj>:<min>:<ino> 0 EOF" while
    # the kernel waits for the holder; the timeout downgrades it to ACTIVE READ
    ino = path.stat().st_ino
    with open("/proc/locks") as f:
        return any(
            line.split()[1:3] == ["LEASE", "BREAKING"] and line.split()[5].endswith(f":{ino}")
            for line in f
        )


def test_a_user_sees_no_trusted_xattrs(top: Path) -> None:  # noqa: F811
    # trusted.* is for CAP_SYS_ADMIN: BACKING lists those names only to it.
    # A non-zero fsuid drops the filesystem capabilities only, so the
    # overlay acting for a user kept CAP_SYS_ADMIN (and CAP_SYS_RESOURCE,
    # which lets a write past quotas and reserved blocks).
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "f").write_text("f")
    os.chmod(backing / "f", 0o644)
    os.setxattr(backing / "f", "trusted.secret", b"1")
    os.setxattr(backing / "f", "user.plain", b"1")
    probe = f"""
import os
print(sorted(os.listxattr({str(backing / "f")!r})))
print(sorted(os.listxattr({str(mnt / "f")!r})))
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        out = _as_attacker(probe)
        as_root = os.listxattr(mnt / "f")
    direct, through = out.stdout.splitlines()
    assert direct == "['user.plain']", out.stderr
    assert through == direct
    assert sorted(as_root) == ["trusted.secret", "user.plain"]


def test_open_with_o_nofollow_reads_a_regular_file(tmp_path: Path) -> None:
    # O_NOFOLLOW reaches the overlay in the open flags; the overlay reopens
    # the file through its /proc/self/fd link, which O_NOFOLLOW refused (ELOOP).
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "f").write_text("data")
    os.symlink("f", backing / "link")
    with run_shim(backing, mnt, tmp_path / "absent.sock"):
        fd = os.open(mnt / "f", os.O_RDONLY | os.O_NOFOLLOW)
        try:
            assert os.read(fd, 10) == b"data"
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="symbolic links") as exc:
            os.open(mnt / "link", os.O_RDONLY | os.O_NOFOLLOW)
    assert exc.value.errno == errno.ELOOP  # the kernel's own answer for a symlink


def test_backing_mounted_noexec_stays_noexec(top: Path) -> None:  # noqa: F811
    # A program on a noexec BACKING could be run through the overlay; set-ID
    # bits and device nodes are ignored there as on any FUSE mount.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,noexec,mode=0755", "tmpfs", str(backing)],
        check=True,
    )
    try:
        (backing / "prog").write_text("#!/bin/sh\necho ran\n")
        os.chmod(backing / "prog", 0o755)
        probe = f"""
import subprocess
for p in ({str(backing / "prog")!r}, {str(mnt / "prog")!r}):
    try:
        print(subprocess.run([p], capture_output=True, text=True).stdout.strip())
    except PermissionError:
        print("refused")
"""
        with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
            out = _as_attacker(probe)
            with open("/proc/self/mountinfo") as f:
                opts = next(line.split()[5] for line in f if line.split()[4] == str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(backing)], check=False)
    assert out.stdout.split() == ["refused", "refused"], out.stderr
    assert {"nosuid", "nodev", "noexec"} <= set(opts.split(",")), opts


def test_a_file_name_cannot_forge_log_lines(tmp_path: Path) -> None:
    # File names come from users: a newline in one must not start a line of
    # the shim's log that reads as the shim's own.
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    forged = "2026-01-01 00:00:00,000 ERROR scoutfs-notify-shim: FORGED"
    evil = backing / f"x\n{forged}"
    evil.write_text("x")
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(backing, mnt, feed.path, "--debug") as shim,
    ):
        feed.wait_client()
        feed.access(evil)
        shim.wait_log("replayed 2 of")
        log = shim.log()
    assert not [line for line in log.splitlines() if line.startswith(forged)], log


def test_libc_openat2_refuses_symlinks(tmp_path: Path) -> None:
    # the replay's walk through the mount relies on it
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f")
    os.symlink("d", tmp_path / "s")
    flags = os.O_PATH | os.O_CLOEXEC
    os.close(libc.openat2(libc.AT_FDCWD, tmp_path / "d" / "f", flags, libc.RESOLVE_NO_SYMLINKS))
    with pytest.raises(OSError, match="symbolic links") as exc:
        libc.openat2(libc.AT_FDCWD, tmp_path / "s" / "f", flags, libc.RESOLVE_NO_SYMLINKS)
    assert exc.value.errno == errno.ELOOP
