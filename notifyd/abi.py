"""The scoutfs-notify ABI, version 1: record layout, ioctls and socket limits.

This module is the only Python statement of ``docs/ABI.md``; the C
statement is ``kmod/src/ioctl-read-notify.h`` (the part of scoutfs's
``ioctl.h`` that the kernel series adds), and ``tests/test_abi.py`` compiles
that header to prove the two agree.  Nothing else re-declares a layout or an
ioctl number.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

__all__ = [
    "INOTIFY_TYPES",
    "INO_PATH",
    "INO_PATH_RESULT",
    "IOC_INO_PATH",
    "IOC_READ_NOTIFY",
    "IOC_READ_NOTIFY_CANDIDATES",
    "IOC_STATFS_MORE",
    "LARGE_MESSAGE_BYTES",
    "LARGE_MESSAGE_RECORDS",
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_RECORDS",
    "MESSAGE_REQUEST",
    "READ_NOTIFY",
    "READ_NOTIFY_DETACH",
    "READ_NOTIFY_WAIT",
    "RECORD",
    "RECORD_SIZE",
    "STATFS_MORE",
    "TYPE_NAMES",
    "TYPE_OPEN",
    "TYPE_READ",
    "UNKNOWN_ID",
    "VERSION",
    "ABIError",
    "Record",
    "decode",
    "decode_message_request",
    "encode",
    "encode_message_request",
    "iter_fields",
    "seq_range",
]


class ABIError(ValueError):
    """A buffer that cannot hold whole records."""


# --- the record (docs/ABI.md section 1) ------------------------------------

VERSION = 1
TYPE_OPEN = 1
TYPE_READ = 2
TYPE_NAMES = {TYPE_OPEN: "OPEN", TYPE_READ: "READ"}
# The types the inotify view (docs/ABI.md section 5) turns into events; a
# record of another type is counted and skipped by whatever replays records.
INOTIFY_TYPES = frozenset({TYPE_OPEN, TYPE_READ})

# uid/gid a source sets when the accessing process is gone: never guess root.
UNKNOWN_ID = 0xFFFFFFFF

# seq ino time_ns pos count | pid uid gid flags | type version | reserved
RECORD = struct.Struct("<QQQQQIIIIHHI")
RECORD_SIZE = RECORD.size
assert RECORD_SIZE == 64

_SEQ = struct.Struct("<Q")


class Record(NamedTuple):
    """One decoded record; field order is the wire order."""

    seq: int
    ino: int
    time_ns: int
    pos: int
    # the ABI's name for the field; it hides tuple.count, which no caller needs
    count: int  # type: ignore[assignment]
    pid: int
    uid: int
    gid: int
    flags: int
    type: int
    version: int = VERSION
    reserved: int = 0

    def pack(self) -> bytes:
        return RECORD.pack(*self)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"TYPE{self.type}")


def _check_length(buf: bytes | bytearray | memoryview) -> int:
    n = len(buf)
    if n % RECORD_SIZE:
        raise ABIError(f"buffer of {n} bytes is not a whole number of {RECORD_SIZE}-byte records")
    return n // RECORD_SIZE


def iter_fields(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, ...]]:
    """Yield each record of ``buf`` as a plain field tuple (no Record objects).

    For hot paths; raises ABIError if ``buf`` is not whole records.
    """
    _check_length(buf)
    return RECORD.iter_unpack(buf)


def decode(buf: bytes | bytearray | memoryview) -> list[Record]:
    """Decode a buffer of whole records, oldest first.

    Types and versions are not judged here: consumers skip what they do not
    know, so an unknown record must survive decoding unchanged.
    """
    make = Record._make
    return [make(fields) for fields in iter_fields(buf)]


def encode(records: Iterable[Record | tuple[int, ...]]) -> bytes:
    """Encode records (or field tuples in wire order) into one buffer."""
    return b"".join(RECORD.pack(*r) for r in records)


def seq_range(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return the (first, last) seq of a non-empty buffer without decoding it."""
    n = _check_length(buf)
    if n == 0:
        raise ABIError("empty buffer has no seq range")
    return _SEQ.unpack_from(buf, 0)[0], _SEQ.unpack_from(buf, (n - 1) * RECORD_SIZE)[0]


