"""The forwarder's and watch's judgement of a NATS server, and credentials.

A server older than 2.10 is refused (Debian 12's 2.9.10 silently drops stream
and consumer fields it does not know): the real 2.9.10 binary when the Debian
package is installed, and always a tiny socket server that sends only a 2.9
INFO line.  A server without JetStream is refused; credentials come from a
file, never from the URL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_support import (
    NatsServer,
    Operator,
    Watch,
    forwarders,
    free_port,
    start_forwarder,
    wait_some_sentinel,
)

from notifyd.cluster.server import ClusterError, check_server

DEBIAN_NATS = "/usr/sbin/nats-server"


def test_check_server_accepts_2_10_and_later_with_jetstream() -> None:
    for v in ("2.10.0", "2.15.1", "v2.11.0-beta.1", "3.0.0"):
        assert check_server({"version": v, "jetstream": True}) == v


@pytest.mark.parametrize(
    ("info", "says"),
    [
        ({"version": "2.9.10", "jetstream": True}, "needs 2.10.0 or later"),
        ({"version": "2.2.0"}, "needs 2.10.0 or later"),
        ({"version": "garbage", "jetstream": True}, "needs 2.10.0 or later"),
        ({"version": "2.15.1", "jetstream": False}, "JetStream off"),
        ({"version": "2.15.1"}, "JetStream off"),
    ],
)
def test_check_server_refuses(info: dict, says: str) -> None:
    with pytest.raises(ClusterError, match=says):
        check_server(info)


def fake_info_server(version: str) -> tuple[int, threading.Thread, socket.socket]:
    """Answers one NATS handshake with an INFO of ``version`` (only that line is fake)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    info = json.dumps(
        {
            "server_id": "FAKE",
            "server_name": "fake",
            "version": version,
            "proto": 1,
            "host": "127.0.0.1",
            "port": lsock.getsockname()[1],
            "headers": True,
            "max_payload": 1048576,
            "jetstream": True,
        }
    )

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"INFO {info}\r\n".encode())
                buf = b""
                while b"PING" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                conn.sendall(b"PONG\r\n")
                # hold the connection until the client gives up on it
                while conn.recv(4096):
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock.getsockname()[1], t, lsock


