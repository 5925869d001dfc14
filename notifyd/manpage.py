"""Man pages for the console scripts, made from their argparse parsers.

``python -m notifyd.manpage [DIR]`` writes ``scoutfs-notifyd.1``,
``scoutfs-notify.1``, ``scoutfs-notify-shim.1`` and
``scoutfs-notify-forward.1`` into DIR (default
``/usr/local/share/man/man1``, where man-db looks).  The package build runs it
(``setup.py``'s ``build_man``) and installs the pages in
``<prefix>/share/man/man1``, so a page can never describe options the
installed command does not have: it is made from the very parser the command
runs (each module's ``build_parser()``, none of which imports pyfuse3).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

__all__ = ["COMMANDS", "main", "render"]

DEFAULT_DIR = Path("/usr/local/share/man/man1")

# command -> (module with build_parser(), one-line summary for NAME)
COMMANDS: dict[str, tuple[str, str]] = {
    "scoutfs-notifyd": (
        "notifyd.daemon",
        "relay file access records of a scoutfs mount (or fanotify) to local clients",
    ),
    "scoutfs-notify": (
        "notifyd.cli",
        "watch the records scoutfs-notifyd relays, show its stats, check the set-up",
    ),
    "scoutfs-notify-shim": (
        "compat.inotify_shim.args",
        "FUSE overlay that turns scoutfs access records into inotify events",
    ),
    "scoutfs-notify-forward": (
        "notifyd.cluster.forward",
        "publish one mount's access records to a NATS JetStream stream",
    ),
}

SEE_ALSO = ["scoutfs-notifyd", "scoutfs-notify", "scoutfs-notify-shim", "scoutfs-notify-forward"]


def _esc(text: str) -> str:
    """Text as roff shows it literally: backslashes, and dots or quotes at a line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _block(text: str, raw: bool) -> Iterator[str]:
    """A description or epilog: kept as laid out when the parser keeps it, else filled."""
    text = text.strip("\n")
    if raw:
        # a paragraph of its own, not the tail of the last option's .TP
        yield ".PP"
        yield ".nf"
        yield _esc(text)
        yield ".fi"
        return
    for para in re.split(r"\n\s*\n", text):
        yield ".PP"
        yield _esc(" ".join(para.split()))


def _raw(parser: argparse.ArgumentParser) -> bool:
    cls = parser.formatter_class
    return isinstance(cls, type) and issubclass(cls, argparse.RawDescriptionHelpFormatter)


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return ", ".join(f"{opt} {metavar}" for opt in action.option_strings)


def _actions(parser: argparse.ArgumentParser) -> Iterator[str]:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        yield ".TP"
        yield f".B {_esc(_invocation(action))}"
        yield _esc(formatter._expand_help(action) if action.help else "")


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    return " ".join(usage.split())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render(name: str, parser: argparse.ArgumentParser, summary: str, version: str) -> str:
    """The roff source of ``name``'s page, section 1."""
    out = [
        f'.TH {name.upper()} 1 "" "scoutfs-notify {version}" "User Commands"',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
    ]
    subs = _subparsers(parser)
    if subs:
        for sub in subs.values():
            out += [".PP", _esc(_usage(sub))]
    else:
        out.append(_esc(_usage(parser)))
    if parser.description:
        out += [".SH DESCRIPTION", *_block(parser.description, _raw(parser))]
    options = list(_actions(parser))
    if options:
        out += [".SH OPTIONS", *options]
    if parser.epilog:
        out += _block(parser.epilog, _raw(parser))
    if subs:
        out.append(".SH COMMANDS")
        for cmd, sub in subs.items():
            out += [f".SS {_esc(cmd)}", _esc(_usage(sub))]
            if sub.description:
                out += _block(sub.description, _raw(sub))
            out += [".PP", "Options:", *_actions(sub)]
            if sub.epilog:
                out += _block(sub.epilog, _raw(sub))
    others = [f".BR {other} (1)" for other in SEE_ALSO if other != name]
    out += [".SH SEE ALSO", ",\n".join(others)]
    return "\n".join(out) + "\n"


def _version() -> str:
    try:
        return metadata.version("scoutfs-notify")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser_of(module: str) -> argparse.ArgumentParser:
    """Import ``module`` and call its ``build_parser()``: nothing is run."""
    make: Callable[[], argparse.ArgumentParser] = importlib.import_module(module).build_parser
    return make()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m notifyd.manpage",
        description="Write the man pages of scoutfs-notify's commands, made from their parsers.",
    )
    p.add_argument(
        "dir",
        nargs="?",
        default=str(DEFAULT_DIR),
        metavar="DIR",
        help="where to write NAME.1 (default: %(default)s)",
    )
    p.add_argument(
        "--version",
        metavar="VERSION",
        help="the package version the pages name (default: the installed package's; "
        "the package build gives its own, since it is not installed yet)",
    )
    args = p.parse_args(argv)
    version = args.version or _version()
    out = Path(args.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, (module, summary) in COMMANDS.items():
            page = render(name, build_parser_of(module), summary, version)
            path = out / f"{name}.1"
            tmp = path.with_suffix(".1.tmp")
            tmp.write_text(page)
            os.replace(tmp, path)
            print(f"wrote {path}")
    except OSError as exc:
        print(f"notifyd.manpage: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
