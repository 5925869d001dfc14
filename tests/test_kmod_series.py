"""The kmod patch series: generated from kmod/src, applies, builds, passes checkpatch.

Tests marked scoutfs_src need a scoutfs git repository (SCOUTFS_SRC, or the
clone kmod/fetch-scoutfs makes) and skip with that reason without one.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import pytest

from notifyd import abi

ROOT = Path(__file__).resolve().parent.parent
KMOD = ROOT / "kmod"
SERIES = KMOD / "series"
LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
CHECKPATCH_FILES = ("checkpatch.pl", "spelling.txt", "const_structs.checkpatch")

# git am commits: give it an identity so the tests don't depend on git config
GIT_ENV = {
    "GIT_AUTHOR_NAME": "scoutfs-notify tests",
    "GIT_AUTHOR_EMAIL": "tests@scoutfs-notify.invalid",
    "GIT_COMMITTER_NAME": "scoutfs-notify tests",
    "GIT_COMMITTER_EMAIL": "tests@scoutfs-notify.invalid",
}

# A kmod build takes ~35 s on an idle 2-core machine and can take over 15 min
# on one shared with other builds and guests: this only catches a hang.
BUILD_TIMEOUT = 2400
# The probe's guest run takes ~1 min under tcg; a hang fails after this.
GUEST_TIMEOUT = 600
VM_KERNEL_SH = KMOD / "test" / "vm" / "kernel.sh"


def read_bases() -> list[tuple[str, int]]:
    bases = []
    for line in (KMOD / "base.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tag, nr = line.split()
            bases.append((tag, int(nr)))
    return bases


BASES = read_bases()
TAGS = [tag for tag, _ in BASES]
# The one release whose utils are built too (the VM tests boot v1.30).
UTILS_TAG = "v1.30"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV, **kwargs.pop("env", {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kwargs)


def clone_at(src: Path, dest: Path, rev: str) -> Path:
    run(["git", "clone", "-q", "--shared", "--no-checkout", str(src), str(dest)]).check_returncode()
    run(["git", "-C", str(dest), "checkout", "-q", "--detach", rev]).check_returncode()
    return dest


def test_base_lists_every_series_with_its_nr() -> None:
    assert sorted(p.name for p in SERIES.iterdir()) == sorted(TAGS)
    for tag, nr in BASES:
        # the ABI rule: 25 where it is free, 26 from v1.31 where upstream took 25
        minor = int(tag.split(".")[1])
        assert nr == (25 if minor <= 30 else 26), tag
        patches = sorted((SERIES / tag).glob("*.patch"))
        assert [p.name[:5] for p in patches] == ["0001-", "0002-", "0003-"], tag
        ring = patches[0].read_text()
        # upstream's shape: the number beside the others in ioctl.h, a literal
        assert f"+\t_IOWR(SCOUTFS_IOCTL_MAGIC, {nr}, struct scoutfs_ioctl_read_notify)\n" in ring
        for patch in patches:
            assert "\nSigned-off-by: " in patch.read_text(), patch


def added_text(patch: str, path: str) -> str:
    """The lines a patch adds to path, in one hunk, without their '+'."""
    m = re.search(
        rf"^\+\+\+ b/{re.escape(path)}\n@@ [^\n]*\n(?: [^\n]*\n)*((?:\+[^\n]*\n)+)", patch, re.M
    )
    assert m, f"the patch adds nothing to {path}"
    return "".join(line[1:] + "\n" for line in m.group(1).splitlines())


def test_series_carry_kmod_src_verbatim() -> None:
    """What the patches add is exactly kmod/src's and kmod/tests' files (nr aside)."""
    for tag, nr in BASES:
        ring, _, test = (p.read_text() for p in sorted((SERIES / tag).glob("*.patch")))
        for name in ("notify.c", "notify.h", "trace/notify.h"):
            want = (KMOD / "src" / name).read_text()
            assert added_text(ring, f"kmod/src/{name}") == want, f"{tag}: run kmod/gen-series"
        want = (KMOD / "src" / "ioctl-read-notify.h").read_text()
        want = want.replace("_IOWR(SCOUTFS_IOCTL_MAGIC, 25, ", f"_IOWR(SCOUTFS_IOCTL_MAGIC, {nr}, ")
        # diff may place the blank line that separates it at either end
        assert added_text(ring, "kmod/src/ioctl.h").strip("\n") == want.strip("\n"), tag
        handler = (KMOD / "src" / "ioctl-read-notify.c").read_text()
        assert handler.startswith("/*\n")
        assert "static long scoutfs_ioc_read_notify(" in handler
        assert added_text(ring, "kmod/src/ioctl.c").startswith('#include "notify.h"\n')
        assert "\n".join("+" + ln for ln in handler.splitlines()) in ring, tag
        for name in ("src/read_notify.c", "tests/notify-basic.sh", "golden/notify-basic"):
            want = (KMOD / "tests" / name).read_text()
            assert added_text(test, f"tests/{name}") == want, f"{tag}: run kmod/gen-series"


def test_commit_messages_are_upstream_sized() -> None:
    """Bodies as short as upstream's (median 4 lines), without test reports."""
    for tag, _ in BASES:
        for patch in sorted((SERIES / tag).glob("*.patch")):
            text = patch.read_text()
            head = text[text.index("\n\n") + 2 : text.index("\n---\n")]
            body = [ln for ln in head.splitlines() if ln and not ln.startswith("Signed-off-by:")]
            assert 1 <= len(body) <= 6, f"{patch}: {len(body)} body lines"
            assert "Tested" not in head, patch
            assert all(len(ln) <= 72 for ln in body), patch


