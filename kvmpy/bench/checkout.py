"""The two sides of `kvmpy bench ab`: a git ref built in its own venv, and the working tree.

The base: `git worktree add --detach` of the ref's commit into a temporary directory,
a virtual environment made with `--system-site-packages` (so the dependencies already
installed here are used and nothing is fetched that is not missing), and `pip install
CHECKOUT` into it: a plain, non-editable install, which builds whatever the ref's build
builds (a C extension too). pip's build isolation needs setuptools from an index; when
that fails, the install is retried with `--no-build-isolation`. Each side runs as
`PYTHON -P -m kvmpy run ...` from a neutral directory (`-P`: the current directory is not
put on sys.path), and before the first run each side proves which kvmpy it imports.

The working tree is run from the current checkout as it is, uncommitted changes
included: its root on PYTHONPATH. If it has a setup.py (a native extension), that is
built in place first (`setup.py build_ext --inplace`, what an editable install does), so
the C code measured is the C code in the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvmpy.errors import KvmpyError

GIT_TIMEOUT = 120
BUILD_TIMEOUT = 900


class CheckoutError(KvmpyError):
    """Not a git checkout of kvmpy, a bad ref, or a side that does not build or import."""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT)
    except FileNotFoundError:
        raise CheckoutError("bench ab needs git, and git is not installed") from None


def repo_root(start: Path) -> Path:
    """The top of the git checkout holding `start`, which must be a kvmpy checkout."""
    r = _git(start, "rev-parse", "--show-toplevel")
    if r.returncode != 0:
        raise CheckoutError(f"{start} is not inside a git checkout (run bench ab from a kvmpy "
                            "clone)")
    root = Path(r.stdout.strip())
    if not (root / "kvmpy" / "__init__.py").is_file() or not (root / "pyproject.toml").is_file():
        raise CheckoutError(f"{root} is not a kvmpy checkout (no kvmpy/ package and "
                            "pyproject.toml at its top)")
    return root


def resolve_ref(root: Path, ref: str) -> str:
    """The full commit hash `ref` names in the repository at `root`."""
    if not ref or ref.startswith("-"):
        raise CheckoutError(f"bad ref {ref!r}: name a branch, tag or commit")
    r = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if r.returncode != 0:
        raise CheckoutError(f"bad ref {ref!r}: no such commit in {root}")
    return r.stdout.strip()


def changed_files(root: Path) -> list[str]:
    """Files of the working tree that differ from HEAD (tracked and untracked, not ignored)."""
    r = _git(root, "status", "--porcelain", "--untracked-files=normal")
    return [line[3:] for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 \
        else []


def _log_tail(text: str) -> str:
    """The most telling line of a failed build's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("error:", "Error:", "ERROR:", "error"):
        hits = [ln for ln in lines if marker in ln and not ln.startswith("note:")
                and "subprocess-exited-with-error" not in ln]
        if hits:
            return hits[-1] if marker == "ERROR:" else hits[0]
    return lines[-1] if lines else "no output"


