"""The overlay as a filesystem: a real shim mount, used like any directory.

No daemon here: the shim serves files before (and without) one.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from shim_support import need_fuse, run_shim, wait_for

from notifyd import libc

NOBODY = 65534


@pytest.fixture
def overlay(tmp_path: Path):
    need_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    with run_shim(backing, tmp_path / "mnt", tmp_path / "absent.sock", "--timeout", "0.2"):
        yield backing, tmp_path / "mnt"


def test_read_write_namespace_and_xattrs(overlay) -> None:
    backing, mnt = overlay
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_text("one\n")
    assert (backing / "d" / "f").read_text() == "one\n"
    with open(mnt / "d" / "f", "a") as f:
        f.write("two\n")
    assert (mnt / "d" / "f").read_text() == "one\ntwo\n"
    os.truncate(mnt / "d" / "f", 3)
    assert (backing / "d" / "f").read_text() == "one"

    (mnt / "d" / "f").rename(mnt / "d" / "g")
    assert not (backing / "d" / "f").exists()
    (mnt / "d").rename(mnt / "e")
    assert (mnt / "e" / "g").read_text() == "one"  # paths under a renamed directory follow it

    os.symlink("g", mnt / "e" / "link")
    assert os.readlink(mnt / "e" / "link") == "g"
    assert (mnt / "e" / "link").read_text() == "one"
    os.link(mnt / "e" / "g", mnt / "e" / "hard")
    assert (mnt / "e" / "g").stat().st_nlink == 2
    assert (mnt / "e" / "hard").stat().st_ino == (backing / "e" / "g").stat().st_ino

    os.chmod(mnt / "e" / "g", 0o640)
    assert (backing / "e" / "g").stat().st_mode & 0o777 == 0o640
    os.utime(mnt / "e" / "g", ns=(1_000_000_000, 2_000_000_000))
    assert (backing / "e" / "g").stat().st_mtime_ns == 2_000_000_000

    os.setxattr(mnt / "e" / "g", "user.k", b"v")
    assert os.getxattr(backing / "e" / "g", "user.k") == b"v"
    assert "user.k" in os.listxattr(mnt / "e" / "g")
    os.removexattr(mnt / "e" / "g", "user.k")
    with pytest.raises(OSError, match="No data available") as exc:
        os.getxattr(mnt / "e" / "g", "user.k")
    assert exc.value.errno == errno.ENODATA

    assert sorted(os.listdir(mnt / "e")) == ["g", "hard", "link"]
    for name in ("g", "hard", "link"):
        (mnt / "e" / name).unlink()
    (mnt / "e").rmdir()
    assert os.listdir(backing) == []
    assert os.statvfs(mnt).f_blocks == os.statvfs(backing).f_blocks


def test_exclusive_create_of_an_existing_file_fails(overlay) -> None:
    backing, mnt = overlay
    (backing / "x").write_text("x")
    with pytest.raises(FileExistsError):
        os.open(mnt / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_changes_on_backing_show_through(overlay) -> None:
    backing, mnt = overlay
    (backing / "log").write_text("a\n")
    assert (mnt / "log").read_text() == "a\n"
    with open(backing / "log", "a") as f:
        f.write("b\n")
    # an open after the append sees all of it, without waiting for a timeout
    assert (mnt / "log").read_text() == "a\nb\n"
    (backing / "new").write_text("n")
    wait_for(lambda: "new" in os.listdir(mnt), 10, "a file created on BACKING to show")
    (backing / "new").unlink()
    wait_for(lambda: not (mnt / "new").exists(), 10, "a file removed on BACKING to go")


def test_large_file_reads_identical_bytes(overlay) -> None:
    backing, mnt = overlay
    size = 48 << 20  # far beyond any readahead window
    with open(backing / "big", "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    digests = []
    for path in (backing / "big", mnt / "big", mnt / "big"):  # cold, then cached
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digests.append(h.hexdigest())
    assert digests[0] == digests[1] == digests[2]


def test_inode_numbers_are_the_backing_ones(overlay) -> None:
    backing, mnt = overlay
    (backing / "a").mkdir()
    (backing / "a" / "b").write_text("b")
    assert (mnt / "a").stat().st_ino == (backing / "a").stat().st_ino
    assert (mnt / "a" / "b").stat().st_ino == (backing / "a" / "b").stat().st_ino


# sys.executable may sit where nobody cannot run it (a pyenv under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} missing: needed to run a probe as another user")
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def open_top():
    """A directory under /tmp every user can walk (pytest's tmp_path is 0700 root)."""
    need_fuse()
    top = Path(tempfile.mkdtemp(prefix="shim-perm-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def test_other_users_get_what_backing_would_give_them(open_top: Path) -> None:
    backing, mnt = open_top / "backing", open_top / "mnt"
    backing.mkdir()
    (backing / "secret").write_text("root only")
    os.chmod(backing / "secret", 0o600)
    (backing / "public").write_text("anyone")
    os.chmod(backing / "public", 0o644)
    (backing / "mine").mkdir()
    os.chown(backing / "mine", NOBODY, NOBODY)
    with run_shim(backing, mnt, open_top / "absent.sock", "--allow-other"):
        probe = f"""
import os
def try_(fn):
    try:
        fn()
        return "ok"
    except PermissionError:
        return "denied"
m = {str(mnt)!r}
print(try_(lambda: open(m + "/public").read()))
print(try_(lambda: open(m + "/secret").read()))
print(try_(lambda: open(m + "/public", "a").write("x")))
print(try_(lambda: open(m + "/new", "w").write("x")))
print(try_(lambda: open(m + "/mine/new", "w").write("x")))
print(try_(lambda: os.chmod(m + "/secret", 0o666)))
"""
        out = _as_nobody(probe)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["ok", "denied", "denied", "denied", "ok", "denied"]
        st = (backing / "mine" / "new").stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        assert (backing / "secret").stat().st_mode & 0o777 == 0o600
        assert (backing / "public").read_text() == "anyone"
        assert not (backing / "new").exists()


def test_without_allow_other_only_root_gets_in(open_top: Path) -> None:
    backing, mnt = open_top / "backing", open_top / "mnt"
    backing.mkdir()
    (backing / "public").write_text("anyone")
    os.chmod(backing / "public", 0o644)
    with run_shim(backing, mnt, open_top / "absent.sock"):
        out = _as_nobody(f"open({str(mnt / 'public')!r}).read()")
        assert "PermissionError" in out.stderr
        assert (mnt / "public").read_text() == "anyone"


def test_renames_keep_every_name_usable(overlay) -> None:
    backing, mnt = overlay
    (mnt / "a").write_text("x")
    os.link(mnt / "a", mnt / "b")
    (mnt / "a").rename(mnt / "c")  # one link of two renamed
    assert (mnt / "c").read_text() == "x"
    assert (mnt / "b").read_text() == "x"
    (mnt / "d").mkdir()
    (mnt / "d" / "e").mkdir()
    (mnt / "d" / "e" / "f").write_text("y")
    (mnt / "d").rename(mnt / "g")  # a tree renamed under a known file
    os.sync()
    assert (mnt / "g" / "e" / "f").read_text() == "y"
    assert sorted(os.listdir(backing)) == ["b", "c", "g"]


def _posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def test_posix_acls_on_backing_are_enforced(open_top: Path) -> None:
    backing, mnt = open_top / "backing", open_top / "mnt"
    backing.mkdir()
    target = backing / "acl"
    target.write_text("acl")
    os.chmod(target, 0o644)
    # everyone may read, except nobody, named in the ACL with no permissions
    acl = _posix_acl(
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_USER, 0, NOBODY),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
        (ACL_MASK, 4, ACL_UNDEFINED_ID),
        (ACL_OTHER, 4, ACL_UNDEFINED_ID),
    )
    try:
        os.setxattr(target, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"BACKING's filesystem takes no POSIX ACLs: {exc.strerror}")
    (backing / "plain").write_text("plain")
    os.chmod(backing / "plain", 0o644)
    direct = _as_nobody(f"open({str(target)!r}).read()")
    assert "PermissionError" in direct.stderr  # BACKING refuses nobody
    with run_shim(backing, mnt, open_top / "absent.sock", "--allow-other"):
        through = _as_nobody(f"open({str(mnt / 'acl')!r}).read()")
        assert "PermissionError" in through.stderr  # and so does the overlay
        plain = _as_nobody(f"print(open({str(mnt / 'plain')!r}).read())")
        assert plain.stdout == "plain\n", plain.stderr
        assert (mnt / "acl").read_text() == "acl"  # root still may


def test_created_files_get_the_callers_mode_and_umask(overlay) -> None:
    backing, mnt = overlay
    # 002 keeps group write, which a shim running under umask 022 would strip
    old = os.umask(0o002)
    try:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mnt / "d", 0o777)
    finally:
        os.umask(old)
    assert (backing / "f").stat().st_mode & 0o777 == 0o664
    assert (backing / "d").stat().st_mode & 0o777 == 0o775


def test_limit_umask_applies_under_a_default_acl(overlay) -> None:
    """Known limit (README): pyfuse3 cannot ask for FUSE_DONT_MASK, so the
    kernel applies the caller's umask before the request reaches us, even
    where POSIX says a default ACL replaces it."""
    backing, mnt = overlay
    (backing / "shared").mkdir()
    default = _posix_acl(
        (ACL_USER_OBJ, 7, ACL_UNDEFINED_ID),
        (ACL_GROUP_OBJ, 7, ACL_UNDEFINED_ID),
        (ACL_MASK, 7, ACL_UNDEFINED_ID),
        (ACL_OTHER, 5, ACL_UNDEFINED_ID),
    )
    try:
        os.setxattr(backing / "shared", "system.posix_acl_default", default)
    except OSError as exc:
        pytest.skip(f"BACKING's filesystem takes no POSIX ACLs: {exc.strerror}")
    old = os.umask(0o077)
    try:
        os.close(os.open(mnt / "shared" / "f", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    # POSIX wants 0664 here (the default ACL, no umask)
    assert (backing / "shared" / "f").stat().st_mode & 0o777 == 0o600


def test_tail_f_on_the_overlay_follows_appends_made_on_backing(overlay) -> None:
    backing, mnt = overlay
    (backing / "log").write_text("first\n")
    # `timeout` ends tail, and so the blocking reads below, if lines never come
    tail = subprocess.Popen(
        ["timeout", "20", "tail", "-n", "+1", "-f", "-s", "0.1", str(mnt / "log")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # killed as a group: `timeout` does not pass SIGKILL on
    )
    try:
        assert tail.stdout is not None
        assert tail.stdout.readline() == "first\n"
        with open(backing / "log", "a") as f:
            f.write("second\n")
        # tail polls (FUSE counts as remote); the new size shows within the
        # attribute timeout, and the read past the old size returns the data
        assert tail.stdout.readline() == "second\n"
    finally:
        os.killpg(tail.pid, signal.SIGKILL)
        tail.wait()


def test_o_direct_through_the_overlay(overlay) -> None:
    backing, mnt = overlay
    data = os.urandom(8192)
    (backing / "d").write_bytes(data)
    buf = mmap.mmap(-1, 8192)  # page aligned, as O_DIRECT wants
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.readv(fd, [buf]) == 8192
    finally:
        os.close(fd)
    assert bytes(buf) == data


def test_changes_on_backing_are_read_at_the_next_open_whatever_the_timeout(
    tmp_path: Path,
) -> None:
    """Close-to-open coherence: an open checks BACKING, not the attribute cache."""
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    # a timeout far longer than the test, so only the open-time check can help
    with run_shim(backing, mnt, tmp_path / "absent.sock", "--timeout", "300"):
        (backing / "r").write_text("aaaa")
        assert (mnt / "r").read_text() == "aaaa"  # now in the overlay's caches
        with open(backing / "r", "r+") as f:  # same size, new bytes
            f.write("bbbb")
        os.utime(backing / "r", ns=(0, 1))  # an mtime surely unlike the last one
        assert (mnt / "r").read_text() == "bbbb"
        with open(backing / "r", "a") as f:
            f.write("cc")
        assert (mnt / "r").read_text() == "bbbbcc"


def test_an_open_file_keeps_its_attributes_after_unlink(overlay) -> None:
    backing, mnt = overlay
    (backing / "u").write_text("12345")
    with open(mnt / "u", "rb") as f:
        (mnt / "u").unlink()
        assert not (backing / "u").exists()
        assert os.fstat(f.fileno()).st_size == 5
        assert f.read() == b"12345"


def test_a_big_listing_takes_no_fd_per_entry(tmp_path: Path) -> None:
    # READDIRPLUS entries are reached through their directory when used: a
    # directory bigger than the open-file limit still lists, and stats
    need_fuse()
    backing = tmp_path / "backing"
    (backing / "big").mkdir(parents=True)
    for i in range(2000):
        (backing / "big" / f"f{i:04d}").touch()
    with run_shim(backing, tmp_path / "mnt", None) as shim:
        fds = Path(f"/proc/{shim.proc.pid}/fd")
        before = len(list(fds.iterdir()))
        listing = subprocess.run(
            ["ls", "-l", str(tmp_path / "mnt" / "big")], capture_output=True, text=True
        )
        after = len(list(fds.iterdir()))
        assert (tmp_path / "mnt" / "big" / "f1999").stat().st_size == 0
    assert listing.returncode == 0, listing.stderr
    assert len(listing.stdout.splitlines()) == 2001  # "total" and the entries
    assert after - before < 100


def _entries(fd: int) -> list[tuple[bytes, int]]:
    out = []
    while batch := libc.getdents(fd, 4096):
        out += batch
    return out


def test_listing_offsets_are_backings_and_seekable(overlay) -> None:
    # A listing is read from BACKING a batch at a time with BACKING's own
    # offsets (nothing snapshotted): every name comes once, and a seek to
    # an entry's offset (seekdir) goes on after that entry.
    backing, mnt = overlay
    (backing / "d").mkdir()
    names = {f"f{i:05d}-{'x' * (i % 40)}".encode() for i in range(3000)}
    for name in names:
        (backing / "d" / os.fsdecode(name)).touch()
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        listed = _entries(fd)
        got = [n for n, _ in listed if n not in (b".", b"..")]
        assert sorted(got) == sorted(names)
        middle = len(listed) // 2
        os.lseek(fd, listed[middle][1], os.SEEK_SET)
        assert _entries(fd) == listed[middle + 1 :]
        os.lseek(fd, 0, os.SEEK_SET)
        assert _entries(fd) == listed
    finally:
        os.close(fd)


def test_many_listings_at_once_each_list_every_name(overlay) -> None:
    # More open directories read in turn than the overlay keeps entries
    # read ahead for: those it dropped are read again from their offset.
    backing, mnt = overlay
    (backing / "d").mkdir()
    names = {f"name-{i:04d}" for i in range(600)}
    for name in names:
        (backing / "d" / name).touch()
    fds = [os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY) for _ in range(300)]
    try:
        seen: list[list[bytes]] = [[] for _ in fds]
        live = list(range(len(fds)))
        while live:
            for i in list(live):
                batch = libc.getdents(fds[i], 1024)
                if not batch:
                    live.remove(i)
                seen[i] += [n for n, _ in batch]
    finally:
        for fd in fds:
            os.close(fd)
    for got in seen:
        assert sorted(os.fsdecode(n) for n in got if n not in (b".", b"..")) == sorted(names)
