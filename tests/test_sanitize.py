"""scripts/sanitize.sh: the native core built with AddressSanitizer and
UndefinedBehaviorSanitizer, its tests and a few real-KVM guest tests run against that
build, clean. About 1.5-3 minutes on this machine: marked slow."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.kvm
def test_native_core_is_clean_under_asan_and_ubsan() -> None:
    r = subprocess.run(["bash", str(REPO / "scripts" / "sanitize.sh")], cwd=REPO,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "sanitize: clean" in r.stdout
