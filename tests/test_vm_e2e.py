"""The real thing under qemu: kmod/test/vm-e2e, one test per part and tag.

Builds scoutfs (with the notify series, and unpatched where a part needs it)
against Debian's 6.1 headers, boots that kernel under qemu and runs, inside
the guest:
- ``e2e``: scoutfs-notifyd, a raw socket client, the inotify shim and
  ``inotifywait -m -r`` over two mounts of the patched filesystem
  (kmod/test/vm/guest/e2e.py lists every check), for every tag of
  SCOUTFS_NOTIFY_VM_TAGS (default: the oldest, v1.30 and the newest release);
- ``faults``: the kernel side under faults, one guest run whose results
  (kmod/test/vm/guest/faults.py) become one test per fault, on
  SCOUTFS_NOTIFY_VM_FULL_TAG (default v1.30);
- ``upstream``: a subset of scoutfs's own tests/run-tests.sh, unpatched and
  then patched with a notify reader attached to every mount; the results
  must be the same and all passes; on SCOUTFS_NOTIFY_VM_FULL_TAG, with
  vm-e2e's subset or the list in SCOUTFS_NOTIFY_VM_TESTS.

Each tag is built once per session and reused by its parts; with
SCOUTFS_NOTIFY_VM_BUILD_ROOT set, in ROOT/TAG, reused across sessions as it is
(remove it after changing the series or scoutfs).  Every run keeps
its console logs and results under artifacts/vm-e2e/ (printed).
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
# the oldest and newest supported releases besides v1.30 (six tags: README)
TAGS = os.environ.get("SCOUTFS_NOTIFY_VM_TAGS", "v1.28 v1.30 v1.33").split()
FULL_TAG = os.environ.get("SCOUTFS_NOTIFY_VM_FULL_TAG", "v1.30")
# faults.py's results, in its order; faults.sh adds unload_clean last
FAULTS = [
    "kill9_restart",
    "reader_killed_in_wait",
    "thread_detach_while_waiting",
    "two_mounts_restart",
    "stress",
    "umount_lazy",
    "unload_clean",
]
UPSTREAM_TESTS = os.environ.get("SCOUTFS_NOTIFY_VM_TESTS", "").split()

# backstops only: run-guest bounds each guest itself (900 s e2e, 1800 s per
# run-tests.sh pass) and kills it when that runs out
BUILD_TIMEOUT_S = 1200
PART_TIMEOUT_S = {"e2e": 1500, "faults": 1500, "upstream": 4200}

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


class Builds:
    """Each tag built once per session, in a build dir its parts share."""

    def __init__(self, env: dict[str, str], tmp: pytest.TempPathFactory) -> None:
        self.env = env
        self.tmp = tmp
        self.dirs: dict[str, Path] = {}
        self.full: set[str] = set()

    def get(self, tag: str, full: bool = False) -> Path:
        """The build dir of ``tag``: the patched module and utils, and with ``full``
        the unpatched module and run-tests.sh trees too."""
        if tag in self.dirs and (not full or tag in self.full):
            return self.dirs[tag]
        keep = os.environ.get("SCOUTFS_NOTIFY_VM_BUILD_ROOT")
        build = self.dirs.get(tag) or (
            Path(keep) / tag if keep else self.tmp.mktemp(f"vm-build-{tag}")
        )
        t0 = time.monotonic()
        part = "build" if full else "build-patched"
        args = ["--tag", tag, "--parts", part, "--build-dir", str(build), "--out", f"{build}/out"]
        rc = run_vm_e2e([*args, "--venv", str(venv_dir())], self.env, BUILD_TIMEOUT_S)
        if rc == UNAVAILABLE:
            pytest.skip(f"vm-e2e cannot run for {tag} here (its message above says why)")
        assert rc == 0, f"building scoutfs {tag} failed (see the output above)"
        print(f"vm-e2e {part} {tag}: {time.monotonic() - t0:.0f}s")
        self.dirs[tag] = build
        if full:
            self.full.add(tag)
        return build


@pytest.fixture(scope="session")
def vm_builds(vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Builds:
    return Builds(vm_env, tmp_path_factory)


def run_part(
    part: str, tag: str, build: Path, env: dict[str, str], extra: list[str] | None = None
) -> tuple[int, Path]:
    """Run one vm-e2e part: (its exit status, its artifacts dir)."""
    out = ARTIFACTS / f"{tag}-{part}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    print(f"artifacts (console logs, results): {out}")
    t0 = time.monotonic()
    args = ["--tag", tag, "--parts", part, "--build-dir", str(build), "--out", str(out)]
    args += [*(extra or []), "--venv", str(venv_dir())]
    rc = run_vm_e2e(args, env, PART_TIMEOUT_S[part])
    print(f"vm-e2e {part} {tag}: exit {rc} in {time.monotonic() - t0:.0f}s; artifacts {out}")
    assert rc != UNAVAILABLE, f"vm-e2e could not run {part} for {tag} (see its message)"
    return rc, out


@pytest.mark.parametrize("tag", TAGS)
def test_vm_e2e(tag: str, vm_builds: Builds, vm_env: dict[str, str]) -> None:
    rc, out = run_part("e2e", tag, vm_builds.get(tag), vm_env)
    assert rc == 0, f"vm-e2e e2e failed for scoutfs {tag}: console logs in {out}"


@pytest.fixture(scope="session")
def fault_results(vm_builds: Builds, vm_env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """One guest run of every fault on FULL_TAG: {name: (passed|failed, detail)}."""
    rc, out = run_part("faults", FULL_TAG, vm_builds.get(FULL_TAG), vm_env)
    results: dict[str, tuple[str, str]] = {}
    tsv = out / "faults" / "results.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            name, status, *detail = line.split("\t")
            results[name] = (status, " ".join(detail))
    if not results:
        console = out / "faults" / "console.log"
        tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
        pytest.fail(f"the faults guest reported nothing (exit {rc}); console tail:\n{tail}")
    results["(guest)"] = ("passed" if rc == 0 else "failed", f"exit {rc}, artifacts {out}")
    return results


@pytest.mark.parametrize("fault", FAULTS)
def test_vm_fault(fault: str, fault_results: dict[str, tuple[str, str]]) -> None:
    guest = fault_results["(guest)"][1]
    missing = ("missing", f"no result: the guest stopped before it ({guest})")
    status, detail = fault_results.get(fault, missing)
    print(f"{fault}: {status}: {detail}")
    assert status == "passed", f"{fault} on scoutfs {FULL_TAG}: {status}: {detail} ({guest})"


def test_vm_upstream(vm_builds: Builds, vm_env: dict[str, str]) -> None:
    extra = ["--tests", " ".join(UPSTREAM_TESTS)] if UPSTREAM_TESTS else []
    rc, out = run_part("upstream", FULL_TAG, vm_builds.get(FULL_TAG, full=True), vm_env, extra)
    assert rc == 0, f"vm-e2e upstream failed for scoutfs {FULL_TAG}: console logs in {out}"
