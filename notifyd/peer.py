"""Who serves a socket a client connected to: only root (or the client's own user) is trusted.

The daemon refuses to serve from a directory other users may write, but a
client given such a path (``--socket /tmp/...``) could still reach a socket
another user bound there first and read forged records or stats from it.
The kernel knows who bound it (``SO_PEERCRED``, recorded at ``listen``), so
the client asks before it believes anything.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Protocol

__all__ = ["UntrustedPeerError", "check_peer", "peer_cred"]

_UCRED = struct.Struct("=iII")


class UntrustedPeerError(Exception):
    """The socket is served by a user who is neither root nor the caller."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def peer_cred(sock: _HasFileno) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process on the other end of ``sock``.

    ``sock`` is anything with ``fileno()``: a ``socket.socket`` or a trio socket.
    """
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        pid, uid, gid = _UCRED.unpack(
            dup.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    return pid, uid, gid


def check_peer(sock: _HasFileno, path: str | os.PathLike[str]) -> None:
    """Raise unless root or the caller's own user serves ``sock``.

    Raises:
        UntrustedPeerError: with a message that names the serving uid.
    """
    pid, uid, _ = peer_cred(sock)
    if uid not in (0, os.geteuid()):
        raise UntrustedPeerError(
            f"{os.fsdecode(path)} is served by uid {uid} (pid {pid}), not by root: refusing "
            "what it sends (a user who may write its directory can take a socket's name)"
        )
