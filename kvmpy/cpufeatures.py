"""CPUID feature bits by QEMU's names (target/i386/cpu.c `feature_word_info`).

Each feature word is one CPUID register of one leaf (and subleaf); its bits have the
names QEMU's `-cpu MODEL,+name` accepts. `FEATURES` maps a name to its (leaf, subleaf,
register, bit); `ALIASES` holds QEMU's legacy spellings (target/i386/cpu.c
`x86_cpu_feature_name`/`feat2prop`: an underscore is a hyphen, "sse3" is "pni", ...).
VMX capability names (QEMU's MSR feature words FEAT_VMX_*) are listed separately:
they are MSR bits, not CPUID bits, and only exist with nested VMX.
"""

from __future__ import annotations

from dataclasses import dataclass

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"


@dataclass(frozen=True)
class FeatureWord:
    """One CPUID register holding feature bits (QEMU's FeatureWordInfo)."""

    leaf: int
    subleaf: int
    reg: str
    names: tuple[str | None, ...]  # 32 entries, bit 0 first

    @property
    def key(self) -> tuple[int, int, str]:
        return self.leaf, self.subleaf, self.reg


def _word(leaf: int, subleaf: int, reg: str, names: str) -> FeatureWord:
    """`names`: 32 whitespace-separated names, "-" for a bit with no name."""
    parts = [None if n == "-" else n for n in names.split()]
    assert len(parts) == 32, (hex(leaf), reg, len(parts))
    return FeatureWord(leaf, subleaf, reg, tuple(parts))


FEATURE_WORDS: tuple[FeatureWord, ...] = (
    _word(1, 0, EDX, """fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov
          pat pse36 pn clflush - ds acpi mmx fxsr sse sse2 ss ht tm ia64 pbe"""),
    _word(1, 0, ECX, """pni pclmulqdq dtes64 monitor ds-cpl vmx smx est tm2 ssse3 cid -
          fma cx16 xtpr pdcm - pcid dca sse4.1 sse4.2 x2apic movbe popcnt
          tsc-deadline aes xsave - avx f16c rdrand hypervisor"""),
    _word(6, 0, EAX, "- - arat" + " -" * 29),
    _word(7, 0, EBX, """fsgsbase tsc-adjust sgx bmi1 hle avx2 fdp-excptn-only smep
          bmi2 erms invpcid rtm - zero-fcs-fds mpx - avx512f avx512dq rdseed adx
          smap avx512ifma pcommit clflushopt clwb intel-pt avx512pf avx512er
          avx512cd sha-ni avx512bw avx512vl"""),
    _word(7, 0, ECX, """- avx512vbmi umip pku - waitpkg avx512vbmi2 - gfni vaes vpclmulqdq
          avx512vnni avx512bitalg - avx512-vpopcntdq - la57 - - - - - rdpid -
          bus-lock-detect cldemote - movdiri movdir64b - sgxlc pks"""),
    _word(7, 0, EDX, """- - avx512-4vnniw avx512-4fmaps fsrm - - - avx512-vp2intersect -
          md-clear - - - serialize - tsx-ldtrk - - arch-lbr - - amx-bf16 avx512-fp16
          amx-tile amx-int8 spec-ctrl stibp flush-l1d arch-capabilities
          core-capability ssbd"""),
    _word(7, 1, EAX, """sha512 sm3 sm4 - avx-vnni avx512-bf16 - cmpccxadd - - fzrm fsrs
          fsrc - - - - fred lkgs wrmsrns - amx-fp16 - avx-ifma - - lam - - - - -"""),
    _word(7, 1, EDX, """- - - - avx-vnni-int8 avx-ne-convert - - amx-complex -
          avx-vnni-int16 - - - prefetchiti - - - - avx10""" + " -" * 12),
    _word(7, 2, EDX, "intel-psfd ipred-ctrl rrsba-ctrl ddpd-u bhi-ctrl mcdt-no" + " -" * 26),
    _word(0xD, 1, EAX, "xsaveopt xsavec xgetbv1 xsaves xfd" + " -" * 27),
    _word(0x4000_0001, 0, EAX, """kvmclock kvm-nopiodelay kvm-mmu kvmclock2 kvm-asyncpf
          kvm-steal-time kvm-pv-eoi kvm-pv-unhalt - kvm-pv-tlb-flush kvm-asyncpf-vmexit
          kvm-pv-ipi kvm-poll-control kvm-pv-sched-yield kvm-asyncpf-int
          kvm-msi-ext-dest-id kvm-hc-map-gpa-range kvm-migration-control - - - - - -
          kvmclock-stable-bit - - - - - - -"""),
    _word(0x4000_0001, 0, EDX, "kvm-hint-dedicated" + " -" * 31),
    _word(0x8000_0001, 0, EDX, """- - - - - - - - - - - syscall - - - - - - - - nx - mmxext
          - - fxsr-opt pdpe1gb rdtscp - lm 3dnowext 3dnow"""),
    _word(0x8000_0001, 0, ECX, """lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a
          misalignsse 3dnowprefetch osvw ibs xop skinit wdt - lwp fma4 tce -
          nodeid-msr - tbm topoext perfctr-core perfctr-nb - - - - - - -"""),
    _word(0x8000_0007, 0, EDX, "- - - - - - - - invtsc" + " -" * 23),
    _word(0x8000_0008, 0, EBX, """clzero - xsaveerptr - - - - - - wbnoinvd - - ibpb - ibrs
          amd-stibp - stibp-always-on - - - - - - amd-ssbd virt-ssbd amd-no-ssb -
          amd-psfd - - -"""),
    _word(0x8000_000A, 0, EDX, """npt lbrv svm-lock nrip-save tsc-scale vmcb-clean
          flushbyasid decodeassists - - pause-filter - pfthreshold avic -
          v-vmsave-vmload vgif - - - - - - - - vnmi - - svme-addr-chk - - -"""),
)

