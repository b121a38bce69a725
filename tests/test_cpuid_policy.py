"""Every CPUID feature bit kvmpy passes to a guest, and why it is honoured.

The entries kvmpy hands KVM_SET_CPUID2 are scanned bit by bit (every feature register
of kvmpy/cpufeatures.py); each set bit must have a reason in kvmpy/cpuid_policy.py for
that irqchip mode and backend, else the test fails. On the real host the table is
printed (`pytest -s tests/test_cpuid_policy.py`)."""

from __future__ import annotations

import pytest

from kvmpy.cpufeatures import AMD_ALIASES, FEATURE_WORDS, FEATURES, bit_name
from kvmpy.cpuid import guest_cpuid
from kvmpy.cpuid_policy import HONOURED, KERNEL, USER, WITHHELD, honour
from kvmpy.cpumodel import MODEL_DEFS, parse_cpu
from kvmpy.kvm.structs import KvmCpuidEntry2

HTT = (1, 0, "edx", 28)


def reason_for(leaf: int, subleaf: int, reg: str, bit: int, irqchip: str, backend: str,
               amd: bool) -> tuple[str, str | None]:
    """(name, reason) of a set bit; reason None if kvmpy has none for it here."""
    if (leaf, subleaf, reg, bit) == HTT:
        return "ht", HONOURED["ht"]
    if (leaf, reg) == (0x8000_0001, "edx") and amd and AMD_ALIASES >> bit & 1:
        name = bit_name(1, 0, "edx", bit)  # AMD's copy of the leaf-1 EDX bit
    else:
        name = bit_name(leaf, subleaf, reg, bit)
    ok, reason = honour(name, irqchip, backend)
    return name, reason if ok else None


def passed_bits(entries: list[KvmCpuidEntry2], irqchip: str, backend: str
                ) -> list[tuple[str, str, str | None]]:
    """(place, name, reason) for every set bit of every feature register given to KVM."""
    by_key = {(e.function, e.index): e for e in entries}
    vendor = by_key[(0, 0)]
    amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x68747541, 0x69746E65, 0x444D4163)
    out = []
    for w in FEATURE_WORDS:
        e = by_key.get((w.leaf, w.subleaf))
        value = getattr(e, w.reg) if e is not None else 0
        for bit in range(32):
            if value >> bit & 1:
                name, reason = reason_for(w.leaf, w.subleaf, w.reg, bit, irqchip, backend, amd)
                place = f"{w.leaf:#x}.{w.subleaf} {w.reg.upper()}[{bit}]"
                out.append((place, name, reason))
    return out


def entry(function: int, index: int = 0, **regs: int) -> KvmCpuidEntry2:
    return KvmCpuidEntry2(function=function, index=index, flags=0, eax=regs.get("eax", 0),
                          ebx=regs.get("ebx", 0), ecx=regs.get("ecx", 0),
                          edx=regs.get("edx", 0))


ALL_ONES = 0xFFFF_FFFF


def everything_supported(vendor: bytes) -> list[KvmCpuidEntry2]:
    """A KVM that claims every bit of every feature register (and a vendor)."""
    ebx, edx, ecx = (int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8))
    entries = {(0, 0): entry(0, eax=0x24, ebx=ebx, ecx=ecx, edx=edx),
               (0x8000_0000, 0): entry(0x8000_0000, eax=0x8000_0021, ebx=ebx, ecx=ecx,
                                       edx=edx),
               (0x8000_0008, 0): entry(0x8000_0008, eax=0x3930)}
    for w in FEATURE_WORDS:
        e = entries.setdefault((w.leaf, w.subleaf), entry(w.leaf, w.subleaf))
        setattr(e, w.reg, ALL_ONES)
    return list(entries.values())


def test_every_name_is_reviewed() -> None:
    # A feature name kvmpy knows is either honoured (with a reason) or withheld (with one).
    assert set(FEATURES) <= set(HONOURED) | set(WITHHELD)
    assert all(HONOURED.values()) and all(w.reason for w in WITHHELD.values())


@pytest.mark.parametrize("vendor", [b"GenuineIntel", b"AuthenticAMD"])
@pytest.mark.parametrize("irqchip", [USER, KERNEL])
@pytest.mark.parametrize("backend", ["kvm_pvm", "kvm_intel"])
@pytest.mark.parametrize("model", sorted(MODEL_DEFS))
def test_no_bit_without_a_reason_even_if_kvm_claims_everything(
        vendor: bytes, irqchip: str, backend: str, model: str) -> None:
    entries = guest_cpuid(everything_supported(vendor), 0, 2, parse_cpu(model),
                          irqchip=irqchip, backend=backend)
    bits = passed_bits(entries, irqchip, backend)
    assert bits, "no bits at all"
    assert [b for b in bits if b[2] is None] == []
    names = {b[1] for b in bits}
    # What needs KVM's in-kernel APIC never goes with kvmpy's own; nor hypercalls to pvm.
    if irqchip == USER:
        assert not names & {"kvm-asyncpf", "kvm-asyncpf-int", "kvm-pv-eoi", "kvm-pv-ipi",
                            "kvm-pv-unhalt", "kvm-pv-sched-yield", "kvm-poll-control"}
    if backend == "kvm_pvm":
        assert not names & {"kvm-pv-ipi", "kvm-pv-unhalt", "kvm-pv-sched-yield", "xsave",
                            "clwb"}
    assert not names & {"vmx", "svm", "sgx", "kvm-msi-ext-dest-id"}


def test_a_bit_without_a_reason_is_caught() -> None:
    # The scan itself: a set bit nobody reviewed (leaf 1 EDX bit 10 has no name) fails it.
    entries = guest_cpuid(everything_supported(b"GenuineIntel"), 0, 1, parse_cpu("host"),
                          backend="kvm_pvm")
    leaf1 = next(e for e in entries if e.function == 1)
    leaf1.edx |= 1 << 10
    unexplained = [b for b in passed_bits(entries, USER, "kvm_pvm") if b[2] is None]
    assert [(p, n) for p, n, _ in unexplained] == [("0x1.0 EDX[10]", "CPUID.01H:EDX [bit 10]")]


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", [USER, KERNEL])
def test_this_hosts_cpuid_every_bit_with_its_reason(irqchip: str) -> None:
    from kvmpy.kvm import Kvm

    kvm = Kvm.open()
    try:
        supported, backend = kvm.supported_cpuid(), kvm.backend
    finally:
        kvm.close()
    for spec in ("host", "qemu64", "Skylake-Server", "Opteron_G1,vendor=AuthenticAMD"):
        entries = guest_cpuid(supported, 0, 2, parse_cpu(spec), irqchip=irqchip,
                              backend=backend)
        bits = passed_bits(entries, irqchip, backend)
        print(f"\n-cpu {spec}, --irqchip {irqchip}, {backend}: {len(bits)} bits")
        for place, name, reason in bits:
            print(f"  {place:<22} {name:<20} {reason}")
        assert [b for b in bits if b[2] is None] == []
