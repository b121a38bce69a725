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
from kvmpy.cpufeatures import FEATURES
from kvmpy.cpuid import (
    CPUID_1_ECX_TSC_DEADLINE,
    CPUID_1_ECX_X2APIC,
    guest_cpuid,
    plan_cpuid,
    vcpu_cpuid,
)
from kvmpy.cpumodel import HOST, QEMU64, CpuModel, check_host, describe_models, parse_cpu
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


@pytest.mark.parametrize(("spec", "x2apic", "tsc_deadline"), [
    ("host", True, True),
    ("max", True, True),
    ("qemu64", True, False),
    # kvm-unit-tests x86/unittests.cfg, groups apic / ioapic / vmexit tscdeadline*
    ("qemu64,+x2apic,+tsc-deadline", True, True),
    ("qemu64,-x2apic,+tsc-deadline", False, True),
    ("qemu64,+x2apic", True, False),
    ("host,-x2apic,-tsc-deadline", False, False),
    ("max,x2apic=off,tsc_deadline=on", False, True),
    ("qemu64,tsc-deadline", True, True),
    ("qemu64,+x2apic,-x2apic", False, False),  # last one wins
    ("Skylake-Server", True, True),  # in QEMU's definition
    ("Opteron_G1", True, False),
])
def test_parse_cpu_apic_features(spec: str, x2apic: bool, tsc_deadline: bool) -> None:
    model = parse_cpu(spec)
    assert (model.x2apic, model.tsc_deadline) == (x2apic, tsc_deadline)
    assert parse_cpu(model.spec) == model


@pytest.mark.parametrize(("spec", "flags"), [
    ("qemu64,+pcid,+invpcid", (("pcid", True), ("invpcid", True))),
    ("qemu64,-pcid,-invpcid", (("pcid", False), ("invpcid", False))),
    ("qemu64,+umip", (("umip", True),)),
    ("qemu64,sse3=on,lahf_lm=off", (("pni", True), ("lahf-lm", False))),  # QEMU aliases
    ("max,+vmx,-vmx-mbec", (("vmx", True), ("vmx-mbec", False))),
    ("max,+svm,-rdtscp,-xsave,-invpcid,-skinit",
     (("svm", True), ("rdtscp", False), ("xsave", False), ("invpcid", False),
      ("skinit", False))),
    ("max,kvmclock=off", (("kvmclock", False),)),
])
def test_parse_cpu_feature_flags_by_qemus_names(spec: str, flags: tuple) -> None:
    model = parse_cpu(spec)
    assert model.flags == flags
    assert parse_cpu(model.spec) == model


def test_kvmclock_names_both_of_qemus_bits() -> None:
    model = parse_cpu("max,kvmclock=off")
    assert model.requested("kvmclock") is False and model.requested("kvmclock2") is False


def test_parse_cpu_properties_the_runner_passes() -> None:
    assert parse_cpu("max,vendor=GenuineIntel").vendor == "GenuineIntel"
    assert parse_cpu("Opteron_G1,vendor=AuthenticAMD").vendor == "AuthenticAMD"
    assert parse_cpu("max,host-phys-bits").host_phys_bits is True
    m = parse_cpu("IvyBridge,phys-bits=36,host-phys-bits=off")
    assert (m.phys_bits, m.host_phys_bits, m.uses_host_phys_bits) == (36, False, False)
    assert parse_cpu("host,migratable=no").migratable is False
    assert parse_cpu("host,hv_passthrough").hv_passthrough is True
    assert parse_cpu("qemu64,enforce").enforce and not parse_cpu("qemu64,check").enforce
    assert parse_cpu("Skylake-Server-v1").name == "Skylake-Server"
    assert parse_cpu("host").uses_host_phys_bits and not parse_cpu("qemu64").uses_host_phys_bits


@pytest.mark.parametrize(("spec", "words"), [
    ("pentium", "CPU model 'pentium' is not implemented"),
    ("qemu64,+frobnicate", "-cpu feature 'frobnicate' is not implemented"),
    ("qemu64,+rdctl-no", "is an MSR bit"),
    ("host,hv-relaxed", "Hyper-V enlightenments are not implemented"),
    ("qemu64,x2apic=maybe", "expected on or off"),
    ("qemu64,vendor=Intel", "exactly 12 characters"),
    ("qemu64,phys-bits=99", "between 32 and 52"),
    ("qemu64,level=13", "-cpu feature 'level' is not implemented"),
])
def test_parse_cpu_refuses_what_it_does_not_implement(spec: str, words: str) -> None:
    with pytest.raises(KvmpyError, match=re.escape(words)):
        parse_cpu(spec)


