"""scoutfs-notifyd: drain records from a source and relay them to socket clients.

One root nursery runs the broadcaster, the stats socket, the source and two
watchers; a SIGTERM, SIGINT or SIGHUP cancels it, and cleanup (detach from
the ring, unlink the sockets) runs on the way out whatever ended the run.

- A socket file removed under the running daemon is noticed at once
  (inotify on its directory; at the latest within ``SOCKET_CHECK_INTERVAL``)
  and bound again (connected clients keep their connections).
- The watched mount unmounted under the running daemon ends it with status
  1 and a log line, so that systemd restarts it (:mod:`notifyd.mountwatch`).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import inherited, libc, paths
from .broadcast import Broadcaster
from .errors import DaemonError
from .listen import Listener, bind_listener, prepare_dir
from .mountwatch import watch_mount
from .sdnotify import sd_notify
from .source import Source
from .source_scoutfs import DELAY_BELOW, DRAIN_DELAY_MS
from .stats import serve_stats

__all__ = ["SourceFactory", "build_parser", "main", "make_source", "parse_args", "serve"]

log = logging.getLogger("scoutfs-notifyd")

DEFAULT_CLIENT_QUEUE = 256
DEFAULT_MAX_CLIENTS = 1024
# inotify wakes the daemon when a socket file is removed; it also looks this
# often, for what inotify on the socket's directory cannot see (the directory
# itself, or one above it, removed): the longest a client finds no socket.
SOCKET_CHECK_INTERVAL = 1.0
# inotify events on a socket's directory that may mean a socket file went away
_REMOVALS = 0x200 | 0x40 | 0x400 | 0x800  # IN_DELETE, IN_MOVED_FROM, IN_DELETE_SELF, IN_MOVE_SELF
# Descriptors the daemon needs besides one per client: sockets, epoll sets,
# the log, connections accepted but not yet counted, and the fanotify
# source's event fds (one per event in a 64 KiB read).
RESERVED_FDS = 8192
# chown(2) takes (gid_t)-1 as "leave the group", so the largest usable gid is one less.
MAX_GID = 2**32 - 2


def build_parser() -> argparse.ArgumentParser:
    """The command line, without running anything (man pages are made from it)."""
    p = argparse.ArgumentParser(
        prog="scoutfs-notifyd",
        epilog="SIGTERM, SIGINT or SIGHUP stop it and remove its sockets (status 0). A socket "
        "removed under it is bound again; the watched mount unmounted under it ends it with "
        "status 1. Bad input or an unsafe socket directory: one line that says why, status 1 "
        "(2 for a malformed option).",
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
        "of one filesystem); its directory must exist, belong to root and be writable by "
        "root alone",
    )
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default=str(paths.RUN_DIR),
        help="parent of the per-filesystem socket directories, made 0700 if missing; an "
        "existing one keeps its mode and must be writable by root alone "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="let this group (a name or a number) connect (socket 0660) instead of root "
        "alone (0600)",
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
        help="connections beyond this are closed at once (default: %(default)s; fewer, "
        "with a warning, if the open-file limit cannot hold them)",
    )
    p.add_argument(
        "--drain-delay",
        metavar="MS",
        type=float,
        default=DRAIN_DELAY_MS,
        help=f"scoutfs source: after a drain of fewer than {DELAY_BELOW} records, wait this long "
        "before draining again, so that a busy mount is drained in batches: a record "
        "reaches clients at most this much later than it could; the first record after "
        "an idle spell is not delayed (default: %(default)s; 0: drain again at once)",
    )
    p.add_argument(
        "--metrics",
        metavar="[ADDR:]PORT",
        type=_listen_address,
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (a bare PORT listens "
        "on 127.0.0.1; default: off)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="(default: %(default)s)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.client_queue < 1:
        p.error("--client-queue must be at least 1")
    if args.max_clients < 1:
        p.error("--max-clients must be at least 1")
    if not 0 <= args.drain_delay <= 1000:
        p.error("--drain-delay must be from 0 to 1000 ms")
    # an empty path would mean the current directory
    if args.path == "":
        p.error("the watched path is empty: give a mount or directory")
    if args.socket == "":
        p.error("--socket: give a path")
    if args.run_dir == "":
        p.error("--run-dir: give a directory")
    return args


def _listen_address(text: str) -> tuple[str, int]:
    # imported here: prometheus_client loads only for --metrics
    from .metrics import listen_arg

    return listen_arg(text)


# Builds the source the daemon drains from its parsed command line.
SourceFactory = Callable[[argparse.Namespace], Source]


def _fit_fd_limit(max_clients: int) -> int:
    """Raise the open-file limit as far as allowed; return how many clients it holds.

    The usual soft limit (1024) is below the default --max-clients plus the
    daemon's own descriptors and a full accept queue: accept(2) (or the
    fanotify source's read, which opens one fd per event) would fail with
    EMFILE first.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", hard, exc)
    if soft == resource.RLIM_INFINITY:
        return max_clients
    # under a low hard limit, keep half of it for the daemon's own needs
    fit = max(1, soft - min(RESERVED_FDS, soft // 2))
    if max_clients <= fit:
        return max_clients
    log.warning(
        "--max-clients %d does not fit the open-file limit (%d): serving at most %d clients",
        max_clients,
        soft,
        fit,
    )
    return fit


def make_source(args: argparse.Namespace) -> Source:
    """The source ``--source`` names, on ``args.path``: the daemon's default factory."""
    if args.source == "fanotify":
        from .source_fanotify import FanotifySource

        return FanotifySource(args.path)
    from .source_scoutfs import ScoutfsSource

    return ScoutfsSource(args.path, drain_delay_ms=args.drain_delay)


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    if not name.isdecimal():
        raise DaemonError(f"--socket-group {name}: no such group") from None
    gid = int(name)
    if gid > MAX_GID:
        raise DaemonError(f"--socket-group {name}: not a group id (at most {MAX_GID})")
    try:
        grp.getgrgid(gid)
    except KeyError:
        log.warning("--socket-group %d: no group has this id; granting it anyway", gid)
    return gid


def _socket_path(args: argparse.Namespace, source: Source, gid: int | None) -> Path:
    """Choose the socket path and make its directories safe."""
    if args.socket:
        path = Path(os.path.abspath(args.socket))
        prepare_dir(path.parent, create=False)
        return path
    run_dir = Path(args.run_dir)
    path = Path(source.default_socket_path(str(run_dir)))
    # group members need to traverse the run dir, never to list it
    run_mode = 0o711 if gid is not None else 0o700
    prepare_dir(run_dir, create=True, mode=run_mode, shared=True, gid=gid)
    prepare_dir(path.parent, create=True, mode=0o710 if gid is not None else 0o700, gid=gid)
    return path


def _watch_removals(ino: int, listeners: list[Listener]) -> None:
    """Have inotify wake the daemon when a socket's directory loses an entry."""
    for parent in {item.path.parent for item in listeners}:
        # again each time: a directory removed and made again is a new inode
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            libc.inotify_add_watch(ino, parent, _REMOVALS)


async def _keep_sockets(
    listeners: list[Listener],
    relay: Broadcaster,
    prepare: Callable[[], object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind a socket again when its file is removed under the running daemon.

    inotify on the sockets' directories says when to look; a look every
    ``SOCKET_CHECK_INTERVAL`` covers what it cannot see (a removed ancestor).

    A socket that cannot be bound again (its directory is gone and cannot
    be made again, or something else holds the path) is logged, once per
    cause, and tried again at every look; connected clients are served
    meanwhile.
    """
    ino = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    # per socket path, why the last attempt to bind it again failed
    failing: dict[Path, str] = {}
    try:
        _watch_removals(ino, listeners)
        task_status.started()
        while True:
            with trio.move_on_after(SOCKET_CHECK_INTERVAL):
                await trio.lowlevel.wait_readable(ino)
            with contextlib.suppress(BlockingIOError):
                while os.read(ino, 65536):
                    pass  # which entry went does not matter: every socket is checked
            for item in listeners:
                if item.present():
                    continue
                if item.path not in failing:
                    log.warning("%s was removed: binding it again", item.path)
                try:
                    prepare()
                    old = item.rebind()
                except (OSError, DaemonError) as exc:
                    why = str(exc)
                    if isinstance(exc, OSError):
                        where = f"{exc.filename}: " if exc.filename else ""
                        why = f"{where}{exc.strerror}"
                    if failing.get(item.path) != why:
                        log.error(
                            "cannot bind %s again: %s (trying again every %.0f s)",
                            item.path,
                            why,
                            SOCKET_CHECK_INTERVAL,
                        )
                    failing[item.path] = why
                    continue
                if failing.pop(item.path, None) is not None:
                    log.info("%s is bound again", item.path)
                if old is relay.listener:
                    relay.replace_listener(item.sock)
                else:
                    # the stats server waits on the old socket: wake it onto the new one
                    trio.lowlevel.notify_closing(old)
                old.close()
            _watch_removals(ino, listeners)
    finally:
        os.close(ino)


async def serve(args: argparse.Namespace, source_factory: SourceFactory = make_source) -> None:
    """Run the daemon until SIGTERM, SIGINT or SIGHUP, relaying ``source_factory(args)``."""
    # from the start, so a signal during startup still ends in the cleanup below
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
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
                listener.sock,
                queue_messages=args.client_queue,
                max_clients=_fit_fd_limit(args.max_clients),
            )

            def snapshot() -> dict[str, Any]:
                return {"pid": os.getpid(), "socket": str(path), **source.stats(), **relay.stats()}

            async with trio.open_nursery() as nursery:
                await nursery.start(watch_mount, args.path)
                await nursery.start(relay.serve)
                await nursery.start(serve_stats, stats_listener, snapshot)
                publish: Callable[[bytes], None] = relay.publish
                if args.metrics:
                    publish = await _start_metrics(nursery, args, snapshot, publish)
                await nursery.start(source.run, publish)
                await nursery.start(
                    _keep_sockets, listeners, relay, lambda: _socket_path(args, source, gid)
                )
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


async def _start_metrics(
    nursery: trio.Nursery,
    args: argparse.Namespace,
    snapshot: Callable[[], dict[str, Any]],
    publish: Callable[[bytes], None],
) -> Callable[[bytes], None]:
    """Serve --metrics; returns ``publish`` wrapped to observe batch sizes."""
    from .metrics import DaemonMetrics, kmod_counters_dir, serve_metrics

    kmod = kmod_counters_dir(args.path) if args.source == "scoutfs" else None
    metrics = DaemonMetrics(snapshot, kmod)
    try:
        await nursery.start(serve_metrics, args.metrics, metrics.registry)
    except OSError as exc:
        host, port = args.metrics
        raise DaemonError(f"--metrics {host}:{port}: {exc.strerror}") from None
    return metrics.wrap_publish(publish)


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
    inherited.close_inherited(log)
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
