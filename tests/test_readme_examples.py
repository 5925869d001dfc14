"""Every ``python`` block of README.md, run against a real daemon.

The daemon serves the default socket of a fresh directory under the real
/run/scoutfs, so ``default_socket_path`` in the examples finds it once
``/mnt/scoutfs`` is replaced by that directory.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notifyd.paths import RUN_DIR

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "notifyd.cli"]
# A bound on waiting for what should come, not a timing assertion.
WAIT = 30.0

READ_AND_SAY_PID = "import os, sys; open(sys.argv[1]).read(); print(os.getpid())"

BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)


def _clients(socket: Path) -> int:
    st = subprocess.run(
        [*CLI, "stats", "--json", "--socket", str(socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(json.loads(st.stdout)["clients"])


def test_the_readme_has_the_three_clients() -> None:
    text = "\n".join(BLOCKS)
    for name in ("Subscriber(", "AsyncSubscriber.connect(", "AsyncioSubscriber.connect("):
        assert name in text, name


@pytest.mark.parametrize("n", range(len(BLOCKS)))
def test_readme_example(n, notifyd_factory, tmp_path) -> None:
    daemon = notifyd_factory(run_dir=RUN_DIR)
    f = daemon.backing / "data"
    f.write_text("data\n")
    ino = os.stat(f).st_ino
    code = BLOCKS[n].replace("/mnt/scoutfs", str(daemon.backing))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT
        while _clients(daemon.socket) < 1:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the example did not subscribe"
            time.sleep(0.05)
        child = subprocess.run(
            [sys.executable, "-c", READ_AND_SAY_PID, f],
            capture_output=True,
            text=True,
            check=True,
        )
        pid = child.stdout.strip()
        # every example prints TYPE INO ... PID ... (the fanotify one names them)
        want = {("OPEN", str(ino), pid), ("READ", str(ino), pid)}
        seen: list[str] = []
        buf = b""
        while want - {(w[0], w[1], p) for w in map(str.split, seen) for p in w[2:] if w}:
            ready, _, _ = select.select([proc.stdout], [], [], WAIT)
            assert ready, f"example {n} printed {seen}, not {want}"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.communicate()[1].decode()
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            seen += [line.decode() for line in lines]
    finally:
        proc.kill()
        proc.communicate()
    daemon.stop()
    # the daemon leaves its lock file (ABI.md section 4) in a directory only this test uses
    shutil.rmtree(daemon.socket.parent)
