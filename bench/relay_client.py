"""A minimal consumer process: count records and seq gaps, report per burst.

    python -m bench.relay_client (--socket PATH | --fd N) [--slow SECONDS]

Connects (or takes an inherited socketpair end), prints ``ready``, then for
every burst of records prints one JSON line once ``IDLE`` seconds pass with
nothing received: records, messages, records lost to seq gaps, and the
CLOCK_MONOTONIC times of the first and last message.  Both arms of the relay
benchmark use this same loop, so only the sending side differs.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

# a burst has ended once nothing arrived for this long
IDLE = 0.3
MESSAGE_BYTES = 4096
RECORD = 64

_SEQ = struct.Struct("<Q")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket")
    where.add_argument("--fd", type=int)
    p.add_argument("--slow", type=float, default=0.0, help="sleep this long after every message")
    args = p.parse_args(argv)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(args.socket)
    print("ready", flush=True)
    buf = bytearray(MESSAGE_BYTES)
    unpack = _SEQ.unpack_from
    now = time.monotonic
    while True:
        sock.settimeout(None)
        n = sock.recv_into(buf)
        if not n:
            return 0
        first_t = last_t = now()
        records = messages = lost = 0
        last_seq = None
        sock.settimeout(IDLE)
        while n:
            count = n // RECORD
            first = unpack(buf, 0)[0]
            if last_seq is not None and first > last_seq + 1:
                lost += first - last_seq - 1
            last_seq = unpack(buf, n - RECORD)[0]
            records += count
            messages += 1
            last_t = now()
            if args.slow:
                time.sleep(args.slow)
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                break
        report = dict(records=records, messages=messages, lost=lost, first=first_t, last=last_t)
        print(json.dumps(report), flush=True)
        if not n:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
