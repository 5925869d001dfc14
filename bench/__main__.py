"""``python -m bench``: run the benchmark stages and write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import report
from .config import ROOT, Config
from .figures import Stage

# stage name -> the module of this package whose run(cfg) measures it
STAGE_MODULES = {
    "ring": "ring",
    "relay": "relay",
    "fanotify": "fanotify_source",
    "shim": "shim",
    "overlay_dirs": "overlay_dirs",
    "kmod_emit": "kmod_emit",
    "cluster": "cluster",
}
STAGES = tuple(STAGE_MODULES)


def _stage_runner(name: str) -> Callable[[Config], Stage]:
    # imported on demand: a stage's imports (pyfuse3...) need not load for the others
    module = importlib.import_module(f".{STAGE_MODULES[name]}", __package__)
    run: Callable[[Config], Stage] = module.run
    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure every stage of scoutfs-notify against a baseline measured in "
        "the same run; print 'bench ...' lines and write BENCHMARKS.md. Run as root.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and 2 runs per figure")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated, in this order: {','.join(STAGES)} (default: all); a run of "
        "some stages rewrites only their sections of --output and their rows of its Targets "
        "table, and keeps the rest",
    )
    p.add_argument("--repeats", type=int, help="runs per figure (default: 5, 2 with --quick)")
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="where to write the report (default: %(default)s)",
    )
    p.add_argument(
        "--workdir", type=Path, default=Path("/tmp"), help="scratch space (default: /tmp)"
    )
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _terminated(signum: int, frame: object) -> None:
    # the stages stop their daemons, shims, servers and mounts on the way out
    # of a KeyboardInterrupt; a bare SIGTERM would leave them running
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    repeats = args.repeats or (2 if args.quick else 5)
    cfg = Config(quick=args.quick, repeats=repeats, workdir=args.workdir)
    info = report.machine()
    stages: list[Stage] = []
    failed = False
    for name in STAGES:
        if name not in args.stages:
            continue
        print(f"# stage {name}", flush=True)
        t0 = time.monotonic()
        try:
            stage = _stage_runner(name)(cfg)
        except Exception as exc:
            traceback.print_exc()
            failed = True
            stage = Stage(name, name, skipped=f"the stage failed: {exc!r}")
        stage.seconds = time.monotonic() - t0
        if stage.skipped:
            print(f"# stage {name} not measured: {stage.skipped}", flush=True)
        stages.append(stage)
    # a run of some stages rewrites only their parts of the report; every stage: all of it
    only = None if set(args.stages) == set(STAGES) else [s.name for s in stages]
    report.write(args.output, cfg, info, stages, only=only, order=list(STAGES))
    if only is None:
        print(f"# wrote {args.output}", flush=True)
    else:
        print(f"# wrote the sections of {', '.join(only)} in {args.output}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
