"""The package build makes the commands' man pages and installs them as data files.

Everything else about the package is in pyproject.toml.  ``build`` gains one
step, ``build_man``: ``python -m notifyd.manpage`` renders each console
script's own ``build_parser()`` into ``build/man/man1``, and the install puts
the pages in ``<prefix>/share/man/man1`` (``/usr/local/share/man/man1`` for
``pip install .`` as root, ``.venv/share/man/man1`` in a venv), where man-db
looks for the pages of the commands in ``<prefix>/bin``.  The parsers import
trio, nats-py and prometheus_client (pyproject.toml's build requirements),
never pyfuse3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.build import build
from setuptools.command.editable_wheel import editable_wheel

# distutils' install_data as setuptools provides it (setuptools has no subclass of its own)
install_data = Distribution().get_command_class("install_data")

HERE = Path(__file__).resolve().parent
MAN_SECTION = "share/man/man1"


class build_man(Command):
    description = "make the man pages of the console scripts from their argparse parsers"
    user_options: list[tuple[str, str | None, str]] = []  # noqa: RUF012 (distutils' API)

    def initialize_options(self) -> None:
        self.build_base: str | None = None
        self.pages: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_base", "build_base"))

    def run(self) -> None:
        assert self.build_base is not None
        out = Path(self.build_base) / "man" / "man1"
        env = dict(os.environ)
        # the source tree's modules, whatever is installed (the build's own environment
        # holds the build requirements, reached through PYTHONPATH under pip)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        version = self.distribution.get_version()
        cmd = [sys.executable, "-m", "notifyd.manpage", "--version", version, str(out)]
        res = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"build_man: {' '.join(cmd)} failed:\n{res.stdout}{res.stderr}")
        self.pages = sorted(str(p) for p in out.glob("*.1"))
        for page in self.pages:
            self.announce(f"made {page}", level=2)

    def get_outputs(self) -> list[str]:
        return self.pages


class build_with_man(build):
    sub_commands = [*build.sub_commands, ("build_man", None)]  # noqa: RUF012


class install_data_with_man(install_data):
    """Installs the pages build_man made, in <prefix>/share/man/man1.

    The pages are named here, when they exist, not in setup(): install_data
    takes its list when it is created, which the editable build (pip install
    -e, which runs no ``build``) does before anything is built.
    """

    def run(self) -> None:
        self.run_command("build_man")
        pages = self.get_finalized_command("build_man").get_outputs()
        self.data_files = [(MAN_SECTION, pages)]
        super().run()


class editable_wheel_with_man(editable_wheel):
    """``pip install -e``: the editable wheel carries the pages too.

    setuptools asks the distribution ``has_data()`` before installing data files
    into an editable wheel, a method Distribution does not have (it has
    ``has_data_files()``), so without this an editable install has no pages.
    """

    def _run_install(self, category: str) -> None:
        if category == "data":
            self.run_command("install_data")
        else:
            super()._run_install(category)


setup(
    cmdclass={
        "build": build_with_man,
        "build_man": build_man,
        "install_data": install_data_with_man,
        "editable_wheel": editable_wheel_with_man,
    },
    # not empty, so that the installs run install_data; it names the pages itself
    data_files=[(MAN_SECTION, [])],
)
