"""sd_notify(3) over a real datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from notifyd.sdnotify import sd_notify, wait_ready


def test_no_manager(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_path_socket(monkeypatch, tmp_path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as mgr:
        mgr.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert sd_notify("READY=1\nSTATUS=x") is True
        assert mgr.recv(4096) == b"READY=1\nSTATUS=x"


def test_abstract_socket(monkeypatch) -> None:
    name = f"scoutfs-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as mgr:
        mgr.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        assert mgr.recv(4096) == b"STOPPING=1"


def test_a_gone_manager_is_not_fatal(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("READY=1") is False
    assert "cannot notify the service manager" in caplog.text


def test_wait_ready_sees_ready_exit_and_silence(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    with listener:
        ready = subprocess.Popen(
            [sys.executable, "-c", "from notifyd.sdnotify import sd_notify; "
             "sd_notify('STATUS=up\\nREADY=1'); import time; time.sleep(30)"],
            env=env,
        )  # fmt: skip
        try:
            wait_ready(listener, ready, 20)
        finally:
            ready.kill()
            ready.wait()
        dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], env=env)
        with pytest.raises(ChildProcessError, match="status 3 before READY=1"):
            wait_ready(listener, dead, 20)
        silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with pytest.raises(TimeoutError, match=r"no READY=1 in 0\.5 s"):
                wait_ready(listener, silent, 0.5)
        finally:
            silent.kill()
            silent.wait()
