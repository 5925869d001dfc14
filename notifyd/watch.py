"""``scoutfs-notify watch``: print records as they arrive, filtered like ``inotifywait``.

The subscription, decoding and gap detection are the client library's
(:class:`~notifyd.client.Subscriber`); this module adds what an admin's
script needs around it: event, path, uid and pid filters, ``--format`` with a
placeholder for every field, ``--csv``, ``-c/--count`` and ``-t/--timeout``
with ``inotifywait``'s exit statuses.  A gap (records lost before they reached
this client) is printed in every output format and never filtered out: a
filter cannot know whether the lost records would have matched.
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import pwd
import re
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from . import abi, ioctls
from .client import Gap, Subscriber
from .peer import check_peer

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "Filters",
    "PathResolver",
    "add_arguments",
    "add_target_arguments",
    "check_arguments",
    "expand_format",
    "format_csv",
    "format_json",
    "format_text",
    "run",
]

# Exit statuses, as inotifywait(1) numbers its own.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 2
EXIT_INTERRUPTED = 130

# Inode -> path answers kept, so a burst of reads of one file costs one lookup.
PATH_CACHE_SIZE = 4096
# What a path prints as when the file has no name left (deleted since).
UNRESOLVED = "?"
# Off scoutfs an unknown inode rebuilds the index by walking MOUNT, at most
# this often, so records for files already gone cost a bounded amount of walking.
MIN_REWALK_INTERVAL = 0.2
# Files indexed by that walk at most: a bound on memory for huge trees.
WALK_LIMIT = 2_000_000

EVENT_NAMES = {"open": abi.TYPE_OPEN, "read": abi.TYPE_READ, "access": abi.TYPE_READ}

DEFAULT_TIMEFMT = "%Y-%m-%dT%H:%M:%S%z"
DEFAULT_GAPFORMAT = "GAP lost=%l after seq=%s"
CSV_COLUMNS = (
    "time_ns",
    "type",
    "path",
    "ino",
    "pid",
    "uid",
    "gid",
    "flags",
    "pos",
    "count",
    "seq",
    "lost",
)

WATCH_DESCRIPTION = """\
Print one line per record until SIGINT, the daemon stops, -c N records or -t S
seconds. Without --format, --csv or --json a line is
  TIME TYPE ino=INO [path=PATH] pid=PID uid=UID gid=GID flags=F|pos=P count=C seq=S
and a loss of records (kernel ring full, a source overflow, this client too slow)
  TIME GAP lost=N after seq=S
Gaps are printed in every format and never filtered out.

Paths are resolved (for --include/--exclude, %f, --csv and --resolve-paths) with
SCOUTFS_IOC_INO_PATH on scoutfs (as root), elsewhere by walking MOUNT; a file
without a name left prints as ?. The filters match the full path (MOUNT/...).
"""

FORMAT_HELP = """\
--format conversions (like inotifywait's; a record's fields from ABI.md):
  %w  MOUNT, with a trailing /          %f  the path relative to MOUNT (? if none)
  %e  OPEN, READ or GAP (%Xe: the same) %T  the record's time, --timefmt (local)
  %t  the record's time_ns              %s  seq (for a GAP: the last seq before it)
  %i  ino       %p  pid       %u  uid (? if unknown)      %g  gid (? if unknown)
  %F  open flags in octal      %o  READ offset (pos)       %c  READ byte count
  %v  record version           %l  records lost (GAP lines; 0 for records)
  %n  newline   %0  NUL        %%  a literal %
A GAP line with --format uses --gapformat (default: "GAP lost=%l after seq=%s").

--csv columns, no header: time_ns,type,path,ino,pid,uid,gid,flags,pos,count,seq,lost
(a GAP row has type GAP, seq the last seq before it and lost the count; path is
empty unless paths are resolved; unknown ids are ?).

