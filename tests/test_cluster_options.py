"""Connection and start options of the cluster commands, with real servers.

- TLS: a CA, a server and a client certificate made here with openssl; the
  server requires the client certificate (verify: true).  The forwarder gets
  the files as options, ``watch --nats`` from the environment.
- ``--from-seq``: ``watch`` and the client library start at a stream
  sequence and print nothing before it.
- No secret ever in argv: user/password come from a file or the environment
  (tests/test_cluster_server.py); here the key is a path, and the process's
  /proc/PID/cmdline is checked for what the files hold.

The creds file (JWT + nkey seed) is not tested: it needs an operator/account
set-up that only ``nsc`` makes, which no package here provides.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from cluster_support import (
    FSID,
    NatsServer,
    Watch,
    forwarders,
    fwd_args,
    read_files,
    sentinel,
    start_forwarder,
)

from notifyd import abi
from notifyd.cluster import wire
from notifyd.cluster.consume import ClusterSubscriber, StartAt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons need root")

OPENSSL = "/usr/bin/openssl"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """ca.pem; server.pem/key for 127.0.0.1; client.pem/key for client auth."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=scoutfs-notify test CA", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
        (d / f"{name}.key").chmod(0o600)


def test_tls_with_a_client_certificate(tmp_path: Path, notifyd_factory) -> None:
    if not os.access(OPENSSL, os.X_OK):
        pytest.skip(f"no {OPENSSL} to make the certificates (apt-get install openssl)")
    pki = tmp_path / "pki"
    make_pki(pki)
    server = NatsServer(tmp_path, "tls")
    base = server.config

    def with_tls() -> str:
        return base() + (
            f'tls {{ cert_file: "{pki}/server.pem", key_file: "{pki}/server.key", '
            f'ca_file: "{pki}/ca.pem", verify: true }}\n'
        )

    server.config = with_tls  # type: ignore[method-assign]
    server.start()
    daemon = notifyd_factory()
    common = fwd_args(server.url, daemon, "nodeA")
    try:
        # without a client certificate the server refuses the handshake
        r = subprocess.run(
            [sys.executable, "-m", "notifyd.cluster.forward", *common, "--tls-ca",
             str(pki / "ca.pem"), str(daemon.backing)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "cannot connect to NATS" in r.stderr
        assert "Traceback" not in r.stderr
        tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem")]
        tls += ["--tls-key", str(pki / "client.key")]
        with forwarders(tmp_path) as fwds:
            fwd = start_forwarder(fwds, tmp_path, daemon.backing, *common, *tls)
            cmdline = Path(f"/proc/{fwd.proc.pid}/cmdline").read_bytes()
            key = (pki / "client.key").read_text().splitlines()[1].encode()
            assert key not in cmdline
            assert b"PRIVATE KEY" not in cmdline
            env = {
                **os.environ,
                "NATS_TLS_CA": str(pki / "ca.pem"),
                "NATS_TLS_CERT": str(pki / "client.pem"),
                "NATS_TLS_KEY": str(pki / "client.key"),
            }
            watch = Watch(server.url, "--all", env=env)
            try:
                ino = sentinel(daemon.backing)
                watch.wait_ino("nodeA", ino, "the sentinel over TLS")
            finally:
                assert watch.stop() == 0, watch.stderr()
            assert fwd.stop() == 0, fwd.log()
    finally:
        server.stop()


async def message_with(url: str, ino: int) -> tuple[int, int]:
    """(stream seq, first record seq) of the message holding ``ino``'s first record."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        seq = 1
        while True:
            msg = await js.get_msg(wire.DEFAULT_STREAM, seq=seq, next=True)
            recs = list(abi.decode(msg.data))
            if any(r.ino == ino for r in recs):
                return int(msg.seq or 0), recs[0].seq
            seq = int(msg.seq or 0) + 1
    finally:
        await nc.close()


async def library_from(url: str, stream_seq: int, until_ino: int) -> list[wire.ClusterRecord]:
    nc = await nats.connect(url)
    sub = ClusterSubscriber(nc, fsid=FSID, start=StartAt(seq=stream_seq))
    got: list[wire.ClusterRecord] = []
    try:
        async with asyncio.timeout(60):
            async for ev in sub:
                assert isinstance(ev, wire.ClusterRecord), ev
                got.append(ev)
                if ev.record.ino == until_ino:
                    return got
    finally:
        await sub.close()
        await nc.close()
    return got


def test_from_seq_starts_watch_and_the_library_at_that_message(
    tmp_path: Path, notifyd_factory
) -> None:
    daemon = notifyd_factory()
    server = NatsServer(tmp_path, "n1")
    server.start()
    try:
        with forwarders(tmp_path) as fwds:
            fwd = start_forwarder(
                fwds, tmp_path, daemon.backing, *fwd_args(server.url, daemon, "A")
            )
            all_watch = Watch(server.url, "--all")
            try:
                read_files(daemon.backing, 5, "one")
                s1 = sentinel(daemon.backing, "s1")
                all_watch.wait_ino("A", s1, "the first sentinel")
                read_files(daemon.backing, 5, "two")
                s2 = sentinel(daemon.backing, "s2")
                all_watch.wait_ino("A", s2, "the second sentinel")
            finally:
                assert all_watch.stop() == 0, all_watch.stderr()
            stream_seq, first = asyncio.run(message_with(server.url, s2))
            # s1's records are in earlier messages than s2's
            assert asyncio.run(message_with(server.url, s1))[0] < stream_seq

            watch = Watch(server.url, "--from-seq", str(stream_seq))
            try:
                watch.wait_ino("A", s2, "the second sentinel from --from-seq")
            finally:
                assert watch.stop() == 0, watch.stderr()
            seqs = [d["seq"] for d in watch.records("A")]
            assert seqs[0] == first
            assert s1 not in {d["ino"] for d in watch.records("A")}
            assert not watch.gaps("A")

            lib = asyncio.run(library_from(server.url, stream_seq, s2))
            assert [e.record.seq for e in lib] == [s for s in seqs if s <= lib[-1].record.seq]
            assert fwd.stop() == 0, fwd.log()
    finally:
        server.stop()
