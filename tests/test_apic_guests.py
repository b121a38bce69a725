"""Guest-side local APIC tests: the apic_* guests in guest/ run through `kvmpy run`.

Each guest prints what it counted next to what it expected and exits with 0 only if
they agree; these tests check the exit status AND the printed counts against their own
tables, so a guest that miscounts or skips a case fails here too. Also runs
kvm-unit-tests' smptest.flat and apic.flat when KVMPY_KUT_DIR names a built tree.

A guest exit code `c` written to port 0xf4 makes `kvmpy run` exit with (c << 1) | 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.guestbuild import build_guest

pytestmark = pytest.mark.kvm

TIMEOUT = 120
CPUS = 4
GUEST_OK = (0 << 1) | 1  # the guest wrote 0 to the debug-exit port
MODES = ["xapic", "x2apic"]


def kvmpy_run(image: str | Path, *args: str, timeout: float = TIMEOUT
              ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(image), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def run_guest(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = kvmpy_run(build_guest(name), "--cpus", str(CPUS), *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def sync_regs_events() -> bool:
    """Does this KVM store and set vCPU events in kvm_run (KVM_CAP_SYNC_REGS)?"""
    from kvmpy.kvm import Kvm
    from kvmpy.kvm import ioctls as k

    kvm = Kvm.open()
    try:
        return bool(kvm.check_extension(k.KVM_CAP_SYNC_REGS) & k.KVM_SYNC_X86_EVENTS)
    finally:
        kvm.close()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split()]


# ---------------------------------------------------------------- apic_smp


@pytest.mark.parametrize("mode", MODES)
def test_apic_smp_starts_every_cpu_with_init_sipi_sipi(mode: str) -> None:
    r = run_guest("apic_smp", "--append", f"mode={mode}")
    assert r.returncode == GUEST_OK, (r.stdout, r.stderr)
    assert f"bsp apic id 0 mode {mode}, {CPUS} cpus available" in r.stdout
    aps = re.findall(r"^apic_smp: cpu (\d+) apic id (\d+) mode (\S+)$", r.stdout, re.M)
    assert sorted(int(cpu) for cpu, _, _ in aps) == list(range(1, CPUS))
    assert sorted(int(apic_id) for _, apic_id, _ in aps) == list(range(1, CPUS))
    assert {m for _, _, m in aps} == {mode}
    assert f"apic_smp: expected {CPUS} online {CPUS}" in r.stdout


def test_apic_smp_starts_only_the_cpus_asked_for() -> None:
    # Fewer CPUs than the VM has: INIT-SIPI-SIPI per APIC ID, not to all-excluding-self.
    r = run_guest("apic_smp", "--append", "cpus=2 mode=x2apic")
    assert r.returncode == GUEST_OK, (r.stdout, r.stderr)
    aps = re.findall(r"^apic_smp: cpu (\d+) apic id (\d+)", r.stdout, re.M)
    assert aps == [("1", "1")]
    assert "apic_smp: expected 2 online 2" in r.stdout


# ---------------------------------------------------------------- apic_ipi

# Per-CPU receive counts with 4 CPUs (index = the order CPUs came online, 0 = BSP).
IPI_COUNTS = {
    "phys": [4, 4, 4, 4],      # every CPU sends one to every CPU
    "logical": [2, 3, 2, 3],   # each alone, then all, then the odd-numbered ones
    "self": [1, 1, 1, 1],
    "allinc": [2, 2, 2, 2],    # from CPU 0 and from CPU 1
    "allbut": [1, 1, 2, 2],    # from CPU 0 and from CPU 1
    "bcast": [2, 2, 2, 2],     # physical and logical broadcast
    "nmi": [1, 1, 1, 1],
}
LOWEST_PRIORITY_SENDS = 8


@pytest.mark.parametrize("fastpath", ["native", "python", "off"])
@pytest.mark.parametrize("mode", MODES)
def test_apic_ipi_exact_counts(mode: str, fastpath: str) -> None:
    args = ["--append", f"mode={mode}", "--fastpath", fastpath, "--stat"]
    r = run_guest("apic_ipi", *args)
    out = r.stdout
    assert r.returncode == GUEST_OK, (out, r.stderr)
    # Every interrupt was queued for its entry once, by KVM_RUN itself where KVM offers
    # KVM_CAP_SYNC_REGS (vcpu_loop.c kvm_queue_interrupt), in every setting.
    injected = re.search(r"^Interrupts injected: (\d+), (\d+) by KVM_RUN itself "
                         r"\(kvm_run.s.regs\), (\d+) by KVM_INTERRUPT$", out + r.stderr, re.M)
    assert injected is not None, r.stderr
    total, by_run, by_ioctl = map(int, injected.groups())
    assert total == by_run + by_ioctl >= sum(map(sum, IPI_COUNTS.values()))
    if sync_regs_events():
        assert by_run > 0
    assert f"apic_ipi: mode {mode}, {CPUS} cpus" in out
    rows = re.findall(r"^apic_ipi: vector 0x[0-9a-f]+ (\w+): got ([\d ]+) expected ([\d ]+)$",
                      out, re.M)
    got = {name: ints(g) for name, g, _ in rows}
    want = dict(IPI_COUNTS, **({"selfmsr": [1, 1, 1, 1]} if mode == "x2apic" else {}))
    assert got == want
    assert all(ints(g) == ints(e) for _, g, e in rows)

    lowest = re.search(r"^apic_ipi: vector 0x46 lowest: got ([\d ]+) total (\d+) "
                       r"expected total (\d+)$", out, re.M)
    assert lowest is not None, out
    per_cpu = ints(lowest.group(1))
    assert len(per_cpu) == CPUS and sum(per_cpu) == LOWEST_PRIORITY_SENDS
    assert int(lowest.group(2)) == LOWEST_PRIORITY_SENDS

    if mode == "x2apic":  # cluster-model LDR derived from the x2APIC ID
        ldrs = re.findall(r"x2apic id (\d+) ldr ([0-9a-f]+) expected", out)
        assert len(ldrs) == CPUS
        assert all(int(ldr, 16) == 1 << int(i) for i, ldr in ldrs)
    assert "FAIL" not in out
    assert out.rstrip().endswith("apic_ipi: ok")


# ---------------------------------------------------------------- apic_gp

GP = 13
GP_CASES = {
    **{f"icr-bit-{b}": GP for b in (13, 16, 17, *range(20, 32))},
    "icr-valid": 0,
    "icr-bit-12-ignored": 0,
    "icr2-read": GP,
    "icr2-write": GP,
    "dfr-read": GP,
    "dfr-write": GP,
    "self-ipi-read": GP,
    "eoi-read": GP,
    "esr-write-nonzero": GP,
    "esr-write-zero": 0,
    "eoi-write-nonzero": GP,
    "eoi-write-zero": 0,
    "version-write": GP,
    "ldr-write": GP,
    "id-write": GP,
    "ppr-write": GP,
    "timer-current-write": GP,
    "tpr-upper-bits": GP,
    "svr-upper-bits": GP,
    "lvt-timer-upper-bits": GP,
    "self-ipi-bits-above-7": GP,
    "nonexistent-804-read": GP,
    "nonexistent-804-write": GP,
    "apr-809-read": GP,
    "reserved-840-read": GP,
    "id-read": 0,
    "ldr-read": 0,
    "self-ipi-write": 0,
    "base-x2apic-to-xapic": GP,
    "base-en0-extd1": GP,
    "base-reserved-bit-9": GP,
    "base-reserved-bit-63": GP,
    "base-x2apic-to-disabled": 0,
    "x2apic-msr-while-disabled": GP,
    "base-disabled-to-x2apic": GP,
    "base-disabled-to-xapic": 0,
    "x2apic-msr-in-xapic-mode": GP,
    "base-xapic-to-x2apic": 0,
    "id-read-after-return": 0,
}


@pytest.mark.parametrize("fastpath", ["native", "python", "off"])
def test_apic_gp_cases(fastpath: str) -> None:
    r = run_guest("apic_gp", "--fastpath", fastpath)
    out = r.stdout
    assert r.returncode == GUEST_OK, (out, r.stderr)
    rows = re.findall(r"^gp (\S+): vector (\d+) expected (\d+)$", out, re.M)
    got = {name: int(v) for name, v, _ in rows}
    assert {name: got.get(name) for name in GP_CASES} == GP_CASES
    assert all(v == e for _, v, e in rows), [row for row in rows if row[1] != row[2]]

    esr = dict(re.findall(r"^esr (\S+): bit5 (\d) expected \d", out, re.M))
    for mode in MODES:
        for vector in (0, 3, 15):
            assert esr[f"send-vector-{vector}-{mode}"] == "1"
        assert esr[f"send-vector-16-{mode}"] == "0"
    # The valid ICR and SELF_IPI writes, and the legal vector-16 IPIs, were delivered.
    assert re.search(r"^stray: got 5 expected 5$", out, re.M), out
    assert out.rstrip().endswith("apic_gp: ok")


# ---------------------------------------------------------------- apic_timer

TIMER_COUNTS = {
    "oneshot": 1,
    "oneshot-current-count-0": 0,
    "oneshot-masked": 0,
    "periodic-not-early": 1,  # 4 interrupts took at least 90% of 4 periods
    "tsc-deadline-halted": 1,
    "tsc-deadline-busy": 1,
    "tsc-deadline-past": 1,
    "tsc-deadline-disarmed": 0,
}


@pytest.mark.parametrize("mode", MODES)
def test_apic_timer_modes(mode: str) -> None:
    r = run_guest("apic_timer", "--append", f"mode={mode}")
    out = r.stdout
    assert r.returncode == GUEST_OK, (out, r.stderr)
    assert f"apic_timer: mode {mode}" in out
    rows = re.findall(r"^timer (\S+): count (\d+) expected (\d+)$", out, re.M)
    got = {name: int(n) for name, n, _ in rows}
    assert {name: got.get(name) for name in TIMER_COUNTS} == TIMER_COUNTS
    # Periodic: stopped by the handler of the 4th interrupt; a 5th only if a period had
    # already expired into IRR by then (a host that delayed the guest).
    pending = re.search(r"^apic_timer: periodic stopped at 4 with ([01]) pending$", out, re.M)
    assert pending is not None, out
    assert got["periodic"] == 4 + int(pending.group(1))
    # Checked once per TSC-deadline case (the dict above keeps the last of each).
    assert [int(n) for name, n, _ in rows if name == "tsc-deadline-msr-cleared"] == [0, 0]
    assert all(n == e for _, n, e in rows)
    assert out.rstrip().endswith("apic_timer: ok")


# A bug this found, fixed: LocalApic.wrmsr(MSR_TSC_DEADLINE) read the host clock twice
# (clock_ns(), then tsc()); a delay between the reads (GIL hand-off, preemption on a
# loaded host) made the deadline early by that delay. It now derives the TSC from the
# one clock reading (LocalApic.tsc_at). The busy case still failed now and then under
# load (300-350 us early at load 10+): the guest timed the interrupt by the TSC its wait
# loop read last, which precedes the loop's test of `ticks`; a vCPU held across the
# deadline between the two took the interrupt after the read. The guest now times it
# in the handler. Probing this found a real bug, fixed: a TSC-deadline timer falling
# due between Python's look and KVM_RUN was left to the next exit (vcpu_enter_guest's
# first pass; tests/test_native_core.py).


def test_tsc_deadline_interrupt_never_comes_early() -> None:
    r = run_guest("apic_timer", "--append", "mode=x2apic")
    rows = re.findall(r"^timing (\S+)-not-early: (\d) expected 1", r.stdout, re.M)
    assert rows == [("tsc-deadline-halted", "1"), ("tsc-deadline-busy", "1")], r.stdout


def test_tsc_deadline_writes_complete_on_the_native_fastpath() -> None:
    """xAPIC mode, so that the only WRMSR exits are IA32_TSC_DEADLINE's and
    IA32_APIC_BASE's: the core completes the armings and the disarm (at least 4: halted,
    busy, the disarm's deadline and its 0), Python only the deadline in the past and
    IA32_APIC_BASE; the interrupts come, and not early (the core's timer thread)."""
    r = run_guest("apic_timer", "--append", "mode=xapic", "--fastpath", "native", "--stat")
    assert r.returncode == GUEST_OK, (r.stdout, r.stderr)
    rows = re.findall(r"^timing (\S+)-not-early: (\d) expected 1", r.stdout, re.M)
    assert rows == [("tsc-deadline-halted", "1"), ("tsc-deadline-busy", "1")], r.stdout
    assert re.search(r"^timer tsc-deadline-past: count 1 expected 1$", r.stdout, re.M)
    wrmsr = re.search(r"│ X86_WRMSR\s+│\s+(\d+) │\s+(\d+) │", r.stderr)
    assert wrmsr, r.stderr
    count, fast = int(wrmsr[1]), int(wrmsr[2])
    assert fast >= 4 and count - fast <= 2, (count, fast)


def test_tsc_deadline_arming_is_immune_to_a_delay_between_clock_reads() -> None:
    from kvmpy.apic import constants as c
    from kvmpy.apic.testing import make_system, write_reg

    system = make_system(1, x2apic=True)
    apic, clock = system[0], system.clock
    write_reg(apic, c.REG_LVT_TIMER, (2 << c.LVT_TIMER_MODE_SHIFT) | 0x60)  # TSC-deadline
    deadline = clock.tsc() + 10_000_000 * clock.tsc_hz // 1_000_000_000  # t0 + 10 ms
    tsc = apic.tsc

    def tsc_after_a_5ms_delay() -> int:
        clock.advance(5_000_000)
        return tsc()

    apic.tsc = tsc_after_a_5ms_delay
    apic.wrmsr(c.MSR_TSC_DEADLINE, deadline)
    apic.tsc = tsc
    clock.advance(1_000_000)  # t0 + 6 ms, before the deadline
    assert not apic.timer_expired(clock.ns())


# ---------------------------------------------------------------- kvm-unit-tests

# apic.flat subtests that fail under QEMU+KVM (kvm_pvm's in-kernel LAPIC) on this host
# too (/work/notes/kvm-unit-tests report): kvmpy may fail these and no others.
KUT_APIC_HOST_FAILURES = {
    "multiple nmi",
    "pending nmi",
    "TMCCT should not be reset to TMICT value",
    "tsc deadline timer",
}
KUT_APIC_MIN_PASSES = 50  # of 55; QEMU+KVM passes 51, kvmpy 54 (fails "multiple nmi")


def kut_dir() -> Path:
    value = os.environ.get("KVMPY_KUT_DIR")
    if not value:
        pytest.skip("KVMPY_KUT_DIR is not set (point it at a built kvm-unit-tests tree)")
    path = Path(value)
    if not (path / "x86").is_dir():
        pytest.skip(f"KVMPY_KUT_DIR={value} has no x86/ directory")
    return path


def kut_test(name: str) -> Path:
    flat = kut_dir() / "x86" / f"{name}.flat"
    if not flat.is_file():
        pytest.skip(f"{flat} is not built (run make in the kvm-unit-tests tree)")
    return flat


def kut_env(tmp_path: Path) -> Path:
    # kvm-unit-tests' runner passes its environment as the initrd; TEST_DEVICE=0 makes
    # apic.flat run without QEMU's pc-testdev.
    env = tmp_path / "env"
    env.write_text("TEST_DEVICE=0\n")
    return env


@pytest.mark.parametrize("cpus", [2, 3, 4])
def test_kvm_unit_tests_smptest(cpus: int, tmp_path: Path) -> None:
    flat = kut_test("smptest")
    r = kvmpy_run(flat, "--cpus", str(cpus), "--initrd", str(kut_env(tmp_path)), timeout=60)
    assert r.returncode == GUEST_OK, (r.stdout, r.stderr)
    assert f"found {cpus} cpus" in r.stdout
    assert sorted(re.findall(r"^ipi called, cpu (\d+)$", r.stdout, re.M)) == [
        str(c) for c in range(cpus)
    ]
    assert "PASS: IPI to each CPU" in r.stdout
    assert "FAIL" not in r.stdout


@pytest.mark.slow
def test_kvm_unit_tests_apic(tmp_path: Path) -> None:
    flat = kut_test("apic")
    r = kvmpy_run(flat, "--cpus", "2", "--initrd", str(kut_env(tmp_path)), timeout=900)
    out = r.stdout
    failed = set(re.findall(r"^FAIL: (.*?)\r?$", out, re.M))
    assert failed <= KUT_APIC_HOST_FAILURES, out
    assert len(re.findall(r"^PASS: ", out, re.M)) >= KUT_APIC_MIN_PASSES, out
    assert re.search(r"^SUMMARY: \d+ tests", out, re.M), out
    expected_status = GUEST_OK if not failed else (1 << 1) | 1  # the guest returned 1
    assert r.returncode == expected_status, (out[-2000:], r.stderr)
