"""``scoutfs-notify doctor [PATH]``: what is wrong with notifications for one mount.

Each check looks at the real thing (the ioctl, the socket, the mount table, the
daemon's stats socket, the processes) and yields a :class:`Finding` with the
command that fixes it.  The exit status is 0 only when nothing failed and no
records were lost while doctor watched.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import os
import re
import shlex
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import abi, ioctls, libc, paths
from .peer import UntrustedPeerError, check_peer
from .stats import read_stats

__all__ = ["DESCRIPTION", "Finding", "add_arguments", "diagnose", "run"]

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
T = TypeVar("T")
# What a loss must be measured over: long enough for a busy mount to show one.
DEFAULT_INTERVAL = 1.0
SHIM_FSTYPE = "fuse.scoutfs-notify-shim"
SHIM_COMMANDS = ("scoutfs-notify-shim", "compat.inotify_shim.main", "compat.inotify_shim")
# /proc/PID/comm of a shim: its console script (15 characters of it) or python
SHIM_COMMS = ("scoutfs-notify-", "python")
# How long one look at /proc or at an overlay may take before doctor gives up on it.
PROC_TIMEOUT = 2.0
OVERLAY_TIMEOUT = 5.0

DESCRIPTION = """\
Check, for one mount, everything the notification path needs, and print one
line per finding with the command that fixes it:

  kernel   PATH is scoutfs and its module answers SCOUTFS_IOC_READ_NOTIFY (the
           notify patches are in), or PATH is another filesystem (the fanotify
           source serves it)
  daemon   a scoutfs-notifyd serves PATH's socket (it accepts a connection and
           its stats socket names PATH)
  modes    /run/scoutfs, the socket directory and the socket are root's and
           never world-accessible (0700/0600, or 0711/0710/0660 with a group)
  shim     every scoutfs-notify-shim over PATH is mounted, its overlay answers,
           and it is subscribed to the daemon; a dead overlay is found too
  losses   records lost while doctor watched (--interval): in the kernel ring,
           the fanotify queue, or a client's queue (which client)

exit status: 0 when all is well, 1 when a check failed or records were lost,
2 on bad usage. Run as root: the checks read root's sockets and /proc.
"""


@dataclass
class Finding:
    """One line of the report."""

    level: str
    area: str
    what: str
    fix: str | None = None

    def __str__(self) -> str:
        line = f"{self.level:<5} {self.area:<7} {self.what}"
        if self.fix:
            line += f"\n{'':14}fix: {self.fix}"
        return line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``doctor`` options, on a subparser the dispatcher made."""
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "mount", nargs="?", default=".", metavar="PATH", help="the mount to check (default: .)"
    )
    p.add_argument(
        "--socket", metavar="PATH", help="the daemon's socket, when it was given --socket"
    )
    p.add_argument(
        "--overlay",
        metavar="DIR",
        action="append",
        help="a shim mount point to check (default: those of running shims over PATH, "
        "and PATH.inotify, where the unit mounts it)",
    )
    p.add_argument(
        "--interval",
        metavar="S",
        type=float,
        default=DEFAULT_INTERVAL,
        help="watch for losses this long (default: %(default)s s)",
    )


# --- kernel ------------------------------------------------------------------


def _probe_read_notify(fd: int) -> tuple[int | None, int]:
    """Ask each READ_NOTIFY number with a zero-length buffer: (nr that answered, errno).

    A patched module rejects buf_bytes 0 with EINVAL before it attaches a
    reader (ABI.md section 3), so the probe never starts emission; an
    unpatched one answers ENOTTY.
    """
    arg = ctypes.create_string_buffer(abi.READ_NOTIFY.pack(0, 0, 0, 0, 0, 0))
    last = errno.ENOTTY
    for request in abi.IOC_READ_NOTIFY_CANDIDATES:
        try:
            libc.ioctl(fd, request, ctypes.addressof(arg))
        except OSError as exc:
            last = exc.errno or 0
            if last == errno.ENOTTY:
                continue
            return request & 0xFF, last
        return request & 0xFF, 0
    return None, last


