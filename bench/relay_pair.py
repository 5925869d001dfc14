"""The relay baseline's sender: the minimal loop over bare socketpairs.

    python -m bench.relay_pair FD...

For every ``N`` read from stdin, sends N records to every FD in 64-record
messages, blocking, made the way the daemon's scoutfs source makes them (a
1024-record drain copied into a buffer, stamped, sliced into messages).
"""

from __future__ import annotations

import ctypes
import socket
import sys

from notifyd import abi

from .records import RING_RECORDS, TEMPLATE, stamp


def main(argv: list[str]) -> int:
    socks = [socket.socket(fileno=int(fd)) for fd in argv]
    buf = ctypes.create_string_buffer(RING_RECORDS * abi.RECORD_SIZE)
    view = memoryview(buf).cast("B")
    seq = 0
    step = abi.MAX_MESSAGE_BYTES
    for line in sys.stdin:
        left = int(line)
        while left > 0:
            n = min(left, RING_RECORDS)
            nbytes = n * abi.RECORD_SIZE
            ctypes.memmove(buf, TEMPLATE, nbytes)
            stamp(view, n, seq + 1)
            seq += n
            left -= n
            for off in range(0, nbytes, step):
                msg = bytes(view[off : off + step])
                for s in socks:
                    s.send(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
