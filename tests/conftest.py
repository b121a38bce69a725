"""Shared test fixtures.

Tests marked `kvm` need /dev/kvm. Outside CI they skip with a clear reason when it is
missing or not usable; in CI (CI=true) that is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def kvm_unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None if it can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def require_kvm() -> None:
    """Skip (outside CI) or fail (in CI) the calling test when KVM is unusable."""
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true: KVM tests must run, but {reason}", pytrace=False)
    pytest.skip(f"needs KVM: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "kvm" in item.keywords:
        require_kvm()
