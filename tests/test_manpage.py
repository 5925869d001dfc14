"""Man pages made from the parsers: every option is there and man renders them cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from notifyd.manpage import COMMANDS, build_parser_of, main


@pytest.fixture(scope="module")
def mandir(tmp_path_factory):
    top = tmp_path_factory.mktemp("man")
    assert main([str(top / "man1")]) == 0
    return top


def _options(parser) -> set[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    for a in parser._actions:
        if hasattr(a, "choices") and isinstance(a.choices, dict):
            for sub in a.choices.values():
                opts |= _options(sub)
    return opts


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_page_has_every_option_and_renders(mandir, name) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian package man-db)")
    env = {**os.environ, "MANPATH": str(mandir), "MANWIDTH": "200", "MAN_KEEP_FORMATTING": ""}
    res = subprocess.run(
        ["man", "--warnings", name], capture_output=True, text=True, env=env, check=True
    )
    assert res.stderr == "", res.stderr
    text = res.stdout
    assert text.startswith(name.upper() + "(1)"), text[:200]
    for opt in _options(build_parser_of(COMMANDS[name][0])) - {"-h", "--help"}:
        assert opt in text, f"{opt} missing from man {name}"


def test_parsers_build_without_running() -> None:
    """Each console script's parser is importable and built without side effects."""
    for module, _ in COMMANDS.values():
        code = f"from {module} import build_parser; build_parser().format_help()"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_watch_page_carries_exit_statuses(mandir) -> None:
    page = (mandir / "man1" / "scoutfs-notify.1").read_text()
    assert "exit status" in page
    assert "\\-t S ran out and no record" in page


def test_write_error_is_said(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    res = subprocess.run(
        [sys.executable, "-m", "notifyd.manpage", str(tmp_path / "file" / "man1")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "file" in res.stderr


def test_forward_page_lists_its_metrics(mandir) -> None:
    page = (mandir / "man1" / "scoutfs-notify-forward.1").read_text()
    assert "\\-\\-metrics [ADDR:]PORT" in page
    for name in ("records_received_total", "records_lost_total", "backlog_records"):
        assert f"scoutfs_notify_forward_{name}" in page
