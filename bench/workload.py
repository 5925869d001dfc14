"""A read-heavy workload: read every file under DIR, ROUNDS times, in CHUNK reads.

    python -m bench.workload DIR ROUNDS [CHUNK]

Prints one JSON line: wall seconds of the reading alone (no start-up), opens,
and reads that returned data (each of which Linux reports as an access).
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
    print(json.dumps({"seconds": seconds, "opens": opens, "reads": reads}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
