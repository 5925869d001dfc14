"""A pyfuse3 overlay that replays notify records as real inotify events.

:mod:`.overlay` is the passthrough filesystem, :mod:`.replay` the synthetic
accesses that make the kernel raise the events, :mod:`.resolve` the inode ->
path lookup, :mod:`.follow` the subscription to the daemon, :mod:`.mounts`
the checks made before mounting, :mod:`.args` the command line and
:mod:`.main` the command.

The names below are imported on first use, not with the package: the
command line (:mod:`.args`, which the package build makes the man page from)
must import without pyfuse3.  ``follow`` is the module: a lazy name of the
same spelling would be replaced by it as soon as anything imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .mounts import FSNAME, FSTYPE, MountpointError, check_paths
    from .overlay import Overlay
    from .replay import Replayer, ReplayStats, ReplayThreads
    from .resolve import Resolver

__all__ = [
    "FSNAME",
    "FSTYPE",
    "MountpointError",
    "Overlay",
    "ReplayStats",
    "ReplayThreads",
    "Replayer",
    "Resolver",
    "check_paths",
]

_MODULE_OF = {
    "FSNAME": "mounts",
    "FSTYPE": "mounts",
    "MountpointError": "mounts",
    "Overlay": "overlay",
    "ReplayStats": "replay",
    "ReplayThreads": "replay",
    "Replayer": "replay",
    "Resolver": "resolve",
    "check_paths": "mounts",
}


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
