"""The long-running commands keep none of the descriptors a shell left open.

Each is started as an admin's shell script would start it: ``exec 7<FILE``
then ``exec`` the command, so fd 7 comes through exec.  A descriptor kept
to a file on scoutfs keeps an unlinked file from being deleted for as long
as the command runs (notifyd/inherited.py).  READY=1 comes after the
descriptors are closed, so once it came their absence is final.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
from cluster_support import nats_servers

from notifyd import procs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons and FUSE need root")

SHELL = 'exec 7<"$0" 8>>"$0"; exec "$@"'


def start_from_a_shell(held: Path, cmd: list[str], tmp_path: Path, name: str) -> procs.ReadyProcess:
    return procs.start_ready(
        ["sh", "-c", SHELL, str(held), *cmd], tmp_path / f"{name}.sd", tmp_path / f"{name}.log"
    )


def open_files(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


@pytest.mark.parametrize("command", ["daemon", "forwarder", "shim"])
def test_a_command_started_from_a_shell_closes_the_descriptors_it_inherited(
    tmp_path: Path, notifyd_factory, command: str
) -> None:
    held = tmp_path / "held-by-the-shell"
    held.write_text("x")
    py = [sys.executable, "-m"]
    with nats_servers(tmp_path / "nats", 1) as servers:
        if command == "daemon":
            backing = tmp_path / "backing"
            backing.mkdir()
            sock = tmp_path / "d.sock"
            cmd = [
                *py,
                "notifyd.daemon",
                "--source",
                "fanotify",
                str(backing),
                "--socket",
                str(sock),
            ]
        else:
            daemon = notifyd_factory()
            if command == "forwarder":
                cmd = [
                    *py, "notifyd.cluster.forward", "--nats", servers[0].url,
                    "--socket", str(daemon.socket), "--fsid", "f", "--node", "n",
                    str(daemon.backing),
                ]  # fmt: skip
            else:
                mnt = tmp_path / "overlay"
                mnt.mkdir()
                cmd = [
                    *py, "compat.inotify_shim.main", "--socket", str(daemon.socket),
                    str(daemon.backing), str(mnt),
                ]  # fmt: skip
        ready = start_from_a_shell(held, cmd, tmp_path, command)
        try:
            assert str(held) not in open_files(ready.proc.pid), ready.log()
            assert "closed 2 descriptors inherited from the parent (7, 8)" in ready.log()
        finally:
            assert ready.stop() == 0, ready.log()
