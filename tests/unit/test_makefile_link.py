"""The Makefile's `natgwd` link on PATH, made in a scratch checkout (a copy of the Makefile
with a venv that is up to date), so that the machine's own link is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def checkout(tmp_path: Path, name: str) -> Path:
    """A directory whose `make venv` only (re)links: the venv is already installed."""
    where = tmp_path / name
    (where / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", where / "Makefile")
    (where / "pyproject.toml").touch()
    (where / ".venv" / "bin" / "natgwd").touch()
    installed = where / ".venv" / ".installed"
    installed.touch()
    stamp = (where / "pyproject.toml").stat().st_mtime - 10
    os.utime(where / "pyproject.toml", (stamp, stamp))
    return where


def make(where: Path, target: str, link: Path) -> str:
    # APT_PACKAGES= : `deps` has nothing to check (and never installs anything here).
    done = subprocess.run(
        ["make", "-s", "-C", str(where), target, f"BIN_LINK={link}", "APT_PACKAGES="],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_link_made_kept_from_another_checkout_and_replaced_once_dangling(tmp_path: Path) -> None:
    link = tmp_path / "natgwd"
    first, second = checkout(tmp_path, "first"), checkout(tmp_path, "second")
    assert make(first, "venv", link) == f"linked {link} -> {first}/.venv/bin/natgwd\n"
    assert make(first, "venv", link) == ""

    # Another clone does not move a link that works.
    said = make(second, "venv", link)
    assert said.startswith(f"{link} links another checkout ({first}/.venv/bin/natgwd): left alone;")
    assert os.readlink(link) == f"{first}/.venv/bin/natgwd"

    # The first checkout is gone: the link dangles, and the next `make venv` replaces it.
    shutil.rmtree(first)
    assert make(second, "venv", link) == (
        f"{link} linked {first}/.venv/bin/natgwd, which is gone: relinked\nlinked {link} -> {second}/.venv/bin/natgwd\n"
    )
    assert os.readlink(link) == f"{second}/.venv/bin/natgwd"


def test_clean_removes_only_its_own_link(tmp_path: Path) -> None:
    link = tmp_path / "natgwd"
    first, second = checkout(tmp_path, "first"), checkout(tmp_path, "second")
    make(first, "venv", link)
    make(second, "clean", link)
    assert os.readlink(link) == f"{first}/.venv/bin/natgwd"
    assert make(first, "clean", link).startswith(f"removed {link} (linked this checkout's natgwd)\n")
    assert not link.is_symlink()
    assert not (first / ".venv").exists()