def test_spinlocks_do_not_disable_interrupts() -> None:
    """Every path runs in process context (open, read, the ioctl): plain spin_lock."""
    for name in ("notify.c", "ioctl-read-notify.c"):
        text = (KMOD / "src" / name).read_text()
        assert not re.search(r"spin_(un)?lock_(irq|bh)", text), name
    assert "spin_lock(&ninf->lock)" in (KMOD / "src" / "notify.c").read_text()


@pytest.fixture(scope="session")
def checkpatch() -> Path:
    """checkpatch.pl and its data files from Debian's linux-source-6.1, extracted once."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    cache = Path(base) / "scoutfs-notify" / "checkpatch"
    if all((cache / f).exists() for f in CHECKPATCH_FILES):
        return cache / "checkpatch.pl"
    if not LINUX_SOURCE.exists():
        pytest.skip(f"no {LINUX_SOURCE}: apt-get install linux-source-6.1 (bootstrap.sh does)")
    if shutil.which("perl") is None:
        pytest.skip("no perl: apt-get install perl")
    tmp = cache.with_name("checkpatch.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = {f"linux-source-6.1/scripts/{f}" for f in CHECKPATCH_FILES}
    with tarfile.open(LINUX_SOURCE) as tar:
        for member in tar:
            if member.name in wanted:
                member.name = Path(member.name).name
                tar.extract(member, tmp, filter="data")
                wanted.discard(f"linux-source-6.1/scripts/{member.name}")
                if not wanted:
                    break
    assert not wanted, f"{LINUX_SOURCE} lacks {sorted(wanted)}"
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache / "checkpatch.pl"


@pytest.mark.parametrize("tag", TAGS)
def test_checkpatch_reports_no_errors(checkpatch: Path, tag: str, tmp_path: Path) -> None:
    patches = sorted((SERIES / tag).glob("*.patch"))
    # outside any git tree: inside one, checkpatch reads the patch as a source file
    proc = run(
        ["perl", str(checkpatch), "--no-tree", "--show-types", *map(str, patches)],
        cwd=tmp_path,
    )
    totals = re.findall(r"^total: (\d+) errors", proc.stdout, re.M)
    assert len(totals) == len(patches), proc.stdout + proc.stderr
    assert totals == ["0"] * len(patches), proc.stdout


@pytest.mark.scoutfs_src
def test_committed_series_is_what_gen_series_makes(scoutfs_src: Path, tmp_path: Path) -> None:
    proc = run([str(KMOD / "gen-series"), "--src", str(scoutfs_src), "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    for tag in TAGS:
        cmp = filecmp.dircmp(SERIES / tag, tmp_path / tag)
        assert not cmp.left_only, f"{tag}: run kmod/gen-series"
        assert not cmp.right_only, f"{tag}: run kmod/gen-series"
        for name in cmp.common_files:
            assert (SERIES / tag / name).read_text() == (tmp_path / tag / name).read_text(), (
                f"kmod/series/{tag}/{name} is stale: run kmod/gen-series and commit it"
            )


def need_build_tools() -> None:
    if shutil.which("sparse") is None:
        pytest.skip("no sparse: apt-get install sparse (bootstrap.sh does)")
    if not list(Path("/usr/src").glob("linux-headers-6.1.*-amd64")):
        pytest.skip(
            "no linux-headers-6.1.*-amd64: apt-get install linux-headers-amd64 on Debian 12"
        )


def ioctl_number(tree: Path, tmp_path: Path) -> int:
    """SCOUTFS_IOC_READ_NOTIFY as the patched tree's header defines it."""
    prog = tmp_path / "nr.c"
    prog.write_text(
        "#include <stdio.h>\n#include <linux/types.h>\n#include <linux/ioctl.h>\n"
        '#include "ioctl.h"\n'
        'int main(void) { printf("%lu\\n", (unsigned long)SCOUTFS_IOC_READ_NOTIFY); return 0; }\n'
    )
    exe = tmp_path / "nr"
    run(["gcc", f"-I{tree / 'kmod' / 'src'}", "-o", str(exe), str(prog)]).check_returncode()
    return int(run([str(exe)]).stdout)


