"""The cluster stream's wire format (docs/ABI.md section 6): subjects, headers, ids.

No NATS import here: the forwarder, the consumers and the tests share these
rules, and a unit test can check them without a server.

A message is one batch of whole 64-byte records (notifyd.abi) of one node, in
``seq`` order, published on ``scoutfs.notify.<fsid>.<node>`` with headers:

- ``Nats-Msg-Id``: ``<fsid>.<node>.<epoch>.<first seq>``, so JetStream's
  duplicate window drops a batch re-sent after a lost ack;
- ``Scoutfs-Notify-Epoch``: names the node's ``seq`` space (a new mount on
  scoutfs, a new daemon for the fanotify source): a consumer resets its
  per-node tracking when it changes;
- ``Scoutfs-Notify-Seq``: ``<first>-<last>`` of the payload;
- ``Scoutfs-Notify-Lost``: records of this node lost just before the first
  record (a ``seq`` gap the forwarder saw, or its backlog bound), when > 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .. import abi

__all__ = [
    "DEFAULT_STREAM",
    "HDR_EPOCH",
    "HDR_LOST",
    "HDR_MSG_ID",
    "HDR_SEQ",
    "HDR_VERSION",
    "SUBJECT_PREFIX",
    "Batch",
    "ClusterGap",
    "ClusterRecord",
    "NodeTracker",
    "WireError",
    "check_token",
    "filter_subject",
    "headers_for",
    "msg_id",
    "parse_message",
    "subject_for",
]

DEFAULT_STREAM = "SCOUTFS_NOTIFY"
SUBJECT_PREFIX = "scoutfs.notify"
HDR_MSG_ID = "Nats-Msg-Id"
HDR_EPOCH = "Scoutfs-Notify-Epoch"
HDR_SEQ = "Scoutfs-Notify-Seq"
HDR_LOST = "Scoutfs-Notify-Lost"
HDR_VERSION = "Scoutfs-Notify-Version"
WIRE_VERSION = "1"

# A subject token: no dots, wildcards or whitespace (NATS splits on them).
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class WireError(ValueError):
    """A name that cannot be a subject token, or a message that breaks the format."""


def check_token(kind: str, value: str) -> str:
    """Return ``value`` if it can be one subject token, else raise WireError."""
    if not _TOKEN.match(value):
        raise WireError(
            f"{kind} {value!r} cannot be a NATS subject token: use 1 to 64 letters, "
            "digits, '-' or '_'"
        )
    return value


def subject_for(fsid: str, node: str) -> str:
    return f"{SUBJECT_PREFIX}.{fsid}.{node}"


def filter_subject(fsid: str | None = None, node: str | None = None) -> str:
    """The subject filter for one filesystem and/or node (``*`` for any)."""
    return subject_for(fsid or "*", node or "*")


def msg_id(fsid: str, node: str, epoch: str, first_seq: int) -> str:
    return f"{fsid}.{node}.{epoch}.{first_seq}"


def headers_for(
    fsid: str, node: str, epoch: str, first: int, last: int, lost: int
) -> dict[str, str]:
    hdrs = {
        HDR_MSG_ID: msg_id(fsid, node, epoch, first),
        HDR_EPOCH: epoch,
        HDR_SEQ: f"{first}-{last}",
        HDR_VERSION: WIRE_VERSION,
    }
    if lost:
        hdrs[HDR_LOST] = str(lost)
    return hdrs


class Batch(NamedTuple):
    """One decoded cluster message."""

    fsid: str
    node: str
    epoch: str
    lost: int
    payload: bytes


def parse_message(subject: str, headers: Mapping[str, str] | None, payload: bytes) -> Batch:
    """Check one message of the stream and return its parts.

    Raises:
        WireError: not a ``scoutfs.notify.<fsid>.<node>`` subject, missing
            headers, or a payload that is not whole records.
    """
    parts = subject.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != SUBJECT_PREFIX:
        raise WireError(f"subject {subject!r} is not {SUBJECT_PREFIX}.<fsid>.<node>")
    hdrs = headers or {}
    epoch = hdrs.get(HDR_EPOCH)
    if epoch is None:
        raise WireError(f"message on {subject} has no {HDR_EPOCH} header")
    try:
        lost = int(hdrs.get(HDR_LOST, "0"))
    except ValueError:
        raise WireError(f"message on {subject} has a bad {HDR_LOST} header") from None
    if not payload or len(payload) % abi.RECORD_SIZE:
        raise WireError(f"message on {subject} carries {len(payload)} bytes, not whole records")
    return Batch(parts[2], parts[3], epoch, lost, payload)


class ClusterRecord(NamedTuple):
    """A record and the node (and filesystem) it came from."""

    fsid: str
    node: str
    record: abi.Record


class ClusterGap(NamedTuple):
    """``lost`` records of one node are missing before ``next_seq``.

    ``last_seq`` is the last seq seen from that node in this stream, or None
    when the loss was reported by the forwarder before anything was seen.
    """

    fsid: str
    node: str
    last_seq: int | None
    next_seq: int
    lost: int


@dataclass
class _NodeState:
    epoch: str
    last_seq: int


class NodeTracker:
    """Per-node seq tracking: turns batches into records and gaps, drops repeats.

    A gap is the larger of what the forwarder reported (the Lost header) and
    the seq jump since the last record seen from that node in the same epoch
    (messages the stream's limits deleted before this consumer read them).
    """

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], _NodeState] = {}
        self.lost = 0
        self.repeats = 0

    def events(self, batch: Batch) -> list[ClusterRecord | ClusterGap]:
        key = (batch.fsid, batch.node)
        state = self.nodes.get(key)
        if state is not None and state.epoch != batch.epoch:
            state = None  # a new seq space: nothing to compare with
        out: list[ClusterRecord | ClusterGap] = []
        last = state.last_seq if state is not None else None
        first_in_batch = True
        for rec in abi.decode(batch.payload):
            if last is not None and rec.seq <= last:
                self.repeats += 1
                continue
            lost = 0
            if last is not None:
                lost = rec.seq - last - 1
            if first_in_batch:
                lost = max(lost, batch.lost)
            if lost > 0:
                self.lost += lost
                out.append(ClusterGap(batch.fsid, batch.node, last, rec.seq, lost))
            out.append(ClusterRecord(batch.fsid, batch.node, rec))
            last = rec.seq
            first_in_batch = False
        if last is not None:
            self.nodes[key] = _NodeState(batch.epoch, last)
        return out
