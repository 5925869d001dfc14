"""scoutfs-notifyd: drain records from a source and relay them to socket clients.

One root nursery runs the broadcaster, the stats socket and the source; a
SIGTERM or SIGINT cancels it, and cleanup (detach from the ring, unlink the
sockets) runs on the way out whatever ended the run.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import paths
from .broadcast import Broadcaster
from .errors import DaemonError
from .listen import Listener, bind_listener, prepare_dir
from .sdnotify import sd_notify
from .source import Source
from .stats import serve_stats

__all__ = ["SourceFactory", "main", "make_source", "parse_args", "serve"]

log = logging.getLogger("scoutfs-notifyd")

DEFAULT_CLIENT_QUEUE = 256
DEFAULT_MAX_CLIENTS = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scoutfs-notifyd",
        description=(
            "Relay file access records to local clients over an AF_UNIX SOCK_SEQPACKET "
            "socket. The scoutfs source drains the notify ring of a scoutfs mount (kernel "
            "with the scoutfs-notify patches); the fanotify source makes the same records "
            "from fanotify events on any local directory."
        ),
    )
    p.add_argument("path", help="the scoutfs mount (scoutfs source) or directory (fanotify)")
    p.add_argument(
        "--source",
        choices=("scoutfs", "fanotify"),
        default="scoutfs",
        help="where records come from (default: %(default)s)",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="serve here instead of RUN_DIR/<fsid>/notify.sock (needed for a second mount "
        "of one filesystem); its directory must exist",
    )
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default=str(paths.RUN_DIR),
        help="parent of the per-filesystem socket directories (default: %(default)s)",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="let this group connect (socket 0660) instead of root alone (0600)",
    )
    p.add_argument(
        "--client-queue",
        metavar="N",
        type=int,
        default=DEFAULT_CLIENT_QUEUE,
        help="messages (of up to 64 records) queued per client before its records are "
        "dropped (default: %(default)s)",
    )
    p.add_argument(
        "--max-clients",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_CLIENTS,
        help="connections beyond this are closed at once (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="(default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.client_queue < 1:
        p.error("--client-queue must be at least 1")
    if args.max_clients < 1:
        p.error("--max-clients must be at least 1")
    return args


# Builds the source the daemon drains from its parsed command line.
SourceFactory = Callable[[argparse.Namespace], Source]


def make_source(args: argparse.Namespace) -> Source:
    """The source ``--source`` names, on ``args.path``: the daemon's default factory."""
    if args.source == "fanotify":
        from .source_fanotify import FanotifySource

        return FanotifySource(args.path)
    from .source_scoutfs import ScoutfsSource

    return ScoutfsSource(args.path)


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise DaemonError(f"--socket-group {name}: no such group") from None


def _socket_path(args: argparse.Namespace, source: Source, gid: int | None) -> Path:
    """Choose the socket path and make its directories safe."""
    if args.socket:
        path = Path(os.path.abspath(args.socket))
        prepare_dir(path.parent, create=False)
        return path
    run_dir = Path(args.run_dir)
    path = Path(source.default_socket_path(str(run_dir)))
    # group members need to traverse the run dir, never to list it
    prepare_dir(run_dir, create=True, mode=0o711 if gid is not None else 0o700, widen_only=True)
    prepare_dir(path.parent, create=True, mode=0o710 if gid is not None else 0o700, gid=gid)
    return path


async def serve(args: argparse.Namespace, source_factory: SourceFactory = make_source) -> None:
    """Run the daemon until SIGTERM/SIGINT, relaying what ``source_factory(args)`` gives."""
    # from the start, so a signal during startup still ends in the cleanup below
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        gid = _group_id(args.socket_group)
        source = source_factory(args)
        listeners: list[Listener] = []
        try:
            source.open()
            try:
                path = _socket_path(args, source, gid)
                listener = bind_listener(path, gid=gid, lock=True)
                listeners.append(listener)
                stats_listener = bind_listener(
                    paths.stats_path_for(path), kind=socket.SOCK_STREAM, gid=gid
                )
                listeners.append(stats_listener)
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                raise DaemonError(f"cannot create the socket: {where}{exc.strerror}") from None
            relay = Broadcaster(
                listener.sock, queue_messages=args.client_queue, max_clients=args.max_clients
            )

            def snapshot() -> dict[str, Any]:
                return {"pid": os.getpid(), "socket": str(path), **source.stats(), **relay.stats()}

            async with trio.open_nursery() as nursery:
                await nursery.start(relay.serve)
                await nursery.start(serve_stats, stats_listener.sock, snapshot)
                await nursery.start(source.run, relay.publish)
                log.info("ready: %s source on %s, serving %s", source.name, args.path, path)
                sd_notify(f"READY=1\nSTATUS=serving {path}")
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
            st = snapshot()
            log.info(
                "stopped: relayed %d records, served %d client(s)",
                st["records_published"],
                st["clients_total"],
            )
        finally:
            # plain calls: nothing here awaits, so cancellation cannot cut it short
            source.close()
            for item in listeners:
                item.close()


def _daemon_errors(exc: BaseException) -> list[DaemonError]:
    if isinstance(exc, DaemonError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _daemon_errors(sub)]
    return []


def main(argv: list[str] | None = None, *, source_factory: SourceFactory = make_source) -> int:
    """The ``scoutfs-notifyd`` command; its exit status.

    ``source_factory`` builds the source from the parsed arguments: a
    benchmark or test passes one to run the real daemon on a source of its
    own (e.g. a :class:`~notifyd.source_scoutfs.ScoutfsSource` with a
    stand-in ioctl); the command line's ``--source`` is then not consulted.
    """
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(serve, args, source_factory)
    except BaseException as exc:
        errors = _daemon_errors(exc)
        if not errors:
            raise
        for err in errors:
            print(f"scoutfs-notifyd: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
