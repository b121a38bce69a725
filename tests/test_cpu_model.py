"""CPU models (`--cpu`, `-cpu`): parsing, the guest CPUID they give, and the local APIC
enforcing what CPUID hides (SDM 10.12.1, 10.12.5, 10.5.4.1). Pure model tests, then
one guest under KVM (guest/cpu_model.c) that checks CPUID and the #GPs from inside."""

from __future__ import annotations

import mmap
import re
import subprocess
import sys

import pytest

from kvmpy.apic import MSR_APIC_BASE, MSR_TSC_DEADLINE, ApicBus, ApicGP, ApicMode, LocalApic
from kvmpy.apic import constants as c
from kvmpy.apic.testing import FakeClock
from kvmpy.cpuid import (
    CPUID_1_ECX_TSC_DEADLINE,
    CPUID_1_ECX_X2APIC,
    QEMU64_1_ECX,
    QEMU64_1_EDX,
    guest_cpuid,
)
from kvmpy.cpumodel import HOST, QEMU64, CpuModel, describe_models, parse_cpu
from kvmpy.errors import KvmpyError
from kvmpy.exits import Fastpath, handle_exit, handle_exit_irqoff
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.kvm.run import RunView
from kvmpy.kvm.structs import KvmCpuidEntry2
from kvmpy.trace import ExitStats
from kvmpy.vcpu import Exit

EN, EXTD = c.APIC_BASE_EN, c.APIC_BASE_EXTD
BASE = c.APIC_DEFAULT_BASE

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("spec", "model"), [
    ("host", CpuModel("host", True, True)),
    ("max", CpuModel("max", True, True)),
    ("qemu64", CpuModel("qemu64", True, False)),
    # kvm-unit-tests x86/unittests.cfg, groups apic / ioapic / vmexit tscdeadline*
    ("qemu64,+x2apic,+tsc-deadline", CpuModel("qemu64", True, True)),
    ("qemu64,-x2apic,+tsc-deadline", CpuModel("qemu64", False, True)),
    ("qemu64,+x2apic", CpuModel("qemu64", True, False)),
    ("host,-x2apic,-tsc-deadline", CpuModel("host", False, False)),
    ("max,x2apic=off,tsc_deadline=on", CpuModel("max", False, True)),
    ("qemu64,tsc-deadline", CpuModel("qemu64", True, True)),
    ("qemu64,+x2apic,-x2apic", CpuModel("qemu64", False, False)),  # last one wins
])
def test_parse_cpu(spec: str, model: CpuModel) -> None:
    assert parse_cpu(spec) == model
    assert parse_cpu(model.spec) == model


@pytest.mark.parametrize(("spec", "words"), [
    ("pentium", "CPU model 'pentium' is not implemented"),
    ("qemu64,+vmx", "-cpu feature 'vmx' is not implemented"),
    ("max,+svm", "-cpu feature 'svm' is not implemented"),
    ("host,hv_passthrough", "-cpu feature 'hv_passthrough' is not implemented"),
    ("qemu64,x2apic=maybe", "expected on or off"),
])
def test_parse_cpu_refuses_what_it_does_not_implement(spec: str, words: str) -> None:
    with pytest.raises(KvmpyError, match=re.escape(words)):
        parse_cpu(spec)


def test_describe_models_lists_every_model_and_flag() -> None:
    text = describe_models()
    assert all(f"x86 {name}" in text for name in ("host", "max", "qemu64"))
    assert "x2apic tsc-deadline" in text


# ---------------------------------------------------------------- CPUID


def entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0,
          edx: int = 0) -> KvmCpuidEntry2:
    return KvmCpuidEntry2(function=function, index=index, flags=0, eax=eax, ebx=ebx,
                          ecx=ecx, edx=edx)


