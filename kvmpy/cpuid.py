"""The guest's CPUID: KVM's supported set, shaped by the CPU model (kvmpy/cpumodel.py),
filtered by what this VMM honours (kvmpy/cpuid_policy.py), with kvmpy's topology.

`plan_cpuid` decides once per VM: for every feature bit (kvmpy/cpufeatures.py) it is
passed iff the model asks for it, KVM supports it (or kvmpy emulates it: x2APIC,
TSC-deadline, the APIC and hypervisor bits) and cpuid_policy.honour() gives a reason;
a requested bit KVM lacks is a warning (QEMU's x86_cpu_filter_features), or an error
with `enforce`; so is a VMX capability flag (no guest gets VMX). `vcpu_cpuid` adds the
per-vCPU part:
- leaf 1 EBX[31:24] initial APIC ID = vCPU index, EBX[23:16] logical processors, EDX
  bit 28 HTT when there is more than one vCPU;
- leaf 0xB (SDM Vol. 2A CPUID, "Extended Topology Enumeration"): EDX = x2APIC ID on
  every subleaf; level 0 SMT (1 thread per core), level 1 core (N cores per package).

host/max keep every leaf KVM reports (feature registers filtered). A named model is
laid out as QEMU's cpu_x86_cpuid lays it out: leaves up to the model's level and
xlevel, vendor (the host's unless vendor=), signature, brand string; leaves of features
the model does not have read 0 (5, 6 apart from ARAT, 7, 0xA, 0xD without XSAVE,
0x80000007 apart from invtsc, 0x8000000A without SVM); 0x80000008 EAX gives the
model's physical address bits (40, QEMU's default, or the host's with host-phys-bits)
and 48 or 57 (LA57) virtual; with an AMD vendor, AMD's copy of the leaf-1 EDX bits
goes in 0x80000001 EDX (CPUID_EXT2_AMD_ALIASES). KVM's paravirtual leaves
(0x4000_00xx) are kept in every model, their feature bits filtered like the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmpy.cpufeatures import (
    AMD_ALIASES,
    FEATURE_WORDS,
    FEATURES,
    VMX_FEATURES,
    FeatureWord,
    describe_bit,
)
from kvmpy.cpuid_policy import honour
from kvmpy.cpumodel import HOST, QEMU_DEFAULT_PHYS_BITS, CpuModel
from kvmpy.errors import KvmpyError
from kvmpy.kvm.structs import KvmCpuidEntry2

CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_EDX_HTT = 1 << 28
FLAG_SIGNIFICANT_INDEX = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

# Bits kvmpy supports itself, whatever KVM_GET_SUPPORTED_CPUID says: its local APIC
# (x2APIC, TSC-deadline; KVM's with --irqchip kernel, KVM_CAP_TSC_DEADLINE_TIMER) and
# the hypervisor bit (QEMU: kvm_arch_get_supported_cpuid adds both the same way).
KVMPY_SUPPORTED = {(1, 0, "ecx"): CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE
                   | CPUID_1_ECX_HYPERVISOR,
                   (1, 0, "edx"): CPUID_1_EDX_APIC}
AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")


@dataclass(frozen=True)
class PassedBit:
    """One CPUID bit a guest gets, and why kvmpy honours it."""

    leaf: int
    subleaf: int
    reg: str
    bit: int
    name: str
    reason: str


@dataclass
class CpuidPlan:
    """The VM-wide CPUID: entries without the per-vCPU topology, and the decisions."""

    entries: list[KvmCpuidEntry2]
    passed: list[PassedBit] = field(default_factory=list)
    withheld: dict[str, str] = field(default_factory=dict)  # supported, not honoured
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # requested, KVM lacks them
    maxphyaddr: int = 36
    vendor: str = ""


def _vendor_of(entries: dict[tuple[int, int], KvmCpuidEntry2]) -> str:
    e = entries.get((0, 0))
    if e is None:
        return "GenuineIntel"
    return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
        "ascii", "replace")


def _set_vendor(e: KvmCpuidEntry2, vendor: str) -> None:
    raw = vendor.encode("ascii")
    e.ebx, e.edx, e.ecx = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))


def _index(supported: Iterable[KvmCpuidEntry2]) -> dict[tuple[int, int], KvmCpuidEntry2]:
    return {(e.function, e.index): KvmCpuidEntry2.from_buffer_copy(e) for e in supported}


def plan_cpuid(supported: Iterable[KvmCpuidEntry2], model: CpuModel = HOST, *,
               irqchip: str = "user", backend: str = "unknown") -> CpuidPlan:
    """Decide the VM's CPUID (see the module docstring); KvmpyError for an `enforce`d
    feature KVM lacks."""
    sup = _index(supported)
    d = model.definition
    vendor = model.vendor or _vendor_of(sup)
    plan = CpuidPlan([], vendor=vendor)
    final: dict[tuple[int, int, str], int] = {}
    for w in FEATURE_WORDS:
        final[w.key] = _decide_word(w, sup, model, irqchip, backend, plan)
    if vendor in AMD_VENDORS:  # AMD repeats leaf-1 EDX bits in 0x80000001 EDX
        aliases = final[(1, 0, "edx")] & AMD_ALIASES
        final[(0x8000_0001, 0, "edx")] |= aliases
        plan.passed += [
            PassedBit(0x8000_0001, 0, "edx", b.bit, b.name, "AMD's copy of leaf 1 EDX: " + b.name)
            for b in list(plan.passed) if (b.leaf, b.reg) == (1, "edx") and aliases >> b.bit & 1
        ]
    _check_vmx_flags(model, plan)
    if model.enforce and plan.missing:
        raise KvmpyError(f"-cpu {model.spec}: KVM does not support "
                         f"{', '.join(plan.missing)}")
    host_phys = sup[(0x8000_0008, 0)].eax & 0xFF if (0x8000_0008, 0) in sup else 36
    plan.maxphyaddr = _phys_bits(model, host_phys)
    entries = _host_layout(sup, final, plan) if d.host else _model_layout(sup, final, model,
                                                                          plan)
    for e in entries:
        if e.function in (0, 0x8000_0000):
            _set_vendor(e, vendor)
    plan.entries = entries
    return plan


def _decide_word(w: FeatureWord, sup: dict[tuple[int, int], KvmCpuidEntry2],
                 model: CpuModel, irqchip: str, backend: str, plan: CpuidPlan) -> int:
    """The final value of one feature register."""
    e = sup.get((w.leaf, w.subleaf))
    supported = (getattr(e, w.reg) if e is not None else 0) | KVMPY_SUPPORTED.get(w.key, 0)
    value = 0
    for bit, name in enumerate(w.names):
        if name is None:
            continue
        if model.definition.host and name == "invtsc" and model.requested(name) is None:
            wanted = not model.migratable  # QEMU: unmigratable, off unless migratable=no
        else:
            wanted = model.wants(name)
        if not wanted:
            continue
        if not supported >> bit & 1:
            if not model.definition.host or model.requested(name):
                plan.missing.append(name)
                plan.warnings.append("host doesn't support requested feature: "
                                     + describe_bit(w.leaf, w.subleaf, w.reg, bit, name))
            continue
        ok, reason = honour(name, irqchip, backend)
        if not ok:
            plan.withheld[name] = reason
            if model.requested(name):
                plan.warnings.append(f"-cpu +{name} withheld: {reason}")
            continue
        value |= 1 << bit
        plan.passed.append(PassedBit(w.leaf, w.subleaf, w.reg, bit, name, reason))
    return value


def _check_vmx_flags(model: CpuModel, plan: CpuidPlan) -> None:
    """VMX capability flags (QEMU's MSR feature words) need VMX, which no guest of
    kvmpy gets (cpuid_policy: nested VMX is not implemented): dropped with QEMU's
    warning, as QEMU drops them where KVM has no nested VMX."""
    asked = [name for name, on in model.flags if name in VMX_FEATURES and on]
    plan.missing += asked
    plan.warnings += [f"host doesn't support requested feature: {name} (no VMX for this "
                      "guest)" for name in asked]


def _phys_bits(model: CpuModel, host_phys: int) -> int:
    """CPUID.80000008H:EAX[7:0] (QEMU x86_cpu_realizefn: host-phys-bits, phys-bits=)."""
    if model.uses_host_phys_bits:
        return host_phys
    bits = model.phys_bits or QEMU_DEFAULT_PHYS_BITS
    if model.phys_bits and bits > host_phys:
        raise KvmpyError(f"-cpu phys-bits={bits}: must be at most the host's {host_phys}")
    return min(bits, host_phys)


def _apply_words(e: KvmCpuidEntry2, final: dict[tuple[int, int, str], int]) -> None:
    for reg in ("eax", "ebx", "ecx", "edx"):
        value = final.get((e.function, e.index, reg))
        if value is not None:
            setattr(e, reg, value)


def _has(final: dict[tuple[int, int, str], int], name: str) -> bool:
    leaf, subleaf, reg, bit = FEATURES[name]
    return bool(final[(leaf, subleaf, reg)] >> bit & 1)


def _host_layout(sup: dict[tuple[int, int], KvmCpuidEntry2],
                 final: dict[tuple[int, int, str], int], plan: CpuidPlan) -> list[KvmCpuidEntry2]:
    """host/max: every leaf KVM reports, feature registers replaced by the final ones."""
    out = []
    for (f, _), e in sup.items():
        if f == 0xB:
            continue  # rebuilt per vCPU
        if f == 0xD and not _has(final, "xsave"):
            e.eax = e.ebx = e.ecx = e.edx = 0  # QEMU: no XSAVE, leaf 0xD reads 0
        _apply_words(e, final)
        out.append(e)
    return out


def _model_layout(sup: dict[tuple[int, int], KvmCpuidEntry2],
                  final: dict[tuple[int, int, str], int], model: CpuModel,
                  plan: CpuidPlan) -> list[KvmCpuidEntry2]:
    """A named model as QEMU's cpu_x86_cpuid lays it out (see the module docstring)."""
    d = model.definition
    out = []
    for (f, i), src in sup.items():
        e = KvmCpuidEntry2.from_buffer_copy(src)
        if d.level < f < 0x4000_0000 or d.xlevel < f <= 0x8FFF_FFFF or f == 0xB:
            continue
        if 0x8000_0002 <= f <= 0x8000_0004:
            continue  # the brand string, added below
        if f == 0:
            e.eax = d.level
        elif f == 1:
            e.eax = d.signature
            e.ebx &= 0xFFFF
        elif f in (5, 0xA) or (f == 0x8000_000A and not _has(final, "svm")) \
                or (f == 0xD and not _has(final, "xsave")):
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif f == 6 or f == 0x8000_0007:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif f == 7:
            e.ebx = e.ecx = e.edx = e.eax = 0
            if i == 0:
                e.eax = 2 if final[(7, 2, "edx")] else 1 if final[(7, 1, "eax")] \
                    or final[(7, 1, "edx")] else 0
        elif f == 0x8000_0000:
            e.eax = d.xlevel
        elif f == 0x8000_0001:
            e.eax, e.ebx = d.signature, 0
        elif f == 0x8000_0008:
            virt = 57 if _has(final, "la57") else 48
            e.eax, e.ebx, e.ecx, e.edx = plan.maxphyaddr | virt << 8, 0, 0, 0
        _apply_words(e, final)
        out.append(e)
    brand = d.model_id.encode("ascii").ljust(48, b"\0")
    for f in range(0x8000_0002, 0x8000_0005):
        chunk = brand[16 * (f - 0x8000_0002) : 16 * (f - 0x8000_0001)]
        regs = [int.from_bytes(chunk[j : j + 4], "little") for j in range(0, 16, 4)]
        out.append(KvmCpuidEntry2(function=f, index=0, flags=0, eax=regs[0], ebx=regs[1],
                                  ecx=regs[2], edx=regs[3]))
    return out


def vcpu_cpuid(plan: CpuidPlan, vcpu_index: int, nr_vcpus: int) -> list[KvmCpuidEntry2]:
    """The plan's entries for vCPU `vcpu_index` of `nr_vcpus` (topology added)."""
    out: list[KvmCpuidEntry2] = []
    for src in plan.entries:
        e = KvmCpuidEntry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpu_index << 24) | ((nr_vcpus & 0xFF) << 16)
            if nr_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
        out.append(e)
    out.extend(_topology_leaves(vcpu_index, nr_vcpus))
    return out