def forward(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyd.cluster.forward", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def watch_nats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyd.cli", "watch", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def lone_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_forwarder_and_watch_refuse_a_2_9_server_by_its_info_line(lone_dir: Path) -> None:
    port, _, lsock = fake_info_server("2.9.10")
    try:
        url = f"nats://127.0.0.1:{port}"
        r = forward(
            "--nats", url, "--fsid", "f", "--node", "n", "--socket", "/nonexistent", str(lone_dir)
        )
        assert r.returncode == 1
        assert "is version 2.9.10; scoutfs-notify needs 2.10.0 or later" in r.stderr
        assert "Traceback" not in r.stderr
        w = watch_nats("--nats", url)
        assert w.returncode == 1
        assert "needs 2.10.0 or later" in w.stderr
        assert "Traceback" not in w.stderr
    finally:
        lsock.close()


def test_forwarder_refuses_debian_nats_server_2_9(tmp_path: Path, lone_dir: Path) -> None:
    if not os.path.exists(DEBIAN_NATS):
        pytest.skip(f"no {DEBIAN_NATS}: apt-get install nats-server (Debian 12: 2.9.10)")
    port = free_port()
    proc = subprocess.Popen(
        [DEBIAN_NATS, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        version = subprocess.run([DEBIAN_NATS, "--version"], capture_output=True, text=True)
        if "v2.9." not in version.stdout:
            pytest.skip(f"{DEBIAN_NATS} is {version.stdout.strip()}, not 2.9")
        r = forward(
            *("--nats", f"nats://127.0.0.1:{port}", "--fsid", "f", "--node", "n"),
            *("--socket", "/nonexistent", str(lone_dir)),
        )
        assert r.returncode == 1, r.stderr
        assert "is version 2.9.10; scoutfs-notify needs 2.10.0 or later" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        proc.terminate()
        proc.wait()


def test_forwarder_refuses_a_server_without_jetstream(tmp_path: Path, lone_dir: Path) -> None:
    server = NatsServer(tmp_path, "nojs")
    server.config = lambda: f"listen: 127.0.0.1:{server.port}\nhttp: 127.0.0.1:{server.http_port}\n"  # type: ignore[method-assign]
    server.start()
    try:
        r = forward(
            "--nats", server.url, "--fsid", "f", "--node", "n", "--socket", "/x", str(lone_dir)
        )
        assert r.returncode == 1
        assert "has JetStream off: start it with -js" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        server.stop()


def test_no_server_is_a_clear_error(lone_dir: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    r = forward("--nats", url, "--fsid", "f", "--node", "n", "--socket", "/x", str(lone_dir))
    assert r.returncode == 1
    assert f"cannot connect to NATS at {url}" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_password_in_the_url_is_refused(lone_dir: Path) -> None:
    r = forward("--nats", "nats://u:secret@127.0.0.1:4222", "--socket", "/x", str(lone_dir))
    assert r.returncode == 1
    assert "carries a password, which ps shows" in r.stderr
    assert "secret" not in r.stderr


def test_user_password_from_a_file_or_the_environment(tmp_path: Path, notifyd_factory) -> None:
    server = NatsServer(tmp_path, "auth")
    base = server.config

    def with_auth() -> str:
        return base() + "authorization { user: scoutfs, password: s3cret-pw }\n"

    server.config = with_auth  # type: ignore[method-assign]
    server.start()
    daemon = notifyd_factory()
    common = ["--nats", server.url, "--socket", str(daemon.socket), "--fsid", "f", "--node", "n"]
    try:
        r = forward(*common, str(daemon.backing))
        assert r.returncode == 1
        assert "cannot connect" in r.stderr
        assert "Traceback" not in r.stderr
        secret = tmp_path / "nats-user"
        secret.write_text("scoutfs:s3cret-pw\n")
        secret.chmod(0o600)
        with forwarders(tmp_path) as fwds:
            fwd = start_forwarder(
                fwds, tmp_path, daemon.backing, *common, "--user-file", str(secret)
            )
            cmdline = Path(f"/proc/{fwd.proc.pid}/cmdline").read_bytes()
            assert b"s3cret" not in cmdline
            assert fwd.stop() == 0, fwd.log()
        env = {**os.environ, "NATS_USER": "scoutfs", "NATS_PASSWORD": "s3cret-pw"}
        w = subprocess.Popen(
            [sys.executable, "-m", "notifyd.cli", "watch", "--nats", server.url],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert w.stderr is not None
        line = w.stderr.readline()
        w.terminate()
        w.wait(20)
        assert "watching scoutfs.notify.*.*" in line, line
    finally:
        server.stop()


def test_creds_file_of_an_operator_mode_server(tmp_path: Path, notifyd_factory) -> None:
    """A server in operator mode (JWT accounts, memory resolver): the forwarder
    and watch work with a user's creds file (by option, and by NATS_CREDS), and
    without one, with another operator's user or with a file that is no creds
    file they stop with an error that says so."""
    op = Operator()
    server = NatsServer(tmp_path, "jwt")
    base = server.config
    server.config = lambda: base() + op.server_config()  # type: ignore[method-assign]
    server.start()
    daemon = notifyd_factory()
    good = op.user_creds(tmp_path / "user.creds")
    wrong = Operator().user_creds(tmp_path / "wrong.creds")
    junk = tmp_path / "junk.creds"
    junk.write_text("user: scoutfs\n")
    common = ["--nats", server.url, "--socket", str(daemon.socket), "--fsid", "f", "--node", "n"]
    try:
        for extra, says in (
            ((), "the server refused a client without credentials"),
            (("--creds", str(wrong)), f"the server refused the user of the creds file {wrong}"),
            (("--creds", str(junk)), f"the creds file {junk} holds no user JWT"),
        ):
            r = forward(*common, *extra, str(daemon.backing))
            assert r.returncode == 1, r.stderr
            assert says in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            w = watch_nats("--nats", server.url, *extra)
            assert w.returncode == 1, w.stderr
            assert says in w.stderr, w.stderr
        with forwarders(tmp_path) as fwds:
            fwd = start_forwarder(fwds, tmp_path, daemon.backing, *common, "--creds", str(good))
            cmdline = Path(f"/proc/{fwd.proc.pid}/cmdline").read_bytes()
            lines = good.read_text().splitlines()
            secrets = [lines[i + 1] for i, line in enumerate(lines) if "-----BEGIN" in line]
            assert len(secrets) == 2  # the JWT and the seed
            for secret in secrets:
                assert secret.encode() not in cmdline
            watch = Watch(
                server.url, "--all", "--fsid", "f", env={**os.environ, "NATS_CREDS": str(good)}
            )
            try:
                watch.wait_watching()
                wait_some_sentinel(watch, "n", daemon.backing)
            finally:
                assert watch.stop() == 0, watch.stderr()
            assert fwd.stop() == 0, fwd.log()
    finally:
        server.stop()


def test_help_states_the_defaults() -> None:
    r = forward("--help")
    assert r.returncode == 0
    for text in (
        "--backlog",
        "1048576",
        "64 MiB",
        "--max-bytes",
        "1G",
        "--max-age",
        "7d",
        "--replicas",
        "default: 1",
        "2.10 or later",
        "authentication",
    ):
        assert text in r.stdout.replace("\n", " ").replace("  ", " ") or text in r.stdout, text
