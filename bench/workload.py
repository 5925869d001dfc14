"""A read-heavy workload: read every file under DIR, ROUNDS times, in CHUNK reads.

    python -m bench.workload DIR ROUNDS [CHUNK]

Prints one JSON line: wall seconds of the reading alone (no start-up), opens,
reads that returned data (each of which Linux reports as an access), and the
user and system CPU seconds the reading took.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    root, rounds = argv[0], int(argv[1])
    chunk = int(argv[2]) if len(argv) > 2 else 4096
    paths = sorted(e.path for e in os.scandir(root) if e.is_file())
    opens = reads = 0
    cpu0 = os.times()
    t0 = time.perf_counter()
    for _ in range(rounds):
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            opens += 1
            try:
                while os.read(fd, chunk):
                    reads += 1
            finally:
                os.close(fd)
    seconds = time.perf_counter() - t0
    cpu = os.times()
    user, system = cpu.user - cpu0.user, cpu.system - cpu0.system
    print(json.dumps(dict(seconds=seconds, opens=opens, reads=reads, user=user, system=system)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
