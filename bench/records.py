"""Synthetic records, laid out as the kernel ring hands them out.

Only the first and last record of every 64-record message get a fresh
``seq``: that is all the benchmark clients read (they check continuity per
message, as decoding every record in Python would make the client the
bottleneck), and the relay never looks inside a batch.  The rest keep the
template's bytes.
"""

from __future__ import annotations

import struct

from notifyd import abi

__all__ = ["RING_RECORDS", "TEMPLATE", "stamp"]

# one drain of the kernel ring: 64 KiB
RING_RECORDS = 1024

TEMPLATE = b"".join(
    abi.Record(
        seq=0,
        ino=1000 + i,
        time_ns=0,
        pos=4096 * i,
        count=4096,
        pid=1,
        uid=0,
        gid=0,
        flags=0,
        type=abi.TYPE_READ,
    ).pack()
    for i in range(RING_RECORDS)
)

_SEQ = struct.Struct("<Q")


def stamp(buf: memoryview | bytearray, nrecords: int, first_seq: int) -> None:
    """Number the messages of ``buf`` (64 records each, then a tail) from ``first_seq``."""
    per = abi.MAX_MESSAGE_RECORDS
    for start in range(0, nrecords, per):
        n = min(per, nrecords - start)
        off = start * abi.RECORD_SIZE
        _SEQ.pack_into(buf, off, first_seq + start)
        _SEQ.pack_into(buf, off + (n - 1) * abi.RECORD_SIZE, first_seq + start + n - 1)
