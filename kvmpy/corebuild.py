"""Is the native exit core (`kvmpy._core`) older than its sources?

A developer who edits kvmpy/native/*.c and forgets to rebuild would measure the old
core. `kvmpy run` and `kvmpy bench` warn in one line; the rebuild is
`python setup.py build_ext --inplace` (or `bash scripts/setup.sh`).
"""

from __future__ import annotations

from pathlib import Path

from kvmpy import _core

NATIVE_DIR = Path(__file__).parent / "native"


def stale_sources() -> list[str]:
    """Native sources modified after the core was built (none in an installed copy,
    which has no sources)."""
    built = Path(_core.__file__).stat().st_mtime
    return sorted(p.name for p in NATIVE_DIR.glob("*.[ch]") if p.stat().st_mtime > built)


def warning() -> str | None:
    """The one-line warning, or None when the core is current."""
    stale = stale_sources()
    if not stale:
        return None
    return (f"kvmpy: warning: the native core is older than kvmpy/native/{stale[0]}"
            f"{' and others' if len(stale) > 1 else ''}; rebuild it with "
            "`python setup.py build_ext --inplace`")
