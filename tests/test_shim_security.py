"""The overlay under attack: a real non-root user, a real shim mount with --allow-other.

The attacker may write in BACKING (normal on shared storage) and acts on it
directly between the overlay's lookup of a name and its use: every attack
swaps a name, or a parent directory, for a symlink to a root-owned place
outside BACKING.  Nothing outside BACKING may be read, changed, created or
deleted, and the shim must keep serving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from shim_support import START_TIMEOUT, feeder, need_fuse, run_shim, wait_for, watch

from compat.inotify_shim import overlay as overlay_mod
from notifyd import abi

# A uid and gid with no passwd entry: a user nobody configured, who owns nothing.
ATTACKER = 54321
SECRET = "TOPSECRET"

# sys.executable may sit where another user cannot run it (a pyenv under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


def _as_attacker(code: str, groups: list[int] | None = None) -> subprocess.CompletedProcess[str]:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} missing: needed to run a probe as another user")
    return subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code],
        user=ATTACKER,
        group=ATTACKER,
        extra_groups=groups or [],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory under /tmp every user can walk (pytest's tmp_path is 0700 root)."""
    need_fuse()
    try:
        pwd.getpwuid(ATTACKER)
    except KeyError:
        pass
    else:
        pytest.skip(f"uid {ATTACKER} has a passwd entry here: the attacker must be nobody's uid")
    path = Path(tempfile.mkdtemp(prefix="shim-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Every entry under ``root``: mode, uid, size, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, data)
    return out


# Each attack: make the decoy on BACKING (the attacker's own), look it up
# through the overlay, swap it (or its parent) for a symlink on BACKING, then
# use the name the kernel has cached.  Results: ["ok", value] or ["err", errno].
ATTACKS = r"""
import json, os
m, b, o = MNT, BACK, OUT
res = {}

def attempt(name, fn):
    try:
        res[name] = ["ok", fn()]
    except OSError as exc:
        res[name] = ["err", exc.errno]

def parent_swap(d, files=("x",)):
    os.mkdir(f"{b}/{d}")
    for f in files:
        with open(f"{b}/{d}/{f}", "w") as fh:
            fh.write("decoy")
        os.stat(f"{m}/{d}/{f}")  # the overlay looks the dir and the file up
    os.stat(f"{m}/{d}")
    os.rename(f"{b}/{d}", f"{b}/{d}.old")
    os.symlink(o, f"{b}/{d}")

def name_swap(f, target):
    with open(f"{b}/{f}", "w") as fh:
        fh.write("decoy")
    os.stat(f"{m}/{f}")
    os.unlink(f"{b}/{f}")
    os.symlink(target, f"{b}/{f}")

parent_swap("d1", ["secret"])
attempt("read via parent swap", lambda: open(f"{m}/d1/secret").read())

name_swap("f1", f"{o}/secret")
attempt("read via name swap", lambda: open(f"{m}/f1").read())

parent_swap("d2", ["victim"])
attempt("truncate via parent swap", lambda: os.truncate(f"{m}/d2/victim", 0))

parent_swap("d3", ["victim"])
def append():
    with open(f"{m}/d3/victim", "a") as fh:
        fh.write("PWNED")
attempt("append via parent swap", append)

name_swap("f2", f"{o}/victim")
def write_swapped():
    with open(f"{m}/f2", "r+") as fh:
        fh.write("PWNED")
attempt("write via name swap", write_swapped)

parent_swap("d4")
def create():
    with open(f"{m}/d4/created", "w") as fh:
        fh.write("PWNED")
attempt("create via parent swap", create)
attempt("mkdir via parent swap", lambda: os.mkdir(f"{m}/d4/newdir"))
attempt("symlink via parent swap", lambda: os.symlink("x", f"{m}/d4/newlink"))

parent_swap("d5", ["precious"])
attempt("unlink via parent swap", lambda: os.unlink(f"{m}/d5/precious"))

parent_swap("d6", ["precious"])
attempt("rename out via parent swap", lambda: os.rename(f"{m}/d6/precious", f"{m}/stolen"))

parent_swap("d7", ["victim"])
attempt("hard link out via parent swap", lambda: os.link(f"{m}/d7/victim", f"{m}/linked"))

# a name the kernel learnt from a directory listing (READDIRPLUS), not a lookup
with open(f"{b}/f4", "w") as fh:
    fh.write("decoy")
os.listdir(m)
os.unlink(f"{b}/f4")
os.symlink(f"{o}/secret", f"{b}/f4")
attempt("read via listing then name swap", lambda: open(f"{m}/f4").read())
os.mkdir(f"{b}/d8")
with open(f"{b}/d8/victim", "w") as fh:
    fh.write("decoy")
os.listdir(m)
os.listdir(f"{m}/d8")
os.rename(f"{b}/d8", f"{b}/d8.old")
os.symlink(o, f"{b}/d8")
attempt("truncate via listing then parent swap", lambda: os.truncate(f"{m}/d8/victim", 0))

name_swap("f3", f"{o}/secret")
attempt("chmod via name swap", lambda: os.chmod(f"{m}/f3", 0o666))
attempt("chown via name swap", lambda: os.chown(f"{m}/f3", os.getuid(), os.getgid()))
attempt("utime via name swap", lambda: os.utime(f"{m}/f3", (1, 1)))
attempt("setxattr via name swap", lambda: os.setxattr(f"{m}/f3", "user.pwned", b"1"))

attempt("listdir after the attacks", lambda: sorted(os.listdir(m))[:1])
print(json.dumps(res))
"""


def test_swapping_names_for_symlinks_on_backing_never_leads_outside(top: Path) -> None:
    backing, mnt, outside = top / "backing", top / "mnt", top / "outside"
    backing.mkdir()
    os.chmod(backing, 0o777)  # the attacker may write in BACKING
    outside.mkdir()
    (outside / "secret").write_text(SECRET)
    os.chmod(outside / "secret", 0o600)
    for name in ("victim", "precious"):
        (outside / name).write_text(name.upper())
        os.chmod(outside / name, 0o644)
    before = _snapshot(outside)
    # a long cache: the kernel keeps using what it looked up before each swap
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60") as shim:
        code = ATTACKS.replace("MNT", repr(str(mnt)))
        code = code.replace("BACK", repr(str(backing))).replace("OUT", repr(str(outside)))
        out = _as_attacker(code)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        alive = shim.proc.poll() is None
        listing = sorted(os.listdir(mnt))
        log = shim.log()
    assert _snapshot(outside) == before, res
    assert SECRET not in out.stdout, res
    # the shim still serves, as root and as the attacker
    assert alive, log
    assert listing, log
    # what the attacker touched was their own decoy, never the file outside
    assert res["read via parent swap"] == ["ok", "decoy"], res
    assert res["read via name swap"] == ["ok", "decoy"], res
    assert res["listdir after the attacks"][0] == "ok", res
    # the listed name now leads elsewhere: refused (ESTALE from the overlay, which
    # no longer finds its inode there, or EACCES once the kernel looked it up again)
    assert res["read via listing then name swap"][0] == "err", res
    assert "Traceback" not in log, log


def test_chmod_600_on_backing_takes_effect_at_once(top: Path) -> None:
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "pub").write_text("data")
    os.chmod(backing / "pub", 0o644)
    probe = f"""
import os
try:
    print(open({str(mnt / "pub")!r}).read())
except PermissionError:
    print("denied")
print(oct(os.stat({str(mnt / "pub")!r}).st_mode & 0o777))
"""
    # attributes cached for a minute: only BACKING can refuse within it
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60"):
        first = _as_attacker(probe)
        assert first.stdout.split() == ["data", "0o644"], first.stderr
        os.chmod(backing / "pub", 0o600)
        second = _as_attacker(probe)
        # the kernel still reports the cached 0644; BACKING refused the open
        assert second.stdout.split() == ["denied", "0o644"], second.stderr


def test_supplementary_groups_decide_as_on_backing(top: Path) -> None:
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    group = 54322
    (backing / "team").write_text("team data")
    os.chown(backing / "team", 0, group)
    os.chmod(backing / "team", 0o640)
    (backing / "teamdir").mkdir()
    os.chown(backing / "teamdir", 0, group)
    os.chmod(backing / "teamdir", 0o770)
    probe = f"""
import os
try:
    print(open({str(mnt / "team")!r}).read().split()[0])
except PermissionError:
    print("denied")
try:
    open({str(mnt / "teamdir" / "new")!r}, "w").close()
    print("created")
except PermissionError:
    print("denied")
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60"):
        outsider = _as_attacker(probe)
        member = _as_attacker(probe, groups=[group])
    assert outsider.stdout.split() == ["denied", "denied"], outsider.stderr
    assert member.stdout.split() == ["team", "created"], member.stderr
    st = (backing / "teamdir" / "new").stat()
    assert (st.st_uid, st.st_gid) == (ATTACKER, ATTACKER)


def test_files_created_by_a_user_are_theirs_without_a_chown(top: Path) -> None:
    # created with the caller's fsuid: BACKING makes them the owner, and a
    # setgid directory's group applies as it does on BACKING
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    os.chmod(backing, 0o777)
    (backing / "sgid").mkdir()
    os.chown(backing / "sgid", 0, 54323)
    os.chmod(backing / "sgid", 0o2777)
    probe = f"""
import os
open({str(mnt / "f")!r}, "w").close()
os.mkdir({str(mnt / "d")!r})
open({str(mnt / "sgid" / "g")!r}, "w").close()
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        out = _as_attacker(probe)
    assert out.returncode == 0, out.stderr
    for name in ("f", "d"):
        st = (backing / name).stat()
        assert (st.st_uid, st.st_gid) == (ATTACKER, ATTACKER), name
    st = (backing / "sgid" / "g").stat()
    assert (st.st_uid, st.st_gid) == (ATTACKER, 54323)


def test_a_mount_nested_under_backing_is_not_crossed(top: Path) -> None:
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "nested").mkdir()
    (backing / "plain").write_text("plain")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(backing / "nested")])
    try:
        (backing / "nested" / "inner").write_text("inner")
        with run_shim(backing, mnt, top / "absent.sock") as shim:
            with pytest.raises(OSError, match="not supported") as exc:
                os.stat(mnt / "nested")
            assert exc.value.errno == errno.EOPNOTSUPP
            assert sorted(os.listdir(mnt)) == ["plain"]
            assert (mnt / "plain").read_text() == "plain"
            shim.wait_log("mount point under BACKING: not served")
    finally:
        subprocess.run(["umount", "-l", str(backing / "nested")], check=False)