def _kernel(mount: str) -> Iterator[Finding]:
    try:
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        yield Finding(FAIL, "path", f"{mount}: {exc.strerror}", "give the mount point")
        return
    try:
        try:
            fsid, _ = ioctls.statfs_more(fd)
        except ioctls.NotScoutfsError:
            yield Finding(
                INFO,
                "kernel",
                f"{mount} is not scoutfs: the fanotify source serves it",
                None,
            )
            return
        nr, err = _probe_read_notify(fd)
        if nr is None:
            yield Finding(
                FAIL,
                "kernel",
                f"{mount} is scoutfs (fsid {fsid:016x}) but its module has no READ_NOTIFY "
                "ioctl: the notify patches are not in",
                "build scoutfs with the series for its release (kmod/apply.sh) and load it",
            )
        elif err == errno.EPERM:
            yield Finding(FAIL, "kernel", "READ_NOTIFY needs CAP_SYS_ADMIN", "run doctor as root")
        else:
            yield Finding(
                OK,
                "kernel",
                f"{mount} is scoutfs (fsid {fsid:016x}); READ_NOTIFY answers (nr {nr})",
            )
    finally:
        os.close(fd)


# --- daemon and modes --------------------------------------------------------


def _start_daemon(mount: str, scoutfs: bool) -> str:
    if scoutfs:
        return f"systemctl restart scoutfs-notifyd@$(systemd-escape -p {shlex.quote(mount)})"
    return f"scoutfs-notifyd --source fanotify {shlex.quote(mount)}"


def _daemon(mount: str, sock: Path, scoutfs: bool) -> Iterator[Finding | dict[str, Any]]:
    """Findings about the socket; yields the stats document last when it answers."""
    start = _start_daemon(mount, scoutfs)
    try:
        st = os.stat(sock)
    except FileNotFoundError:
        yield Finding(FAIL, "daemon", f"no socket at {sock}: no daemon serves {mount}", start)
        return
    except PermissionError:
        yield Finding(FAIL, "daemon", f"cannot look at {sock}", "run doctor as root")
        return
    if not stat.S_ISSOCK(st.st_mode):
        yield Finding(FAIL, "daemon", f"{sock} is not a socket", f"rm {sock}; {start}")
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(5)
        try:
            s.connect(str(sock))
        except ConnectionRefusedError:
            yield Finding(
                FAIL, "daemon", f"{sock} is stale: nothing listens (the daemon died)", start
            )
            return
        except PermissionError:
            yield Finding(FAIL, "daemon", f"permission denied on {sock}", "run doctor as root")
            return
        except OSError as exc:
            yield Finding(FAIL, "daemon", f"{sock}: {exc.strerror}", start)
            return
        try:
            check_peer(s, sock)
        except UntrustedPeerError as exc:
            yield Finding(FAIL, "daemon", str(exc), f"rm {sock}; {start}")
            return
    stats_path = paths.stats_path_for(sock)
    try:
        doc = read_stats(str(stats_path))
    except (OSError, ValueError) as exc:
        yield Finding(
            FAIL, "daemon", f"{sock} accepts, but its stats socket does not answer: {exc}", start
        )
        return
    served = doc.get("path")
    if served is None or os.path.realpath(served) != os.path.realpath(mount):
        yield Finding(
            FAIL,
            "daemon",
            f"{sock} is served by a daemon for {served}, not {mount}",
            f"give doctor that daemon's --socket, or {start}",
        )
        return
    yield Finding(
        OK,
        "daemon",
        f"pid {doc.get('pid')} serves {mount} on {sock} ({doc.get('source')} source, "
        f"{len(doc.get('clients', []))} client(s), {doc.get('records_published')} records relayed)",
    )
    yield doc


def _mode_finding(path: Path, allowed: tuple[int, ...], kind: str, restart: str) -> Finding:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return Finding(FAIL, "modes", f"{path}: {exc.strerror}", restart)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return Finding(FAIL, "modes", f"{kind} {path} is owned by uid {st.st_uid}", restart)
    if mode not in allowed:
        want = oct(allowed[0])[2:].zfill(4)
        return Finding(
            FAIL,
            "modes",
            f"{kind} {path} is {mode:04o}, expected " + " or ".join(f"{m:04o}" for m in allowed),
            f"chmod {want} {path}  (or restart the daemon, which sets it)",
        )
    return Finding(OK, "modes", f"{kind} {path} is {mode:04o}")


def _modes(sock: Path, restart: str) -> Iterator[Finding]:
    # ABI.md section 4: 0600 root, or 0660 for one group (then 0710 and 0711 above)
    yield _mode_finding(sock, (0o600, 0o660), "socket", restart)
    yield _mode_finding(sock.parent, (0o700, 0o710), "its directory", restart)
    if sock.parent.parent == paths.RUN_DIR:
        yield _mode_finding(paths.RUN_DIR, (0o700, 0o711), "run dir", restart)


