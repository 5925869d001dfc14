"""The cluster stream on a real kernel: ``kmod/test/vm-e2e --parts cluster``.

In the guest (kmod/test/vm/guest/cluster.py): two mounts of one patched
scoutfs, a daemon and a forwarder per mount, the venv's nats-server, the
shim with --nats on mount A; a read on mount B must reach ``inotifywait -m
-r`` on A's overlay as IN_OPEN and IN_ACCESS, and each mount's records must
be on the subject of its own rid.  Builds and skips as tests/test_vm_e2e.py
does (whose session fixtures it shares, so a tag is built once), on
SCOUTFS_NOTIFY_VM_FULL_TAG (default v1.30).
"""

from __future__ import annotations

import time

import pytest
from test_vm_e2e import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    FULL_TAG,
    UNAVAILABLE,
    Builds,
    run_vm_e2e,
    venv_dir,
    vm_builds,
    vm_env,
)

pytestmark = [pytest.mark.vm, pytest.mark.scoutfs_src]

# a backstop: run-guest kills the guest itself after 900 s
CLUSTER_TIMEOUT_S = 1500


# One release: the cluster part adds nothing kernel-specific to what e2e
# proves on every tag, and each guest costs minutes of the test command.
@pytest.mark.parametrize("tag", [FULL_TAG])
def test_vm_cluster(tag: str, vm_builds: Builds, vm_env: dict[str, str]) -> None:  # noqa: F811
    build = vm_builds.get(tag)
    out = ARTIFACTS / f"{tag}-cluster-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    print(f"artifacts (console log, every process's log): {out}")
    args = ["--tag", tag, "--parts", "cluster", "--build-dir", str(build), "--out", str(out)]
    rc = run_vm_e2e([*args, "--venv", str(venv_dir())], vm_env, CLUSTER_TIMEOUT_S)
    assert rc != UNAVAILABLE, f"vm-e2e could not run the cluster part for {tag} (see its message)"
    assert rc == 0, f"vm-e2e cluster failed for scoutfs {tag}: logs in {out}"
