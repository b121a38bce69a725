"""`kvmpy bench ab`: figures from consoles, one-line errors, and a small real A/B run.

The runs happen in a scratch repository holding this tree (conftest.snapshot_repo), so
the temporary worktrees bench ab adds and removes never touch this checkout's repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.bench.ab import figure_name, figure_parser
from kvmpy.cli import main

ROOT = Path(__file__).resolve().parent.parent
needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs git and a git checkout of kvmpy")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout


def clone(tmp: Path) -> Path:
    """This tree, committed as `main` of a scratch repository (conftest.snapshot_repo)."""
    from conftest import snapshot_repo

    return snapshot_repo(tmp / "repo")


def bench_ab(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """This tree's `kvmpy bench ab` (-P: not the clone's kvmpy) run inside `cwd`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-P", "-m", "kvmpy", "bench", "ab", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def worktrees(repo: Path) -> int:
    return git(repo, "worktree", "list").count("\n")


# ---------------------------------------------------------------- figures


def test_figure_names_and_values() -> None:
    assert figure_name(r"burst_send (\d+)") == "burst_send"
    assert figure_name(r"^cycles=(\d+)") == "cycles"
    assert figure_name(r"(\d+) us") == r"(\d+) us"
    parse = figure_parser([r"burst_send (\d+)", r"^lat (?P<name>\w+) (?P<value>[\d.]+)$"])
    out = parse("burst_send 10\nlat a 1.5\nburst_send 30\nlat b 2\nlat a 2.5\n", 1, "")
    assert out.ok and out.message == ""
    assert out.values == {"burst_send": [10.0, 30.0], "a": [1.5, 2.5], "b": [2.0]}


def test_figure_problems_make_a_failed_run() -> None:
    parse = figure_parser([r"x=(\w+)", r"y=(\d+)"])
    out = parse("x=abc\n", 3, "")
    assert not out.ok
    assert out.message == "'x=(\\w+)' matched 'abc', not a number; no line matches 'y=(\\d+)'"
    out = figure_parser([r"x=(\d+)"])("x=5\n", 4, "kvmpy: vCPU 0: triple fault\n")
    assert not out.ok and out.values == {"x": [5.0]}
    assert out.message == "exit status 4 (triple fault): kvmpy: vCPU 0: triple fault"


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("argv, message", [
    (["--base", "HEAD"], "needs exactly one benchmark"),
    (["--base", "HEAD", "--ipi-bench", "5", "--guest", "hello"], "needs exactly one benchmark"),
    (["--base", "HEAD", "--guest", "hello"], "--guest needs --figure REGEX"),
    (["--base", "HEAD", "--guest", "hello", "--figure", "x"], "needs a group around the number"),
    (["--base", "HEAD", "--guest", "hello", "--figure", "x(("], "not a regular expression"),
    (["--base", "HEAD", "--guest", "no_such_guest", "--figure", "x(\\d)"],
     "image no_such_guest: no such file, nor a bundled guest"),
    (["--base", "HEAD", "--ipi-bench", "5", "--tests", "nosuch"], "ipi_bench has no test"),
    (["--base", "HEAD", "--ipi-bench", "5", "--figure", "x(\\d)"], "go with --guest"),
    (["--base", "HEAD", "--kut-dir", "/nonexistent"], "vmexit.flat: no such file"),
    (["--base", "HEAD", "--ipi-bench", "5", "--runs", "1"], "--runs must be at least 2"),
    (["--base", "HEAD", "--ipi-bench", "5", "--run-args", "'"], "--run-args"),
    (["--base", "no-such-ref-x", "--ipi-bench", "5"], "bad ref 'no-such-ref-x': no such commit"),
])
@needs_git
def test_bad_command_lines_give_one_line_and_status_2(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["bench", "ab", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_outside_a_git_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "ab", "--base", "main", "--ipi-bench", "5"]) == 2
    assert capsys.readouterr().err == (f"kvmpy: {tmp_path} is not inside a git checkout "
                                       "(run bench ab from a kvmpy clone)\n")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_git_checkout_that_is_not_kvmpy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "ab", "--base", "HEAD", "--ipi-bench", "5"]) == 2
    assert "is not a kvmpy checkout" in capsys.readouterr().err


@pytest.mark.kvm
@needs_git
def test_a_guest_that_prints_no_figure_stops_before_the_base_is_built(tmp_path: Path) -> None:
    repo = clone(tmp_path)
    r = bench_ab(repo, "--base", "HEAD", "--guest", "hello", "--append", "x=5",
                 "--figure", r"y=(\d+)")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("kvmpy: hello x=5 printed no figure under the working tree: wanted a "
                        "line matching 'y=(\\d+)'; no line matches 'y=(\\d+)'\n")
    assert worktrees(repo) == 1


@pytest.mark.kvm
@needs_git
def test_a_base_that_does_not_build(tmp_path: Path) -> None:
    repo = clone(tmp_path)
    with open(repo / "pyproject.toml", "a") as f:
        f.write("[project\n")  # a TOML error: fails in pip before any download
    git(repo, "commit", "-qam", "broken build")
    broken = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    r = bench_ab(repo, "--base", broken, "--guest", "hello", "--append", "x=5",
                 "--figure", r"x=(\d+)")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"kvmpy: base {broken} ({broken[:10]}) does not build: ")
    assert "TOML" in line and "pip's log: " in line
    Path(line.split("pip's log: ")[1].rstrip(")")).unlink()
    assert worktrees(repo) == 1


# ---------------------------------------------------------------- a real run


@pytest.mark.kvm
@needs_git
def test_ab_run_against_head_with_an_uncommitted_change(tmp_path: Path) -> None:
    """base = the clone's HEAD, work = the same plus an untracked file: three rotated
    rounds of ipi_coalesce, JSON with every run median, the verdict and a plot."""
    repo = clone(tmp_path)
    (repo / "notes.txt").write_text("an uncommitted change\n")
    head = git(repo, "rev-parse", "HEAD").strip()
    plot = tmp_path / "ab.png"
    r = bench_ab(repo, "--base", "HEAD", "--guest", "ipi_coalesce", "--append", "n=8",
                 "--figure", r"burst_send (\d+)", "--unit", "cycles", "--runs", "3",
                 "--resamples", "500", "--json", "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kind"] == "ab" and data["configs"] == ["base", "work"]
    assert data["order"] == ["base", "work", "work", "base", "base", "work"]
    assert data["base"]["commit"] == head and data["base"]["ref"] == "HEAD"
    assert data["work"]["path"] == str(repo) and data["work"]["changed_files"] == ["notes.txt"]
    assert data["unit"] == "cycles" and data["tsc_hz"] > 0 and data["failures"] == []
    test = data["tests"]["burst_send"]
    for side in ("base", "work"):
        medians = test["configs"][side]["run_medians"]
        assert len(medians) == 3 and all(m > 0 for m in medians)
        assert test["configs"][side]["median_us"] > 0
    ratio = test["ratios"]["work/base"]
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert ratio["verdict"].startswith(("the change is faster by", "the change is slower by",
                                        "no significant difference"))
    assert ratio["verdict"].endswith("(under 5 runs a side: not reliable)")
    assert plot.stat().st_size > 1000
    assert worktrees(repo) == 1  # the base's worktree is gone
