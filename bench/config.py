"""What every stage is told: how long to try, and where to put scratch files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "Config"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    quick: bool = False
    # runs of every measurement; figures are their medians
    repeats: int = 5
    # scratch space (sparse files, sockets); removed by each stage
    workdir: Path = Path("/tmp")

    def pick(self, full: int, quick: int) -> int:
        """A size for this run: ``full``, or ``quick`` with --quick."""
        return quick if self.quick else full

    @property
    def env(self) -> dict[str, str]:
        """Environment for child Python processes: this checkout first on the path."""
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONPATH": f"{ROOT}:{path}" if path else str(ROOT)}
