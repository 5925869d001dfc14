"""Inode -> path resolution off scoutfs (real walks) and on it (INO_PATH faked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from compat.inotify_shim import resolve
from compat.inotify_shim.resolve import Resolver, walk_index


def test_walk_index_maps_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("f")
    (tmp_path / "g").write_text("g")
    os.symlink("g", tmp_path / "link")
    index, truncated = walk_index(str(tmp_path), limit=100)
    assert not truncated
    assert index == {
        (tmp_path / "d" / "e" / "f").stat().st_ino: "d/e/f",
        (tmp_path / "g").stat().st_ino: "g",
    }
    _, truncated = walk_index(str(tmp_path), limit=1)
    assert truncated


async def test_the_overlay_table_wins_then_a_walk_finds_new_files(tmp_path: Path) -> None:
    (tmp_path / "known").write_text("k")
    known_ino = (tmp_path / "known").stat().st_ino
    table = {known_ino: str(tmp_path / "known")}
    resolver = Resolver(str(tmp_path), table.get, trio.CapacityLimiter(1))
    assert not resolver.on_scoutfs
    assert resolver.cached(known_ino) == "known"
    (tmp_path / "later").write_text("l")
    later_ino = (tmp_path / "later").stat().st_ino
    assert resolver.cached(later_ino) is None
    assert await resolver.resolve(later_ino, since=trio.current_time()) == "later"
    # a stale answer is not given twice
    assert await resolver.resolve(later_ino, since=trio.current_time(), stale="later") is None
    # paths outside BACKING from the table are not used
    table[later_ino] = "/elsewhere/later"
    assert resolver.cached(later_ino) == "later"


@pytest.fixture
def fake_scoutfs(tmpfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mount of its own (a tmpfs) that the resolver takes for scoutfs.

    Only STATFS_MORE is faked; the mount root the resolver finds is real.
    """
    monkeypatch.setattr(resolve, "statfs_more", lambda fd: (1, 1))
    return tmpfs_mount


async def test_scoutfs_paths_are_taken_under_backing_only(
    fake_scoutfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INO_PATH answers relative to the mount root; BACKING may be a subdirectory."""
    backing = fake_scoutfs / "sub" / "dir"
    backing.mkdir(parents=True)
    resolver = Resolver(str(backing), lambda ino: None, trio.CapacityLimiter(1))
    assert resolver.on_scoutfs
    answers = {7: ["other/f", "sub/dir/a/f", "sub/dir/b/f"], 8: ["other/g"]}
    monkeypatch.setattr(resolve, "ino_paths", lambda fd, ino: answers.get(ino, []))
    assert await resolver.resolve(7, since=0.0) == "a/f"
    assert await resolver.resolve(7, since=0.0, stale="a/f") == "b/f"
    assert await resolver.resolve(8, since=0.0) is None
    assert await resolver.resolve(9, since=0.0) is None


async def test_scoutfs_errors_lose_the_record_not_the_shim(
    fake_scoutfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver(str(fake_scoutfs), lambda ino: None, trio.CapacityLimiter(1))
    assert resolver.on_scoutfs

    def denied(fd: int, ino: int) -> list[str]:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(resolve, "ino_paths", denied)
    assert await resolver.resolve(7, since=0.0) is None
