"""The package build makes the man pages and installs them where man finds them.

A wheel is built from this checkout the way pip builds one for ``pip install .``
(an isolated build environment holding only the build requirements: no
pyfuse3), installed into a throwaway venv, and man-db finds the pages there
from PATH alone, as it does for ``/usr/local/bin`` after ``pip install .`` as
root.  bootstrap.sh's link from ``/usr/local/share/man/man1`` is checked on a
directory of the test's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from notifyd.manpage import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
PAGES = sorted(f"{s}.1" for s in SCRIPTS)


def _man_env(path: str) -> dict[str, str]:
    """man with its search path from PATH alone (no MANPATH), at a fixed width."""
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT", "MANPAGER")}
    return {**env, "PATH": path, "MANWIDTH": "120", "PAGER": "cat"}


def _need_man() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian package man-db)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the checkout, so the build's build/ and egg-info never touch this one
    src = out / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "artifacts"
        ),
    )
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "-w", str(out), "--no-deps", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (found,) = out.glob("scoutfs_notify-*.whl")
    return found


def test_every_console_script_has_a_page() -> None:
    assert sorted(COMMANDS) == SCRIPTS


def test_the_wheel_holds_the_four_pages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        pages = sorted(n for n in z.namelist() if "/share/man/man1/" in n)
        assert [p.split("/")[0] for p in pages] == [wheel.name.split("-")[0] + "-0.1.0.data"] * 4
        assert sorted(Path(p).name for p in pages) == PAGES
        page = z.read(next(p for p in pages if p.endswith("/scoutfs-notify-shim.1"))).decode()
    # made from the shim's own parser, with the version the build names
    assert page.startswith('.TH SCOUTFS-NOTIFY-SHIM 1 "" "scoutfs-notify 0.1.0"')
    assert "\\-\\-new\\-dir\\-wait SECONDS" in page


def test_installed_wheel_pages_are_found_by_man_from_path(wheel: Path, tmp_path) -> None:
    _need_man()
    env_dir = tmp_path / "venv"
    venv.create(env_dir)  # no pip of its own: this one installs into it (--python)
    py = env_dir / "bin" / "python"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    env = _man_env(f"{env_dir / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin")
    for name in SCRIPTS:
        assert (env_dir / "bin" / name).exists()
        where = subprocess.run(
            ["man", "-w", name], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()
        assert where == str(env_dir / "share" / "man" / "man1" / f"{name}.1")
        shown = subprocess.run(
            ["man", "--warnings", "-l", where], capture_output=True, text=True, env=env
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stderr == "", shown.stderr
        assert shown.stdout.startswith(name.upper() + "(1)"), shown.stdout[:200]
        assert "SYNOPSIS" in shown.stdout
    # without the venv's bin on PATH man does not look there: PATH is what finds them
    elsewhere = subprocess.run(
        ["man", "-w", "scoutfs-notifyd"],
        capture_output=True,
        text=True,
        env=_man_env("/usr/sbin:/usr/bin:/sbin:/bin"),
    )
    assert str(env_dir) not in elsewhere.stdout


def test_parsers_render_without_pyfuse3(tmp_path) -> None:
    """What the isolated build does: make every page with pyfuse3 unimportable."""
    code = (
        "import sys\n"
        "sys.modules['pyfuse3'] = None\n"  # import pyfuse3 now raises ImportError
        "from notifyd.manpage import main\n"
        f"sys.exit(main(['--version', '9.9', {str(tmp_path)!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == PAGES
    assert '"scoutfs-notify 9.9"' in (tmp_path / "scoutfs-notifyd.1").read_text()


def _link_man_pages(venv_dir: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    """bootstrap.sh's own link_man_pages, run on directories of the test's."""
    script = (ROOT / "bootstrap.sh").read_text()
    start = script.index("link_man_pages() {")
    body = script[start : script.index("\n}\n", start) + 3]
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail\n{body}\nlink_man_pages "$1" "$2"', "x", venv_dir, dest],
        capture_output=True,
        text=True,
    )


def test_bootstrap_links_the_venv_pages_once(tmp_path) -> None:
    _need_man()
    venv_dir, top = tmp_path / "venv", tmp_path / "usr-local-share-man"
    made = venv_dir / "share" / "man" / "man1"
    made.mkdir(parents=True)
    for name in SCRIPTS:
        (made / f"{name}.1").write_text(f'.TH {name.upper()} 1 "" "x" "User Commands"\n')
    # a page an earlier bootstrap.sh wrote as a file of its own is replaced by the link
    (top / "man1").mkdir(parents=True)
    (top / "man1" / "scoutfs-notifyd.1").write_text("stale\n")
    res = _link_man_pages(venv_dir, top / "man1")
    assert res.returncode == 0, res.stderr
    for name in SCRIPTS:
        link = top / "man1" / f"{name}.1"
        assert link.is_symlink()
        assert link.resolve() == made / f"{name}.1"
    where = subprocess.run(
        ["man", "-w", "-M", str(top), "scoutfs-notifyd"],
        capture_output=True,
        text=True,
        env=_man_env("/usr/bin:/bin"),
        check=True,
    )
    # man names the file the link leads to
    assert where.stdout.strip() == str(made / "scoutfs-notifyd.1")
    # run twice (every bootstrap.sh run does): still one link each
    assert _link_man_pages(venv_dir, top / "man1").returncode == 0
    assert sorted(p.name for p in (top / "man1").iterdir()) == PAGES


def test_bootstrap_says_when_the_install_made_no_pages(tmp_path) -> None:
    res = _link_man_pages(tmp_path / "venv", tmp_path / "man1")
    assert res.returncode == 1
    assert "left no man pages" in res.stderr