# --- the socket (docs/ABI.md section 4) --------------------------------------

MAX_MESSAGE_RECORDS = 64
MAX_MESSAGE_BYTES = MAX_MESSAGE_RECORDS * RECORD_SIZE

# A client may ask for larger messages (section 4, "Larger messages"): one
# message of MESSAGE_REQUEST, magic, version 1 and the records it takes in a
# message.  A daemon that does not know it discards it; one that does sends
# that client messages of up to that many records, rounded down to a
# multiple of 64 and at most LARGE_MESSAGE_RECORDS (its drain buffer).
MESSAGE_REQUEST = struct.Struct("<4sHH")
MESSAGE_REQUEST_MAGIC = b"SNMR"
MESSAGE_REQUEST_VERSION = 1
LARGE_MESSAGE_RECORDS = 1024
LARGE_MESSAGE_BYTES = LARGE_MESSAGE_RECORDS * RECORD_SIZE


def encode_message_request(records: int) -> bytes:
    """The message that asks the daemon for messages of up to ``records`` records."""
    return MESSAGE_REQUEST.pack(MESSAGE_REQUEST_MAGIC, MESSAGE_REQUEST_VERSION, records)


def decode_message_request(msg: bytes) -> int | None:
    """Records per message a client asks for (64..1024), or None if ``msg`` is no request."""
    if len(msg) != MESSAGE_REQUEST.size:
        return None
    magic, version, asked = MESSAGE_REQUEST.unpack(msg)
    if magic != MESSAGE_REQUEST_MAGIC or version != MESSAGE_REQUEST_VERSION:
        return None
    records = int(asked) - int(asked) % MAX_MESSAGE_RECORDS
    return max(MAX_MESSAGE_RECORDS, min(records, LARGE_MESSAGE_RECORDS))


# --- ioctls (docs/ABI.md section 3, and the scoutfs ioctls the project uses) -

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _iow(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, size)


def _ior(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, typ, nr, size)


def _iowr(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


IOCTL_MAGIC = 0xE8

# struct scoutfs_ioctl_read_notify: buf_ptr buf_bytes flags timeout_ms _pad dropped
READ_NOTIFY = struct.Struct("<QIIIIQ")
READ_NOTIFY_WAIT = 1 << 0
READ_NOTIFY_DETACH = 1 << 1
READ_NOTIFY_NR = 25
# upstream v1.31 and later took 25 (INJECT_TOTL_DELTA); their series use 26
READ_NOTIFY_NR_V131 = 26
IOC_READ_NOTIFY = _iowr(IOCTL_MAGIC, READ_NOTIFY_NR, READ_NOTIFY.size)
# the order a drainer tries them in: a wrong full number answers ENOTTY
IOC_READ_NOTIFY_CANDIDATES = (
    IOC_READ_NOTIFY,
    _iowr(IOCTL_MAGIC, READ_NOTIFY_NR_V131, READ_NOTIFY.size),
)

# struct scoutfs_ioctl_statfs_more: fsid rid committed_seq total_meta_blocks
# total_data_blocks reserved_meta_blocks
STATFS_MORE = struct.Struct("<QQQQQQ")
IOC_STATFS_MORE = _ior(IOCTL_MAGIC, 10, STATFS_MORE.size)

# struct scoutfs_ioctl_ino_path: ino dir_ino dir_pos result_ptr result_bytes _pad[6]
INO_PATH = struct.Struct("<QQQQH6x")
# struct scoutfs_ioctl_ino_path_result: dir_ino dir_pos path_bytes _pad[6] path[]
INO_PATH_RESULT = struct.Struct("<QQH6x")
IOC_INO_PATH = _iow(IOCTL_MAGIC, 2, INO_PATH.size)