def test_hv_passthrough_is_refused_with_the_reason() -> None:
    with pytest.raises(KvmpyError, match="KVM_CAP_HYPERV is 0"):
        check_host(parse_cpu("host,hv_passthrough"), has_hyperv=False)
    with pytest.raises(KvmpyError, match="not implemented"):
        check_host(parse_cpu("host,hv_passthrough"), has_hyperv=True)
    check_host(parse_cpu("host"), has_hyperv=False)


def test_describe_models_lists_every_model_and_flag() -> None:
    text = describe_models()
    assert all(f"x86 {name}" in text
               for name in ("host", "max", "qemu64", "Opteron_G1", "Skylake-Server"))
    assert all(f" {flag}" in text for flag in ("x2apic", "tsc-deadline", "umip", "vmx-ept"))


# ---------------------------------------------------------------- CPUID


def entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0,
          edx: int = 0) -> KvmCpuidEntry2:
    return KvmCpuidEntry2(function=function, index=index, flags=0, eax=eax, ebx=ebx,
                          ecx=ecx, edx=edx)


def vendor_entry(function: int, eax: int, vendor: bytes) -> KvmCpuidEntry2:
    ebx, edx, ecx = (int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8))
    return entry(function, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


# KVM_GET_SUPPORTED_CPUID of an AMD EPYC host under kvm_pvm, abridged.
SUPPORTED = [
    vendor_entry(0, 0x10, b"AuthenticAMD"),
    entry(1, eax=0x830F10, ebx=0x1020800, ecx=0x81202000, edx=0x078BFBFF),
    entry(6, eax=0x4),
    entry(7, ebx=0x1800002, ecx=0x4, edx=0xA8000000),
    entry(0xB, edx=1),
    entry(0xD, eax=0x7, ebx=0x340, ecx=0x340),
    entry(0x10),
    entry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    entry(0x4000_0001, eax=0x1007EFB),
    vendor_entry(0x8000_0000, 0x8000_0021, b"AuthenticAMD"),
    entry(0x8000_0001, eax=0x830F10, ebx=0x4000_0000, ecx=0x400393, edx=0x23D3FBFF),
    entry(0x8000_0002),
    entry(0x8000_0007, edx=0x100),
    entry(0x8000_0008, eax=0x3030),
    entry(0x8000_000A),
    entry(0x8000_001D, index=0, eax=0x121),
    entry(0x8000_0021, eax=0x10000244),
]
# The same KVM on an Intel host (this project's machine in another session), abridged.
SUPPORTED_INTEL = [
    vendor_entry(0, 0x24, b"GenuineIntel"),
    entry(1, eax=0xA0671, ebx=0x1020800, ecx=0x81202000, edx=0x0F8BFBFF),
    entry(6, eax=0x4),
    entry(7, eax=2, ebx=0x1802852, ecx=0x1A010104, edx=0x20010000),
    entry(7, index=1, eax=0x1C00, edx=0x4000),
    entry(0xD, eax=0xE7, ebx=0xA80, ecx=0xA80),
    entry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    entry(0x4000_0001, eax=0x1007EFB),
    vendor_entry(0x8000_0000, 0x8000_0008, b"\0" * 12),
    entry(0x8000_0001, ecx=0x101, edx=0x20100800),
    entry(0x8000_0007, edx=0x100),
    entry(0x8000_0008, eax=0x3930),
]


def leaves(model: CpuModel, vcpu: int = 0, n: int = 2, supported: list | None = None,
           **kw: str) -> dict[tuple[int, int], KvmCpuidEntry2]:
    return {(e.function, e.index): e
            for e in guest_cpuid(supported or SUPPORTED, vcpu, n, model, **kw)}


def vendor(e: KvmCpuidEntry2) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))


def brand(got: dict) -> bytes:
    return b"".join(r.to_bytes(4, "little") for f in range(0x8000_0002, 0x8000_0005)
                    for r in (got[(f, 0)].eax, got[(f, 0)].ebx, got[(f, 0)].ecx,
                              got[(f, 0)].edx)).rstrip(b"\0")


