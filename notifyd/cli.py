"""scoutfs-notify: watch the records a scoutfs-notifyd relays, or show its stats."""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from . import doctor, paths, watch
from .cluster import watch as cluster_watch
from .peer import UntrustedPeerError
from .stats import read_stats
from .watch import PathResolver, format_json, format_text

__all__ = ["PathResolver", "build_parser", "format_json", "format_text", "main"]

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
  doctor checks a mount's whole notification path (kernel, daemon, socket
         modes, shim, losses) and says how to fix what is wrong.

Each command has its own --help (watch: filters, --format and exit statuses).

The socket is /run/scoutfs/<fsid>/notify.sock for a scoutfs MOUNT (the fsid of
`scoutfs statfs`), /run/scoutfs/local-<hash>/notify.sock for a directory
watched by the fanotify source, or any --socket the daemon was given.
"""


def _add_target(p: argparse.ArgumentParser, json_help: str) -> None:
    watch.add_target_arguments(p)
    p.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, without running anything (man pages are made from it)."""
    p = argparse.ArgumentParser(
        prog="scoutfs-notify",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("watch", help="print records as they arrive, filtered like inotifywait")
    watch.add_arguments(w)
    cluster_watch.add_watch_args(w)
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
    doctor.add_arguments(
        sub.add_parser("doctor", help="check one mount's notification path; say how to fix it")
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = p.parse_args(argv)
        if args.command == "doctor":
            return args
        if getattr(args, "shim", None):
            if args.socket or args.mount:
                p.error("--shim takes the place of MOUNT and --socket")
        elif not args.socket and not args.mount and not getattr(args, "nats", None):
            p.error(
                "give MOUNT or --socket PATH"
                + (" (or --nats URL)" if args.command == "watch" else "")
            )
        if args.command == "watch" and not args.nats:
            try:
                args.filters = watch.check_arguments(args)
            except ValueError as exc:
                p.error(str(exc))
    except SystemExit as exc:
        # watch's 2 means -t ran out (inotifywait's statuses): its usage errors are 1
        if exc.code == 2 and argv[:1] == ["watch"]:
            raise SystemExit(watch.EXIT_ERROR) from None
        raise
    return args


def _socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "shim", None):
        # ends in .stats: main() takes it as the stats socket itself
        return paths.shim_stats_path(args.shim)
    return Path(args.socket) if args.socket else paths.default_socket_path(args.mount)


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
    if args.command == "doctor":
        return doctor.run(args)
    if args.command == "watch" and args.nats:
        return cluster_watch.run_watch(args)
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
        return watch.run(args, sock_path, args.filters)
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
