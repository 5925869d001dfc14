"""Stage 1: the kernel ring, kmod/src/notify.c run in userspace.

bench/ring_bench.c is built against the kernel API shim of the test harness
(kmod/test/harness/shim) and the real notify.c, and prints each figure next
to its baseline measured in the same process.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

from .config import ROOT, Config
from .figures import Figure, Stage, median

__all__ = ["build", "run"]

STAGE = "ring"
HARNESS = ROOT / "kmod" / "test" / "harness"
SOURCES = [
    ROOT / "bench" / "ring_bench.c",
    HARNESS / "kshim.c",
    HARNESS / "ioctl.c",
    ROOT / "kmod" / "src" / "notify.c",
]
# the harness Makefile's flags, so the code is compiled as its tests compile it
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]


def build(out: Path) -> Path:
    """Compile the ring driver into ``out``; returns the binary."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (Debian package build-essential)")
    binary = out / "ring_bench"
    cmd = [cc, *CFLAGS, f"-I{HARNESS / 'shim'}", f"-I{ROOT / 'kmod' / 'src'}"]
    cmd += ["-o", str(binary), *map(str, SOURCES)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return binary


def _runs(binary: Path, ops: int, repeats: int) -> dict[str, list[float]]:
    values: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        out = subprocess.run(
            [str(binary), str(ops)], check=True, capture_output=True, text=True, timeout=300
        ).stdout
        for line in out.splitlines():
            name, value = line.split()
            values[name].append(float(value))
    return values


def run(cfg: Config) -> Stage:
    stage = Stage(
        STAGE,
        "Kernel ring (userspace harness)",
        method=(
            "`bench/ring_bench.c` compiled with the real `kmod/src/notify.c` against the "
            "harness's kernel API shim (`kmod/test/harness/shim`), `-O2`. The shim's spinlock is "
            "a pthread mutex, `copy_to_user` a `process_vm_writev(2)` of the process itself (so a"
            " drain pays a syscall the kernel's copy does not), counters are atomics and the wait"
            " queue a condvar. The clock is read around whole loops; the nanosecond loops (no "
            "reader, the empty call, the clock) report the fastest of 5 chunks, so that one "
            "preemption on a shared machine does not make the figure. Baselines, same process: a "
            "no-op `noinline` call; a 64-byte `memcpy` into a 1024-slot ring under the same "
            "mutex; that same plain ring with 1 and 2 emitting threads while a thread drains it. "
            "Drain: a full ring (1024 records) per call, time per record."
        ),
    )
    ops = cfg.pick(10_000_000, 1_000_000)
    with tempfile.TemporaryDirectory(prefix="nfyb-ring-", dir=cfg.workdir) as tmp:
        try:
            binary = build(Path(tmp))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            stage.skipped = f"cannot build the ring driver: {getattr(exc, 'stderr', exc)}"
            return stage
        v = _runs(binary, ops, cfg.repeats)

    def fig(name: str, base: str, unit: str, base_name: str, **kw) -> None:
        stage.add(
            Figure(
                STAGE,
                name,
                median(v[name]),
                unit,
                median(v[base]),
                base_name,
                runs=v[name],
                **kw,
            )
        )

    fig(
        "hook_no_reader_ns",
        "empty_call_ns",
        "ns/call",
        "an empty noinline function call",
        note="the inlined hook: one unlikely() test of a flag",
    )
    fig(
        "emit_stored_ns",
        "plain_copy_locked_ns",
        "ns/record",
        "a 64-byte copy into a ring under the same lock",
        note="includes ktime_get_real_ns(), a clock_gettime() here of "
        f"{median(v['clock_read_ns']):.0f} ns (the kernel's is cheaper), credentials, "
        "two atomic counters and smp_mb()",
    )
    fig(
        "drain_per_record_ns",
        "plain_copy_locked_ns",
        "ns/record",
        "a 64-byte copy into a ring under the same lock",
        note="1024 records per READ_NOTIFY; the shim's copy_to_user is a syscall",
    )
    for n in (1, 2):
        fig(
            f"emit_threads_{n}_per_s",
            f"plain_threads_{n}_per_s",
            "emits/s",
            f"the plain locked ring, {n} emitting thread(s), one draining",
            note="emits per second of wall time while the caller drains with WAIT "
            "(records dropped on a full ring count: the emitter's cost is the figure)",
        )
    stage.notes.append(
        "In the threaded runs the drainer sleeps in WAIT, so every emit that finds it "
        "waiting calls the shim's wake_up (a mutex and a condvar broadcast): dearer than the "
        "kernel's wake_up, and a cost the plain ring, drained by polling, does not pay."
    )
    return stage
