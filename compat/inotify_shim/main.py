"""scoutfs-notify-shim: mount the overlay and replay records as inotify events."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import pyfuse3
import trio

from notifyd import inherited
from notifyd.errors import DaemonError
from notifyd.listen import Listener, bind_listener, prepare_dir
from notifyd.metrics import MetricsServer, ShimMetrics
from notifyd.paths import RUN_DIR, default_socket_path, shim_stats_path
from notifyd.sdnotify import sd_notify
from notifyd.stats import serve_stats

from . import rundir
from .args import build_parser
from .follow import FollowState, follow
from .follow_cluster import check_cluster_args, follow_cluster
from .mounts import FSNAME, MountpointError, check_paths, set_read_ahead
from .overlay import REQUEST_TASKS, Overlay
from .replay import Replayer, ReplayThreads
from .resolve import Resolver

__all__ = ["build_parser", "main"]

log = logging.getLogger("scoutfs-notify-shim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    # an empty path would mean the current directory
    for name, value in (("BACKING", args.backing), ("MOUNTPOINT", args.mountpoint)):
        if not value:
            p.error(f"{name} is empty: give a directory")
    if args.socket == "":
        p.error("--socket is empty: give a path, or leave it out for the default")
    return args


def _tell_systemd(state: str) -> None:
    try:
        sd_notify(state)
    except OSError as exc:
        # the service manager times the unit out on its own; say why here
        log.warning("cannot tell systemd %s: %s", state, exc)


async def _fuse_session(done: trio.CancelScope) -> None:
    # calls that may wait leave some of these free (overlay._MAX_WAITING_CALLS)
    await pyfuse3.main(max_tasks=REQUEST_TASKS)
    # unmounted from outside (fusermount3 -u): nothing left to serve
    log.info("the FUSE session ended")
    done.cancel()


async def _until_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return


def _tune(mountpoint: str, read_ahead_kb: int) -> None:
    """Worker thread, once the session runs: set the overlay's readahead.

    Not before: the kernel sets the readahead again from the reply to FUSE
    INIT (to at most what it had at mount time, 128 KiB), and that reply is
    the session's first.  Any request waits for INIT, so once this statvfs
    returns the figure stays.  (Never from the trio thread: it would wait
    for its own reply.)
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        log.warning("cannot set the overlay's readahead: %s", exc)
        return
    set_read_ahead(mountpoint, read_ahead_kb)


def _bind_stats(mountpoint: str, given: str | None) -> Listener:
    """The stats socket, bound before mounting so a bad path stops the start."""
    if given:
        path = Path(os.path.abspath(given))
        # a directory others may write would let them take the name first
        prepare_dir(path.parent, create=False)
    else:
        path = shim_stats_path(mountpoint)
        # the run dir is shared with the daemons: made as they make it, never re-moded
        prepare_dir(RUN_DIR, create=True, mode=0o711, shared=True)
        # the directory is made and the socket bound under the lock that sweeps take
        with rundir.locked(RUN_DIR):
            rundir.sweep(RUN_DIR, keep=path.parent)
            prepare_dir(path.parent, create=True)
            return bind_listener(path, kind=socket.SOCK_STREAM)
    return bind_listener(path, kind=socket.SOCK_STREAM)