# KVM_GET_SUPPORTED_CPUID on this project's host (kvm_pvm, AMD EPYC), abridged.
SUPPORTED = [
    entry(0, eax=0x10, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
    entry(1, eax=0x830F10, ebx=0x1020800, ecx=0x81202000, edx=0x078BFBFF),
    entry(6, eax=0x4),
    entry(7, ebx=0x1800002, ecx=0x4, edx=0xA8000000),
    entry(0xB, edx=1),
    entry(0xD, eax=0x7, ebx=0x340, ecx=0x340),
    entry(0x10),
    entry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    entry(0x4000_0001, eax=0x1007EFB),
    entry(0x8000_0000, eax=0x8000_0021, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
    entry(0x8000_0001, eax=0x830F10, ebx=0x4000_0000, ecx=0x400393, edx=0x23D3FBFF),
    entry(0x8000_0002),
    entry(0x8000_0007, edx=0x100),
    entry(0x8000_0008, eax=0x3030),
    entry(0x8000_000A),
    entry(0x8000_001D, index=0, eax=0x121),
    entry(0x8000_0021, eax=0x10000244),
]


def leaves(model: CpuModel, vcpu: int = 0, n: int = 2) -> dict[tuple[int, int], KvmCpuidEntry2]:
    return {(e.function, e.index): e for e in guest_cpuid(SUPPORTED, vcpu, n, model)}


def vendor(e: KvmCpuidEntry2) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))


@pytest.mark.parametrize("model", [HOST, QEMU64, parse_cpu("qemu64,-x2apic,+tsc-deadline"),
                                   parse_cpu("host,-x2apic,-tsc-deadline")],
                         ids=lambda m: m.spec)
def test_leaf_1_reports_exactly_the_models_apic_features(model: CpuModel) -> None:
    leaf1 = leaves(model, vcpu=1, n=3)[(1, 0)]
    assert bool(leaf1.ecx & CPUID_1_ECX_X2APIC) == model.x2apic
    assert bool(leaf1.ecx & CPUID_1_ECX_TSC_DEADLINE) == model.tsc_deadline
    assert leaf1.ecx >> 31 == 1 and leaf1.edx >> 9 & 1  # hypervisor, APIC
    assert leaf1.ebx >> 24 == 1 and (leaf1.ebx >> 16) & 0xFF == 3  # APIC ID, CPU count


def test_host_model_keeps_kvms_features() -> None:
    got = leaves(HOST)
    assert got[(1, 0)].eax == 0x830F10 and got[(0, 0)].eax == 0x10
    assert got[(7, 0)].ebx == 0x1800002
    assert (0x8000_0021, 0) in got and got[(0x8000_0007, 0)].edx == 0x100


def test_qemu64_is_qemus_definition_filtered_by_kvm() -> None:
    got = leaves(QEMU64)
    assert vendor(got[(0, 0)]) == b"AuthenticAMD" and got[(0, 0)].eax == 0xD
    assert got[(1, 0)].eax == 0x663  # family 6, model 6, stepping 3
    assert got[(1, 0)].edx & ~QEMU64_1_EDX == 1 << 28  # + HTT with 2 CPUs, as QEMU
    assert got[(1, 0)].edx & QEMU64_1_EDX == 0x078BFBFF & QEMU64_1_EDX
    # SSE3 is in qemu64 but not in KVM's set here: filtered out, CX16 kept.
    assert got[(1, 0)].ecx & QEMU64_1_ECX == 1 << 13
    assert (got[(7, 0)].ebx, got[(7, 0)].ecx, got[(7, 0)].edx) == (0, 0, 0)
    assert got[(0xD, 0)].eax == 0 and got[(6, 0)].eax == 0
    assert (0x10, 0) not in got  # above level 0xd
    assert got[(0x8000_0000, 0)].eax == 0x8000_000A
    assert vendor(got[(0x8000_0000, 0)]) == b"AuthenticAMD"
    ext = got[(0x8000_0001, 0)]
    assert ext.ecx == 1  # LAHF_LM only (SVM off on KVM)
    assert ext.edx & (1 << 29 | 1 << 20 | 1 << 11) == 1 << 29 | 1 << 20 | 1 << 11
    assert ext.edx & 0x0183F3FF == got[(1, 0)].edx & 0x0183F3FF  # AMD's aliases
    assert got[(0x8000_0007, 0)].edx == 0
    assert (0x8000_001D, 0) not in got and (0x8000_0021, 0) not in got
    brand = b"".join(r.to_bytes(4, "little") for f in range(0x8000_0002, 0x8000_0005)
                     for r in (got[(f, 0)].eax, got[(f, 0)].ebx, got[(f, 0)].ecx,
                               got[(f, 0)].edx))
    assert brand.rstrip(b"\0") == b"QEMU Virtual CPU version 2.5+"
    assert got[(0x8000_0008, 0)].eax == 0x3030  # address sizes kept
    assert got[(0x4000_0001, 0)].eax == 0x1007EFB  # KVM's paravirtual leaves kept