def test_an_unexpected_exception_in_a_handler_is_an_eio_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the one fake here: a handler that fails the way a bug would
    @overlay_mod.fuse_handler
    async def broken() -> None:
        raise NotImplementedError("a bug")

    @overlay_mod.fuse_handler
    async def refused() -> None:
        raise PermissionError(errno.EACCES, "no")

    async def call(fn) -> int:
        try:
            await fn()
        except pyfuse3.FUSEError as exc:
            return exc.errno
        return 0

    with caplog.at_level(logging.ERROR, logger=overlay_mod.__name__):
        assert trio.run(call, broken) == errno.EIO
        assert trio.run(call, refused) == errno.EACCES
    assert "broken failed; answered EIO" in caplog.text
    assert "NotImplementedError: a bug" in caplog.text


def test_a_replay_never_opens_a_fifo_that_took_a_files_name(tmp_path: Path) -> None:
    # A writer blocked opening a FIFO through the overlay must stay blocked:
    # a replay that opened the FIFO would wake it and then discard its data.
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "p").write_text("regular")
    ino = (backing / "p").stat().st_ino
    writer_code = f"""
import os
fd = os.open({str(mnt / "p")!r}, os.O_WRONLY)
print("opened", flush=True)
os.write(fd, b"writer data")
"""
    with (
        feeder(tmp_path / "notify.sock") as feed,
        run_shim(backing, mnt, feed.path, "--timeout", "0.2"),
    ):
        feed.wait_client()
        # an open file keeps the inode, and the name the overlay knows for it, alive
        held = open(mnt / "p")  # noqa: SIM115
        # a name sorting after "p": the overlay's table would offer either
        os.link(backing / "p", backing / "z")
        (backing / "p").unlink()
        os.mkfifo(backing / "p")
        wait_for(
            lambda: stat.S_ISFIFO(os.stat(mnt / "p").st_mode),
            START_TIMEOUT,
            "the overlay to show the FIFO",
        )
        writer = subprocess.Popen(
            [sys.executable, "-c", writer_code], stdout=subprocess.PIPE, text=True
        )
        try:
            # the writer waits in open() for a reader (fs/pipe.c: wait_for_partner)
            wait_for(
                lambda: Path(f"/proc/{writer.pid}/wchan").read_text() == "wait_for_partner",
                START_TIMEOUT,
                "the writer to block opening the FIFO",
            )
            with watch(mnt) as w:
                feed.send([feed.record(abi.TYPE_OPEN, ino)])
                # the sentinel: the record was replayed, on the name that still has the file
                w.expect("z", "OPEN")
                assert w.sequence("p") == []
            assert writer.poll() is None, "a replay opened the FIFO and woke its writer"
            fd = os.open(mnt / "p", os.O_RDONLY)
            try:
                assert writer.stdout is not None
                assert writer.stdout.readline() == "opened\n"
                assert os.read(fd, 100) == b"writer data"
            finally:
                os.close(fd)
        finally:
            writer.kill()
            writer.wait()
            held.close()


