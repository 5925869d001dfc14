"""docs/ABI.md states the layouts notifyd/abi.py implements (test_abi ties that to C).

The document and the code change together: a field moved, resized or
renamed in one and not the other fails here.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from notifyd import abi

DOC = Path(__file__).resolve().parent.parent / "docs" / "ABI.md"

# | 0      | 8    | `seq`     | per-mount sequence number...
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", re.M)
# 	__u64 buf_ptr;     /* ... */  or  	__u8 _pad[4];  /* ... */
C_FIELD = re.compile(r"^\s*__u(8|16|32|64)\s+(\w+)(?:\[(\d+)\])?;", re.M)
C_DEFINE = re.compile(r"^#define\s+SCOUTFS_IOC_READ_NOTIFY_(WAIT|DETACH)\s+\(1 << (\d+)\)", re.M)


def section(title: str) -> str:
    """The text of the ``## title`` section of docs/ABI.md."""
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def python_layout(fmt: struct.Struct, names: list[str]) -> list[tuple[int, int, str]]:
    """(offset, size, name) of every field of a packed little-endian struct."""
    out = []
    offset = 0
    for code, name in zip(fmt.format.lstrip("<"), names, strict=True):
        size = struct.calcsize("<" + code)
        out.append((offset, size, name))
        offset += size
    return out


def test_the_record_table_is_the_record() -> None:
    rows = [(int(o), int(s), n) for o, s, n in ROW.findall(section("1. The notification record"))]
    assert rows, "no record table found in docs/ABI.md section 1"
    assert rows == python_layout(abi.RECORD, list(abi.Record._fields))
    assert sum(size for _, size, _ in rows) == abi.RECORD_SIZE


def test_the_ioctl_struct_and_flags_are_the_ioctls() -> None:
    text = section("3. The drain ioctl")
    fields = C_FIELD.findall(text)
    assert [int(bits) // 8 * int(n or 1) for bits, _, n in fields] == [
        size for _, size, _ in python_layout(abi.READ_NOTIFY, [name for _, name, _ in fields])
    ]
    flags = {name: 1 << int(bit) for name, bit in C_DEFINE.findall(text)}
    assert flags == {"WAIT": abi.READ_NOTIFY_WAIT, "DETACH": abi.READ_NOTIFY_DETACH}
    for nr in (abi.READ_NOTIFY_NR, abi.READ_NOTIFY_NR_V131):
        assert f"nr {nr}" in text or f" {nr} " in text, f"ioctl nr {nr} not in section 3"


def test_the_socket_limits_are_the_socket() -> None:
    text = section("4. The socket")
    assert f"1 to {abi.MAX_MESSAGE_RECORDS} whole records" in text
    assert f"({abi.RECORD_SIZE} to {abi.MAX_MESSAGE_BYTES} bytes)" in text
