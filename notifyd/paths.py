"""Where a daemon serves its socket, derived the same way by every part."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .ioctls import NotScoutfsError, fsid_of

__all__ = [
    "RUN_DIR",
    "default_socket_path",
    "shim_stats_path",
    "socket_path_for_dir",
    "socket_path_for_fsid",
    "stats_path_for",
]

RUN_DIR = Path("/run/scoutfs")
SOCKET_NAME = "notify.sock"


def socket_path_for_fsid(fsid: int, run_dir: str | os.PathLike[str] = RUN_DIR) -> Path:
    """docs/ABI.md section 4: ``/run/scoutfs/<16 lowercase hex digits>/notify.sock``."""
    return Path(run_dir) / f"{fsid:016x}" / SOCKET_NAME


def socket_path_for_dir(
    path: str | os.PathLike[str], run_dir: str | os.PathLike[str] = RUN_DIR
) -> Path:
    """The socket of a non-scoutfs (fanotify) source watching ``path``.

    A hash of the resolved path keeps the name short: sun_path holds only
    107 bytes, and watched directories can be deep.
    """
    digest = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:16]
    return Path(run_dir) / f"local-{digest}" / SOCKET_NAME


def default_socket_path(
    path: str | os.PathLike[str], run_dir: str | os.PathLike[str] = RUN_DIR
) -> Path:
    """The socket a daemon serves for ``path``: by fsid on scoutfs, else by path."""
    try:
        return socket_path_for_fsid(fsid_of(path), run_dir)
    except NotScoutfsError:
        return socket_path_for_dir(path, run_dir)


def stats_path_for(socket_path: str | os.PathLike[str]) -> Path:
    """The daemon's read-only stats socket, beside its notify socket.

    A separate socket keeps the record stream one-way (docs/ABI.md section 4: the
    daemon never reads from clients); ``scoutfs-notify stats`` connects here.
    """
    p = Path(socket_path)
    return p.with_name(p.name + ".stats")


def shim_stats_path(
    mountpoint: str | os.PathLike[str], run_dir: str | os.PathLike[str] = RUN_DIR
) -> Path:
    """The stats socket of the inotify shim mounted at ``mountpoint``.

    Named by a hash of the resolved mount point, like :func:`socket_path_for_dir`,
    so ``scoutfs-notify stats --shim MOUNTPOINT`` finds it.
    """
    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return Path(run_dir) / f"shim-{digest}" / "shim.stats"
