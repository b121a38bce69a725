"""kvm-unit-tests' own runner (`./run_tests.sh`) with kvmpy-qemu as its QEMU.

Runs only when KVMPY_KUT_DIR names a configured and built kvm-unit-tests tree (never
part of this repository). The wrapper script below stands in for the installed
`kvmpy-qemu` console script, so this checkout is what runs. Results are read from the
runner's own PASS/FAIL/SKIP lines and, for a test's subtests, from its log.

What is checked is what this machine allows (README, "kvm-unit-tests' own runner on
kvmpy"): the SMP and vmexit IPI/TSC-deadline tests pass; apic.flat (x2apic, xapic)
with a timeout long enough for kvm_pvm fails only subtests that also fail under
QEMU+KVM here or that depend on this host's timing; ioapic.flat fails only the subtest
the host cannot do; and no test ends in a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"^(PASS|FAIL|SKIP) (\S+)(?: (.*))?$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# apic.flat subtests kvmpy may fail here (README table): "multiple nmi", "pending nmi"
# and "tsc deadline timer" fail under QEMU+KVM on this host too; the TMCCT ones need a
# line of guest output between two timer reads to take well under 5 ms, and it takes
# about 4.5 ms here (3.5 ms of it in kvm_pvm's emulator), more when the shared cores
# are busy.
APIC_HOST_FAILURES = {
    "multiple nmi",
    "pending nmi",
    "tsc deadline timer",
    "TMCCT should not be reset to TMICT value",
    "TMCCT should be reset to the initial-count",
    "TMCCT should have a non-zero value",
}
APIC_MIN_PASSES = {"x2apic": 50, "xapic": 40}  # measured: 53-54 and 42 PASS lines
# ioapic.flat: the host misses the interrupt window after STI (README, "The I/O APIC").
IOAPIC_HOST_FAILURES = {"ioapic simultaneous edge interrupts"}


def kut_dir() -> Path:
    value = os.environ.get("KVMPY_KUT_DIR")
    if not value:
        pytest.skip("KVMPY_KUT_DIR is not set (point it at a built kvm-unit-tests tree)")
    path = Path(value)
    if not (path / "run_tests.sh").is_file() or not (path / "config.mak").is_file():
        pytest.skip(f"KVMPY_KUT_DIR={value} is not a configured kvm-unit-tests tree")
    return path


@pytest.fixture
def kvmpy_qemu(tmp_path: Path) -> Path:
    script = tmp_path / "kvmpy-qemu"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" '
                      '-m kvmpy.qemu_cli "$@"\n')
    script.chmod(0o755)
    return script


def run_tests(qemu: Path, tmp_path: Path, *tests: str, timeout: str | None = None,
              guest_env: str | None = None) -> tuple[dict[str, tuple[str, str]], Path]:
    """`./run_tests.sh TESTS` -> ({test: (PASS|FAIL|SKIP, rest of line)}, log dir).
    `guest_env`: extra lines for the guest's environment (the runner's
    KVM_UNIT_TESTS_ENV file, merged into the -initrd it builds)."""
    kut = kut_dir()
    logs = tmp_path / "logs"
    env = dict(os.environ, QEMU=str(qemu), unittest_log_dir=str(logs))
    for name in ("TIMEOUT", "KVM_UNIT_TESTS_ENV", "ACCEL", "MACHINE"):
        env.pop(name, None)
    if timeout:
        env["TIMEOUT"] = timeout
    if guest_env:
        env_file = tmp_path / "guest.env"
        env_file.write_text(guest_env)
        env["KVM_UNIT_TESTS_ENV"] = str(env_file)
    r = subprocess.run(["./run_tests.sh", *tests], cwd=kut, env=env, capture_output=True,
                       text=True, timeout=3600)
    results = {}
    for line in ANSI.sub("", r.stdout).splitlines():
        m = RESULT.match(line.strip())
        if m:
            results[m.group(2)] = (m.group(1), m.group(3) or "")
    assert set(results) == set(tests), r.stdout + r.stderr
    return results, logs


def subtests(logs: Path, test: str, verdict: str) -> list[str]:
    """The subtests the log reports with `verdict` (PASS/FAIL/SKIP), one per line (a
    name can repeat: apic.flat reports some checks twice)."""
    text = (logs / f"{test}.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    return [m.strip() for m in re.findall(rf"^{verdict}: (.*)$", text, re.M)]


def test_smp_and_vmexit_tests_pass(kvmpy_qemu: Path, tmp_path: Path) -> None:
    tests = ("smptest", "smptest3", "vmexit_ipi", "vmexit_ipi_halt", "vmexit_tscdeadline",
             "vmexit_tscdeadline_immed")
    results, logs = run_tests(kvmpy_qemu, tmp_path, *tests)
    assert {t: v for t, (v, _) in results.items()} == dict.fromkeys(tests, "PASS"), results
    assert subtests(logs, "smptest3", "PASS") == ["IPI to each CPU"]


@pytest.mark.parametrize("test", ["x2apic", "xapic"])
def test_apic_fails_only_what_the_host_fails(kvmpy_qemu: Path, tmp_path: Path,
                                             test: str) -> None:
    # TEST_DEVICE=0: apic.flat's PV-IPI subtest (vmmcall, KVM_HC_SEND_IPI) never returns
    # on this host, under QEMU+KVM too (README); without it the test times out there.
    results, logs = run_tests(kvmpy_qemu, tmp_path, test, timeout="900s",
                              guest_env="TEST_DEVICE=0\n")
    failed = set(subtests(logs, test, "FAIL"))
    passed = subtests(logs, test, "PASS")
    assert failed <= APIC_HOST_FAILURES, failed
    assert results[test][0] == ("PASS" if not failed else "FAIL"), results
    assert len(passed) >= APIC_MIN_PASSES[test], passed
    if test == "xapic":  # -cpu qemu64,-x2apic: the guest sees no x2APIC, and gets #GP
        assert "enable unsupported x2apic" in passed
        assert "self_ipi_x2apic: Local apic enabled in x2APIC mode" not in passed
    else:
        assert "x2apic enabled to invalid state" in passed


def test_ioapic_fails_only_what_the_host_fails(kvmpy_qemu: Path, tmp_path: Path) -> None:
    results, logs = run_tests(kvmpy_qemu, tmp_path, "ioapic")
    failed = set(subtests(logs, "ioapic", "FAIL"))
    assert failed <= IOAPIC_HOST_FAILURES, failed
    assert results["ioapic"][0] == ("PASS" if not failed else "FAIL"), results
    assert "timeout" not in results["ioapic"][1]
    assert len(subtests(logs, "ioapic", "PASS")) >= 20


def test_realmode_lam_rdpru_pass_and_asyncpf_skips(kvmpy_qemu: Path, tmp_path: Path) -> None:
    # realmode: its multiboot info after the kernel and its `sti; hlt` woken by the PIT
    # through the 8259; lam: pc-testdev's I/O RAM; rdpru: #UD for no instruction;
    # asyncpf: KVM's async PF needs its in-kernel APIC, so kvmpy does not offer it.
    results, _ = run_tests(kvmpy_qemu, tmp_path, "realmode", "lam", "rdpru", "asyncpf")
    assert {t: v for t, (v, _) in results.items()} == {
        "realmode": "PASS", "lam": "PASS", "rdpru": "PASS", "asyncpf": "SKIP"}, results


def test_s3_and_the_pm_timer_through_the_runner(kvmpy_qemu: Path, tmp_path: Path) -> None:
    """s3.flat finds the FACS and FADT, sleeps through PM1a_CNT and is woken by the RTC
    alarm into its real-mode waking vector (which exits 0: PASS); vmexit's
    inl_from_pmtimer reads the PM timer port the FADT gives (QEMU's 0x608), not the
    0xcccccccc a missing FADT left it."""
    results, logs = run_tests(kvmpy_qemu, tmp_path, "s3", "vmexit_inl_pmtimer")
    assert {t: v for t, (v, _) in results.items()} == {"s3": "PASS",
                                                        "vmexit_inl_pmtimer": "PASS"}
    s3 = (logs / "s3.log").read_text(errors="replace")
    assert "FACS is at 0xf0040" in s3 and "PM1a event registers at 600" in s3
    pmtimer = (logs / "vmexit_inl_pmtimer.log").read_text(errors="replace")
    assert "PM timer port is 608" in pmtimer
