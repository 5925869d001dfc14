"""Placeholder until its issue lands."""

import sys


def main() -> int:
    print(f"{sys.argv[0]}: not implemented yet", file=sys.stderr)
    return 1