exit status (as inotifywait(1) documents its own):
  0    -c N records were printed, or -t S ran out after at least one record
  1    an error: no daemon, no permission, bad input, or the daemon closed the
       connection (it stopped)
  2    -t S ran out and no record passed the filters
  130  interrupted by SIGINT (also when started with SIGINT ignored, as a shell
       script's background job is)
"""


# --- paths -----------------------------------------------------------------


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

    @property
    def works(self) -> bool:
        return self.fd >= 0

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


def walk_index(top: str, limit: int = WALK_LIMIT) -> dict[int, str]:
    """Map inode -> full path of every regular file under ``top``, on its filesystem.

    Inode numbers come from ``d_ino`` (no stat per file); the first name of a
    hard-linked file wins.
    """
    index: dict[int, str] = {}
    dev = os.lstat(top).st_dev
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue  # gone, or no longer a directory
        with it:
            for de in it:
                try:
                    if de.is_dir(follow_symlinks=False):
                        if de.stat(follow_symlinks=False).st_dev == dev:
                            stack.append(de.path)
                    elif de.is_file(follow_symlinks=False):
                        index.setdefault(de.inode(), de.path)
                        if len(index) >= limit:
                            return index
                except OSError:
                    continue
    return index


class WalkResolver:
    """Inode numbers to paths off scoutfs (the fanotify source), by walking MOUNT.

    A miss rebuilds the index unless it was rebuilt less than
    :data:`MIN_REWALK_INTERVAL` ago; what is still unknown then resolves to None.
    """

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self.index: dict[int, str] = {}
        self.walked = -1e9

    works = True

    def close(self) -> None:
        self.index = {}

    def __call__(self, ino: int) -> str | None:
        path = self.index.get(ino)
        if path is None and time.monotonic() - self.walked >= MIN_REWALK_INTERVAL:
            self.index = walk_index(self.mount)
            self.walked = time.monotonic()
            path = self.index.get(ino)
        return path


def make_resolver(mount: str, err: TextIO = sys.stderr) -> PathResolver | WalkResolver:
    """INO_PATH on scoutfs, a walk of ``mount`` elsewhere."""
    try:
        ioctls.fsid_of(mount)
    except ioctls.NotScoutfsError:
        return WalkResolver(mount)
    except OSError:
        pass  # PathResolver says why
    return PathResolver(mount, err)


# --- output ----------------------------------------------------------------


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


def format_csv(ev: abi.Record | Gap, path: str | None = None) -> str:
    """One ``watch --csv`` row (without its line end), columns as :data:`CSV_COLUMNS`."""
    if isinstance(ev, Gap):
        row: list[object] = [time.time_ns(), "GAP", "", "", "", "", "", "", "", ""]
        row += [ev.last_seq, ev.lost]
    else:
        row = [ev.time_ns, ev.type_name, "" if path is None else path, ev.ino, ev.pid]
        row += [_id(ev.uid), _id(ev.gid), f"0{ev.flags:o}", ev.pos, ev.count, ev.seq, 0]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()


_CONVERSION = re.compile(r"%(.e|.)", re.S)


def check_format(fmt: str) -> str | None:
    """Return why ``fmt`` is not a valid --format, or None."""
    if fmt.endswith("%") and not fmt.endswith("%%"):
        return "ends with a lone %"
    for m in _CONVERSION.finditer(fmt):
        conv = m.group(1)
        if len(conv) == 2 and conv[1] == "e":
            continue
        if conv not in "wfeTtsipugFocvln0%":
            return f"unknown conversion %{conv} (see --help)"
    return None


def expand_format(
    fmt: str,
    ev: abi.Record | Gap,
    *,
    mount: str = "",
    rel: str | None = None,
    timefmt: str = DEFAULT_TIMEFMT,
) -> str:
    """Fill --format ``fmt`` for a record or a gap; ``rel`` is the path below ``mount``."""
    if isinstance(ev, Gap):
        now = time.time_ns()
        values: dict[str, str] = dict.fromkeys("ipugFocv", "")
        values.update(e="GAP", t=str(now), s=str(ev.last_seq), l=str(ev.lost), f="")
        stamp = now
    else:
        values = {
            "e": ev.type_name,
            "t": str(ev.time_ns),
            "s": str(ev.seq),
            "i": str(ev.ino),
            "p": str(ev.pid),
            "u": _id(ev.uid),
            "g": _id(ev.gid),
            "F": f"0{ev.flags:o}",
            "o": str(ev.pos),
            "c": str(ev.count),
            "v": str(ev.version),
            "l": "0",
            "f": UNRESOLVED if rel is None else rel,
        }
        stamp = ev.time_ns
    values.update(n="\n", **{"0": "\0", "%": "%"})
    values["w"] = mount.rstrip("/") + "/" if mount else ""

    def one(m: re.Match[str]) -> str:
        conv = m.group(1)
        if conv == "T":
            return time.strftime(timefmt, time.localtime(stamp / 1e9))
        if len(conv) == 2 and conv[1] == "e":
            return values["e"]  # one event per record: the separator never shows
        return values.get(conv, m.group(0))

    return _CONVERSION.sub(one, fmt)


# --- filters ---------------------------------------------------------------


class Filters:
    """What a record must be to be printed: types, ids and path regexes."""

    def __init__(
        self,
        types: Iterable[int] | None = None,
        uids: Iterable[int] | None = None,
        pids: Iterable[int] | None = None,
        include: re.Pattern[str] | None = None,
        exclude: re.Pattern[str] | None = None,
    ) -> None:
        self.types = frozenset(types) if types else None
        self.uids = frozenset(uids) if uids else None
        self.pids = frozenset(pids) if pids else None
        self.include = include
        self.exclude = exclude

    @property
    def needs_path(self) -> bool:
        return self.include is not None or self.exclude is not None

    def wants(self, rec: abi.Record) -> bool:
        """Everything but the path: cheap, so it runs before any lookup."""
        if self.types is not None and rec.type not in self.types:
            return False
        if self.uids is not None and rec.uid not in self.uids:
            return False
        return self.pids is None or rec.pid in self.pids

    def wants_path(self, path: str | None) -> bool:
        """A file without a name left matches no --include and no --exclude."""
        if self.include is not None and (path is None or not self.include.search(path)):
            return False
        return not (self.exclude is not None and path is not None and self.exclude.search(path))


# --- arguments -------------------------------------------------------------


def _csv_items(values: list[str] | None) -> list[str]:
    return [item.strip() for v in values or [] for item in v.split(",") if item.strip()]


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """MOUNT and ``--socket``: which daemon a command asks."""
    p.add_argument(
        "mount",
        nargs="?",
        metavar="MOUNT",
        help="the scoutfs mount (or fanotify-watched directory) whose daemon to ask",
    )
    p.add_argument("--socket", metavar="PATH", help="the daemon's notify socket")


def add_arguments(w: argparse.ArgumentParser) -> None:
    """The ``watch`` options, on a subparser the dispatcher made."""
    w.description = WATCH_DESCRIPTION
    w.epilog = FORMAT_HELP
    w.formatter_class = argparse.RawDescriptionHelpFormatter
    add_target_arguments(w)
    out = w.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per record or gap")
    out.add_argument("--csv", action="store_true", help="CSV rows (columns below)")
    out.add_argument("--format", metavar="FMT", help="printf-like lines (conversions below)")
    w.add_argument(
        "--timefmt",
        metavar="FMT",
        default=DEFAULT_TIMEFMT,
        help="strftime(3) format for %%T (default: %(default)s)",
    )
    w.add_argument(
        "--gapformat",
        metavar="FMT",
        default=DEFAULT_GAPFORMAT,
        help='what a GAP prints as with --format (default: "%(default)s")',
    )
    w.add_argument("--no-newline", action="store_true", help="no line end after each --format line")
    w.add_argument(
        "-e",
        "--event",
        action="append",
        metavar="EVENTS",
        help="print only these events: open, read (or access); comma-separated or repeated",
    )
    for opt, what in (
        ("--include", "print only records whose path matches this regex"),
        ("--exclude", "skip records whose path matches this regex"),
        ("--includei", "like --include, case-insensitive"),
        ("--excludei", "like --exclude, case-insensitive"),
    ):
        w.add_argument(opt, metavar="REGEX", help=what)
    w.add_argument(
        "--uid",
        action="append",
        metavar="UIDS",
        help="print only accesses by these users (numbers or names; comma-separated or repeated)",
    )
    w.add_argument(
        "--pid",
        action="append",
        metavar="PIDS",
        help="print only accesses by these processes (comma-separated or repeated)",
    )
    w.add_argument(
        "-c",
        "--count",
        type=int,
        metavar="N",
        help="exit 0 after N records (gaps do not count)",
    )
    w.add_argument(
        "-t",
        "--timeout",
        type=float,
        metavar="S",
        help="exit after S seconds: 0 if a record was printed, 2 if none (0: never)",
    )
    w.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="once: no status lines on stderr; twice: print nothing but fatal errors",
    )
    w.add_argument(
        "--resolve-paths",
        action="store_true",
        help="add each file's path to the default and JSON lines (see above)",
    )


def _regex(args: argparse.Namespace, name: str) -> re.Pattern[str] | None:
    cased, icase = getattr(args, name), getattr(args, name + "i")
    if cased and icase:
        raise ValueError(f"give --{name} or --{name}i, not both")
    if not (cased or icase):
        return None
    try:
        return re.compile(cased or icase, 0 if cased else re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"--{name}{'' if cased else 'i'} {cased or icase!r}: {exc}") from None


def _uid(item: str) -> int:
    if item.isdigit():
        return int(item)
    try:
        return pwd.getpwnam(item).pw_uid
    except KeyError:
        raise ValueError(f"--uid {item}: no such user") from None


def check_arguments(args: argparse.Namespace) -> Filters:
    """Validate the watch options; raise ValueError with the message to print."""
    types = []
    for item in _csv_items(args.event):
        if item.lower() not in EVENT_NAMES:
            raise ValueError(f"-e {item}: unknown event (known: open, read, access)")
        types.append(EVENT_NAMES[item.lower()])
    pids = []
    for item in _csv_items(args.pid):
        if not item.isdigit():
            raise ValueError(f"--pid {item}: not a process id")
        pids.append(int(item))
    uids = [_uid(item) for item in _csv_items(args.uid)]
    if args.count is not None and args.count < 1:
        raise ValueError("-c/--count must be at least 1")
    if args.timeout is not None and args.timeout < 0:
        raise ValueError("-t/--timeout must be 0 or more seconds")
    for opt, fmt in (("--format", args.format), ("--gapformat", args.gapformat)):
        why = fmt is not None and check_format(fmt)
        if why:
            raise ValueError(f"{opt} {fmt!r}: {why}")
    filters = Filters(types, uids, pids, _regex(args, "include"), _regex(args, "exclude"))
    uses_path = args.resolve_paths or args.csv or filters.needs_path
    if args.format and "%f" in args.format.replace("%%", ""):
        uses_path = True
    if uses_path and not args.mount:
        raise ValueError("a path (for --include/--exclude, %f, --csv, --resolve-paths) needs MOUNT")
    return filters


# --- the loop --------------------------------------------------------------


def _formatter(
    args: argparse.Namespace, mount: str
) -> Callable[[abi.Record | Gap, str | None], str]:
    if args.json:
        return format_json
    if args.csv:
        return format_csv
    if args.format is not None:
        fmt, gapfmt, timefmt = args.format, args.gapformat, args.timefmt

        def fill(ev: abi.Record | Gap, path: str | None) -> str:
            rel = None if path is None else os.path.relpath(path, mount)
            return expand_format(
                gapfmt if isinstance(ev, Gap) else fmt, ev, mount=mount, rel=rel, timefmt=timefmt
            )

        return fill
    return format_text


def run(args: argparse.Namespace, sock_path: Path, filters: Filters) -> int:
    """Print records from ``sock_path`` until a limit, SIGINT or end of stream.

    Raises the OSError of a failed connect for the dispatcher to explain, and
    UntrustedPeerError when anyone but root (or the caller) serves the socket.
    """
    out = sys.stdout
    mount = os.path.abspath(args.mount) if args.mount else ""
    fmt = _formatter(args, mount)
    end = "" if args.format is not None and args.no_newline else "\n"
    uses_path = args.resolve_paths or args.csv or filters.needs_path
    if args.format is not None and "%f" in args.format.replace("%%", ""):
        uses_path = True
    resolve = make_resolver(mount) if uses_path else None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    printed = 0
    quiet = args.quiet
    # SIGINT ends watch with 130 however it was started.  A shell script's background
    # job (`scoutfs-notify watch ... &`) starts with SIGINT ignored, Python then keeps
    # it ignored, and `kill -INT $!` would leave watch running for ever.  Set before
    # connecting: once the daemon counts this client, SIGINT is honoured.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Subscriber(sock_path, timeout=args.timeout or None) as sub:
            check_peer(sub.sock, sock_path)
            if not quiet:
                print(f"scoutfs-notify: watching {sock_path}", file=sys.stderr)
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return EXIT_OK if printed else EXIT_TIMEOUT
                    sub.sock.settimeout(left)
                try:
                    batch = sub.recv_batch()
                except TimeoutError:
                    return EXIT_OK if printed else EXIT_TIMEOUT
                if batch is None:
                    break
                for ev in sub.tracker.events(batch):
                    path = None
                    if isinstance(ev, abi.Record):
                        if ev.type not in abi.TYPE_NAMES:
                            continue  # docs/ABI.md: consumers skip types they do not know
                        if not filters.wants(ev):
                            continue
                        if resolve is not None:
                            path = resolve(ev.ino) if resolve.works else None
                            if not filters.wants_path(path):
                                continue
                            if path is None and args.resolve_paths:
                                path = UNRESOLVED
                        printed += 1
                    if quiet < 2:
                        out.write(fmt(ev, path) + end)
                    if args.count is not None and printed >= args.count:
                        out.flush()
                        return EXIT_OK
                out.flush()
    finally:
        if resolve is not None:
            resolve.close()
    if quiet < 2:
        print("scoutfs-notify: the daemon closed the connection", file=sys.stderr)
    return EXIT_ERROR
