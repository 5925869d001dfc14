"""The overlay's page cache: kept across opens of an unchanged file, dropped at
the first open after BACKING changed (close-to-open, as NFS gives).

A real shim mount, no daemon.  What the kernel holds is read with util-linux's
``fincore``, whose own open of the file is the "next open" being judged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from shim_support import need_fuse, run_shim, wait_for

SIZE = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def _cached_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache, after an open of it (fincore's)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "PAGES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


@pytest.fixture
def mounted(tmp_path: Path):
    need_fuse()
    if shutil.which("fincore") is None:
        pytest.skip("fincore not installed (Debian package util-linux-extra)")
    backing = tmp_path / "backing"
    backing.mkdir()
    # attributes cached far longer than the test: only the open-time check
    # can make a change on BACKING show
    with run_shim(backing, tmp_path / "mnt", tmp_path / "absent.sock", "--timeout", "300"):
        yield backing, tmp_path / "mnt"


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """New bytes of the same length, and the old mtime back: only ctime tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert after.st_ctime_ns != st.st_ctime_ns


def test_an_unchanged_file_keeps_its_pages_across_opens(mounted) -> None:
    backing, mnt = mounted
    (backing / "f").write_bytes(os.urandom(SIZE))
    assert (mnt / "f").read_bytes() == (backing / "f").read_bytes()
    # the sentinel that the check below can fail: a first open caches nothing
    # until read, and this one read all of it
    assert _cached_pages(mnt / "f") == SIZE // PAGE
    assert _cached_pages(mnt / "f") == SIZE // PAGE


def test_a_change_on_backing_drops_the_pages_at_the_next_open(mounted) -> None:
    backing, mnt = mounted
    (backing / "f").write_bytes(b"a" * SIZE)
    assert (mnt / "f").read_bytes() == b"a" * SIZE
    assert _cached_pages(mnt / "f") == SIZE // PAGE
    with open(backing / "f", "r+b") as f:  # same size, new bytes, new mtime
        f.write(b"b" * SIZE)
    assert _cached_pages(mnt / "f") == 0
    assert (mnt / "f").read_bytes() == b"b" * SIZE


def test_a_rewrite_that_keeps_size_and_mtime_is_read_at_the_next_open(mounted) -> None:
    # cp -p, rsync -t, tar -x: the mtime is set back, but ctime cannot be
    backing, mnt = mounted
    (backing / "f").write_bytes(b"a" * SIZE)
    assert (mnt / "f").read_bytes() == b"a" * SIZE
    _rewrite_keeping_size_and_mtime(backing / "f", b"b" * SIZE)
    assert (mnt / "f").read_bytes() == b"b" * SIZE


def test_a_stat_between_the_change_and_the_open_does_not_hide_it(tmp_path: Path) -> None:
    # a short timeout: the stat reaches the overlay and hands the kernel the
    # new attributes before the open; the open must still drop the old pages
    need_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    with run_shim(backing, mnt, tmp_path / "absent.sock", "--timeout", "0.01"):
        (backing / "f").write_bytes(b"a" * SIZE)
        assert (mnt / "f").read_bytes() == b"a" * SIZE
        _rewrite_keeping_size_and_mtime(backing / "f", b"b" * SIZE)
        ctime = (backing / "f").stat().st_ctime_ns
        wait_for(
            lambda: (mnt / "f").stat().st_ctime_ns == ctime,
            10,
            "a stat through the overlay to show BACKING's new ctime",
        )
        assert (mnt / "f").read_bytes() == b"b" * SIZE


def test_a_write_through_the_overlay_is_read_back_through_it(mounted) -> None:
    backing, mnt = mounted
    (backing / "f").write_bytes(b"a" * SIZE)
    assert (mnt / "f").read_bytes() == b"a" * SIZE
    with open(mnt / "f", "r+b") as f:
        f.seek(SIZE // 2)
        f.write(b"w" * PAGE)
    want = b"a" * (SIZE // 2) + b"w" * PAGE + b"a" * (SIZE // 2 - PAGE)
    assert (backing / "f").read_bytes() == want
    assert (mnt / "f").read_bytes() == want


# A uid with no passwd entry, and the system's Python (the venv's may sit
# under a directory that user cannot enter)
OTHER_UID = 54321
SYSTEM_PYTHON = "/usr/bin/python3"


def test_pages_cached_for_root_are_not_read_by_another_user(tmp_path: Path) -> None:
    # keep_cache keeps pages per inode, but each open is still made on BACKING
    # with the opener's rights: another user's open is refused, cache or not
    need_fuse()
    if shutil.which("fincore") is None:
        pytest.skip("fincore not installed (Debian package util-linux-extra)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} missing: needed to open as another user")
    top = Path(tempfile.mkdtemp(prefix="shim-cache-", dir="/tmp"))  # tmp_path is 0700
    try:
        os.chmod(top, 0o755)
        backing, mnt = top / "backing", top / "mnt"
        backing.mkdir()
        (backing / "secret").write_bytes(b"s" * SIZE)
        os.chmod(backing / "secret", 0o600)
        with run_shim(backing, mnt, top / "absent.sock", "--allow-other", "--timeout", "300"):
            assert (mnt / "secret").read_bytes() == b"s" * SIZE
            assert _cached_pages(mnt / "secret") == SIZE // PAGE
            probe = subprocess.run(
                [SYSTEM_PYTHON, "-I", "-c", f"open({str(mnt / 'secret')!r}, 'rb').read(1)"],
                user=OTHER_UID,
                group=OTHER_UID,
                extra_groups=[],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert probe.returncode != 0
            assert "PermissionError" in probe.stderr, probe.stderr
            # and root's pages are still there: the refusal dropped nothing
            assert _cached_pages(mnt / "secret") == SIZE // PAGE
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)
