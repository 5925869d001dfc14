"""Fixtures shared across the suite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from notifyd import procs
from notifyd.paths import socket_path_for_dir

ROOT = Path(__file__).resolve().parent.parent


def scoutfs_cache_dir() -> Path:
    """Where kmod/fetch-scoutfs clones upstream scoutfs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "scoutfs-notify" / "scoutfs"


def find_scoutfs_src() -> tuple[Path | None, str]:
    """Return (git repo, "") or (None, why not)."""
    env = os.environ.get("SCOUTFS_SRC")
    cand = Path(env) if env else scoutfs_cache_dir()
    where = f"SCOUTFS_SRC={env}" if env else f"the fetch-scoutfs cache {cand}"
    try:
        subprocess.run(
            ["git", "-C", str(cand), "rev-parse", "--git-dir"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None, (
            f"no scoutfs git repository at {where}: set SCOUTFS_SRC to a scoutfs "
            "clone, or run kmod/fetch-scoutfs (URL: github, or the bundle "
            "../shared/vendor/scoutfs.bundle; .ci/run does that itself)"
        )
    return cand, ""


def in_ci() -> bool:
    """True under CI (``CI=true``, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


# Markers of the tests that need the scoutfs source, a 6.1 kernel or qemu.
# Under CI they must run: a skip there would hide that nothing of the kernel
# side was proved, so it is reported as a failure with the skip's reason.
MUST_RUN_IN_CI = ("vm", "scoutfs_src")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    if not (rep.skipped and in_ci()) or hasattr(rep, "wasxfail"):
        return
    marks = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    if not marks:
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (
        f"CI=true: a test marked {', '.join(marks)} must not skip in CI, and this one "
        f"would have: {reason}"
    )


@pytest.fixture(scope="session")
def scoutfs_src() -> Path:
    """A scoutfs git repository with the release tags; skips with the reason if none."""
    src, why = find_scoutfs_src()
    if src is None:
        pytest.skip(why)
    return src


@pytest.fixture
def tmpfs_mount(tmp_path: Path) -> Generator[Path, None, None]:
    """A fresh tmpfs mounted at ``tmp_path/mnt``: a mount of its own, unmounted after.

    Skips with the reason when it cannot be mounted (not root, no tmpfs).
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- notifyd: the real daemon as a subprocess ---------------------------------

# How long a daemon may take to report READY=1, or to exit after SIGTERM.
# Generous: CI shares 2 cores with FUSE daemons and qemu.
NOTIFYD_START_TIMEOUT = 30.0
NOTIFYD_STOP_TIMEOUT = 15.0


class NotifydProcess:
    """A running ``scoutfs-notifyd`` started by :func:`notifyd_factory`.

    Attributes:
        backing: the watched directory.
        socket: the notify socket (AF_UNIX SOCK_SEQPACKET); ready to connect.
        stats_socket: its stats socket (``scoutfs-notify stats --socket``).
        proc: the ``subprocess.Popen``; stderr goes to ``log_path``.
        log_path: the daemon's log file.
    """

    def __init__(self, backing: Path, socket: Path, ready: procs.ReadyProcess) -> None:
        self.backing = backing
        self.socket = socket
        self.stats_socket = Path(str(socket) + ".stats")
        self.proc = ready.proc
        self.log_path = ready.log_path
        self._ready = ready
        self.killed = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL (no cleanup, the socket stays): teardown then expects nothing."""
        self._ready.stop(signal.SIGKILL)
        self.killed = True

    def stop(self) -> int:
        """SIGTERM, wait; fail the test if it does not exit 0 and remove its socket."""
        rc = self._ready.stop(timeout=NOTIFYD_STOP_TIMEOUT)
        if self.killed:
            return rc
        if rc == -signal.SIGKILL:
            pytest.fail(f"notifyd ignored SIGTERM for {NOTIFYD_STOP_TIMEOUT} s:\n{self.log()}")
        if rc != 0:
            pytest.fail(f"notifyd exited with status {rc}:\n{self.log()}")
        if self.socket.exists():
            pytest.fail(f"notifyd left its socket {self.socket} behind:\n{self.log()}")
        return rc


@pytest.fixture
def notifyd_factory(tmp_path: Path):
    """Start real ``scoutfs-notifyd`` processes; every one is stopped at teardown.

    ``start(backing=None, *extra_args, source="fanotify", socket=None, run_dir=None)``
    returns a :class:`NotifydProcess` once the daemon has sent READY=1 (its
    fanotify mark is in place and its socket listens). ``backing`` defaults to a
    fresh directory; ``socket`` to a fresh short path (sun_path holds 107
    bytes). With ``run_dir`` the daemon gets ``--run-dir`` instead of
    ``--socket`` and serves the default path under it.
    Calling ``start`` again with the same ``backing`` and ``socket`` after
    ``.stop()`` restarts the daemon in place. ``extra_args`` go to the daemon
    (e.g. ``"--client-queue", "4"``).

    Teardown SIGTERMs every daemon still running and fails the test if one
    exits non-zero, hangs, or leaves its socket behind.
    """
    started: list[NotifydProcess] = []
    sockdir = Path(tempfile.mkdtemp(prefix="nfy-", dir="/tmp"))

    def start(
        backing: Path | None = None,
        *extra_args: str,
        source: str = "fanotify",
        socket: Path | None = None,
        run_dir: Path | None = None,
    ) -> NotifydProcess:
        n = len(started)
        if backing is None:
            backing = tmp_path / f"backing{n}"
            backing.mkdir()
        if run_dir is not None:
            socket = socket_path_for_dir(backing, run_dir)
            where = ["--run-dir", str(run_dir)]
        else:
            if socket is None:
                socket = sockdir / f"{n}.sock"
            where = ["--socket", str(socket)]
        log_path = tmp_path / f"notifyd{n}.log"
        cmd = [sys.executable, "-m", "notifyd.daemon", "--source", source]
        cmd += [str(backing), *where, *extra_args]
        try:
            ready = procs.start_ready(
                cmd, sockdir / f"{n}.sd", log_path, timeout=NOTIFYD_START_TIMEOUT
            )
        except procs.NotReadyError as exc:
            pytest.fail(f"notifyd did not start: {exc}")
        daemon = NotifydProcess(backing, socket, ready)
        started.append(daemon)
        return daemon

    yield start

    failures = []
    for daemon in started:
        try:
            daemon.stop()
        except pytest.fail.Exception as exc:
            failures.append(str(exc))
    shutil.rmtree(sockdir, ignore_errors=True)
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def fanotify_daemon(notifyd_factory) -> NotifydProcess:
    """One real fanotify-source daemon over a fresh directory (see notifyd_factory).

    ``.backing`` is the watched directory, ``.socket`` the socket to connect to,
    ``.proc`` the process. Accesses made under ``.backing`` after a client's
    ``connect()`` returned reach that client.
    """
    return notifyd_factory()