def has(got: dict, name: str) -> bool:
    leaf, sub, reg, bit = FEATURES[name]
    e = got.get((leaf, sub))
    return e is not None and bool(getattr(e, reg) >> bit & 1)


@pytest.mark.parametrize("model", [HOST, QEMU64, parse_cpu("qemu64,-x2apic,+tsc-deadline"),
                                   parse_cpu("host,-x2apic,-tsc-deadline")],
                         ids=lambda m: m.spec)
def test_leaf_1_reports_exactly_the_models_apic_features(model: CpuModel) -> None:
    leaf1 = leaves(model, vcpu=1, n=3)[(1, 0)]
    assert bool(leaf1.ecx & CPUID_1_ECX_X2APIC) == model.x2apic
    assert bool(leaf1.ecx & CPUID_1_ECX_TSC_DEADLINE) == model.tsc_deadline
    assert leaf1.ecx >> 31 == 1 and leaf1.edx >> 9 & 1  # hypervisor, APIC
    assert leaf1.ebx >> 24 == 1 and (leaf1.ebx >> 16) & 0xFF == 3  # APIC ID, CPU count


def test_host_model_keeps_kvms_features_it_honours() -> None:
    got = leaves(HOST)
    assert got[(1, 0)].eax == 0x830F10 and got[(0, 0)].eax == 0x10
    assert got[(7, 0)].ebx == 0x1800002
    assert (0x8000_0021, 0) in got
    assert got[(0x8000_0007, 0)].edx == 0  # invtsc is unmigratable: QEMU drops it ...
    assert leaves(parse_cpu("host,migratable=no"))[(0x8000_0007, 0)].edx == 0x100  # ... unless


def test_kvm_pv_features_need_kvms_apic_and_hypercalls() -> None:
    pv = {"kvm-asyncpf", "kvm-asyncpf-int", "kvm-pv-eoi", "kvm-pv-unhalt", "kvm-pv-ipi",
          "kvm-pv-sched-yield", "kvm-poll-control"}
    kept = {"kvmclock", "kvmclock2", "kvm-nopiodelay", "kvm-steal-time", "kvm-pv-tlb-flush",
            "kvmclock-stable-bit"}
    user = leaves(HOST, irqchip="user")
    assert not any(has(user, n) for n in pv) and all(has(user, n) for n in kept)
    kernel = leaves(HOST, irqchip="kernel", backend="kvm_intel")
    assert all(has(kernel, n) for n in pv | kept)
    pvm = leaves(HOST, irqchip="kernel", backend="kvm_pvm")  # no hypercalls there
    assert {n for n in pv if has(pvm, n)} == pv - {"kvm-pv-unhalt", "kvm-pv-ipi",
                                                    "kvm-pv-sched-yield"}
    assert not has(leaves(HOST, backend="kvm_pvm"), "xsave")  # no XSAVE in its emulator


def test_qemu64_is_qemus_definition_filtered_by_kvm() -> None:
    got = leaves(QEMU64)
    assert vendor(got[(0, 0)]) == b"AuthenticAMD" and got[(0, 0)].eax == 0xD  # the host's
    assert got[(1, 0)].eax == 0x60FB1  # family 15, model 107, stepping 1 (QEMU 7.2)
    assert got[(1, 0)].edx & 1 << 28  # HTT with 2 CPUs, as QEMU
    # SSE3 is in qemu64 but not in KVM's set here: filtered out, CX16 kept.
    assert not has(got, "pni") and has(got, "cx16")
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
    assert brand(got) == b"QEMU Virtual CPU version 2.5+"
    assert got[(0x8000_0008, 0)].eax == 0x3028  # 40 physical (QEMU's default), 48 virtual
    assert got[(0x4000_0001, 0)].eax == 0x100002B  # kvmclock x2, nopiodelay, steal time,
    # stable bit; QEMU's kvm-asyncpf and kvm-pv-eoi are withheld (kvmpy's own APIC)