def _acl_granting_nobody_read() -> bytes:
    # system.posix_acl_access, version 2: user::rw- user:65534:r-- group::--- mask::r-- other::---
    entries = ((0x01, 6, 0xFFFFFFFF), (0x02, 4, 65534), (0x04, 0, 0xFFFFFFFF))
    entries += ((0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize("acl", [False, True], ids=["default", "--acl"])
def test_acls_that_grant_pass_only_with_acl(top: Path, acl: bool) -> None:
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "granted").write_text("granted")
    os.chmod(backing / "granted", 0o600)
    try:
        os.setxattr(backing / "granted", "system.posix_acl_access", _acl_granting_nobody_read())
    except OSError as exc:
        pytest.skip(f"BACKING's filesystem takes no POSIX ACLs: {exc.strerror}")
    probe = f"""
import os
try:
    print(open({str(mnt / "granted")!r}).read())
except PermissionError:
    print("denied")
"""
    args = ["--allow-other"] + (["--acl"] if acl else [])
    with run_shim(backing, mnt, top / "absent.sock", *args):
        out = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", probe],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
        )
        if acl:
            assert os.getxattr(mnt / "granted", "system.posix_acl_access")
        else:
            # Known limit (README): without --acl, ACLs are not visible through the
            # overlay, and the kernel's mode-bit check refuses what only an ACL grants
            with pytest.raises(OSError, match="not supported") as exc:
                os.getxattr(mnt / "granted", "system.posix_acl_access")
            assert exc.value.errno == errno.EOPNOTSUPP
    assert out.stdout.split() == (["granted"] if acl else ["denied"]), out.stderr


