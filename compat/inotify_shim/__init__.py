"""A pyfuse3 overlay that replays notify records as real inotify events.

:mod:`.overlay` is the passthrough filesystem, :mod:`.replay` the synthetic
accesses that make the kernel raise the events, :mod:`.resolve` the inode ->
path lookup, :mod:`.follow` the subscription to the daemon, :mod:`.mounts`
the checks made before mounting and :mod:`.main` the command.
"""

from .follow import follow
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
    "follow",
]