def test_topology_leaves_in_every_model() -> None:
    for model in (HOST, QEMU64):
        got = leaves(model, vcpu=2, n=4)
        assert [got[(0xB, i)].edx for i in range(3)] == [2, 2, 2]


# ---------------------------------------------------------------- enforcement (pure)


def apic_for(model: CpuModel) -> LocalApic:
    clock = FakeClock()
    bus = ApicBus(lambda i: None)
    apic = LocalApic(0, bus, bsp=True, clock_ns=clock.ns, tsc=clock.tsc, tsc_at=clock.tsc_at,
                     tsc_hz=clock.tsc_hz, x2apic_supported=model.x2apic,
                     tsc_deadline_supported=model.tsc_deadline)
    bus.add(apic)
    apic.mmio_write(c.REG_SVR, 4, c.SVR_APIC_ENABLED | 0xFF)
    return apic


def test_hidden_x2apic_makes_extd_reserved_and_every_x2apic_msr_gp() -> None:
    apic = apic_for(parse_cpu("qemu64,-x2apic,+tsc-deadline"))
    base = apic.rdmsr(MSR_APIC_BASE)
    for value in (base | EXTD, (base & ~EN) | EN | EXTD):
        with pytest.raises(ApicGP):
            apic.wrmsr(MSR_APIC_BASE, value)
    apic.wrmsr(MSR_APIC_BASE, base & ~EN)  # through disabled: still no x2APIC
    with pytest.raises(ApicGP):
        apic.wrmsr(MSR_APIC_BASE, (base & ~EN) | EN | EXTD)
    apic.wrmsr(MSR_APIC_BASE, base)
    assert apic.mode is ApicMode.XAPIC and apic.rdmsr(MSR_APIC_BASE) == base
    for msr in (0x802, 0x808, 0x830, 0x832, 0x838, 0x83F):
        with pytest.raises(ApicGP):
            apic.rdmsr(msr) if msr != 0x83F else apic.wrmsr(msr, 0x40)
        with pytest.raises(ApicGP):
            apic.wrmsr(msr, 0)


def test_shown_x2apic_can_be_entered() -> None:
    apic = apic_for(QEMU64)
    apic.wrmsr(MSR_APIC_BASE, apic.rdmsr(MSR_APIC_BASE) | EXTD)
    assert apic.mode is ApicMode.X2APIC and apic.rdmsr(0x802) == 0


@pytest.mark.parametrize("x2apic", [False, True])
def test_hidden_tsc_deadline_msr_gps_and_mode_10b_is_reserved(x2apic: bool) -> None:
    apic = apic_for(parse_cpu("qemu64,-tsc-deadline"))
    if x2apic:
        apic.wrmsr(MSR_APIC_BASE, apic.rdmsr(MSR_APIC_BASE) | EXTD)
    for op in (lambda: apic.rdmsr(MSR_TSC_DEADLINE), lambda: apic.wrmsr(MSR_TSC_DEADLINE, 1)):
        with pytest.raises(ApicGP):
            op()
    lvt = 0xEF | (c.TIMER_TSC_DEADLINE << c.LVT_TIMER_MODE_SHIFT)
    if x2apic:
        with pytest.raises(ApicGP):  # a reserved bit in an x2APIC write (SDM 10.12.1.3)
            apic.wrmsr(0x832, lvt)
        assert apic.rdmsr(0x832) == c.LVT_MASKED  # unchanged
    else:
        apic.mmio_write(c.REG_LVT_TIMER, 4, lvt)  # xAPIC: the reserved bit is dropped
        assert apic.mmio_read(c.REG_LVT_TIMER, 4) == 0xEF
        assert apic.timer.mode == c.TIMER_ONESHOT


