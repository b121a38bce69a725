"""The guest's CPUID: KVM's supported set, shaped by the CPU model (kvmpy/cpumodel.py),
with kvmpy's APIC topology and features.

Leaf 1: EBX[31:24] initial APIC ID = vCPU index, EBX[23:16] logical processors,
ECX bit 21 x2APIC and bit 24 TSC-deadline as the model says (kvmpy emulates both; KVM's
own bits are dropped), ECX bit 31 hypervisor, EDX bit 9 APIC.
Leaf 0xB (SDM Vol. 2A CPUID, "Extended Topology Enumeration"): EDX = x2APIC ID on every
subleaf; level 0 SMT (1 thread per core), level 1 core (N cores per package).

`qemu64` (QEMU's builtin_x86_defs entry, as QEMU builds it on KVM): vendor, signature,
levels and brand string of the model; leaf 1 and 0x80000001 feature bits are the model's
AND KVM's (QEMU's kvm_arch_get_supported_cpuid filter), with AMD's copy of the leaf-1
EDX bits in 0x80000001 EDX (CPUID_EXT2_AMD_ALIASES); leaves of features the model does
not have (5, 6, 7, 0xA, 0xD, 0x80000007, 0x8000000A) read 0; leaves above the model's
levels are dropped. KVM's paravirtual leaves (0x4000_00xx) are kept in every model.
"""

from __future__ import annotations

from kvmpy.cpumodel import HOST, CpuModel
from kvmpy.kvm.structs import KvmCpuidEntry2

CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_EDX_HTT = 1 << 28


def _bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


# QEMU target/i386/cpu.c: PPRO_FEATURES (FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP PGE
# CMOV PAT MMX FXSR SSE SSE2) | MTRR CLFLUSH MCA PSE36.
QEMU64_1_EDX = _bits(0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 16, 23, 24, 25, 26,
                     12, 19, 14, 17)
QEMU64_1_ECX = _bits(0, 13)  # SSE3, CX16
QEMU64_EXT_EDX = _bits(29, 11, 20)  # LM, SYSCALL, NX
QEMU64_EXT_ECX = _bits(0)  # LAHF_LM (SVM: off on KVM, kvm_default_props)
AMD_ALIASES = 0x0183F3FF  # CPUID_EXT2_AMD_ALIASES: leaf-1 EDX bits AMD repeats
QEMU64_LEVEL = 0xD
QEMU64_XLEVEL = 0x8000000A
QEMU64_SIGNATURE = (6 << 8) | (6 << 4) | 3  # family 6, model 6, stepping 3
QEMU64_VENDOR = b"AuthenticAMD"
QEMU64_BRAND = b"QEMU Virtual CPU version 2.5+"
QEMU64_ZEROED = frozenset({5, 6, 7, 0xA, 0xD, 0x80000007, 0x8000000A})


def guest_cpuid(
    supported: list[KvmCpuidEntry2], vcpu_index: int, nr_vcpus: int,
    model: CpuModel = HOST,
) -> list[KvmCpuidEntry2]:
    """The CPUID entries for vCPU `vcpu_index` of `nr_vcpus` under `model`."""
    if model.name == "qemu64":
        supported = _qemu64(supported)
    out: list[KvmCpuidEntry2] = []
    for src in supported:
        e = KvmCpuidEntry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpu_index << 24) | ((nr_vcpus & 0xFF) << 16)
            e.ecx &= ~(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if model.x2apic:
                e.ecx |= CPUID_1_ECX_X2APIC
            if model.tsc_deadline:
                e.ecx |= CPUID_1_ECX_TSC_DEADLINE
            e.edx |= CPUID_1_EDX_APIC
            if nr_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
        elif e.function == 0xB:
            continue  # rebuilt below
        out.append(e)
    out.extend(_topology_leaves(vcpu_index, nr_vcpus))
    return out


def _vendor_regs(vendor: bytes) -> tuple[int, int, int]:
    """(EBX, EDX, ECX) of leaf 0 / 0x80000000 for a 12-byte vendor string."""
    words = [int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8)]
    return words[0], words[1], words[2]


def _qemu64(supported: list[KvmCpuidEntry2]) -> list[KvmCpuidEntry2]:
    """KVM's supported entries reshaped into QEMU's qemu64 (see the module docstring)."""
    ebx, edx, ecx = _vendor_regs(QEMU64_VENDOR)
    brand = QEMU64_BRAND.ljust(48, b"\0")
    out = []
    for src in supported:
        e = KvmCpuidEntry2.from_buffer_copy(src)
        f = e.function
        if QEMU64_LEVEL < f < 0x4000_0000 or QEMU64_XLEVEL < f <= 0x8FFF_FFFF:
            continue
        if f in QEMU64_ZEROED:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif f == 0:
            e.eax = min(e.eax, QEMU64_LEVEL)
            e.ebx, e.edx, e.ecx = ebx, edx, ecx
        elif f == 1:
            e.eax = QEMU64_SIGNATURE
            e.ecx &= QEMU64_1_ECX | CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE
            e.edx &= QEMU64_1_EDX
        elif f == 0x8000_0000:
            e.eax = min(e.eax, QEMU64_XLEVEL)
            e.ebx, e.edx, e.ecx = ebx, edx, ecx
        elif f == 0x8000_0001:
            leaf1 = next((s for s in supported if s.function == 1), None)
            leaf1_edx = (leaf1.edx if leaf1 is not None else 0) & QEMU64_1_EDX
            e.eax = QEMU64_SIGNATURE
            e.ebx = 0
            e.ecx &= QEMU64_EXT_ECX
            e.edx = (e.edx & QEMU64_EXT_EDX) | (leaf1_edx & AMD_ALIASES)
        elif 0x8000_0002 <= f <= 0x8000_0004:
            continue  # the brand string, added below
        out.append(e)
    for f in range(0x8000_0002, 0x8000_0005):  # the brand string
        chunk = brand[16 * (f - 0x8000_0002) : 16 * (f - 0x8000_0001)]
        regs = [int.from_bytes(chunk[i : i + 4], "little") for i in range(0, 16, 4)]
        out.append(KvmCpuidEntry2(function=f, index=0, flags=0, eax=regs[0], ebx=regs[1],
                                  ecx=regs[2], edx=regs[3]))
    return out


def _topology_leaves(vcpu_index: int, nr_vcpus: int) -> list[KvmCpuidEntry2]:
    core_shift = max(0, (nr_vcpus - 1).bit_length())
    flags = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    smt = KvmCpuidEntry2(function=0xB, index=0, flags=flags, eax=0, ebx=1,
                         ecx=(1 << 8) | 0, edx=vcpu_index)
    core = KvmCpuidEntry2(function=0xB, index=1, flags=flags, eax=core_shift, ebx=nr_vcpus,
                          ecx=(2 << 8) | 1, edx=vcpu_index)
    end = KvmCpuidEntry2(function=0xB, index=2, flags=flags, eax=0, ebx=0,
                         ecx=2, edx=vcpu_index)
    return [smt, core, end]
