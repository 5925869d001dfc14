"""sd_notify(3) over a real datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket

from notifyd.sdnotify import sd_notify


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
