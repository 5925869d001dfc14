"""``scoutfs-notify watch --nats URL``: every node's records from the cluster stream.

Runs asyncio in its own process (the CLI is not a trio program).  Lines are
those of the local ``watch`` with ``node=NODE`` after the time; with
``--durable`` a message is acknowledged only after its lines were written
and flushed, and SIGINT/SIGTERM finish the message in hand first, so a
restarted watcher prints exactly the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import signal
import sys
from typing import TextIO

from .. import abi
from ..client import Gap
from ..watch import format_json, format_text
from . import wire
from .consume import ClusterSubscriber, StartAt
from .server import ClusterError, add_stream_group, connect, credentials_from_args

__all__ = ["add_watch_args", "format_cluster", "run_watch"]

log = logging.getLogger("scoutfs-notify")

# How long creating the consumer may keep timing out (a leader election after
# a server died takes seconds) before watch gives up.
SUBSCRIBE_RETRY_FOR = 30.0


def _since(text: str) -> datetime.datetime:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        ago = float(t[:-1]) * units[t[-1]]
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)
    try:
        when = datetime.datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (ISO 8601 like 2026-01-31T12:00:00Z, or 10m, 2h, 1d ago)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_watch_args(w: argparse.ArgumentParser) -> None:
    """The cluster options of ``scoutfs-notify watch`` (all inert without --nats)."""
    g = add_stream_group(
        w,
        "cluster stream (--nats)",
        "Read every node's records from the NATS JetStream stream that "
        "scoutfs-notify-forward fills, instead of this node's daemon. Lines carry "
        "node=NODE (the mount's rid on scoutfs). Credentials come from files or the "
        "environment, never from arguments.",
        fsid_help="only this filesystem (default: all)",
        node_help="only this node (default: all)",
    )
    g.add_argument(
        "--durable",
        metavar="NAME",
        help="a named consumer: a restarted watch resumes after the last record it printed",
    )
    start = g.add_mutually_exclusive_group()
    start.add_argument(
        "--new", action="store_true", help="start with records published from now on (default)"
    )
    start.add_argument("--all", action="store_true", help="start with the oldest record kept")
    start.add_argument("--from-seq", type=_positive, metavar="S", help="start at stream sequence S")
    start.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="start with records published since TIME (ISO 8601, or 10m/2h/1d ago)",
    )


def _start(args: argparse.Namespace) -> StartAt:
    if args.from_seq:
        return StartAt(seq=args.from_seq)
    if args.since:
        return StartAt(time=args.since)
    if args.all:
        return StartAt.all()
    return StartAt()


def format_cluster(ev: wire.ClusterRecord | wire.ClusterGap, as_json: bool) -> str:
    """One ``watch --nats`` line: the local line with the node (and fsid in JSON)."""
    if isinstance(ev, wire.ClusterGap):
        if as_json:
            return json.dumps({"type": "GAP", **ev._asdict()})
        ts = format_text(Gap(0, 0)).split(" ", 1)[0]
        after = f" after seq={ev.last_seq}" if ev.last_seq is not None else ""
        return f"{ts} node={ev.node} GAP lost={ev.lost}{after} before seq={ev.next_seq}"
    if as_json:
        doc = json.loads(format_json(ev.record))
        return json.dumps({"fsid": ev.fsid, "node": ev.node, **doc})
    ts, rest = format_text(ev.record).split(" ", 1)
    return f"{ts} node={ev.node} {rest}"


async def _watch(args: argparse.Namespace, out: TextIO) -> int:
    cred = credentials_from_args(args)
    nc = await connect(args.nats, cred, name="scoutfs-notify watch")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sub = ClusterSubscriber(
        nc,
        stream=args.stream,
        fsid=args.fsid,
        node=args.node,
        durable=args.durable,
        start=_start(args),
    )
    try:
        await _subscribe(sub, args.stream)
        print(
            f"scoutfs-notify: watching {sub.subject} in {args.stream}"
            + (f" as {args.durable}" if args.durable else ""),
            file=sys.stderr,
            flush=True,
        )
        batches = sub.batches()
        while not stop.is_set():
            nxt = asyncio.ensure_future(anext(batches))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await nxt
                break
            for ev in nxt.result():
                if isinstance(ev, wire.ClusterRecord) and ev.record.type not in abi.TYPE_NAMES:
                    continue  # ABI.md: consumers skip types they do not know
                out.write(format_cluster(ev, args.json) + "\n")
            out.flush()
        # what was printed is acknowledged before we go
        await sub.ack_pending()
        await sub.close()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return 0


async def _subscribe(sub: ClusterSubscriber, stream: str) -> None:
    """Create the consumer; retry while the cluster elects leaders (a server just died)."""
    import nats.errors
    import nats.js.errors

    deadline = asyncio.get_running_loop().time() + SUBSCRIBE_RETRY_FOR
    while True:
        try:
            await sub.subscribe()
            return
        except nats.js.errors.NotFoundError:
            raise ClusterError(
                f"no stream {stream}: start scoutfs-notify-forward first (it creates it), "
                "or give --stream"
            ) from None
        except (
            nats.errors.TimeoutError,
            TimeoutError,
            nats.js.errors.ServiceUnavailableError,
        ) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ClusterError(f"cannot consume from the stream {stream}: {exc}") from None
            log.warning("creating the consumer timed out (%s); retrying", exc)
            await asyncio.sleep(1.0)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise ClusterError(f"cannot consume from the stream {stream}: {exc}") from None


def run_watch(args: argparse.Namespace) -> int:
    """``scoutfs-notify watch --nats``: print until SIGINT; 1 with a message on errors."""
    logging.basicConfig(level=logging.WARNING, format="scoutfs-notify: %(message)s")
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_watch(args, sys.stdout))
    except ClusterError as exc:
        print(f"scoutfs-notify: {exc}", file=sys.stderr)
    except BrokenPipeError:
        return 0
    return 1