def test_shown_tsc_deadline_works() -> None:
    apic = apic_for(parse_cpu("qemu64,+tsc-deadline"))
    apic.mmio_write(c.REG_LVT_TIMER, 4, 0xEF | (c.TIMER_TSC_DEADLINE << c.LVT_TIMER_MODE_SHIFT))
    apic.wrmsr(MSR_TSC_DEADLINE, apic.tsc() + 1000)
    assert apic.rdmsr(MSR_TSC_DEADLINE) != 0 and apic.timer_deadline_ns() is not None


class MsrVcpu:
    """What exits.py needs for MSR exits, around one APIC."""

    def __init__(self, apic: LocalApic, *, fastpath: bool) -> None:
        self.apic = apic
        self.index = 0
        self.fastpath_enabled = fastpath
        self.view = RunView(mmap.mmap(-1, 4096))
        self.stats = ExitStats(False)

    def sync_timer(self) -> None: ...

    def after_apic_write(self) -> None: ...

    def apic_base_changed(self) -> None: ...


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "slow-path"])
@pytest.mark.parametrize(("reason", "msr", "value"), [
    (k.KVM_EXIT_X86_WRMSR, MSR_APIC_BASE, BASE | EN | EXTD | c.APIC_BASE_BSP),
    (k.KVM_EXIT_X86_WRMSR, 0x830, 0x40),  # x2APIC ICR
    (k.KVM_EXIT_X86_WRMSR, 0x838, 1000),  # x2APIC timer initial count (a fastpath MSR)
    (k.KVM_EXIT_X86_WRMSR, MSR_TSC_DEADLINE, 1),
    (k.KVM_EXIT_X86_RDMSR, MSR_TSC_DEADLINE, 0),
    (k.KVM_EXIT_X86_RDMSR, 0x802, 0),
])
def test_hidden_features_gp_through_both_exit_paths(fastpath: bool, reason: int, msr: int,
                                                     value: int) -> None:
    vcpu = MsrVcpu(apic_for(parse_cpu("qemu64,-x2apic,-tsc-deadline")), fastpath=fastpath)
    exit = Exit((reason, msr, value, 0))
    fp = handle_exit_irqoff(vcpu, exit)
    assert fp is Fastpath.NONE  # nothing the fastpath may complete
    handle_exit(vcpu, exit, fp)
    assert vcpu.view.u8[kr.MSR_ERROR] == 1  # KVM injects #GP
    assert vcpu.apic.mode is ApicMode.XAPIC


# ---------------------------------------------------------------- a guest under KVM


def run_cpu_model_guest(cpu: str) -> str:
    from kvmpy.guestbuild import build_guest

    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(build_guest("cpu_model")),
                        "--cpu", cpu], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)  # the guest wrote 0 to port 0xf4
    return r.stdout


@pytest.mark.kvm
@pytest.mark.parametrize("cpu", ["qemu64,-x2apic,+tsc-deadline", "qemu64", "host"])
def test_guest_sees_and_gets_what_the_model_says(cpu: str) -> None:
    model = parse_cpu(cpu)
    out = run_cpu_model_guest(cpu)
    assert (f"cpuid x2apic {int(model.x2apic)} tsc-deadline {int(model.tsc_deadline)} "
            "hypervisor 1 apic 1") in out, out
    gp_x2 = 0 if model.x2apic else 13
    gp_tsc = 0 if model.tsc_deadline else 13
    assert f"gp set-extd: vector {gp_x2}\n" in out
    assert f"gp x2apic-id-read: vector {gp_x2}\n" in out
    assert f"gp tsc-deadline-read: vector {gp_tsc}\n" in out
    assert f"gp tsc-deadline-write: vector {gp_tsc}\n" in out
    assert f"lvt timer mode {2 if model.tsc_deadline else 0}\n" in out
    if model.name == "qemu64":
        assert "cpuid vendor AuthenticAMD max d ext 8000000a family 6 model 6 stepping 3" in out
        assert "brand QEMU Virtual CPU version 2.5+" in out