def which_kvmpy(python: str, env: dict[str, str], cwd: Path) -> Path:
    """The kvmpy package directory `python -P` imports with this environment."""
    try:
        r = subprocess.run([python, "-P", "-c", "import kvmpy; print(kvmpy.__file__)"],
                           capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise CheckoutError(f"cannot run {python}: {e}") from None
    if r.returncode != 0:
        raise CheckoutError(f"{python} cannot import kvmpy: {_log_tail(r.stderr)}")
    return Path(r.stdout.strip()).resolve().parent


@dataclass
class Side:
    """How to run one side: its Python, its environment, and what it is."""

    name: str  # "base" or "work"
    python: str
    env: dict[str, str]
    describe: str  # e.g. "main = 1a2b3c4" or "/path/to/clone (2 files changed)"
    info: dict[str, object] = field(default_factory=dict)  # for --json


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def working_tree(root: Path, neutral: Path) -> Side:
    """The working tree as it is; a native extension in it is built in place first."""
    if (root / "setup.py").is_file():
        try:
            r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                               cwd=root, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckoutError("the working tree's build_ext timed out") from None
        if r.returncode != 0:
            raise CheckoutError("the working tree does not build: "
                                + _log_tail(r.stderr + r.stdout))
    env = _clean_env()
    env["PYTHONPATH"] = str(root)
    found = which_kvmpy(sys.executable, env, neutral)
    if found != (root / "kvmpy").resolve():
        raise CheckoutError(f"the working tree's kvmpy is shadowed by {found}")
    changed = changed_files(root)
    head = _git(root, "rev-parse", "HEAD").stdout.strip()
    what = f"{root} at {head[:10]}" + (f" + uncommitted changes in {len(changed)} file"
                                       f"{'s' if len(changed) != 1 else ''}" if changed else "")
    return Side("work", sys.executable, env, what,
                {"path": str(root), "head": head, "changed_files": changed})


class BaseBuild:
    """`with BaseBuild(root, ref, tmp) as side:` the ref checked out, installed, runnable.

    The worktree is removed on exit; the venv lives in `tmp` (the caller removes it). A
    failed build leaves its full log in the system temporary directory and says where.
    """

    def __init__(self, root: Path, ref: str, tmp: Path) -> None:
        self.root = root
        self.ref = ref
        self.tmp = tmp
        self.commit = resolve_ref(root, ref)
        self.checkout = tmp / "base"
        self.venv = tmp / "venv"
        self._added = False

    def __enter__(self) -> Side:
        try:
            self._add_worktree()
            python = self._install()
            env = _clean_env()
            found = which_kvmpy(python, env, self.tmp)
            if not found.is_relative_to(self.venv.resolve()):
                raise CheckoutError(f"base {self.ref} ({self.commit[:10]}) was installed, but "
                                    f"its Python imports kvmpy from {found}")
        except BaseException:
            self._remove_worktree()
            raise
        return Side("base", python, env, f"{self.ref} = {self.commit[:10]}",
                    {"ref": self.ref, "commit": self.commit})

    def __exit__(self, *exc: object) -> None:
        self._remove_worktree()

    def _add_worktree(self) -> None:
        r = _git(self.root, "worktree", "add", "--detach", "--quiet", str(self.checkout),
                 self.commit)
        if r.returncode != 0:
            raise CheckoutError(f"cannot check out {self.ref}: {_log_tail(r.stderr)}")
        self._added = True

    def _remove_worktree(self) -> None:
        if not self._added:
            return
        self._added = False
        r = _git(self.root, "worktree", "remove", "--force", str(self.checkout))
        if r.returncode != 0:
            shutil.rmtree(self.checkout, ignore_errors=True)
            _git(self.root, "worktree", "prune")

    def _install(self) -> str:
        """A venv with the checkout pip-installed into it; returns its Python."""
        python = str(self.venv / "bin" / "python")
        outer_pip = _pip_version() >= (22, 3)  # pip --python: no pip inside the venv
        venv = [sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)]
        made = subprocess.run(venv + (["--without-pip"] if outer_pip else []),
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise CheckoutError(f"cannot make a venv: {_log_tail(made.stderr)}")
        pip = ([sys.executable, "-m", "pip", "--python", python] if outer_pip
               else [python, "-m", "pip"])
        pip += ["install", "--disable-pip-version-check", "--no-input", str(self.checkout)]
        log, first = [], ""
        for extra in ([], ["--no-build-isolation"]):
            try:
                r = subprocess.run(pip + extra, capture_output=True, text=True,
                                   timeout=BUILD_TIMEOUT, cwd=self.tmp)
            except subprocess.TimeoutExpired:
                raise CheckoutError(f"base {self.ref}: pip install timed out") from None
            log.append(f"$ {' '.join(pip + extra)}\n{r.stdout}{r.stderr}")
            if r.returncode == 0:
                return python
            first = first or _log_tail(r.stderr + r.stdout)
        path = Path(tempfile.gettempdir()) / f"kvmpy-bench-ab-{self.commit[:10]}.log"
        path.write_text("\n".join(log))
        raise CheckoutError(f"base {self.ref} ({self.commit[:10]}) does not build: {first} "
                            f"(pip's log: {path})")


def _pip_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("pip").split(".")[:2])
    except Exception:  # noqa: BLE001 - no pip metadata: assume an old one
        return (0,)
