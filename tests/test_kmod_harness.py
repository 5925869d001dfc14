"""The notify ring and ioctl from kmod/src/notify.c, run in userspace.

kmod/test/harness builds the very file the patch series adds against a shim
of the kernel APIs it uses, and its notify_test program runs each case.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "kmod" / "test" / "harness"

# Every case notify_test knows; test_every_case_is_run keeps this honest.
CASES = [
    "order",
    "no_reader",
    "full",
    "partial",
    "wait_wakes",
    "wait_timeout",
    "wait_signal",
    "detach",
    "busy_takeover",
    "einval",
    "eperm",
    "efault",
    "destroy",
    "stress",
]

# A lost wakeup hangs a case forever; far above the ~1 s the slowest takes.
CASE_TIMEOUT = 300


@pytest.fixture(scope="module")
def notify_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no cc or make: apt-get install gcc make (bootstrap.sh installs them)")
    out = tmp_path_factory.mktemp("harness")
    subprocess.run(
        ["make", "-s", "-C", str(HARNESS), f"O={out}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out / "notify_test"


def run(notify_test: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(notify_test), *args], capture_output=True, text=True, timeout=CASE_TIMEOUT
    )


def test_every_case_is_run(notify_test: Path) -> None:
    proc = run(notify_test, "list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == CASES


@pytest.mark.parametrize("case", CASES)
def test_case(notify_test: Path, case: str) -> None:
    proc = run(notify_test, "run", case)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok {case}\n" in proc.stdout


def test_unknown_case_is_an_error(notify_test: Path) -> None:
    proc = run(notify_test, "run", "no_such_case")
    assert proc.returncode == 2
    assert "no test named no_such_case" in proc.stderr


def test_bench_prints_machine_readable_lines(notify_test: Path) -> None:
    proc = run(notify_test, "bench", "20000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = []
    for line in lines:
        m = re.fullmatch(r"bench name=(\w+) ops=(\d+) ns_per_op=(\d+\.\d+)", line)
        assert m, line
        names.append(m.group(1))
    assert "hook_no_reader" in names
    assert "emit_stored" in names
    assert "emit_dropped_full" in names
    # what a reader adds to a paced workload, in the emitting thread's CPU time
    assert {"paced_no_reader", "paced_idle_reader", "paced_delayed_drainer"} <= set(names)


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_cases_under_sanitizer(
    tmp_path_factory: pytest.TempPathFactory, notify_test: Path, sanitizer: str
) -> None:
    """Data races (emit vs drain vs attach), memory and UB errors in notify.c fail here."""
    out = tmp_path_factory.mktemp("sanitizer")
    cflags = f"-O1 -g -fno-omit-frame-pointer -fsanitize={sanitizer} -fno-sanitize-recover=all"
    proc = subprocess.run(
        ["make", "-s", "-C", str(HARNESS), f"O={out}", f"CFLAGS={cflags}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "sanitize" in proc.stderr:
        pytest.skip(f"this compiler can't build with -fsanitize={sanitizer}: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    env = {
        **os.environ,
        "TSAN_OPTIONS": "halt_on_error=1",
        "ASAN_OPTIONS": "detect_leaks=1",
    }
    proc = subprocess.run(
        [str(out / "notify_test"), "run", "all"],
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "Sanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == len(CASES)


def test_harness_compiles_the_patch_source() -> None:
    """The harness must build kmod/src/notify.c itself, never a copy."""
    makefile = (HARNESS / "Makefile").read_text()
    assert "SRC := ../../src" in makefile
    assert "$(SRC)/notify.c" in makefile
    assert not list(HARNESS.rglob("notify.c"))
    # the ioctl handler too: the harness's ioctl.c includes the file gen-series inserts
    assert '#include "ioctl-read-notify.c"' in (HARNESS / "ioctl.c").read_text()
    assert not list(HARNESS.rglob("ioctl-read-notify.*"))
