"""The Python ABI module agrees with the C header, and round-trips records."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifyd import abi

# the part of scoutfs's ioctl.h that kmod/gen-series appends, with ioctl nr 25
HEADER = Path(__file__).resolve().parent.parent / "kmod" / "src" / "ioctl-read-notify.h"

FIELDS = [
    "seq", "ino", "time_ns", "pos", "count", "pid", "uid", "gid", "flags",
    "type", "version", "_pad",
]  # fmt: skip
IOCTL_FIELDS = ["buf_ptr", "buf_bytes", "flags", "timeout_ms", "_pad", "dropped"]

PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include <linux/ioctl.h>

/* what scoutfs's ioctl.h and the kernel define before the part */
#define SCOUTFS_IOCTL_MAGIC 0xE8
#define U32_MAX ((__u32)~0U)
#include "ioctl-read-notify.h"

#define REC(f) printf("record.%s %zu %zu\n", #f, \
	offsetof(struct scoutfs_ioctl_notify_record, f), \
	sizeof(((struct scoutfs_ioctl_notify_record *)0)->f));
#define ARG(f) printf("ioctl.%s %zu %zu\n", #f, \
	offsetof(struct scoutfs_ioctl_read_notify, f), \
	sizeof(((struct scoutfs_ioctl_read_notify *)0)->f));

int main(void)
{
	printf("record.sizeof %zu\n", sizeof(struct scoutfs_ioctl_notify_record));
	printf("ioctl.sizeof %zu\n", sizeof(struct scoutfs_ioctl_read_notify));
	%FIELDS%
	printf("VERSION %d\n", SCOUTFS_IOC_NOTIFY_VERSION);
	printf("TYPE_OPEN %d\n", SCOUTFS_IOC_NOTIFY_OPEN);
	printf("TYPE_READ %d\n", SCOUTFS_IOC_NOTIFY_READ);
	printf("READ_NOTIFY_WAIT %u\n", (unsigned)SCOUTFS_IOC_READ_NOTIFY_WAIT);
	printf("READ_NOTIFY_DETACH %u\n", (unsigned)SCOUTFS_IOC_READ_NOTIFY_DETACH);
	printf("READ_NOTIFY_UNKNOWN %u\n", (unsigned)SCOUTFS_IOC_READ_NOTIFY_UNKNOWN);
	printf("IOC_READ_NOTIFY %lu\n", (unsigned long)SCOUTFS_IOC_READ_NOTIFY);
	return 0;
}
"""


def _c_facts(tmp_path: Path, nr: int | None) -> dict[str, tuple[int, ...]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (bootstrap.sh installs it)")
    fields = "\n\t".join([f"REC({f})" for f in FIELDS] + [f"ARG({f})" for f in IOCTL_FIELDS])
    src = tmp_path / "abi.c"
    src.write_text(PROGRAM.replace("%FIELDS%", fields))
    exe = tmp_path / f"abi{nr}"
    header = HEADER
    if nr is not None:
        # the nr as kmod/gen-series puts it into a release's ioctl.h
        text = HEADER.read_text()
        assert text.count("_IOWR(SCOUTFS_IOCTL_MAGIC, 25, ") == 1
        header = tmp_path / HEADER.name
        header.write_text(text.replace("MAGIC, 25, ", f"MAGIC, {nr}, "))
    subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic",
         "-I", str(header.parent), "-o", str(exe), str(src)],
        check=True,
    )  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: tuple(map(int, rest)) for name, *rest in (ln.split() for ln in out.splitlines())}


def _py_layout(fmt: str, names: list[str]) -> dict[str, tuple[int, int]]:
    import struct

    layout, off = {}, 0
    for name, code in zip(names, fmt.lstrip("<"), strict=True):
        size = struct.calcsize("<" + code)
        layout[name] = (off, size)
        off += size
    return layout


def test_header_layout_matches_python(tmp_path: Path) -> None:
    c = _c_facts(tmp_path, None)
    assert c["record.sizeof"] == (abi.RECORD_SIZE,) == (64,)
    assert c["ioctl.sizeof"] == (abi.READ_NOTIFY.size,) == (32,)
    for name, off_size in _py_layout(abi.RECORD.format, FIELDS).items():
        assert c[f"record.{name}"] == off_size, name
    for name, off_size in _py_layout(abi.READ_NOTIFY.format, IOCTL_FIELDS).items():
        assert c[f"ioctl.{name}"] == off_size, name
    assert c["VERSION"] == (abi.VERSION,)
    assert c["TYPE_OPEN"] == (abi.TYPE_OPEN,)
    assert c["TYPE_READ"] == (abi.TYPE_READ,)
    assert c["READ_NOTIFY_WAIT"] == (abi.READ_NOTIFY_WAIT,)
    assert c["READ_NOTIFY_DETACH"] == (abi.READ_NOTIFY_DETACH,)
    known = abi.READ_NOTIFY_WAIT | abi.READ_NOTIFY_DETACH
    assert c["READ_NOTIFY_UNKNOWN"] == (0xFFFFFFFF & ~known,)


@pytest.mark.parametrize("nr", [25, 26])
def test_ioctl_numbers_match_python(tmp_path: Path, nr: int) -> None:
    c = _c_facts(tmp_path, nr)
    assert c["IOC_READ_NOTIFY"] == (abi.IOC_READ_NOTIFY_CANDIDATES[nr - 25],)


def test_default_ioctl_number_is_25(tmp_path: Path) -> None:
    assert _c_facts(tmp_path, None)["IOC_READ_NOTIFY"] == (abi.IOC_READ_NOTIFY,)
    # _IOWR(0xE8, 25, 32 bytes), spelled out once as a cross-check of _ioc()
    assert abi.IOC_READ_NOTIFY == 0xC020E819


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
# the machine may be loaded (CI runs VM tests too): no per-example deadlines
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
records = st.builds(abi.Record, u64, u64, u64, u64, u64, u32, u32, u32, u32, u16, u16, u32)


@relaxed
@given(st.lists(records, max_size=80))
def test_round_trip(recs: list[abi.Record]) -> None:
    buf = abi.encode(recs)
    assert len(buf) == 64 * len(recs)
    assert abi.decode(buf) == recs
    assert abi.decode(memoryview(buf)) == recs
    assert [tuple(r) for r in recs] == list(abi.iter_fields(buf))
    if recs:
        assert abi.seq_range(buf) == (recs[0].seq, recs[-1].seq)


@relaxed
@given(st.lists(records, min_size=1, max_size=8), u16.filter(lambda t: t not in abi.TYPE_NAMES))
def test_unknown_types_pass_through(recs: list[abi.Record], typ: int) -> None:
    odd = [r._replace(type=typ, version=7, reserved=123) for r in recs]
    back = abi.decode(abi.encode(odd))
    assert back == odd
    assert all(r.type_name == f"TYPE{typ}" for r in back)


@pytest.mark.parametrize("n", [1, 63, 65, 4095])
def test_partial_records_rejected(n: int) -> None:
    with pytest.raises(abi.ABIError, match="not a whole number of 64-byte records"):
        abi.decode(b"\0" * n)


def test_wire_bytes_are_little_endian() -> None:
    rec = abi.Record(1, 2, 3, 4, 5, 6, 7, 8, 9, abi.TYPE_READ)
    buf = rec.pack()
    assert buf[:8] == b"\x01" + b"\0" * 7
    assert buf[56:60] == b"\x02\x00\x01\x00"  # type 2, version 1
    assert buf[60:] == b"\0" * 4
