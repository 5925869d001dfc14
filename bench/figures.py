"""How a benchmark reports: figures against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Figure:
    """One measured figure and the baseline it is judged against.

    ``ratio`` is value / baseline; whether higher is better depends on the
    figure and is said in ``target``.
    """

    stage: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.value / self.baseline

    def line(self) -> str:
        """A line a script can read: ``bench STAGE.NAME value=V unit=U ...``."""
        parts = [f"bench {self.stage}.{self.name}", f"value={self.value:.6g}", f"unit={self.unit}"]
        if self.baseline is not None:
            parts += [f"baseline={self.baseline:.6g}", f"ratio={self.ratio:.4g}"]
        if self.met is not None:
            parts.append(f"target_met={'yes' if self.met else 'no'}")
        return " ".join(parts)


def median_runs(fn: Callable[[], float], repeats: int) -> float:
    """The median of ``repeats`` calls of ``fn`` (each returns one measurement)."""
    return statistics.median(fn() for _ in range(repeats))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