def guest_cpuid(supported: list[KvmCpuidEntry2], vcpu_index: int, nr_vcpus: int,
                model: CpuModel = HOST, *, irqchip: str = "user",
                backend: str = "unknown") -> list[KvmCpuidEntry2]:
    """The CPUID entries for vCPU `vcpu_index` of `nr_vcpus` under `model`."""
    plan = plan_cpuid(supported, model, irqchip=irqchip, backend=backend)
    return vcpu_cpuid(plan, vcpu_index, nr_vcpus)


def _topology_leaves(vcpu_index: int, nr_vcpus: int) -> list[KvmCpuidEntry2]:
    core_shift = max(0, (nr_vcpus - 1).bit_length())
    flags = FLAG_SIGNIFICANT_INDEX
    smt = KvmCpuidEntry2(function=0xB, index=0, flags=flags, eax=0, ebx=1,
                         ecx=(1 << 8) | 0, edx=vcpu_index)
    core = KvmCpuidEntry2(function=0xB, index=1, flags=flags, eax=core_shift, ebx=nr_vcpus,
                          ecx=(2 << 8) | 1, edx=vcpu_index)
    end = KvmCpuidEntry2(function=0xB, index=2, flags=flags, eax=0, ebx=0,
                         ecx=2, edx=vcpu_index)
    return [smt, core, end]
