"""notifyd.procs: the process helpers the demo, the tests and the benchmarks share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notifyd import procs

# a child that says it has set its handler, then ignores SIGTERM
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring', flush=True)\n"
    "time.sleep(60)\n"
)


def test_stop_ends_a_process_that_obeys_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert procs.stop(proc) == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ignoring\n"
    assert procs.stop(proc, timeout=0.2) == -signal.SIGKILL


def test_stop_of_an_exited_process_returns_its_status() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert procs.stop(proc) == 3


def test_start_ready_waits_for_ready_and_reports_a_silent_exit(tmp_path: Path) -> None:
    code = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.connect(os.environ['NOTIFY_SOCKET']); s.send(b'READY=1')\n"
        "import time; time.sleep(60)\n"
    )
    ready = procs.start_ready([sys.executable, "-c", code], tmp_path / "sd", tmp_path / "log")
    assert ready.proc.poll() is None
    assert ready.stop() == -signal.SIGTERM
    with pytest.raises(procs.NotReadyError, match="before READY=1") as exc:
        procs.start_ready(
            [sys.executable, "-c", "print('no readiness here'); raise SystemExit(4)"],
            tmp_path / "sd",
            tmp_path / "log2",
        )
    assert "no readiness here" in str(exc.value)


def test_wait_until_returns_the_first_true_value_or_names_what_it_awaited() -> None:
    values = iter([0, None, "", "here"])
    assert procs.wait_until(lambda: next(values), 30, "a value", interval=0) == "here"
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        procs.wait_until(lambda: False, 0.05, "the impossible", interval=0.01)


def test_line_reader_splits_chunks_and_ends_at_eof_or_deadline() -> None:
    r, w = os.pipe()
    try:
        lines = procs.LineReader(r)
        os.write(w, b"one\ntw")
        assert lines.next(time.monotonic() + 30) == "one"
        # an unfinished line is not a line: the deadline ends the wait
        assert lines.next(time.monotonic() + 0.05) is None
        assert not lines.eof
        os.write(w, b"o\nthree\n")
        assert lines.next(time.monotonic() + 30) == "two"
        assert lines.next(time.monotonic() + 30) == "three"
        os.close(w)
        w = -1
        assert lines.next(time.monotonic() + 30) is None
        assert lines.eof
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_pick_files_goes_shallow_first_by_name_and_skips_links(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").write_text("x")
    (tmp_path / "z").write_text("x")
    (tmp_path / "a").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert procs.pick_files(tmp_path, 2) == [tmp_path / "a", tmp_path / "z"]
    assert procs.pick_files(tmp_path, 10) == [
        tmp_path / "a",
        tmp_path / "z",
        tmp_path / "b" / "deep",
    ]
