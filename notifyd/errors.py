"""The one error the daemon reports to its operator instead of a traceback."""

from __future__ import annotations

__all__ = ["DaemonError"]


class DaemonError(Exception):
    """A condition the operator can fix; the message says how."""
