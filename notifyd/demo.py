"""The README's main job.  A smoke check of the ABI until the daemon lands."""

from __future__ import annotations

import sys

from . import abi


def main(argv: list[str] | None = None) -> int:
    print(
        f"scoutfs-notify ABI v{abi.VERSION}: {abi.RECORD_SIZE}-byte records, "
        f"READ_NOTIFY ioctl {abi.IOC_READ_NOTIFY:#x}"
    )
    print("the relay daemon and shim are not implemented yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
