"""scoutfs-notify: watch the records a scoutfs-notifyd relays, or show its stats."""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, TextIO

from . import abi, ioctls, paths
from .client import Gap, Subscriber
from .peer import UntrustedPeerError, check_peer
from .stats import read_stats

__all__ = ["PathResolver", "format_json", "format_text", "main"]

# Inode -> path answers kept, so a burst of reads of one file costs one ioctl.
PATH_CACHE_SIZE = 4096
# What --resolve-paths prints for an inode without a path (deleted since).
UNRESOLVED = "?"

DESCRIPTION = """\
Show file accesses on a scoutfs mount as scoutfs-notifyd relays them.

  watch  prints one line per record, like `inotifywait -m`:
           TIME TYPE ino=INO [path=PATH] pid=PID uid=UID gid=GID [flags=F | pos=P count=C]
         TYPE is OPEN or READ; uid/gid print as ? when the process had gone
         before the fanotify source looked it up; path (--resolve-paths) as ?
         when the file has no name left. A line
           TIME GAP lost=N after seq=S
         means N records were lost (kernel ring full, or this client too slow).
  stats  prints the daemon's counters: records drained, ring drops, clients
         and each client's drops; with --shim MOUNTPOINT, the inotify shim's:
         records replayed, and every record not replayed, by cause.

The socket is /run/scoutfs/<fsid>/notify.sock for a scoutfs MOUNT (the fsid of
`scoutfs statfs`), /run/scoutfs/local-<hash>/notify.sock for a directory
watched by the fanotify source, or any --socket the daemon was given.
"""


def _add_target(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument(
        "mount",
        nargs="?",
        metavar="MOUNT",
        help="the scoutfs mount (or fanotify-watched directory) whose daemon to ask",
    )
    p.add_argument("--socket", metavar="PATH", help="the daemon's notify socket")
    p.add_argument("--json", action="store_true", help=json_help)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scoutfs-notify",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser(
        "watch",
        help="print records as they arrive, until SIGINT",
        description="Print one line per record (or JSON lines) until SIGINT or the daemon stops.",
    )
    _add_target(w, "one JSON object per record or gap, one per line")
    w.add_argument(
        "--resolve-paths",
        action="store_true",
        help="add each file's path (relative to MOUNT) with SCOUTFS_IOC_INO_PATH; "
        "needs MOUNT on scoutfs and CAP_DAC_READ_SEARCH",
    )
    from .cluster.watch import add_watch_args  # here: it imports this module

    add_watch_args(w)
    s = sub.add_parser(
        "stats",
        help="print the daemon's counters",
        description="Print what the daemon has drained and relayed: records, drops in the "
        "kernel ring or the fanotify queue, and every client with its own drops.",
    )
    _add_target(s, "the daemon's JSON document as it is")
    s.add_argument(
        "--shim",
        metavar="MOUNTPOINT",
        help="ask the scoutfs-notify-shim mounted at MOUNTPOINT instead of a daemon",
    )
    args = p.parse_args(argv)
    if getattr(args, "shim", None):
        if args.socket or args.mount:
            p.error("--shim takes the place of MOUNT and --socket")
    elif not args.socket and not args.mount and not getattr(args, "nats", None):
        p.error(
            "give MOUNT or --socket PATH" + (" (or --nats URL)" if args.command == "watch" else "")
        )
    if getattr(args, "resolve_paths", False) and not args.mount:
        p.error("--resolve-paths needs MOUNT (paths are relative to it)")
    return args


def _socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "shim", None):
        # ends in .stats: main() takes it as the stats socket itself
        return paths.shim_stats_path(args.shim)
    return Path(args.socket) if args.socket else paths.default_socket_path(args.mount)


def _ts(time_ns: int) -> str:
    secs, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


def _id(value: int) -> str:
    return "?" if value == abi.UNKNOWN_ID else str(value)


def format_text(ev: abi.Record | Gap, path: str | None = None) -> str:
    """One ``watch`` line for a record or a gap."""
    if isinstance(ev, Gap):
        return f"{_ts(time.time_ns())} GAP lost={ev.lost} after seq={ev.last_seq}"
    where = f"ino={ev.ino}" + (f" path={path}" if path is not None else "")
    who = f"pid={ev.pid} uid={_id(ev.uid)} gid={_id(ev.gid)}"
    # open flags in octal, as <fcntl.h> writes them
    what = f"flags=0{ev.flags:o}" if ev.type == abi.TYPE_OPEN else f"pos={ev.pos} count={ev.count}"
    return f"{_ts(ev.time_ns)} {ev.type_name} {where} {who} {what} seq={ev.seq}"


def format_json(ev: abi.Record | Gap, path: str | None = None) -> str:
    """One ``watch --json`` line: the record's fields (or the gap's), plus path."""
    if isinstance(ev, Gap):
        doc: dict[str, Any] = {"type": "GAP", **ev._asdict(), "lost": ev.lost}
    else:
        doc = {**ev._asdict(), "type": ev.type_name}
        del doc["reserved"]
        if path is not None:
            doc["path"] = path
    return json.dumps(doc)


