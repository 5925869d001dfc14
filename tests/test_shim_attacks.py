"""More attacks on the overlay's safety, each once a hole (issue #14 under attack).

As in ``test_shim_security``: a real uid with no passwd entry, a real shim
mounted with ``--allow-other``, and a root-owned place outside BACKING that
must stay untouched.  Each test here failed against the overlay before its
fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import resource
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from shim_support import (
    EVENT_TIMEOUT,
    START_TIMEOUT,
    feeder,
    need_fuse,
    run_shim,
    shim_stats,
    wait_for,
)
from test_shim_security import ATTACKER, SYSTEM_PYTHON, _as_attacker, top  # noqa: F401

from compat.inotify_shim import overlay
from compat.inotify_shim.overlay import Overlay
from compat.inotify_shim.replay import Announce, ReplayThreads
from compat.procs import ShimProcess, mount_type, unmount
from notifyd import abi, libc, procs

SECRET = "TOPSECRET"

_IN_OPEN = 0x20
_IN_ACCESS = 0x01
_IN_EVENT = struct.Struct("=iIII")


def _user_proc(argv: list[str], uid: int | str = ATTACKER) -> subprocess.Popen[str]:
    """The system python with ``argv`` as ``uid`` (its own group, no others), piped."""
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-I", *argv],
        user=uid,
        group=uid,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _attacker_proc(code: str) -> subprocess.Popen[str]:
    """A long-lived attacker process: it says what it did on stdout, waits on stdin."""
    return _user_proc(["-c", code])


def _lease_holder(path: Path) -> subprocess.Popen[str]:
    """A user's process holding a write lease on ``path`` (a file it writes
    first); it says "leased", then "asked to let go" when an open conflicts."""
    code = f"""
import fcntl, os, signal, sys
p = {str(path)!r}
with open(p, "w") as f:
    f.write("mine")
fd = os.open(p, os.O_RDONLY)
# os.write: a print here could re-enter the print of "leased" still returning
signal.signal(signal.SIGIO, lambda *a: os.write(1, b"asked to let go\\n"))
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
sys.stdin.read()
"""
    return _attacker_proc(code)


def _holder_says(holder: subprocess.Popen[str], opener: subprocess.Popen[str] | None = None) -> str:
    """The lease holder's next line, or a failure that says why after START_TIMEOUT:
    a test waiting for a lease to be broken must not wait for ever."""
    assert holder.stdout is not None
    if not select.select([holder.stdout], [], [], START_TIMEOUT)[0]:
        why = f"the lease holder said nothing for {START_TIMEOUT} s"
        if opener is not None and opener.poll() is not None:
            why += f"; the opener exited {opener.returncode}: {opener.communicate()}"
        raise AssertionError(why)
    return holder.stdout.readline()


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
                    lambda: d if _settled(d := shim_stats(mnt)) == 2 else None,
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
    reader_code = f"print(open({str(mnt / 'leased')!r}).read(), flush=True)"
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        holder = _lease_holder(backing / "leased")
        reader = None
        try:
            assert _holder_says(holder) == "leased\n", holder.stderr
            reader = _attacker_proc(reader_code)
            # the overlay's open of the file asked the holder to let go
            assert _holder_says(holder, reader) == "asked to let go\n", holder.communicate()
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
import resource
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


@pytest.fixture
def nested_shim(top: Path) -> Iterator[ShimProcess]:  # noqa: F811
    """``top/backing`` with a file ``plain`` and, at ``sub``, another shim's mount.

    The test stops that shim (SIGSTOP) to play a hung NFS or FUSE server
    mounted under BACKING; it is let go on the way out, whatever the test did.
    """
    backing, other = top / "backing", top / "other"
    backing.mkdir()
    other.mkdir()
    (backing / "sub").mkdir()
    (backing / "plain").write_text("plain")
    with run_shim(
        other,
        backing / "sub",
        top / "absent.sock",
        "--stats-socket",
        str(top / "nested.stats"),
        log=top / "nested.log",
    ) as nested:
        try:
            yield nested
        finally:
            os.kill(nested.proc.pid, signal.SIGCONT)


def test_a_hung_filesystem_mounted_under_backing_stops_nothing(
    top: Path,  # noqa: F811
    nested_shim: ShimProcess,
) -> None:
    # A mount under BACKING is never served, but the overlay still stat'ed
    # it (to see it was one) on its one serving thread: a hung NFS or FUSE
    # server there stopped the overlay for every user.
    backing, mnt = top / "backing", top / "mnt"
    probe = f"""
import os
import resource
m = {str(mnt)!r}
print(sorted(os.listdir(m)))
print([os.lstat(os.path.join(m, n)).st_size for n in sorted(os.listdir(m))])
try:
    os.stat(os.path.join(m, "sub"))
except OSError as exc:
    print(exc.errno)
