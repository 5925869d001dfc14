"""How a benchmark reports: figures against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Figure", "Stage", "median", "median_runs", "timed"]


@dataclass
class Figure:
    """One measured figure and the baseline it is judged against.

    ``ratio`` is value / baseline; whether higher is better depends on the
    figure and is said in ``target``.  ``why`` says why a target is missed.
    """

    stage: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None
    why: str = ""
    note: str = ""
    runs: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.value / self.baseline

    def __post_init__(self) -> None:
        # the line is split on spaces: a unit with one would break every reader
        if " " in self.unit:
            raise ValueError(f"unit {self.unit!r} of {self.stage}.{self.name} has a space")

    def line(self) -> str:
        """A line a script can read: ``bench STAGE.NAME value=V unit=U ...``."""
        parts = [f"bench {self.stage}.{self.name}", f"value={self.value:.6g}", f"unit={self.unit}"]
        if self.baseline is not None:
            parts.append(f"baseline={self.baseline:.6g}")
            if self.ratio is not None:
                parts.append(f"ratio={self.ratio:.4g}")
        if self.runs:
            parts.append(f"runs={len(self.runs)}")
        if self.met is not None:
            parts.append(f"target_met={'yes' if self.met else 'no'}")
        return " ".join(parts)


@dataclass
class Stage:
    """What one stage measured: its figures, how, and what got in the way."""

    name: str
    title: str
    method: str = ""
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # set when the stage could not run at all (and why)
    skipped: str = ""
    seconds: float = 0.0

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        print(fig.line(), flush=True)
        return fig


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def median_runs(fn: Callable[[], float], repeats: int) -> float:
    """The median of ``repeats`` calls of ``fn`` (each returns one measurement)."""
    return statistics.median(fn() for _ in range(repeats))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
