"""The shim's command line, apart from the shim: it imports no pyfuse3.

The package build makes the man page from :func:`build_parser` (``notifyd.manpage``)
without pyfuse3, which needs libfuse3 to build; :mod:`.main` parses with it.
"""

from __future__ import annotations

import argparse
import math

from notifyd.cluster.server import add_stream_group
from notifyd.metrics import listen_arg

from .resolve import DEFAULT_INDEX_LIMIT

__all__ = ["DEFAULT_READ_AHEAD_KB", "add_cluster_args", "build_parser"]

# The overlay's readahead (KiB): FUSE starts at 128, where a disk commonly has
# several MiB (/sys/class/bdi/*/read_ahead_kb).  Above 128 the kernel's READ
# requests for sequential reads are 1 MiB instead of 128 KiB: fewer round trips.
DEFAULT_READ_AHEAD_KB = 8192

DESCRIPTION = """\
Mount a read-write passthrough of BACKING at MOUNTPOINT and turn the access
records scoutfs-notifyd serves for BACKING into real inotify events on the
overlay: a watcher there (inotifywait -m -r MOUNTPOINT, watchdog, anything on
inotify) sees IN_OPEN, IN_ACCESS and IN_CLOSE_NOWRITE for accesses made
anywhere on BACKING, on any node, as if they had been made through the
overlay.  Accesses made through the overlay raise their events once.

Files are served as soon as the overlay is mounted; events flow once the
daemon's socket answers (the shim waits for it and reconnects by itself).
SIGTERM or SIGINT unmounts cleanly.  Run as root.
"""


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 1 second")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError("must be from 0 to 10 seconds")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    add_stream_group(
        p,
        "cluster (--nats)",
        "Also replay the records of the other nodes of BACKING's filesystem, from the "
        "NATS JetStream stream scoutfs-notify-forward fills on every node.",
        fsid_help="off scoutfs: the --fsid the forwarders use (default: the local socket's "
        "directory name); on scoutfs the filesystem's fsid",
        node_help="off scoutfs: this node's --node, whose records come from the local socket "
        "(default: the hostname); on scoutfs the mount's rid",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line, without running anything (man pages are made from it)."""
    p = argparse.ArgumentParser(
        prog="scoutfs-notify-shim",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("backing", metavar="BACKING", help="the directory to serve and watch")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory outside BACKING")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: the one scoutfs-notifyd derives from BACKING: "
        "/run/scoutfs/<fsid>/notify.sock on scoutfs)",
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let users other than root use the overlay (each call is made with the "
        "caller's identity, so BACKING decides what they may do)",
    )
    p.add_argument(
        "--acl",
        action="store_true",
        help="pass POSIX ACLs through: the kernel honours ACLs that grant more than "
        "the mode bits, and getfacl/setfacl work on the overlay, at one request per "
        "file for `ls -l` (default: ACLs are not visible through the overlay; BACKING "
        "still enforces them, since every call is made as the calling user)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how long the kernel may cache names and attributes; changes made "
        "directly on BACKING show after at most this long (default: 1; docs/ABI.md "
        "section 5 wants 1 or less)",
    )
    p.add_argument(
        "--close-after",
        type=_seconds,
        default=0.25,
        metavar="SECONDS",
        help="a replayed open is closed (IN_CLOSE_NOWRITE) this long after the "
        "last record for its file (default: 0.25)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=4,
        metavar="N",
        help="threads making synthetic accesses (default: 4)",
    )
    p.add_argument(
        "--max-pending",
        type=_positive,
        default=8192,
        metavar="N",
        help="files that may wait for replay before records are dropped and counted "
        "(default: 8192)",
    )
    p.add_argument(
        "--index-limit",
        type=_positive,
        default=DEFAULT_INDEX_LIMIT,
        metavar="N",
        help="off scoutfs, the most files the inode -> path index of BACKING holds "
        f"(default: {DEFAULT_INDEX_LIMIT})",
    )
    p.add_argument(
        "--read-ahead",
        type=_non_negative,
        default=DEFAULT_READ_AHEAD_KB,
        metavar="KB",
        help="the overlay's readahead in KiB, set after mounting; 0 leaves the FUSE "
        f"default of 128 (default: {DEFAULT_READ_AHEAD_KB}, as for a disk; above 128 "
        "sequential reads reach the overlay in 1 MiB requests instead of 128 KiB)",
    )
    p.add_argument(
        "--metrics",
        metavar="[ADDR:]PORT",
        type=listen_arg,
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (a bare PORT listens "
        "on 127.0.0.1; default: off)",
    )
    p.add_argument(
        "--stats-socket",
        metavar="PATH",
        help="serve the shim's counters (records replayed, and every record not "
        "replayed, by cause) on this socket, mode 0600 (default: "
        "/run/scoutfs/shim-<hash of MOUNTPOINT>/shim.stats, the one `scoutfs-notify "
        "stats --shim MOUNTPOINT` reads)",
    )
    p.add_argument(
        "--new-dir-wait",
        type=_non_negative_seconds,
        default=0.2,
        metavar="SECONDS",
        help="before replaying an access inside directories the overlay has never "
        "shown, raise IN_CREATE for each of them (so inotifywait -r and watchdog add "
        "watches) and wait up to this long for a watcher to look each one up; 0 "
        "turns that off (default: 0.2)",
    )
    p.add_argument(
        "--read-byte",
        action="store_true",
        help="replay a READ as a 1-byte read through the overlay (one FUSE request) "
        "instead of a zero-length read (none); by default the first READ checks that "
        "a zero-length read raises IN_ACCESS and falls back to this by itself",
    )
    p.add_argument("--debug", action="store_true", help="log every replay")
    add_cluster_args(p)
    return p