class Build(NamedTuple):
    tree: Path
    out: Path
    apply: subprocess.CompletedProcess[str]
    build: subprocess.CompletedProcess[str] | None


@pytest.fixture(scope="module")
def build_release(scoutfs_src: Path, tmp_path_factory: pytest.TempPathFactory):
    """build(tag): the tag's series applied and built, once per module (the VM test reuses it)."""
    done: dict[str, Build] = {}

    def build(tag: str) -> Build:
        if tag not in done:
            need_build_tools()
            tmp = tmp_path_factory.mktemp(f"build-{tag}")
            tree = clone_at(scoutfs_src, tmp / "scoutfs", tag)
            applied = run([str(KMOD / "apply.sh"), str(tree)])
            built = None
            if applied.returncode == 0:
                cmd = [str(KMOD / "test" / "build-scoutfs"), str(tree), str(tmp / "out")]
                if tag != UTILS_TAG:
                    cmd.insert(1, "--kmod-only")
                built = run(cmd, timeout=BUILD_TIMEOUT)
            done[tag] = Build(tree, tmp / "out", applied, built)
        return done[tag]

    return build


@pytest.mark.scoutfs_src
@pytest.mark.parametrize("tag", TAGS)
def test_series_applies_and_builds(build_release, tag: str, tmp_path: Path) -> None:
    nr = dict(BASES)[tag]
    b = build_release(tag)
    assert b.apply.returncode == 0, b.apply.stderr
    log = run(["git", "-C", str(b.tree), "log", "--format=%s", f"{tag}..HEAD"]).stdout
    assert log.splitlines() == [
        "Add notify-basic test",
        "Emit notifications for regular file opens and reads",
        "Add a per-mount file access notification ring",
    ]
    assert (b.tree / "kmod/src/notify.c").read_text() == (KMOD / "src/notify.c").read_text()
    want = abi.IOC_READ_NOTIFY_CANDIDATES[0 if nr == 25 else 1]
    assert ioctl_number(b.tree, tmp_path) == want

    assert b.build is not None
    assert b.build.returncode == 0, b.build.stdout[-4000:] + b.build.stderr[-4000:]
    release = (b.out / "kernel-release").read_text().strip()
    assert re.fullmatch(r"6\.1\.\d+-\d+-amd64", release), release
    modinfo = shutil.which("modinfo") or "/sbin/modinfo"
    info = run([modinfo, "-F", "vermagic", str(b.out / "scoutfs.ko")])
    assert info.stdout.split()[0] == release
    syms = run(["nm", str(b.out / "scoutfs.ko")]).stdout
    for sym in ("scoutfs_notify_drain", "scoutfs_notify_setup", "scoutfs_file_open"):
        assert re.search(rf" T {sym}$", syms, re.M), f"{sym} missing from scoutfs.ko"
    for event in ("attach", "detach", "drop"):
        assert re.search(rf" __tracepoint_scoutfs_notify_{event}$", syms, re.M), event
    # the test the series adds: its helper builds (-Werror) against the
    # patched ioctl.h, and upstream's own check finds its three parts (it
    # complains about v1.28's lock-rever-invalidate golden file: not ours)
    tests = b.tree / "tests"
    made = run(["make", "-s", "-C", str(tests), "src/read_notify", "check-test-files"])
    assert made.returncode == 0, made.stdout + made.stderr
    assert "notify" not in made.stdout, made.stdout
    assert (tests / "src" / "read_notify").exists()
    assert (b.out / "scoutfs").exists() == (tag == UTILS_TAG)
    # the build copies the checkout: it must leave it as it was
    assert run(["git", "-C", str(b.tree), "status", "--porcelain"]).stdout == ""


