"""``scoutfs-notify-shim --nats``: node B's reads raise inotify events on node A's overlay.

Real parts: one directory bind-mounted twice stands for one filesystem
mounted on two nodes (the same inode numbers on both, as on scoutfs), a
real fanotify daemon and forwarder per bind mount, a real nats-server, the
real shim on A's bind mount and the real inotifywait on its overlay.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cluster_support import Watch, forwarders, nats_servers, start_forwarder
from shim_support import need_fuse, run_shim, watch

FSID = "sharedfs"


@contextlib.contextmanager
def bind_mount(src: Path, dst: Path) -> Iterator[Path]:
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        yield dst
    finally:
        subprocess.run(["umount", "-l", str(dst)], check=False)


def test_shim_with_nats_replays_reads_made_on_another_node(tmp_path: Path, notifyd_factory) -> None:
    need_fuse()
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub" / "from-b").write_bytes(b"read on node B\n")
    (shared / "from-a").write_bytes(b"read on node A\n")
    (shared / "other-fs").write_bytes(b"read on another filesystem\n")
    for i in range(3):
        (shared / f"sentinel{i}").write_bytes(b"s")
    with contextlib.ExitStack() as stack:
        mount_a = stack.enter_context(bind_mount(shared, tmp_path / "node-a"))
        mount_b = stack.enter_context(bind_mount(shared, tmp_path / "node-b"))
        mount_c = stack.enter_context(bind_mount(shared, tmp_path / "node-c"))
        servers = stack.enter_context(nats_servers(tmp_path / "nats", 1))
        url = servers[0].url
        fwds = stack.enter_context(forwarders(tmp_path))
        daemons = {}
        for node, mount, fsid in (
            ("nodeA", mount_a, FSID),
            ("nodeB", mount_b, FSID),
            ("nodeC", mount_c, "otherfs"),
        ):
            d = notifyd_factory(mount)
            # before its mount goes: a daemon whose mount vanishes exits 1
            stack.callback(d.stop)
            daemons[node] = d
            start_forwarder(
                fwds,
                tmp_path,
                mount,
                *["--nats", url, "--socket", str(d.socket), "--fsid", fsid, "--node", node],
            )
        overlay = tmp_path / "overlay"
        shim = stack.enter_context(
            run_shim(
                mount_a,
                overlay,
                daemons["nodeA"].socket,
                *["--nats", url, "--fsid", FSID, "--node", "nodeA"],
            )
        )
        shim.wait_log("following the other nodes of sharedfs")
        stream = Watch(url, "--all")
        stack.callback(stream.stop)
        with watch(overlay) as w:
            # a read on node B: IN_OPEN and IN_ACCESS with its name, on A's overlay
            (mount_b / "sub" / "from-b").read_bytes()
            w.expect("sub/from-b", "OPEN")
            w.expect("sub/from-b", "ACCESS")

            # a read on node A itself comes from A's socket, never again from NATS;
            # a read on another filesystem (fsid otherfs) is never replayed
            (mount_a / "from-a").read_bytes()
            (mount_c / "other-fs").read_bytes()
            ino_a = (shared / "from-a").stat().st_ino
            ino_c = (shared / "other-fs").stat().st_ino
            stream.wait_ino("nodeA", ino_a, "node A's read")
            stream.wait_ino("nodeC", ino_c, "node C's read")
            # node B's sentinel is behind both in the stream, and the shim's
            # consumer reads the stream in order: once it is replayed, the
            # records before it have been dealt with
            (mount_b / "sentinel0").read_bytes()
            w.expect("sentinel0", "ACCESS")
            events = w.drain(quiet=0.5)
        opens_a = [e for p, e in events if p == "from-a" and "OPEN" in e]
        assert len(opens_a) == 1, f"node A's read replayed {len(opens_a)} times: {events}"
        assert not [p for p, _ in events if p == "other-fs"], events
        assert shim.stop() == 0, shim.log()
        assert "Traceback" not in shim.log()
        for daemon in daemons.values():
            assert os.path.exists(daemon.socket)
