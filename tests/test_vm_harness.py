"""kmod/test/vm/run-guest itself: the guest's status comes back, and a
panicked or hung guest fails within its bound instead of passing or hanging.

These boot the 6.1 test kernel with no scoutfs at all (~15 s each under tcg).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_vm_e2e import host_missing

ROOT = Path(__file__).resolve().parent.parent
RUN_GUEST = ROOT / "kmod" / "test" / "vm" / "run-guest"
FETCH_GAWK = ROOT / "kmod" / "test" / "vm" / "fetch-gawk"
USE_GAWK = ROOT / "kmod" / "test" / "vm" / "guest" / "use-gawk"

# run-guest's own statuses
TIMED_OUT = 124
DIED = 125

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", autouse=True)
def need_vm_host() -> None:
    why = host_missing()
    if why:
        pytest.skip(f"cannot boot the 6.1 test kernel: {why}")


def run_guest(
    tmp_path: Path, *cmd: str, timeout: int = 300, options: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Run ``cmd`` in a guest; return (run-guest's status, the console log)."""
    work = tmp_path / "work"
    p = subprocess.run(
        [str(RUN_GUEST), "--work", str(work), "--timeout", str(timeout), *options, "--", *cmd],
        capture_output=True,
        text=True,
        # run-guest bounds the guest; this only bounds a broken run-guest
        timeout=timeout + 120,
        check=False,
    )
    return p.returncode, (work / "console.log").read_text(errors="replace")


def test_command_status_and_output_come_back(tmp_path: Path) -> None:
    rc, console = run_guest(tmp_path, "bash", "-c", 'echo "in guest $(uname -r)"; exit 7')
    assert rc == 7
    assert "in guest 6.1." in console


def test_a_panic_fails_even_after_the_command_ran(tmp_path: Path) -> None:
    # the oops happens inside the command: no marker line, and "Kernel panic" on the console
    rc, console = run_guest(tmp_path, "bash", "-c", "echo c > /proc/sysrq-trigger")
    assert rc == DIED
    assert "Kernel panic" in console


def test_a_hung_guest_is_killed_at_its_timeout(tmp_path: Path) -> None:
    rc, _ = run_guest(tmp_path, "sleep", "3600", timeout=60)
    assert rc == TIMED_OUT


def test_append_reaches_the_guest_kernel(tmp_path: Path) -> None:
    # what bench kmod_emit relies on: the guest reads time from the TSC, not the HPET
    rc, console = run_guest(
        tmp_path,
        "bash",
        "-c",
        'echo "cmdline: $(cat /proc/cmdline)"; '
        'echo "clock: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"',
        options=("--append", "clocksource=tsc tsc=reliable", "--append", "nfy_mark=1"),
    )
    assert rc == 0
    line = next(x for x in console.splitlines() if x.startswith("cmdline: "))
    assert line.endswith(" clocksource=tsc tsc=reliable nfy_mark=1")
    assert "clock: tsc" in console


def test_the_guests_awk_is_gawk_and_the_hosts_stays(tmp_path: Path) -> None:
    # scoutfs's totl-merge-read checks its totals with or(), which only gawk has;
    # Debian's awk is mawk unless gawk is installed, which would change the host's
    host_awk = os.path.realpath("/usr/bin/awk")
    gawk = tmp_path / "gawk"
    subprocess.run([str(FETCH_GAWK), str(gawk)], check=True, timeout=600)
    rc, console = run_guest(
        tmp_path,
        "bash",
        "-c",
        f"{USE_GAWK} {gawk} && awk 'BEGIN {{ print \"or:\", or(1, 8) }}'",
    )
    assert rc == 0, console[-2000:]
    assert "or: 9" in console
    assert os.path.realpath("/usr/bin/awk") == host_awk