def test_the_host_vendor_and_vendor_override() -> None:
    got = leaves(QEMU64, supported=SUPPORTED_INTEL)
    assert vendor(got[(0, 0)]) == b"GenuineIntel"
    assert got[(0x8000_0001, 0)].edx & 0x0183F3FF == 0  # no AMD aliases on Intel
    amd = leaves(parse_cpu("Opteron_G1,vendor=AuthenticAMD"), supported=SUPPORTED_INTEL)
    assert vendor(amd[(0, 0)]) == vendor(amd[(0x8000_0000, 0)]) == b"AuthenticAMD"
    assert amd[(0x8000_0001, 0)].edx & 0x0183F3FF == amd[(1, 0)].edx & 0x0183F3FF
    assert amd[(0, 0)].eax == 5 and amd[(0x8000_0000, 0)].eax == 0x8000_0008
    assert (6, 0) not in amd and (7, 0) not in amd  # above level 5
    assert amd[(1, 0)].eax == 0xF61 and has(amd, "vme") and has(amd, "syscall")
    assert brand(amd) == b"AMD Opteron 240 (Gen 1 Class Opteron)"
    intel = leaves(parse_cpu("qemu64,vendor=GenuineIntel"))
    assert vendor(intel[(0, 0)]) == b"GenuineIntel"


def test_named_model_features_are_filtered_with_qemus_warning() -> None:
    plan = plan_cpuid(SUPPORTED_INTEL, parse_cpu("Skylake-Server,host-phys-bits,+vmx,+vmx-mbec"))
    got = {(e.function, e.index): e for e in vcpu_cpuid(plan, 0, 1)}
    assert has(got, "hle") and has(got, "rtm") and has(got, "arat") and has(got, "tsc-deadline")
    assert not has(got, "avx512f") and not has(got, "vmx") and not has(got, "xsave")
    assert "host doesn't support requested feature: CPUID.07H:EBX.avx512f [bit 16]" \
        in plan.warnings
    assert "host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]" in plan.warnings
    assert any("vmx-mbec" in w for w in plan.warnings)
    assert got[(0x8000_0008, 0)].eax & 0xFF == 48 and plan.maxphyaddr == 48  # host's
    assert got[(1, 0)].eax == 0x50654  # family 6, model 85, stepping 4


def test_phys_bits() -> None:
    assert plan_cpuid(SUPPORTED_INTEL, QEMU64).maxphyaddr == 40
    assert plan_cpuid(SUPPORTED_INTEL, parse_cpu("qemu64,phys-bits=36")).maxphyaddr == 36
    assert plan_cpuid(SUPPORTED_INTEL, HOST).maxphyaddr == 48
    with pytest.raises(KvmpyError, match="at most the host's 48"):
        plan_cpuid(SUPPORTED_INTEL, parse_cpu("qemu64,phys-bits=52"))
    la57 = leaves(parse_cpu("qemu64,+la57"), supported=SUPPORTED_INTEL)
    assert la57[(0x8000_0008, 0)].eax == 57 << 8 | 40


def test_enforce_and_explicit_flags() -> None:
    with pytest.raises(KvmpyError, match="qemu64,enforce: KVM does not support pni$"):
        plan_cpuid(SUPPORTED_INTEL, parse_cpu("qemu64,enforce"))
    plan = plan_cpuid(SUPPORTED_INTEL, parse_cpu("qemu64,+umip,+kvm-pv-eoi,-cx16"))
    got = {(e.function, e.index): e for e in vcpu_cpuid(plan, 0, 1)}
    assert has(got, "umip") and not has(got, "cx16") and not has(got, "kvm-pv-eoi")
    assert any(w.startswith("-cpu +kvm-pv-eoi withheld: needs KVM's in-kernel local APIC")
               for w in plan.warnings)
    vmx_host = [*SUPPORTED_INTEL[:1], entry(1, ecx=0x81202020), *SUPPORTED_INTEL[2:]]
    plan = plan_cpuid(vmx_host, parse_cpu("max,+vmx,+vmx-ept"))
    assert not plan.passed or all(b.name != "vmx" for b in plan.passed)
    assert "vmx" in plan.withheld and any("vmx-ept" in w for w in plan.warnings)


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
    if model.name == "qemu64":  # the host's vendor, QEMU 7.2's family 15 model 107
        assert re.search(r"cpuid vendor \w+ max d ext 8000000a family 15 model 107 "
                         "stepping 1", out), out
        assert "brand QEMU Virtual CPU version 2.5+" in out