print(open(os.path.join(m, "plain")).read())
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        os.kill(nested_shim.proc.pid, signal.SIGSTOP)
        proc = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
        try:
            out, _ = proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(nested_shim.proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()
            pytest.fail("the overlay stopped with the filesystem mounted under BACKING")
        finally:
            os.kill(nested_shim.proc.pid, signal.SIGCONT)
    assert out.split("\n")[:4] == ["['plain']", "[5]", str(errno.EOPNOTSUPP), "plain"], out


def test_a_former_owner_cannot_strip_set_id_bits(top: Path) -> None:  # noqa: F811
    # Dropping set-ID bits is the kernel's own step after a non-owner's
    # write, made as root by the overlay.  The kernel lets a chmod through
    # on ownership it cached for --timeout: a user whose file root took
    # over (chown root, chmod 4755) could still strip its set-user-ID bit.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    os.chmod(backing, 0o777)
    prog = backing / "prog"
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60"):
        made = _as_attacker(
            f"import os; open({str(prog)!r}, 'w').close(); os.stat({str(mnt / 'prog')!r})"
        )
        assert made.returncode == 0, made.stderr
        os.chown(prog, 0, 0)
        os.chmod(prog, 0o4755)
        out = _as_attacker(
            f"""
import os
import resource
try:
    os.chmod({str(mnt / "prog")!r}, 0o755)
    print("changed")
except PermissionError:
    print("refused")
"""
        )
    assert out.stdout.split() == ["refused"], out.stderr
    assert stat.S_IMODE(prog.stat().st_mode) == 0o4755


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_one_user_cannot_take_every_open_file_of_the_overlay(top: Path, kind: str) -> None:  # noqa: F811
    # Every file or directory opened through the overlay holds one of its
    # fds: a user with a high enough limit of their own took them all, and
    # every other user's open failed with EMFILE.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "f").write_text("f")
    os.chmod(backing / "f", 0o644)
    (backing / "d").mkdir()
    target, flags = (
        ("f", "os.O_RDONLY") if kind == "file" else ("d", "os.O_RDONLY | os.O_DIRECTORY")
    )
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if limit == resource.RLIM_INFINITY or limit > 200_000:
        pytest.skip(f"open-file hard limit {limit}: too many opens for one test")
    probe = f"""
import errno, os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
fds = []
try:
    while len(fds) < {limit} - 16:
        fds.append(os.open({str(mnt / target)!r}, {flags}))
except OSError as exc:
    print(errno.errorcode[exc.errno], len(fds), flush=True)
else:
    print("all", len(fds), flush=True)
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim:
        # two processes of the one user: more than the overlay may open at all
        holders = [_attacker_proc(probe + "import sys; sys.stdin.read()\n") for _ in range(2)]
        try:
            stopped = []
            for holder in holders:
                assert holder.stdout is not None
                stopped.append(holder.stdout.readline().split())
            # another user, and root, still open files
            other = subprocess.run(
                [SYSTEM_PYTHON, "-I", "-c", f"print(open({str(mnt / 'f')!r}).read())"],
                user=ATTACKER + 1,
                group=ATTACKER + 1,
                extra_groups=[],
                capture_output=True,
                text=True,
                check=False,
            )
            as_root = (mnt / "f").read_text()
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()
        log = shim.log()
    assert other.stdout == "f\n", (other.stderr, stopped)
    assert as_root == "f"
    assert [s[0] for s in stopped] == ["EMFILE", "EMFILE"], stopped
    assert sum(int(s[1]) for s in stopped) < limit // 2, stopped
    assert log.count("its share: EMFILE") == 1, log


def test_a_hung_filesystem_under_backing_stops_no_replay(
    top: Path,  # noqa: F811
    nested_shim: ShimProcess,
) -> None:
    # A record for a file the overlay never looked up is resolved by walking
    # BACKING, which stat'ed every directory to see whether it was a mount
    # point: a hung server mounted under BACKING stopped the walk, and with
    # it every replay that needed one.
    backing, mnt = top / "backing", top / "mnt"
    ino = (backing / "plain").stat().st_ino
    with feeder(top / "notify.sock") as feed, run_shim(backing, mnt, feed.path):
        feed.wait_client()
        os.kill(nested_shim.proc.pid, signal.SIGSTOP)
        try:
            feed.send([feed.record(abi.TYPE_OPEN, ino)])
            doc = wait_for(
                lambda: d if _settled(d := shim_stats(mnt)) == 1 else None,
                EVENT_TIMEOUT,
                "the record to be replayed while the nested server is stopped",
            )
        finally:
            os.kill(nested_shim.proc.pid, signal.SIGCONT)
    assert doc["replayed"] == 1, doc


REFUSALS = r"""
import errno, json, os, sys
base = sys.argv[1]
res = {}

def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except OSError as exc:
        res[name] = errno.errorcode[exc.errno]

f = f"{base}/rootfile"
attempt("open for writing", lambda: os.close(os.open(f, os.O_WRONLY)))
attempt("open with O_TRUNC", lambda: os.close(os.open(f, os.O_RDONLY | os.O_TRUNC)))
attempt("open with O_APPEND", lambda: os.close(os.open(f, os.O_WRONLY | os.O_APPEND)))
attempt("truncate", lambda: os.truncate(f, 0))
attempt("chmod", lambda: os.chmod(f, 0o666))
attempt("chown", lambda: os.chown(f, os.getuid(), os.getgid()))
attempt("utime explicit", lambda: os.utime(f, (1, 1)))
attempt("utime now", lambda: os.utime(f))
attempt("setxattr user", lambda: os.setxattr(f, "user.x", b"1"))
attempt("setxattr trusted", lambda: os.setxattr(f, "trusted.x", b"1"))
attempt("removexattr user", lambda: os.removexattr(f, "user.root"))
attempt("hard link", lambda: os.link(f, f"{base}/open/link"))
attempt("rename into a root dir", lambda: os.rename(f"{base}/open/mine", f"{base}/closed/mine"))
attempt("unlink in a sticky dir", lambda: os.unlink(f"{base}/sticky/theirs"))
attempt("rename in a sticky dir", lambda: os.rename(f"{base}/sticky/theirs", f"{base}/sticky/x"))
new = f"{base}/closed/new"
attempt("create in a root dir", lambda: os.close(os.open(new, os.O_CREAT | os.O_WRONLY)))
attempt("mkdir in a root dir", lambda: os.mkdir(f"{base}/closed/newdir"))
attempt("symlink in a root dir", lambda: os.symlink("x", f"{base}/closed/newlink"))
attempt("mkfifo in a root dir", lambda: os.mkfifo(f"{base}/closed/fifo"))
attempt("mknod a device", lambda: os.mknod(f"{base}/open/dev", 0o666 | 0o020000, os.makedev(1, 3)))
attempt("list a dir without x", lambda: os.listdir(f"{base}/noexec"))
attempt("stat in a dir without x", lambda: os.stat(f"{base}/noexec/f"))
attempt("list a dir without r", lambda: os.listdir(f"{base}/noread"))
attempt("stat in a dir without r", lambda: os.stat(f"{base}/noread/f"))
attempt("open a dir for writing", lambda: os.close(os.open(f"{base}/open", os.O_WRONLY)))
attempt("read a 0600 file", lambda: open(f"{base}/noread/f").read())
print(json.dumps(res))
"""


def test_refusals_through_the_overlay_are_backings(top: Path) -> None:  # noqa: F811
    # The cases that did not break it: everything BACKING refuses this user
    # is refused through the overlay with the same errno.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    for side in ("direct", "overlay"):
        base = backing / side
        base.mkdir()
        (base / "rootfile").write_text("root's")
        os.chmod(base / "rootfile", 0o644)
        os.setxattr(base / "rootfile", "user.root", b"1")
        (base / "open").mkdir(mode=0o777)
        os.chmod(base / "open", 0o777)
        (base / "open" / "mine").write_text("mine")
        os.chown(base / "open" / "mine", ATTACKER, ATTACKER)
        (base / "closed").mkdir()
        (base / "sticky").mkdir()
        os.chmod(base / "sticky", 0o1777)
        (base / "sticky" / "theirs").write_text("theirs")
        os.chown(base / "sticky" / "theirs", ATTACKER + 1, ATTACKER + 1)
        os.chmod(base / "sticky" / "theirs", 0o666)
        for name, mode in (("noexec", 0o744), ("noread", 0o711)):
            (base / name).mkdir()
            (base / name / "f").write_text("f")
            os.chmod(base / name / "f", 0o600)
            os.chmod(base / name, mode)
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim:
        direct = _as_attacker(REFUSALS.replace("sys.argv[1]", repr(str(backing / "direct"))))
        through = _as_attacker(REFUSALS.replace("sys.argv[1]", repr(str(mnt / "overlay"))))
        alive = shim.proc.poll() is None
    assert direct.returncode == 0, direct.stderr
    assert through.returncode == 0, through.stderr
    want, got = json.loads(direct.stdout), json.loads(through.stdout)
    assert got == want
    assert alive
    # nothing was allowed but what r or x alone allow
    assert set(want.values()) - {"EACCES", "EPERM", "EISDIR"} <= {"ok"}, want
    allowed = [k for k, v in want.items() if v == "ok"]
    assert allowed == ["list a dir without x", "stat in a dir without r"], want


def test_an_announcing_replay_thread_never_makes_a_directory(tmp_path: Path) -> None:
    # A replay thread makes its "mkdir" through the mount to announce a
    # directory made on BACKING, and the overlay answers it without touching
    # BACKING, if the parent and name are the ones announced.  Should a
    # rename on BACKING put another directory (a root-only one the user
    # moved there) on the thread's way, its mkdir was made for real, as
    # root, mode 0777.  The overlay's own method, with a stand-in request.
    backing = tmp_path / "backing"
    backing.mkdir()
    threads = ReplayThreads()
    overlay = Overlay(str(backing), threads)
    ctx = types.SimpleNamespace(uid=0, gid=0, pid=threading.get_native_id(), umask=0)
    threads.announce(Announce(parent=12345, name=b"b", ino=67890))

    async def mkdir() -> int:
        try:
            await overlay.mkdir(pyfuse3.ROOT_INODE, b"b", 0o777, ctx)  # type: ignore[arg-type]
        except pyfuse3.FUSEError as exc:
            return exc.errno
        return 0

    try:
        assert trio.run(mkdir) == errno.ESTALE
    finally:
        threads.announced(67890)
    assert not (backing / "b").exists()


@contextlib.contextmanager
def _sysctl(path: str, value: str) -> Iterator[None]:
    """``/proc/sys/<path>`` set to ``value`` for the block, then as it was."""
    with open(f"/proc/sys/{path}") as f:
        old = f.read()
    try:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    except OSError as exc:
        pytest.skip(f"cannot set {path} here ({exc}): the kernel's check to compare is off")
    try:
        yield
    finally:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(old)


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_file_made_since_the_lookup_is_opened_as_backing_would(tmp_path: Path, kind: str) -> None:
    # A CREATE comes after a lookup that found nothing; a file made on
    # BACKING in between was opened without O_CREAT, so the kernel's check
    # on an O_CREAT open of another user's file (or FIFO) in a sticky
    # world-writable directory (fs.protected_regular, protected_fifos: the
    # victim's code opening a name in /tmp that an attacker made first) was
    # skipped (a FIFO was refused, EEXIST, but opened first).  The
    # overlay's own method, with a stand-in request, on a
    # name that exists (no timing to win); the knob is set for the test
    # (this machine's default is off) and restored.
    backing = tmp_path / "backing"
    (backing / "sticky").mkdir(parents=True)
    os.chmod(backing / "sticky", 0o1777)
    theirs = backing / "sticky" / "theirs"
    if kind == "file":
        theirs.write_text("theirs")
    else:
        os.mkfifo(theirs)
    os.chown(theirs, ATTACKER + 1, ATTACKER + 1)
    os.chmod(theirs, 0o666)
    overlay = Overlay(str(backing), ReplayThreads())
    root = types.SimpleNamespace(uid=0, gid=0, pid=0, umask=0)
    user = types.SimpleNamespace(uid=ATTACKER, gid=ATTACKER, pid=0, umask=0o022)
    direct = (
        SYSTEM_PYTHON,
        "-I",
        "-c",
        f"import os; os.open({str(theirs)!r}, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK)",
    )

    async def create() -> str:
        sticky = await overlay.lookup(pyfuse3.ROOT_INODE, b"sticky", root)  # type: ignore[arg-type]
        try:
            info, _ = await overlay.create(
                sticky.st_ino,
                b"theirs",
                0o644,
                os.O_RDONLY,
                user,  # type: ignore[arg-type]
            )
        except pyfuse3.FUSEError as exc:
            return errno.errorcode[exc.errno]
        os.close(info.fh)
        return "opened"

    with _sysctl(f"fs/protected_{'regular' if kind == 'file' else 'fifos'}", "1"):
        got = trio.run(create)
        as_user = subprocess.run(
            direct, user=ATTACKER, group=ATTACKER, extra_groups=[], capture_output=True, text=True
        )
    assert "PermissionError" in as_user.stderr, as_user.stderr
    assert got == "EACCES"


class _HeldListingFs:
    """``tests/held_listing_fs.py`` running: what it says, and the word that lets it go."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def line(self) -> str:
        """Its next line; "" if none comes within START_TIMEOUT (a stalled overlay)."""
        try:
            return self._lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            return ""

    def release(self) -> None:
        """Let the held listings go."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()


@contextlib.contextmanager
def _held_listing_backing(at: Path) -> Iterator[_HeldListingFs]:
    """``tests/held_listing_fs.py`` mounted at ``at``: its listings wait for release()."""
    at.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("held_listing_fs.py")), str(at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: mount_type(str(at)) is not None or proc.poll() is not None,
            START_TIMEOUT,
            "the held-listing filesystem to mount",
        )
        assert proc.poll() is None, "the held-listing filesystem exited"
        yield _HeldListingFs(proc)
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        unmount(at)
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# what a user does to the held directory `held` or file `slow`, what BACKING
# then says, and what the user's call prints once BACKING answers.  A listing
# was read whole from BACKING at its first READDIR, on the overlay's one
# serving thread: a user's `ls` of a huge directory (or of one on a slow disk)
# stopped every other user's calls until it was read.
_HELD_CALLS = {
    "listing": ("print(sorted(os.listdir(HELD)))", "listing held\n", "['a', 'b']\n"),
    "read": ("print(open(SLOW).read(), end='')", "reading slow\n", "f\n"),
    "write": ("print(open(SLOW, 'r+').write('x'))", "writing slow\n", "1\n"),
    "truncate": ("print(os.truncate(SLOW, 1))", "truncating slow\n", "None\n"),
    "open_trunc": ("print(open(SLOW, 'w').write('x'))", "truncating slow\n", "1\n"),
    "fsync": ("f = open(SLOW, 'r+')\nprint(os.fsync(f.fileno()))", "syncing slow\n", "None\n"),
}


def test_a_create_that_finds_a_file_truncates_it_off_the_serving_thread(top: Path) -> None:  # noqa: F811
    # A CREATE with O_TRUNC of a name made on BACKING since the kernel's
    # lookup opened the file with O_TRUNC on the serving thread: a change of
    # size, which on scoutfs waits for released data to be staged, while no
    # one's calls were served.  The overlay's own method, on a name BACKING
    # has (no race to win) whose truncation it holds: the serving loop must
    # see BACKING's word that the truncation began.  A watchdog lets
    # BACKING go should the loop stay stopped, so that the test ends.
    backing = top / "backing"
    with _held_listing_backing(backing) as fs:
        overlay = Overlay(str(backing), ReplayThreads())
        ctx = types.SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)
        seen: list[str] = []
        answered = threading.Event()
        watchdog_fired = threading.Event()

        def watchdog() -> None:
            if not answered.wait(START_TIMEOUT):
                watchdog_fired.set()
                fs.release()

        async def create_while_held() -> str:
            result: list[str] = []

            async def create() -> None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                try:
                    info, entry = await overlay.create(
                        pyfuse3.ROOT_INODE,
                        b"s010",
                        0o644,
                        flags,
                        ctx,  # type: ignore[arg-type]
                    )
                except pyfuse3.FUSEError as exc:
                    result.append(errno.errorcode[exc.errno])
                else:
                    os.close(info.fh)
                    result.append(f"opened, size {entry.st_size}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                line = await trio.to_thread.run_sync(fs.line)
                seen.append("stopped until the watchdog" if watchdog_fired.is_set() else line)
                answered.set()
                fs.release()
            return result[0]

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            got = trio.run(create_while_held)
        finally:
            # BACKING's server ends once nothing holds its files
            for node in overlay._inodes.values():
                overlay._release_fd(node)
    assert seen == ["truncating s010\n"]
    # (BACKING says every size it is asked for is the file's own)
    assert got == "opened, size 2"


@pytest.mark.parametrize("call", sorted(_HELD_CALLS))
def test_a_call_on_data_in_progress_stalls_no_one_else(top: Path, call: str) -> None:  # noqa: F811
    # A file's data was read, written and truncated on BACKING from the
    # overlay's one serving thread.  On scoutfs each of those waits, for a
    # file whose data was released (any user may release their own:
    # SCOUTFS_IOC_RELEASE wants only a file open for writing), until
    # something stages it back: for ever if nothing does; one waiting for
    # another node's cluster lock or a slow disk waits too.  Meanwhile no
    # one's calls were served.  Here BACKING is a FUSE filesystem whose
    # `slow` file answers only when the test says: the call is provably in
    # progress while root reads another file.
    backing, mnt = top / "backing", top / "mnt"
    code, started, printed = _HELD_CALLS[call]
    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        slow = _attacker_proc(
            f"import os\nSLOW = {str(mnt / 'slow')!r}\nHELD = {str(mnt / 'held')!r}\n{code}"
        )
        try:
            # the sentinel: BACKING's side of the call has begun, and waits
            assert fs.line() == started
            done: list[str] = []
            reader = threading.Thread(target=lambda: done.append((mnt / "f").read_text()))
            reader.start()
            reader.join(START_TIMEOUT)
            read_meanwhile = list(done)
            still_waiting = slow.poll() is None
            fs.release()
            reader.join()
            out, err = slow.communicate(timeout=START_TIMEOUT)
        finally:
            slow.kill()
            slow.wait()
        alive = shim.proc.poll() is None
    assert read_meanwhile == ["f\n"], f"root's read waited for another user's {call}"
    assert still_waiting
    assert done == ["f\n"]
    assert out == printed, err
    assert alive


def test_a_close_that_waits_on_backing_stalls_no_one_else(top: Path) -> None:  # noqa: F811
    # The overlay closed a user's file on BACKING, at RELEASE, on its one
    # serving thread, and a close may wait: a network filesystem writes the
    # file's dirty data back (FLUSH on a FUSE one), for as long as its
    # server takes; the last close of a file unlinked meanwhile frees its
    # data.  The user's close(2) itself does not wait for RELEASE: BACKING
    # saying the flush began is the sentinel.
    backing, mnt = top / "backing", top / "mnt"
    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        closer = _attacker_proc(f"open({str(mnt / 's020')!r}).close()\nprint('closed')")
        try:
            assert fs.line() == "flushing s020\n"
            done: list[str] = []
            reader = threading.Thread(target=lambda: done.append((mnt / "f").read_text()))
            reader.start()
            reader.join(START_TIMEOUT)
            read_meanwhile = list(done)
            fs.release()
            reader.join()
            out, err = closer.communicate(timeout=START_TIMEOUT)
        finally:
            fs.release()
            closer.kill()
            closer.wait()
        alive = shim.proc.poll() is None
    assert read_meanwhile == ["f\n"], "root's read waited for another user's close"
    assert out == "closed\n", err
    assert alive


def test_one_users_lookups_leave_others_their_open_files(top: Path) -> None:  # noqa: F811
    # The inode fds the overlay holds for the kernel's entries were counted
    # against no one: a user who listed a directory of their own files and
    # opened each made the overlay keep an fd per inode on top of each open
    # file, past its budget, until every fd of the shim was taken (root's
    # open then failed, with ESTALE).  The shim's limit is lowered once it
    # runs (the budgets follow it) so that a few thousand files show it.
    backing, mnt = top / "backing", top / "mnt"
    (backing / "mine").mkdir(parents=True)
    for i in range(1500):
        (backing / "mine" / f"f{i:04d}").touch()
    for p in (backing / "mine", *(backing / "mine").iterdir()):
        os.chown(p, ATTACKER, ATTACKER)
    (backing / "rootfile").write_text("root's")
    (backing / "rootdir").mkdir()
    (backing / "rootdir" / "late").write_text("late")
    limit = 1024
    attack = f"""
import errno, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
d = {str(mnt / "mine")!r}
names = sorted(os.listdir(d))
for n in names:
    os.stat(os.path.join(d, n))
fds = []
try:
    for n in names:
        fds.append(os.open(os.path.join(d, n), os.O_RDONLY))
except OSError as exc:
    print(errno.errorcode[exc.errno], len(fds), flush=True)
else:
    print("all", len(fds), flush=True)
sys.stdin.read()
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim:
        resource.prlimit(shim.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        attacker = _attacker_proc(attack)
        try:
            assert attacker.stdout is not None
            stopped = attacker.stdout.readline().split()
            assert stopped, attacker.stderr.read() if attacker.stderr else ""
            held = len(os.listdir(f"/proc/{shim.proc.pid}/fd"))
            as_root = (mnt / "rootfile").read_text()
            late = (mnt / "rootdir" / "late").read_text()
        finally:
            attacker.kill()
            attacker.wait()
        alive = shim.proc.poll() is None
    assert as_root == "root's", stopped
    assert late == "late"
    assert stopped[0] == "EMFILE", stopped
    # their open files and the inode fds kept for them: under half of it
    assert held < limit // 2, (held, stopped)
    assert alive


def test_groups_are_taken_only_from_a_task_with_the_requests_ids(tmp_path: Path) -> None:
    # A request carries the caller's fsuid, fsgid and thread id; the
    # supplementary groups were read from /proc/<tid> whoever that task
    # was.  A task whose own ids are not the request's (nfsd or a stacked
    # filesystem acting for a client over its own groups) lent the request
    # its groups.  The overlay's own method, with a stand-in request and a
    # real task of another user in another group.
    group = 54329
    other = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", "import sys; sys.stdin.read()"],
        user=ATTACKER + 1,
        group=ATTACKER + 1,
        extra_groups=[group],
        stdin=subprocess.PIPE,
    )
    overlay = Overlay(str(tmp_path), ReplayThreads())
    try:
        ctx = types.SimpleNamespace(uid=ATTACKER, gid=ATTACKER, pid=other.pid)
        lent = overlay._creds(ctx)  # type: ignore[arg-type]
        ctx_own = types.SimpleNamespace(uid=ATTACKER + 1, gid=ATTACKER + 1, pid=other.pid)
        own = overlay._creds(ctx_own)  # type: ignore[arg-type]
    finally:
        other.kill()
        other.wait()
    gone = overlay._creds(ctx)  # type: ignore[arg-type]
    assert [c.groups if c else None for c in (lent, own, gone)] == [(), (group,), ()]


def _task_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_killed_caller_waits_for_its_answer_so_its_tid_stays_its_own(top: Path) -> None:  # noqa: F811
    # What _caller_groups relies on: a task whose request the server has
    # read cannot exit, not even on SIGKILL, until it has its answer, so
    # the thread id in the request is not another task's while the request
    # is served.  Checked on this kernel with a real FUSE server holding a
    # READDIR (no overlay involved).
    backing = top / "held"
    with _held_listing_backing(backing) as fs:
        lister = _attacker_proc(f"import os\nos.listdir({str(backing / 'held')!r})")
        try:
            assert fs.line() == "listing held\n"
            lister.kill()
            # the sentinel: the kill reached it, and it waits, uninterruptibly
            wait_for(
                lambda: _task_state(lister.pid) == "D" or None,
                START_TIMEOUT,
                "the killed caller to wait out its request",
            )
            exited_meanwhile = lister.poll() is not None
            fs.release()
            code = lister.wait(timeout=START_TIMEOUT)
        finally:
            lister.kill()
            lister.wait()
    assert not exited_meanwhile
    assert code == -signal.SIGKILL


def test_one_users_held_listings_leave_others_theirs(top: Path) -> None:  # noqa: F811
    # Directory reads run in threads, so a user whose listings wait on
    # BACKING could take every thread (and every request pyfuse3 serves at
    # once) by starting many: a user's reads run four at a time, wait past
    # that, and past 24 pending answer EAGAIN.  30 listings of held
    # directories from one user; root's listing of another still reaches
    # BACKING.  (The kernel itself sends one READDIR or LOOKUP of a
    # directory at a time: pyfuse3 does not ask for parallel directory
    # operations, so each listing here is of a directory of its own.)
    backing, mnt = top / "backing", top / "mnt"
    many = 30
    attack = f"""
import errno, os, sys, threading
errs = []
lock = threading.Lock()
def ls(i):
    try:
        os.listdir(os.path.join({str(mnt)!r}, "h%02d" % i))
    except OSError as exc:
        with lock:
            errs.append(errno.errorcode[exc.errno])
            # at once: the test waits for these before it lets any listing go
            print(errs[-1], flush=True)
threads = [threading.Thread(target=ls, args=(i,)) for i in range({many})]
for t in threads:
    t.start()
print("started", flush=True)
for t in threads:
    t.join()
print(" ".join(sorted(errs)) or "none", flush=True)
"""
    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        attacker = _attacker_proc(attack)
        try:
            assert attacker.stdout is not None
            # "started", and the sentinel that every listing is in: those past
            # the 24 pending refused (none can end before fs.release(), so none
            # frees a place), in whatever order the attacker's threads print
            said = procs.LineReader(attacker.stdout.fileno())
            deadline = time.monotonic() + START_TIMEOUT
            started = sorted(said.next(deadline) or "" for _ in range(many - 24 + 1))
            # the user's share of reads reached BACKING and wait there
            reached = [fs.line()[: len("listing h")] for _ in range(4)]
            root_listing: list[list[str]] = []
            lister = threading.Thread(
                target=lambda: root_listing.append(sorted(os.listdir(mnt / "held")))
            )
            lister.start()
            # the sentinel: root's read reached BACKING too
            root_reached = fs.line()
            fs.release()
            lister.join()
            out, err = attacker.communicate(timeout=START_TIMEOUT)
        finally:
            attacker.kill()
            attacker.wait()
        alive = shim.proc.poll() is None
    assert reached == ["listing h"] * 4
    assert started == ["EAGAIN"] * (many - 24) + ["started"]
    assert root_reached == "listing held\n"
    assert root_listing == [["a", "b"]]
    assert out.split() == ["EAGAIN"] * (many - 24), err
    assert alive


def test_a_symlink_to_a_hung_filesystem_stops_no_replay(top: Path) -> None:  # noqa: F811
    # Before replaying the first access in a directory, a replay thread
    # stat'ed the directories above the file by their BACKING path, which
    # follows a symlink anywhere on the way.  A user swaps their directory
    # for a symlink to a filesystem that does not answer (their own FUSE
    # mount: fusermount3 lets any user make one; a hung NFS mount will do)
    # and the thread waits for it, as long as it hangs: with every worker
    # stuck so, no record is replayed again and the shim cannot stop.
    backing, mnt, hung = top / "backing", top / "mnt", top / "hung"
    backing.mkdir()
    os.chmod(backing, 0o777)
    (top / "other").mkdir()
    (top / "other" / "e").mkdir()
    (backing / "plain").write_text("plain")
    attack = f"""
import os, sys
b, m, h = {str(backing)!r}, {str(mnt)!r}, {str(hung)!r}
os.makedirs(f"{{b}}/d/e")
with open(f"{{b}}/d/e/f", "w") as f:
    f.write("mine")
held = open(f"{{m}}/d/e/f")
os.rename(f"{{b}}/d", f"{{b}}/d.old")
os.symlink(h, f"{{b}}/d")
print(os.fstat(held.fileno()).st_ino, flush=True)
sys.stdin.read()
"""
    with (
        run_shim(
            top / "other",
            hung,
            top / "absent.sock",
            "--stats-socket",
            str(top / "hung.stats"),
            log=top / "hung.log",
        ) as server,
        feeder(top / "notify.sock") as feed,
        run_shim(backing, mnt, feed.path, "--allow-other", "--workers", "1") as shim,
    ):
        feed.wait_client()
        attacker = _attacker_proc(attack)
        try:
            assert attacker.stdout is not None
            line = attacker.stdout.readline()
            assert line, attacker.stderr.read() if attacker.stderr else ""
            os.kill(server.proc.pid, signal.SIGSTOP)
            feed.send([feed.record(abi.TYPE_OPEN, int(line))])
            feed.send([feed.record(abi.TYPE_OPEN, (backing / "plain").stat().st_ino)])
            # the sentinel: both records ended, one way or another
            doc = wait_for(
                lambda: d if _settled(d := shim_stats(mnt)) == 2 else None,
                EVENT_TIMEOUT,
                "both records to be replayed or refused while the other server is stopped",
            )
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
            attacker.kill()
            attacker.wait()
        alive = shim.proc.poll() is None
    # the user's own file is found again where it is, as for any stale path
    assert doc["replayed"] == 2, doc
    assert alive


def _calls_in_flight(pid: int) -> int:
    """Threads of ``pid`` waiting for a FUSE server's answer (sent or still queued)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
            n += f.read() == "request_wait_answer"
    return n


def test_many_users_held_calls_leave_the_overlay_serving(top: Path) -> None:  # noqa: F811
    # pyfuse3 serves at most max_tasks requests at once, and a call that
    # waits for a worker thread (or in one, on BACKING) holds one of them
    # until it ends.  Each user was bounded (24 pending calls on data, 24
    # listings) but the users together were not: five users with 24 writes
    # each that BACKING holds (a released file on scoutfs, until something
    # stages it) took all 99, no one read /dev/fuse any more, and every
    # user's lookups, stats and cached reads, root's too, waited with them.
    backing, mnt = top / "backing", top / "mnt"
    users, per_user = 5, 24
    calls = users * per_user
    probe_uid = ATTACKER + 9
    # the files opened first (no lookup is left to be made), then written at once
    attack = """
import errno, os, sys, threading
fds = [os.open(path, os.O_WRONLY) for path in sys.argv[1:]]
print("opened", flush=True)
sys.stdin.readline()
def write(fd):
    try:
        os.write(fd, b"x")
    except OSError as exc:
        # at once: the test counts these before it lets any write go
        print(errno.errorcode[exc.errno], flush=True)
threads = [threading.Thread(target=write, args=(fd,)) for fd in fds]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", flush=True)
"""
    probe = f"""
import os
m = {str(mnt)!r}
print(os.stat(m + "/f").st_size, os.stat(m + "/h01/b").st_size, open(m + "/f").read(), end="")
"""

    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        # f's data in the overlay's cache: a read of it asks the shim for nothing
        assert (mnt / "f").read_text() == "f\n"
        attackers = [
            _user_proc(
                ["-c", attack, *(str(mnt / f"s{k * per_user + i:03d}") for i in range(per_user))],
                ATTACKER + 10 + k,
            )
            for k in range(users)
        ]
        probed: list[str] = []
        try:
            refused = [procs.LineReader(a.stdout.fileno()) for a in attackers]  # type: ignore[union-attr]
            deadline = time.monotonic() + START_TIMEOUT
            assert [r.next(deadline) for r in refused] == ["opened"] * users
            for a in attackers:
                a.stdin.write("go\n")  # type: ignore[union-attr]
                a.stdin.flush()  # type: ignore[union-attr]
            said: list[str] = []

            def all_in() -> bool:
                for r in refused:
                    while (line := r.next(time.monotonic() + 0.01)) is not None:
                        said.append(line)
                return sum(_calls_in_flight(a.pid) for a in attackers) + len(said) >= calls

            # the sentinel: every write is in the kernel's hands or refused
            wait_for(all_in, START_TIMEOUT, "every user's writes to be made")
            prober = _user_proc(["-c", probe], probe_uid)
            root: list[str] = []

            def as_root() -> None:
                root.append(str(os.stat(mnt / "h02" / "a").st_size))
                root.append((mnt / "f").read_text())
                # one that waits: the users left root some
                try:
                    root.append((mnt / "s150").read_text())
                except OSError as exc:
                    root.append(errno.errorcode[exc.errno])

            rooted = threading.Thread(target=as_root)
            rooted.start()
            # the sentinel: root's read reached BACKING (past the users' held writes)
            while (line := fs.line()) not in ("reading s150\n", ""):
                pass
            root_reached = line
            try:
                probed.append(prober.communicate(timeout=START_TIMEOUT)[0])
            except subprocess.TimeoutExpired:
                probed.append("stalled")
            root_meanwhile = list(root)
            fs.release()
            rooted.join()
            prober.communicate()
            outs = [a.communicate(timeout=START_TIMEOUT)[0] for a in attackers]
        finally:
            # a killed caller waits for its answer: let BACKING give it first
            fs.release()
            for a in attackers:
                a.kill()
                a.wait()
        alive = shim.proc.poll() is None
        code = shim.stop()
        log = shim.log()
    assert probed == ["2 0 f\n"]
    assert root_meanwhile == ["0", "f\n"]
    assert root_reached == "reading s150\n"
    assert root == ["0", "f\n", "f\n"]
    # past the bound on waiting calls, all users together, EAGAIN (a refused
    # call may still be in flight when the sentinel counts it); the others
    # were served once BACKING answered
    said += " ".join(outs).split()
    n_refused = calls - (overlay._MAX_WAITING_CALLS - overlay._ROOT_WAITING_CALLS)
    assert sorted(said) == ["EAGAIN"] * n_refused + ["done"] * users
    assert alive
    assert code == 0, log