# Leaf 1 EDX bits AMD repeats in 0x80000001 EDX (QEMU's CPUID_EXT2_AMD_ALIASES).
AMD_ALIASES = 0x0183F3FF

# name -> (leaf, subleaf, register, bit). "kvmclock" names bits 0 and 3 in QEMU; kvmpy
# calls bit 3 (the "new" kvmclock MSRs) kvmclock2 and lets "kvmclock" set both.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    name: (w.leaf, w.subleaf, w.reg, bit)
    for w in FEATURE_WORDS for bit, name in enumerate(w.names) if name is not None
}
# QEMU's legacy spellings (target/i386/cpu.c: "sse3" is "pni", ...); '_' becomes '-'
# before the lookup, as QEMU's feat2prop does.
ALIASES = {
    "sse3": "pni", "pclmuldq": "pclmulqdq", "sse4-1": "sse4.1", "sse4-2": "sse4.2",
    "xd": "nx", "ffxsr": "fxsr-opt", "i64": "lm", "kvm-pv-tlbflush": "kvm-pv-tlb-flush",
}
# Names that also set a second bit ("kvmclock": both kvmclock MSR pairs, QEMU's
# duplicate name for bits 0 and 3).
COMPANIONS = {"kvmclock": ("kvmclock2",)}

# QEMU's FEAT_VMX_* MSR feature words (VMX capability MSRs, nested VMX only).
VMX_FEATURES = frozenset("""
vmx-activity-hlt vmx-activity-shutdown vmx-activity-wait-sipi vmx-apicv-register
vmx-apicv-vid vmx-apicv-x2apic vmx-apicv-xapic vmx-cr3-load-noexit vmx-cr3-store-noexit
vmx-cr8-load-exit vmx-cr8-store-exit vmx-desc-exit vmx-encls-exit vmx-entry-ia32e-mode
vmx-entry-load-bndcfgs vmx-entry-load-efer vmx-entry-load-pat
vmx-entry-load-perf-global-ctrl vmx-entry-load-pkrs vmx-entry-load-rtit-ctl
vmx-entry-noload-debugctl vmx-ept vmx-ept-1gb vmx-ept-2mb vmx-ept-advanced-exitinfo
vmx-ept-execonly vmx-eptad vmx-eptp-switching vmx-exit-ack-intr vmx-exit-clear-bndcfgs
vmx-exit-clear-rtit-ctl vmx-exit-load-efer vmx-exit-load-pat
vmx-exit-load-perf-global-ctrl vmx-exit-load-pkrs vmx-exit-nosave-debugctl
vmx-exit-save-efer vmx-exit-save-pat vmx-exit-save-preemption-timer vmx-flexpriority
vmx-hlt-exit vmx-ins-outs vmx-intr-exit vmx-invept vmx-invept-all-context
vmx-invept-single-context vmx-invept-single-context-noglobals vmx-invlpg-exit
vmx-invpcid-exit vmx-invvpid vmx-invvpid-all-context vmx-invvpid-single-addr
vmx-io-bitmap vmx-io-exit vmx-monitor-exit vmx-movdr-exit vmx-msr-bitmap vmx-mtf
vmx-mwait-exit vmx-nmi-exit vmx-page-walk-4 vmx-page-walk-5 vmx-pause-exit vmx-ple
vmx-pml vmx-posted-intr vmx-preemption-timer vmx-rdpmc-exit vmx-rdrand-exit
vmx-rdseed-exit vmx-rdtsc-exit vmx-rdtscp-exit vmx-secondary-ctls vmx-shadow-vmcs
vmx-store-lma vmx-true-ctls vmx-tsc-offset vmx-tsc-scaling vmx-unrestricted-guest
vmx-vintr-pending vmx-vmfunc vmx-vmwrite-vmexit-fields vmx-vnmi vmx-vnmi-pending
vmx-vpid vmx-wbinvd-exit vmx-xsaves vmx-zero-len-inject vmx-mbec
""".split())


def canonical(name: str) -> str:
    """QEMU's spelling of a feature name: '_' -> '-', then the legacy aliases."""
    name = name.replace("_", "-")
    return ALIASES.get(name, name)


def feature_word(leaf: int, subleaf: int, reg: str) -> FeatureWord | None:
    for w in FEATURE_WORDS:
        if w.key == (leaf, subleaf, reg):
            return w
    return None


def bit_name(leaf: int, subleaf: int, reg: str, bit: int) -> str:
    """QEMU's name of a CPUID bit, or "CPUID.<leaf>H:<REG>[bit n]" when it has none."""
    w = feature_word(leaf, subleaf, reg)
    name = w.names[bit] if w is not None else None
    return name or describe_bit(leaf, subleaf, reg, bit)


def describe_bit(leaf: int, subleaf: int, reg: str, bit: int, name: str | None = None) -> str:
    """QEMU's spelling of a bit (x86_cpu_filter_features' warning), e.g.
    "CPUID.07H:EBX.clwb [bit 24]", or "CPUID.07H:EBX [bit 24]" without a name."""
    sub = f".{subleaf:02X}H" if subleaf else ""
    dot = f".{name}" if name else ""
    return f"CPUID.{leaf:02X}H{sub}:{reg.upper()}{dot} [bit {bit}]"