class PathResolver:
    """Inode numbers to paths on a scoutfs mount, with a small LRU cache.

    Says once, on stderr, why it cannot resolve, and then gives None.
    """

    def __init__(self, mount: str, err: TextIO = sys.stderr) -> None:
        self.mount = mount
        self.err = err
        self.fd = -1
        self.cache: OrderedDict[int, str | None] = OrderedDict()
        try:
            self.fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            ioctls.statfs_more(self.fd)
        except ioctls.NotScoutfsError:
            self._give_up(f"{mount} is not scoutfs: printing inode numbers only")
        except OSError as exc:
            self._give_up(f"cannot open {mount}: {exc.strerror}")

    def _give_up(self, why: str) -> None:
        print(f"scoutfs-notify: --resolve-paths: {why}", file=self.err)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __call__(self, ino: int) -> str | None:
        if self.fd < 0:
            return None
        if ino in self.cache:
            self.cache.move_to_end(ino)
            return self.cache[ino]
        try:
            found = ioctls.ino_paths(self.fd, ino, limit=1)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self._give_up("needs CAP_DAC_READ_SEARCH: run as root")
            else:
                self._give_up(f"INO_PATH failed: {exc.strerror}")
            return None
        # a file deleted since its access has no path left
        path = os.path.join(self.mount, found[0]) if found else None
        self.cache[ino] = path
        if len(self.cache) > PATH_CACHE_SIZE:
            self.cache.popitem(last=False)
        return path


def _watch(args: argparse.Namespace, sock_path: Path) -> int:
    fmt = format_json if args.json else format_text
    resolve = PathResolver(args.mount) if args.resolve_paths else None
    out = sys.stdout
    try:
        with Subscriber(sock_path) as sub:
            check_peer(sub.sock, sock_path)
            while (batch := sub.recv_batch()) is not None:
                for ev in sub.tracker.events(batch):
                    if isinstance(ev, abi.Record) and ev.type not in abi.TYPE_NAMES:
                        continue  # docs/ABI.md: consumers skip types they do not know
                    path = None
                    if resolve and resolve.fd >= 0 and isinstance(ev, abi.Record):
                        # a file deleted since its access has no path left
                        path = resolve(ev.ino) or UNRESOLVED
                    out.write(fmt(ev, path) + "\n")
                out.flush()
    finally:
        if resolve:
            resolve.close()
    print("scoutfs-notify: the daemon closed the connection", file=sys.stderr)
    return 1


def _print_stats(doc: dict[str, Any]) -> None:
    if "clients" not in doc:
        # the shim's document: flat counters
        width = max(map(len, doc), default=0)
        for key, value in doc.items():
            print(f"{key:<{width}}  {value}")
        return
    clients = doc.pop("clients", [])
    width = max(map(len, doc), default=0)
    for key, value in doc.items():
        print(f"{key:<{width}}  {value}")
    print(f"clients: {len(clients)}")
    for c in clients:
        print(
            f"  client {c['id']}: pid {c['pid']} uid {c['uid']}, "
            f"{c['records_sent']} records sent, {c['records_dropped']} dropped, "
            f"{c['queued_messages']} messages queued"
        )


def _say(msg: str) -> int:
    print(f"scoutfs-notify: {msg}", file=sys.stderr)
    return 1


def _explain(exc: OSError, where: Path, args: argparse.Namespace) -> str:
    """What went wrong talking to the daemon at ``where``, and the fix."""
    hint = f" for {args.mount}" if args.mount else ""
    shim = getattr(args, "shim", None)
    if shim and isinstance(exc, FileNotFoundError):
        return f"no shim stats socket at {where}: is scoutfs-notify-shim mounted at {shim}?"
    if isinstance(exc, FileNotFoundError):
        return f"no daemon socket at {where}: is scoutfs-notifyd running{hint}?"
    if isinstance(exc, PermissionError):
        return (
            f"permission denied on {where}: run as root, or as a member of the daemon's "
            "--socket-group"
        )
    try:
        is_socket = stat.S_ISSOCK(os.stat(where).st_mode)
    except OSError:
        is_socket = True
    if not is_socket:
        return f"{where} is not a socket: give the daemon's notify socket"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where}: restart scoutfs-notifyd"
    if exc.errno == errno.EPROTOTYPE:
        # watch on the .stats socket, or stats on a socket that is not a daemon's
        return (
            f"{where} is not a scoutfs-notifyd notify socket (wrong socket type): give the "
            "notify socket, not its .stats"
        )
    if isinstance(exc, TimeoutError):
        return f"{where}: the daemon did not answer: is it stuck?"
    return f"{where}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "watch" and args.nats:
        from .cluster.watch import run_watch

        return run_watch(args)
    try:
        sock_path = _socket_path(args)
    except OSError as exc:
        return _say(f"{args.mount}: {exc.strerror}")
    where = paths.stats_path_for(sock_path) if args.command == "stats" else sock_path
    if args.command == "stats" and sock_path.name.endswith(".stats"):
        # the one the operator gave is the stats socket itself
        where = sock_path
    try:
        if args.command == "stats":
            doc = read_stats(str(where))
            if args.json:
                print(json.dumps(doc))
            else:
                _print_stats(doc)
            return 0
        return _watch(args, sock_path)
    except UntrustedPeerError as exc:
        return _say(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (| head): that is a normal end
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        return _say(_explain(exc, where, args))
    except ValueError as exc:
        # JSON that is not a stats document, or a malformed record message
        return _say(f"{where} does not speak scoutfs-notifyd's protocol: {exc}")


if __name__ == "__main__":
    sys.exit(main())
