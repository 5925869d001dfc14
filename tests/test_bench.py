"""``python -m bench`` in its quick mode: the report's shape, never its timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.figures import Figure

ROOT = Path(__file__).resolve().parent.parent

# bench STAGE.NAME value=V unit=U [baseline=B ratio=R] [runs=N] [target_met=yes|no]
LINE = re.compile(r"^bench (?P<stage>[a-z_]+)\.(?P<name>[a-z0-9_]+)(?P<pairs>( [a-z_]+=\S+)+)$")
KEYS = {"value", "unit", "baseline", "ratio", "runs", "target_met"}


def parse(line: str) -> tuple[str, dict[str, str]]:
    m = LINE.match(line)
    assert m, f"malformed bench line: {line!r}"
    pairs = dict(p.split("=", 1) for p in m["pairs"].split())
    assert set(pairs) <= KEYS, line
    assert {"value", "unit"} <= set(pairs), line
    float(pairs["value"])
    if "ratio" in pairs:
        float(pairs["baseline"])
        float(pairs["ratio"])
    if "target_met" in pairs:
        assert pairs["target_met"] in ("yes", "no")
    return f"{m['stage']}.{m['name']}", pairs


def test_figure_line_is_parseable():
    fig = Figure("relay", "records_per_s_1_clients", 1.5e6, "records/s", 3e6, "pair", met=False)
    name, pairs = parse(fig.line())
    assert name == "relay.records_per_s_1_clients"
    assert pairs["ratio"] == "0.5"
    assert pairs["target_met"] == "no"


def test_a_unit_with_a_space_is_refused():
    with pytest.raises(ValueError, match="space"):
        Figure("ring", "x", 1.0, "ns per op")


def test_quick_run_writes_lines_and_report(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("the fanotify stage bind-mounts and uses fanotify: run as root")
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--repeats",
            "1",
            "--stages",
            "ring,fanotify",
            "--output",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("bench ")]
    figures = dict(parse(line) for line in lines)
    stages = {name.split(".")[0] for name in figures}
    assert stages == {"ring", "fanotify"}, proc.stdout
    assert all("ratio" in p for n, p in figures.items() if n.startswith("ring."))
    # issue #11's target for the fanotify source is judged in its stage
    assert "target_met" in figures["fanotify.cpu_us_per_record"], proc.stdout

    text = out.read_text()
    for heading in ("# Benchmarks", "## Method", "## Machine", "## Targets"):
        assert f"\n{heading}\n" in f"\n{text}", heading
    for field in ("nproc", "cpu", "kernel", "python"):
        assert f"| {field} |" in text, field
    # every printed figure has its row in the report
    for name in figures:
        assert f"| `{name}` |" in text, name
    # nothing left behind: scratch directories and mounts are gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("nfyb-")]
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()


def test_overlay_read_miss_is_explained_from_the_run():
    from bench.procs import Usage
    from bench.shim import _why_seq

    idle = _why_seq(Usage(machine_total=2.0), 32.0, 0.5, 1000.0)
    assert "no FUSE request reached it" in idle
    busy = _why_seq(
        Usage(user=0.02, system=0.06, voluntary=64, machine_busy=1.0, machine_total=2.0),
        64.0,
        0.5,
        1000.0,
    )
    # 80 ms of CPU for 64 MiB: 1.25 ms per MiB, so about 839 MB/s on a whole core
    assert "woke 64 times" in busy, busy
    assert "(1.25 ms per MiB)" in busy, busy
    assert "75% of it system time" in busy, busy
    assert "one core serves 839 MB/s, well above the overlay's 500" in busy, busy
    assert "50% idle" in busy, busy
    # the per-folio costs and the reader's own CPU, when the run measured them
    warm = _why_seq(Usage(machine_total=2.0), 32.0, 0.3, 9000.0, reader=(0.4, 0.1), folios=(1, 256))
    assert "folios of 1.0 page(s) on the overlay and 256.0 on BACKING" in warm, warm
    assert "(lookup, reference, LRU activation at the second access, a copy) 256 times" in warm
    assert "0.40 ms of CPU per MiB through the overlay and 0.10 on BACKING" in warm, warm
    # the CPU ceiling: 0.4 ms the reader + 1.25 the shim against 0.5 directly
    capped = _why_seq(
        Usage(user=0.02, system=0.06, voluntary=64, machine_busy=2.0, machine_total=2.0),
        64.0,
        0.2,
        1000.0,
        reader=(0.4, 0.5),
    )
    assert "the overlay cost 1.65 ms of CPU per MiB against 0.50" in capped, capped
    assert "(0% idle here) it reaches at most 0.30 of BACKING's rate" in capped, capped
    assert "well above" not in capped, capped
    same = _why_seq(Usage(machine_total=2.0), 32.0, 0.3, 9000.0, folios=(256, 256))
    assert "folios" not in same, same
