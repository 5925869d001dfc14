"""Socket and directory safety of the real daemon (docs/ABI.md section 4), in a private run dir."""

from __future__ import annotations

import fcntl
import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from notifyd.paths import socket_path_for_dir, stats_path_for

NOBODY = 65534
# A bound on a daemon that must refuse to start, not a timing.
REFUSE_TIMEOUT = 30.0


@pytest.fixture
def short_dir():
    """A private directory with a short path (sun_path holds 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nfy-l-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def refused(backing: Path, *args: str) -> str:
    """Run a daemon that must exit 1 without serving; return its stderr."""
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.daemon", "--source", "fanotify", str(backing), *args],
        capture_output=True,
        text=True,
        timeout=REFUSE_TIMEOUT,
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(path))
    return True


def test_default_layout_is_root_only(notifyd_factory, short_dir) -> None:
    run = short_dir / "run"
    d = notifyd_factory(run_dir=run)
    assert d.socket == socket_path_for_dir(d.backing, run)
    assert d.socket.parent.parent == run
    for p, m in [(run, 0o700), (d.socket.parent, 0o700), (d.socket, 0o600)]:
        st = os.lstat(p)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (m, 0), p
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    assert mode(stats_path_for(d.socket)) == 0o600
    assert connects(d.socket)


def test_a_run_dir_it_did_not_create_keeps_its_mode(notifyd_factory, short_dir) -> None:
    run = short_dir / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    d = notifyd_factory(run_dir=run)
    assert mode(run) == 0o755
    assert (mode(d.socket.parent), mode(d.socket)) == (0o700, 0o600)


@pytest.mark.parametrize("unsafe", [0o1777, 0o777, 0o775])
def test_a_run_dir_others_can_write_is_refused_untouched(tmp_path, short_dir, unsafe) -> None:
    # a stand-in for /tmp (1777) was once turned into 0700
    run = short_dir / "tmp"
    run.mkdir()
    run.chmod(unsafe)
    err = refused(tmp_path, "--run-dir", str(run))
    assert f"{run}: writable by other users (mode {unsafe:04o})" in err
    assert "use a directory only root can write" in err
    assert mode(run) == unsafe
    assert list(run.iterdir()) == []


def test_a_run_dir_the_group_cannot_traverse_is_refused_untouched(tmp_path, short_dir) -> None:
    run = short_dir / "run"
    run.mkdir(mode=0o700)
    err = refused(tmp_path, "--run-dir", str(run), "--socket-group", str(NOBODY))
    assert "others may not traverse it (mode 0700), so --socket-group members" in err
    assert "chmod o+x it" in err
    assert mode(run) == 0o700


def _connect_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    return subprocess.run(
        [*as_user, sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
    )


def test_socket_group_grants_one_group(notifyd_factory, short_dir) -> None:
    try:
        group = grp.getgrgid(NOBODY).gr_name
    except KeyError:
        pytest.skip(f"no group with gid {NOBODY} to grant")
    short_dir.chmod(0o711)  # let nobody reach the run dir, as /run allows
    run = short_dir / "run"
    d = notifyd_factory(None, "--socket-group", group, run_dir=run)
    assert mode(run) == 0o711
    assert (mode(d.socket.parent), os.lstat(d.socket.parent).st_gid) == (0o710, NOBODY)
    assert (mode(d.socket), os.lstat(d.socket).st_gid) == (0o660, NOBODY)
    member = _connect_as(NOBODY, NOBODY, d.socket)
    assert member.returncode == 0, member.stderr
    stranger = _connect_as(NOBODY - 1, NOBODY - 1, d.socket)
    assert stranger.returncode == 13, stranger.stderr


def test_a_live_daemon_is_never_stolen(notifyd_factory) -> None:
    first = notifyd_factory()
    err = refused(first.backing, "--socket", str(first.socket))
    assert "a live daemon serves it: stop that one or choose another --socket" in err
    assert connects(first.socket)
    assert first.proc.poll() is None


def test_a_stale_socket_is_replaced(notifyd_factory, short_dir) -> None:
    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    d = notifyd_factory(None, socket=path)
    assert "replacing stale socket" in d.log()
    assert connects(path)


def test_restart_after_sigkill(notifyd_factory, short_dir) -> None:
    path = short_dir / "k.sock"
    d = notifyd_factory(None, socket=path)
    d.kill()
    assert path.exists()  # SIGKILL leaves it behind
    again = notifyd_factory(d.backing, socket=path)
    assert "replacing stale socket" in again.log()
    assert connects(path)


def test_sigint_removes_both_sockets(notifyd_factory) -> None:
    d = notifyd_factory()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(REFUSE_TIMEOUT) == 0
    assert not d.socket.exists()
    assert not stats_path_for(d.socket).exists()
    assert "SIGINT: shutting down" in d.log()


def test_symlink_instead_of_the_directory_is_refused(tmp_path, short_dir) -> None:
    backing = tmp_path / "b"
    backing.mkdir()
    run = short_dir / "run"
    run.mkdir(mode=0o700)
    planted = short_dir / "attacker"
    planted.mkdir()
    socket_path_for_dir(backing, run).parent.symlink_to(planted)
    err = refused(backing, "--run-dir", str(run))
    assert "not a directory or a symlink: remove it" in err
    assert list(planted.iterdir()) == []


def test_symlinked_run_dir_is_refused(tmp_path, short_dir) -> None:
    planted = short_dir / "attacker"
    planted.mkdir()
    (short_dir / "run").symlink_to(planted)
    err = refused(tmp_path, "--run-dir", str(short_dir / "run"))
    assert "not a directory or a symlink" in err
    assert list(planted.iterdir()) == []


def test_directory_of_another_owner_is_refused(tmp_path, short_dir) -> None:
    run = short_dir / "run"
    run.mkdir(mode=0o700)
    sockdir = socket_path_for_dir(tmp_path, run).parent
    sockdir.mkdir(mode=0o700)
    os.chown(sockdir, NOBODY, NOBODY)
    err = refused(tmp_path, "--run-dir", str(run))
    assert f"owned by uid {NOBODY}" in err


def test_a_file_in_the_way_is_left_alone(tmp_path, short_dir) -> None:
    path = short_dir / "notify.sock"
    path.write_text("precious")
    err = refused(tmp_path, "--socket", str(path))
    assert "exists and is a regular file, not a socket: choose another --socket" in err
    assert path.read_text() == "precious"


@pytest.mark.parametrize("unsafe", [0o777, 0o1777, 0o770, 0o1730])
def test_a_socket_dir_other_users_can_write_is_refused(tmp_path, short_dir, unsafe) -> None:
    # sticky or not: a user there could bind the name first and feed forged records
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(unsafe)
    err = refused(tmp_path, "--socket", str(open_dir / "n.sock"))
    assert f"{open_dir}: writable by other users (mode {unsafe:04o})" in err
    assert list(open_dir.iterdir()) == []
    assert mode(open_dir) == unsafe


def test_the_real_tmp_is_refused_as_socket_dir(tmp_path) -> None:
    err = refused(tmp_path, "--socket", "/tmp/nfy-squat-test.sock")
    assert "/tmp: writable by other users (mode 1777)" in err
    assert not os.path.lexists("/tmp/nfy-squat-test.sock")


def test_a_socket_dir_below_one_another_user_owns_is_refused(tmp_path, short_dir) -> None:
    # nobody could rename their directory away and put their own in its place
    theirs = short_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    mine = theirs / "mine"
    mine.mkdir(mode=0o700)
    err = refused(tmp_path, "--socket", str(mine / "n.sock"))
    assert f"its ancestor {theirs} belongs to uid {NOBODY}" in err
    assert list(mine.iterdir()) == []


def test_a_squatted_socket_path_in_a_safe_dir_is_refused_and_kept(tmp_path, short_dir) -> None:
    # what a squatter in /tmp would do: listen on the path first
    path = short_dir / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as squat:
        squat.bind(str(path))
        squat.listen(1)
        err = refused(tmp_path, "--socket", str(path))
    assert "a live daemon serves it" in err


def test_the_socket_lock_is_respected(tmp_path, short_dir) -> None:
    # a daemon that is starting holds the lock before its socket exists
    path = short_dir / "n.sock"
    fd = os.open(short_dir / "n.sock.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        err = refused(tmp_path, "--socket", str(path))
    finally:
        os.close(fd)
    assert "a live daemon serves it" in err
    assert not path.exists()


def test_an_unusable_run_dir_is_a_clear_error(tmp_path, short_dir) -> None:
    err = refused(tmp_path, "--run-dir", str(short_dir / "missing" / "run"))
    assert f"cannot create the socket: {short_dir / 'missing' / 'run'}: No such file" in err


def test_a_half_made_socket_is_cleaned_up(notifyd_factory, short_dir) -> None:
    # a daemon that died between bind and rename leaves .NAME.new behind
    path = short_dir / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(short_dir / ".n.sock.new"))
    notifyd_factory(None, socket=path)
    assert connects(path)
    assert sorted(p.name for p in short_dir.iterdir()) == ["n.sock", "n.sock.lock", "n.sock.stats"]
