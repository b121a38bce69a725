"""The guest's CPUID: KVM's supported set, with kvmpy's APIC topology and features.

Leaf 1: EBX[31:24] initial APIC ID = vCPU index, EBX[23:16] logical processors,
ECX bit 21 x2APIC and bit 24 TSC-deadline (kvmpy emulates both), EDX bit 9 APIC.
Leaf 0xB (SDM Vol. 2A CPUID, "Extended Topology Enumeration"): EDX = x2APIC ID on every
subleaf; level 0 SMT (1 thread per core), level 1 core (N cores per package).
"""

from __future__ import annotations

from kvmpy.kvm.structs import KvmCpuidEntry2

CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_EDX_HTT = 1 << 28


def guest_cpuid(
    supported: list[KvmCpuidEntry2], vcpu_index: int, nr_vcpus: int
) -> list[KvmCpuidEntry2]:
    """The CPUID entries for vCPU `vcpu_index` of `nr_vcpus`."""
    out: list[KvmCpuidEntry2] = []
    for src in supported:
        e = KvmCpuidEntry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpu_index << 24) | ((nr_vcpus & 0xFF) << 16)
            e.ecx |= CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_HYPERVISOR
            e.edx |= CPUID_1_EDX_APIC
            if nr_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
        elif e.function == 0xB:
            continue  # rebuilt below
        out.append(e)
    out.extend(_topology_leaves(vcpu_index, nr_vcpus))
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
