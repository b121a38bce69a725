"""Bundled guests by name: `kvmpy run NAME`, `kvmpy guests`, and the list in --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.guestbuild import build_guest, guest_names
from kvmpy.guests import CATALOG, example_command, guest_list_text, resolve_image

ROOT = Path(__file__).resolve().parent.parent


def kvmpy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_every_bundled_guest_has_a_description_and_no_stale_entries() -> None:
    assert sorted(CATALOG) == guest_names()
    for name, info in CATALOG.items():
        assert info.description and "\n" not in info.description, name
        assert info.cpus >= 1


def test_example_command_spells_cpus_and_append() -> None:
    assert example_command("hello") == "kvmpy run hello"
    assert example_command("ipi_stress") == 'kvmpy run ipi_stress --cpus 4 --append "ipis=4000"'


def test_guests_command_lists_every_guest_with_a_command() -> None:
    r = kvmpy("guests")
    assert r.returncode == 0, r.stderr
    for name in guest_names():
        assert f"\n{name} " in "\n" + r.stdout, name
        assert f"kvmpy run {name}" in r.stdout


def test_run_help_lists_the_bundled_guests() -> None:
    r = kvmpy("run", "--help")
    assert r.returncode == 0
    assert "bundled guests" in r.stdout
    for name in guest_names():
        assert f"  {name} " in r.stdout, name
    assert guest_list_text().splitlines()[0] in r.stdout


def test_neither_file_nor_guest_is_one_line_and_status_2(tmp_path: Path) -> None:
    r = kvmpy("run", "no_such_guest", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == ("kvmpy: image no_such_guest: no such file, nor a bundled guest "
                                "(`kvmpy guests` lists them)")
    assert r.stdout == ""


def test_resolve_image_prefers_an_existing_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hello").write_bytes(b"not an image")
    assert resolve_image("hello") == (Path("hello"), False)
    path, bundled = resolve_image("exitcode")
    assert bundled and path == build_guest("exitcode")


@pytest.mark.kvm
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_run_a_bundled_guest_by_name(tmp_path: Path) -> None:
    r = kvmpy("run", "hello", "--append", "x=1", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "hello from kvmpy" in r.stdout and "x=1" in r.stdout
    r = kvmpy("run", "ipi_stress", "--cpus", "4", "--append", "ipis=400", cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # the guest's exit code 0, QEMU's (0 << 1) | 1
    assert "ipi_stress: lost=0 invented=0" in r.stdout
    assert "ipi_stress: ok" in r.stdout


@pytest.mark.kvm
def test_a_file_named_like_a_guest_wins(tmp_path: Path) -> None:
    shutil.copy(build_guest("exitcode"), tmp_path / "hello")
    r = kvmpy("run", "hello", "--append", "code=9", cwd=tmp_path)
    assert r.returncode == (9 << 1) | 1, r.stderr