async def serve(
    overlay: Overlay,
    mountpoint: str,
    socket_path: str,
    args: argparse.Namespace,
    stats: Listener | None = None,
    metrics: ShimMetrics | None = None,
) -> None:
    """Run the FUSE session and the bridge until a signal or an unmount.

    The bridge stops first and closes its synthetic opens while the overlay
    still answers them; only then does the FUSE session end.
    """
    threads = overlay.replay_threads
    limiter = trio.CapacityLimiter(args.workers + 1)
    resolver = Resolver(overlay.backing, overlay.path_of, limiter, args.index_limit)
    replayer = Replayer(
        mountpoint,
        resolver,
        threads,
        limiter,
        workers=args.workers,
        max_pending=args.max_pending,
        close_after=args.close_after,
        zero_read=not args.read_byte,
        kernel_knows=overlay.knows if args.new_dir_wait > 0 else None,
        new_dir_wait=args.new_dir_wait,
    )
    following = FollowState()

    def snapshot() -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "backing": overlay.backing,
            "mountpoint": mountpoint,
            "socket": socket_path,
            **following.snapshot(),
            **replayer.snapshot(),
        }

    async with trio.open_nursery() as outer:
        outer.start_soon(_fuse_session, outer.cancel_scope)
        if args.read_ahead > 0:
            await trio.to_thread.run_sync(_tune, mountpoint, args.read_ahead)
        async with trio.open_nursery() as bridge:
            bridge.start_soon(_until_signal, bridge.cancel_scope)
            if stats is not None:
                await bridge.start(serve_stats, stats, snapshot)
            await bridge.start(replayer.run)
            on_event = None
            if metrics is not None:
                metrics.attach(lambda: dataclasses.asdict(replayer.stats))
                replayer.on_replayed = metrics.on_replayed
                replayer.on_lost = metrics.on_lost
                on_event = metrics.on_event
            await bridge.start(
                functools.partial(follow, state=following, on_event=on_event),
                socket_path,
                replayer,
            )
            if args.nats:
                await bridge.start(follow_cluster, args, overlay.backing, socket_path, replayer)
            log.info(
                "serving %s at %s; records from %s (%s)",
                overlay.backing,
                mountpoint,
                socket_path,
                "scoutfs ino_path" if resolver.on_scoutfs else "inode index",
            )
            _tell_systemd("READY=1")
        _tell_systemd("STOPPING=1")
        pyfuse3.terminate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    inherited.close_inherited(log)
    if os.geteuid() != 0:
        log.error("run as root: the overlay acts on BACKING for every user")
        return 1
    try:
        backing, mountpoint = check_paths(args.backing, args.mountpoint)
    except MountpointError as exc:
        log.error("%s", exc)
        return 1
    # create/mkdir/mknod apply the caller's umask themselves; ours must not
    # mask what they ask for a second time
    os.umask(0)
    socket_path = os.fspath(args.socket or default_socket_path(backing))
    if why := check_cluster_args(args, backing, socket_path):
        log.error("--nats: %s", why)
        return 1
    metrics = server = None
    if args.metrics:
        metrics = ShimMetrics()
        try:
            server = MetricsServer(args.metrics, metrics.registry)
        except OSError as exc:
            log.error("--metrics %s:%d: %s", *args.metrics, exc.strerror)
            return 1
    try:
        try:
            stats = _bind_stats(mountpoint, args.stats_socket)
        except (DaemonError, OSError) as exc:
            log.error("cannot serve the stats socket: %s", exc)
            return 1
        try:
            return _mount_and_serve(args, backing, mountpoint, socket_path, stats, metrics)
        finally:
            stats.close()
            if not args.stats_socket:
                # the per-mount directory made for it; never the shared run dir
                with contextlib.suppress(OSError):
                    os.rmdir(stats.path.parent)
    finally:
        if server is not None:
            server.close()


def _mount_and_serve(
    args: argparse.Namespace,
    backing: str,
    mountpoint: str,
    socket_path: str,
    stats: Listener,
    metrics: ShimMetrics | None = None,
) -> int:
    overlay = Overlay(backing, ReplayThreads(), timeout=args.timeout, acl=args.acl)
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if args.allow_other:
        options.add("allow_other")
    # what BACKING's mount refuses, the overlay refuses too (FUSE mounts are
    # nosuid and nodev already): a program there is not run through it
    if os.statvfs(backing).f_flag & os.ST_NOEXEC:
        options.add("noexec")
    try:
        pyfuse3.init(overlay, mountpoint, options)
    except RuntimeError as exc:
        log.error("mounting %s failed: %s", mountpoint, exc)
        return 1
    try:
        trio.run(serve, overlay, mountpoint, socket_path, args, stats, metrics)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
