"""The real thing under qemu: kmod/test/vm-e2e, one test per part and tag.

Builds scoutfs (unpatched and with the notify series) against Debian's 6.1
headers, boots that kernel under qemu and runs, inside the guest:
- ``e2e``: scoutfs-notifyd, a raw socket client, the inotify shim and
  ``inotifywait -m -r`` over two mounts of the patched filesystem
  (kmod/test/vm/guest/e2e.py lists every check);
- ``upstream``: a subset of scoutfs's own tests/run-tests.sh, unpatched and
  then patched with a notify reader attached to every mount; the results
  must be the same and all passes.

Tags: v1.30, or the space-separated list in SCOUTFS_NOTIFY_VM_TAGS; the
run-tests.sh subset: vm-e2e's eight, or the list in SCOUTFS_NOTIFY_VM_TESTS.
Every run keeps its console logs and results under artifacts/vm-e2e/
(printed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VM_E2E = ROOT / "kmod" / "test" / "vm-e2e"
KERNEL_SH = ROOT / "kmod" / "test" / "vm" / "kernel.sh"
ARTIFACTS = ROOT / "artifacts" / "vm-e2e"
TAGS = os.environ.get("SCOUTFS_NOTIFY_VM_TAGS", "v1.30").split()
UPSTREAM_TESTS = os.environ.get("SCOUTFS_NOTIFY_VM_TESTS", "").split()

# backstops only: run-guest bounds each guest itself (900 s e2e, 1800 s per
# run-tests.sh pass) and kills it when that runs out
BUILD_TIMEOUT_S = 1200
PART_TIMEOUT_S = {"e2e": 1500, "upstream": 4200}

# vm-e2e's status when the host cannot run it at all
UNAVAILABLE = 3

pytestmark = [pytest.mark.vm, pytest.mark.scoutfs_src]


def host_missing() -> str:
    """Why this host cannot boot the test kernel, or ''."""
    if os.geteuid() != 0:
        return "the VM test shares the host root with the guest: run as root"
    if not shutil.which("qemu-system-x86_64"):
        return "no qemu-system-x86_64: apt-get install qemu-system-x86"
    p = subprocess.run(
        ["bash", "-c", f'. "{KERNEL_SH}"; vm_missing "$(vm_kernel_release)"'],
        capture_output=True,
        text=True,
        check=True,
    )
    return p.stdout.strip()


def venv_dir() -> Path:
    """The venv this pytest runs from: the guest runs its console scripts."""
    return Path(sys.executable).parent.parent


def run_vm_e2e(args: list[str], env: dict[str, str], timeout: float) -> int:
    """Run vm-e2e in its own process group, killed whole (qemu too) if it overruns."""
    proc = subprocess.Popen([str(VM_E2E), *args], env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vm-e2e {' '.join(args)} still running after {timeout}s: killed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def vm_env(scoutfs_src: Path) -> dict[str, str]:
    why = host_missing()
    if why:
        pytest.skip(f"cannot boot the 6.1 test kernel: {why}")
    if not (venv_dir() / "bin" / "scoutfs-notifyd").exists():
        pytest.skip(f"no scoutfs-notifyd in {venv_dir()}/bin: install the project in this venv")
    return {**os.environ, "SCOUTFS_SRC": str(scoutfs_src)}


@pytest.fixture(scope="session", params=TAGS)
def vm_build(
    request: pytest.FixtureRequest, vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """(tag, build dir) with both modules, the utils and run-tests.sh trees built once."""
    tag: str = request.param
    build = tmp_path_factory.mktemp(f"vm-build-{tag}")
    t0 = time.monotonic()
    args = ["--tag", tag, "--parts", "build", "--build-dir", str(build), "--out", f"{build}/out"]
    rc = run_vm_e2e(
        [*args, "--venv", str(venv_dir())],
        vm_env,
        BUILD_TIMEOUT_S,
    )
    if rc == UNAVAILABLE:
        pytest.skip(f"vm-e2e cannot run for {tag} here (its message above says why)")
    assert rc == 0, f"building scoutfs {tag} failed (see the output above)"
    print(f"built scoutfs {tag} in {time.monotonic() - t0:.0f}s")
    return tag, build


@pytest.mark.parametrize("part", ["e2e", "upstream"])
def test_vm(part: str, vm_build: tuple[str, Path], vm_env: dict[str, str]) -> None:
    tag, build = vm_build
    out = ARTIFACTS / f"{tag}-{part}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    print(f"artifacts (console logs, results): {out}")
    t0 = time.monotonic()
    args = ["--tag", tag, "--parts", part, "--build-dir", str(build), "--out", str(out)]
    if UPSTREAM_TESTS:
        args += ["--tests", " ".join(UPSTREAM_TESTS)]
    rc = run_vm_e2e(
        [*args, "--venv", str(venv_dir())],
        vm_env,
        PART_TIMEOUT_S[part],
    )
    print(f"vm-e2e {part} {tag}: exit {rc} in {time.monotonic() - t0:.0f}s; artifacts {out}")
    assert rc != UNAVAILABLE, f"vm-e2e could not run {part} for {tag} (see its message)"
    assert rc == 0, f"vm-e2e {part} failed for scoutfs {tag}: console logs in {out}"
