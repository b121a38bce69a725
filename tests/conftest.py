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


def snapshot_repo(dst):
    """This checkout's working tree as it is (tracked and untracked files, not ignored
    ones) committed as branch `main` of a new git repository at `dst`: what `kvmpy bench
    ab` and the tutorial's commands run in, so that their temporary worktrees never touch
    this checkout's repository. Returns `dst` (a pathlib.Path)."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    dst = Path(dst)
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = root / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(dst), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "test@example.com")
    git("config", "user.name", "test")
    git("add", "-A")
    git("commit", "-q", "-m", "snapshot of the tree under test")
    return dst


class RealModeGuest:
    """One real-mode vCPU on a bare KVM VM (no kvmpy Machine), for tests that drive the
    native core through a real KVM_RUN (tests/test_native_core.py, test_native_inject.py):
    64 KiB of RAM from 0, each of ``code``'s blobs at its address, CS = SS = 0, and the
    given RIP and RSP. ``close()`` releases the vCPU, the VM, the memory and /dev/kvm."""

    def __init__(self, code: dict[int, bytes], rip: int, rsp: int = 0) -> None:
        from kvmpy.kvm import Kvm
        from kvmpy.kvm import structs as s
        from kvmpy.memory import GuestMemory

        self.kvm = Kvm.open()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory(0x10000)
        for region in self.mem.regions:
            self.vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                           region.host_address)
        for gpa, blob in code.items():
            self.mem.write(gpa, blob)
        self.fd = self.vm.create_vcpu(0)
        sregs = self.fd.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        sregs.ss.base = sregs.ss.selector = 0
        self.fd.set_sregs(sregs)
        regs = s.KvmRegs()
        regs.rflags, regs.rip, regs.rsp = 0x2, rip, rsp
        self.fd.set_regs(regs)

    def close(self) -> None:
        self.fd.close()
        self.vm.close()
        self.mem.close()
        self.kvm.close()