def test_limit_directory_search_permission_is_checked_on_cached_attributes(top: Path) -> None:
    # Known limit (README): the kernel checks a directory's search permission
    # with the attributes it cached; BACKING checks the file itself at once.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "d").mkdir()
    (backing / "d" / "f").write_text("f")
    (backing / "d" / "g").write_text("g")
    probe = f"""
for name in ("f", "g"):
    try:
        print(open({str(mnt / "d")!r} + "/" + name).read())
    except PermissionError:
        print("denied")
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60"):
        assert _as_attacker(probe).stdout.split() == ["f", "g"]
        os.chmod(backing / "d", 0o700)
        os.chmod(backing / "d" / "g", 0o600)
        out = _as_attacker(probe)
    # f: the directory's new mode is not seen yet; g: its own mode is, at once
    assert out.stdout.split() == ["f", "denied"], out.stderr


def test_a_writer_who_is_not_the_owner_may_touch_but_not_set_times(top: Path) -> None:
    # pyfuse3 hands UTIME_NOW over as a timestamp; the overlay applies a time
    # that close to the clock as "now", which BACKING grants to anyone who may
    # write.  An explicit time, even one close to now, needs the owner: the
    # kernel refuses it before the overlay sees it.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "shared").write_text("x")
    os.chmod(backing / "shared", 0o666)
    probe = f"""
import os, time
p = {str(mnt / "shared")!r}
for t in (None, time.time(), 1_000_000):
    try:
        os.utime(p, None if t is None else (t, t))
        print("ok")
    except PermissionError:
        print("denied")
"""
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other"):
        out = _as_attacker(probe)
    assert out.stdout.split() == ["ok", "denied", "denied"], out.stderr


def test_a_root_caller_without_capabilities_gets_no_more_than_on_backing(top: Path) -> None:
    # A uid-0 caller whose capabilities were dropped (a container's root, a
    # service with an empty capability set) was served as root: the kernel
    # checked its capabilities, but on attributes cached up to --timeout, so
    # a user's file made 0600 on BACKING stayed readable to it meanwhile.
    if not os.access("/usr/bin/setpriv", os.X_OK):
        pytest.skip("setpriv missing (Debian package util-linux): needed to drop capabilities")
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    (backing / "theirs").write_text("data")
    os.chown(backing / "theirs", ATTACKER, ATTACKER)
    os.chmod(backing / "theirs", 0o644)
    probe = f"""
try:
    print(open({str(mnt / "theirs")!r}).read())
except PermissionError:
    print("denied")
"""
    capless = ["/usr/bin/setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    command = [*capless, SYSTEM_PYTHON, "-I", "-c", probe]
    # attributes cached for a minute: only BACKING can refuse within it
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "60") as shim:
        first = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert first.stdout.split() == ["data"], first.stderr
        os.chmod(backing / "theirs", 0o600)
        direct = subprocess.run(
            [*capless, SYSTEM_PYTHON, "-I", "-c", probe.replace(str(mnt), str(backing))],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        second = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        # root with its capabilities still reads it
        as_root = (mnt / "theirs").read_text()
        alive = shim.proc.poll() is None
    assert direct.stdout.split() == ["denied"], direct.stderr
    assert second.stdout.split() == ["denied"], second.stderr
    assert as_root == "data"
    assert alive
