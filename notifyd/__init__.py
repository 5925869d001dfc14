"""scoutfs-notify relay daemon, its ABI and its client library."""

from .abi import Record, decode, encode
from .client import AsyncSubscriber, Gap, Subscriber

__all__ = ["AsyncSubscriber", "Gap", "Record", "Subscriber", "decode", "encode"]