# --- shim --------------------------------------------------------------------


def _mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo."""
    out = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            # mountinfo writes space, tab, newline and backslash as \ooo
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            out[point] = fields[sep + 1]
    return out


def _bounded(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` in a thread; TimeoutError if it has not returned within ``timeout``.

    For what can block for good on a shared machine: reading the cmdline of a
    process stuck in a page fault, or stat(2) on an overlay whose shim is
    stopped.  Both kernel waits are killable, so an abandoned thread never
    keeps this process from exiting.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer in {timeout:g} s")
    if errors:
        raise errors[0]
    return box[0]


def _read_cmdline(pid: str) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [os.fsdecode(a) for a in f.read().split(b"\0") if a]


def _shims(mount: str, mounts: dict[str, str]) -> dict[str, int]:
    """Mount point -> pid of each running shim whose BACKING is ``mount``.

    Paths in a shim's command line are compared as written (made absolute),
    never resolved: resolving would stat other people's overlays, which hang
    when their shim is stopped.
    """
    found: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # comm needs no lock on the process's memory, unlike cmdline
            with open(f"/proc/{entry.name}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if not comm.startswith(SHIM_COMMS):
            continue
        try:
            argv = _bounded(functools.partial(_read_cmdline, entry.name), PROC_TIMEOUT)
        except (OSError, TimeoutError):
            continue
        if not any(a.endswith(SHIM_COMMANDS) for a in argv[:3]):
            continue
        args = [os.path.abspath(a) for a in argv[1:] if not a.startswith("-")]
        for i, arg in enumerate(args):
            if arg != mount:
                continue
            # the mount point is the positional after BACKING that is a shim mount
            for later in args[i + 1 :]:
                if mounts.get(later) == SHIM_FSTYPE or later == args[-1]:
                    found.setdefault(later, int(entry.name))
                    break
    return found


def _shim(mount: str, overlays: list[str] | None, doc: dict[str, Any] | None) -> Iterator[Finding]:
    mounts = _mounts()
    running = _shims(mount, mounts)
    points = {os.path.abspath(p) for p in overlays or []}
    points |= set(running)
    default = mount + ".inotify"
    if not overlays and mounts.get(default) == SHIM_FSTYPE:
        points.add(default)
    unit = f"scoutfs-notify-shim@$(systemd-escape -p {shlex.quote(mount)})"
    if not points:
        yield Finding(
            INFO,
            "shim",
            f"no scoutfs-notify-shim over {mount} (inotify watchers need one)",
            f"systemctl start {unit}",
        )
        return
    clients = {c.get("pid") for c in (doc or {}).get("clients", [])}
    for point in sorted(points):
        pid = running.get(point)
        if mounts.get(point) != SHIM_FSTYPE:
            why = f"shim pid {pid} runs but " if pid else ""
            yield Finding(FAIL, "shim", f"{why}{point} is not mounted", f"systemctl restart {unit}")
            continue
        try:
            _bounded(functools.partial(os.stat, point), OVERLAY_TIMEOUT)
        except TimeoutError:
            yield Finding(
                FAIL,
                "shim",
                f"{point} does not answer in {OVERLAY_TIMEOUT:g} s (its shim is stopped or stuck)",
                f"systemctl restart {unit}",
            )
            continue
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                yield Finding(FAIL, "shim", f"{point}: {exc.strerror}", f"systemctl restart {unit}")
                continue
            yield Finding(
                FAIL,
                "shim",
                f"{point} is a dead overlay (its shim is gone: {exc.strerror})",
                f"umount -l {point}; systemctl restart {unit}",
            )
            continue
        if pid is None:
            yield Finding(
                WARN,
                "shim",
                f"{point} is a shim mount, but no running shim over {mount} serves it",
                f"systemctl restart {unit}",
            )
        elif doc is None:
            yield Finding(WARN, "shim", f"pid {pid} mounts {point}; no daemon to subscribe to")
        elif pid not in clients:
            yield Finding(
                FAIL,
                "shim",
                f"pid {pid} mounts {point} but is not subscribed to the daemon "
                "(wrong --socket? its log says which socket it waits for)",
                f"journalctl -u {unit}; systemctl restart {unit}",
            )
        else:
            yield Finding(OK, "shim", f"pid {pid} mounts {point} and is subscribed")
        yield from _shim_stats(point)


SHIM_LOSSES = ("gap", "overload", "unresolved", "gone", "failed")


def _shim_stats(point: str) -> Iterator[Finding]:
    """What the shim at ``point`` says on its stats socket, when it has one."""
    path = paths.shim_stats_path(point)
    if not path.exists():
        return
    try:
        doc = read_stats(str(path))
    except (OSError, ValueError) as exc:
        yield Finding(WARN, "shim", f"its stats socket {path} does not answer: {exc}")
        return
    lost = {k: doc.get(k, 0) for k in SHIM_LOSSES if doc.get(k)}
    said = ", ".join(f"{n} {k}" for k, n in lost.items()) or "none"
    yield Finding(
        INFO,
        "shim",
        f"{point}: {doc.get('replayed', 0)} events replayed, records not replayed since it "
        f"started: {said} (scoutfs-notify stats --shim {point})",
    )


# --- losses ------------------------------------------------------------------

SOURCE_LOSSES = (
    ("ring_dropped", "in the kernel ring (the ring was full: the daemon did not drain in time)"),
    ("source_overflows", "in the fanotify queue (overflow: the daemon did not read in time)"),
)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        return " ".join(argv)[:80] or "?"
    except OSError:
        return "?"


def _losses(before: dict[str, Any], after: dict[str, Any], interval: float) -> Iterator[Finding]:
    lost_any = False
    for key, where in SOURCE_LOSSES:
        n = (after.get(key) or 0) - (before.get(key) or 0)
        if n > 0:
            lost_any = True
            yield Finding(
                WARN,
                "losses",
                f"{n} records lost in {interval:g} s {where}",
                "look at the daemon's CPU and log: journalctl -u 'scoutfs-notifyd@*'",
            )
    old = {c["id"]: c for c in before.get("clients", [])}
    for c in after.get("clients", []):
        n = c["records_dropped"] - old.get(c["id"], {}).get("records_dropped", 0)
        if n > 0:
            lost_any = True
            yield Finding(
                WARN,
                "losses",
                f"client pid {c['pid']} ({_comm(c['pid'])}) lost {n} records in {interval:g} s: "
                "it does not read fast enough",
                "speed that client up, or restart the daemon with a larger --client-queue",
            )
    if not lost_any:
        total = sum((after.get(k) or 0) for k, _ in SOURCE_LOSSES)
        total += sum(c["records_dropped"] for c in after.get("clients", []))
        yield Finding(OK, "losses", f"none in {interval:g} s ({total} since the daemon started)")


# --- all of it ---------------------------------------------------------------


def diagnose(
    mount: str, sock: str | None, overlays: list[str] | None, interval: float
) -> list[Finding]:
    """Run every check on ``mount``; the findings in the order they were made."""
    mount = os.path.abspath(mount)
    findings = list(_kernel(mount))
    if any(f.level == FAIL and f.area == "path" for f in findings):
        return findings
    scoutfs = any(f.area == "kernel" and f.level != INFO for f in findings)
    try:
        sock_path = Path(sock) if sock else paths.default_socket_path(mount)
    except OSError as exc:
        findings.append(Finding(FAIL, "daemon", f"{mount}: {exc.strerror}", "run doctor as root"))
        return findings
    doc: dict[str, Any] | None = None
    for item in _daemon(mount, sock_path, scoutfs):
        if isinstance(item, Finding):
            findings.append(item)
        else:
            doc = item
    if doc is not None or sock_path.exists():
        findings += _modes(sock_path, _start_daemon(mount, scoutfs))
    if doc is not None:
        time.sleep(interval)
        try:
            after = read_stats(str(paths.stats_path_for(sock_path)))
        except (OSError, ValueError) as exc:
            findings.append(Finding(FAIL, "daemon", f"the daemon stopped answering: {exc}"))
        else:
            findings += _losses(doc, after, interval)
            doc = after
    findings += _shim(mount, overlays, doc)
    return findings


def run(args: argparse.Namespace) -> int:
    """Print the findings; 0 only when nothing failed and nothing was lost."""
    if args.interval < 0:
        print("scoutfs-notify: doctor: --interval must be 0 or more seconds", file=sys.stderr)
        return 2
    findings = diagnose(args.mount, args.socket, args.overlay, args.interval)
    for f in findings:
        print(f)
    bad = [f for f in findings if f.level in (FAIL, WARN)]
    print(f"{len(bad)} problem(s) found" if bad else "all is well")
    return 1 if bad else 0