def vm_missing() -> str:
    """Why this host can't boot the 6.1 test kernel under qemu, or ''."""
    if os.geteuid() != 0:
        return "the guest shares the host root: run as root"
    proc = run(["bash", "-c", f'. "{VM_KERNEL_SH}"; vm_missing "$(vm_kernel_release)"'])
    return proc.stdout.strip()


@pytest.mark.vm
@pytest.mark.scoutfs_src
def test_ioctl_contract_in_qemu(build_release, tmp_path: Path) -> None:
    """docs/ABI.md section 3 on a real mount: kmod/test/ioctl-probe.py in the guest."""
    why = vm_missing()
    if why:
        pytest.skip(f"cannot boot the 6.1 test kernel: {why}")
    b = build_release(UTILS_TAG)
    if b.build is None or b.build.returncode != 0:
        pytest.fail(f"the {UTILS_TAG} build failed: see test_series_applies_and_builds")
    log = tmp_path / "guest.log"
    cmd = [str(KMOD / "test" / "vm" / "run-guest"), "--work", str(tmp_path / "work")]
    cmd += ["--timeout", str(GUEST_TIMEOUT), "--disk", "16G", "--disk", "16G"]
    cmd += ["--env", f"SCOUTFS_BUILD={b.out}", "--"]
    cmd += [str(KMOD / "test" / "ioctl-probe.sh"), sys.executable]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=GUEST_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, f"guest exited {rc}:\n{text[-6000:]}"
    assert "probe done" in text, text[-6000:]


@pytest.mark.scoutfs_src
def test_apply_refuses_what_it_cannot_patch(scoutfs_src: Path, tmp_path: Path) -> None:
    tree = clone_at(scoutfs_src, tmp_path / "scoutfs", "v1.30")
    apply = str(KMOD / "apply.sh")

    (tree / "kmod/src/super.c").write_text("dirty\n")
    proc = run([apply, str(tree)])
    assert proc.returncode == 1
    assert "uncommitted changes" in proc.stderr
    run(["git", "-C", str(tree), "checkout", "-q", "--", "kmod/src/super.c"]).check_returncode()

    run(["git", "-C", str(tree), "checkout", "-q", "--detach", "v1.30~1"]).check_returncode()
    proc = run([apply, str(tree)])
    assert proc.returncode == 1
    assert "not at a release tag" in proc.stderr

    run(["git", "-C", str(tree), "checkout", "-q", "--detach", "v1.27"]).check_returncode()
    proc = run([apply, str(tree)])
    assert proc.returncode == 1
    assert "no series for scoutfs v1.27" in proc.stderr

    proc = run([apply, str(tmp_path)])
    assert proc.returncode == 1
    assert "not a git checkout" in proc.stderr
    # nothing was applied anywhere
    assert (
        run(["git", "-C", str(tree), "rev-parse", "HEAD"]).stdout
        == run(["git", "-C", str(tree), "rev-parse", "v1.27^{commit}"]).stdout
    )


@pytest.mark.scoutfs_src
def test_nr_is_free_in_each_release(scoutfs_src: Path) -> None:
    for tag, nr in BASES:
        pattern = f"SCOUTFS_IOCTL_MAGIC, {nr},"
        proc = run(["git", "-C", str(scoutfs_src), "grep", "-n", pattern, tag, "--", "kmod/src"])
        assert proc.returncode == 1, f"{tag} already uses ioctl nr {nr}:\n{proc.stdout}"


@pytest.mark.scoutfs_src
def test_ring_patch_builds_without_the_hooks(scoutfs_src: Path, tmp_path: Path) -> None:
    """Each patch builds on its own: the first one, without the hooks, too."""
    need_build_tools()
    tree = clone_at(scoutfs_src, tmp_path / "scoutfs", UTILS_TAG)
    ring = next((SERIES / UTILS_TAG).glob("0001-*.patch"))
    proc = run(["git", "-C", str(tree), "am", "--3way", str(ring)])
    assert proc.returncode == 0, proc.stderr
    assert "scoutfs_file_open" not in (tree / "kmod/src/file.c").read_text()

    out = tmp_path / "out"
    cmd = [str(KMOD / "test" / "build-scoutfs"), "--kmod-only", str(tree), str(out)]
    proc = run(cmd, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    syms = run(["nm", str(out / "scoutfs.ko")]).stdout
    assert re.search(r" T scoutfs_notify_drain$", syms, re.M)
