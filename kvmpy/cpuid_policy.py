"""Which CPUID feature bits kvmpy may pass to a guest, and why: one reason per bit.

A bit reaches the guest only if it is requested (by the CPU model or a `+flag`),
supported (KVM_GET_SUPPORTED_CPUID, or emulated by kvmpy itself: the local APIC) and
*honoured*: something in this VMM configuration implements what the bit promises.
`honour()` answers the last question for a bit, an irqchip mode (kvmpy's local APIC,
"user", or KVM's, "kernel") and a KVM backend; every bit kvmpy might pass has an entry
here, and a bit with none is withheld (tests/test_cpuid_policy.py fails on one: a new
bit must be reviewed before any guest sees it).

Withheld, with their reasons (WITHHELD below):
- KVM paravirtual features that KVM implements only with its in-kernel local APIC
  (arch/x86/kvm/x86.c: kvm_pv_enable_async_pf and kvm_pv_enable_async_pf_int return 1,
  a #GP, unless lapic_in_kernel(); PV EOI lives in the in-kernel APIC page
  (kvm_lapic_set_pv_eoi); PV IPIs, PV unhalt and directed yield find their target
  through the in-kernel APIC map (kvm_pv_send_ipi, kvm_pv_kick_cpu_op,
  kvm_sched_yield); poll control tunes KVM's halt polling, which never runs when HLT
  exits to kvmpy). QEMU hides kvm-pv-unhalt the same way (kvm_arch_get_supported_cpuid)
  but leaves the async-PF and PV-EOI bits, which then #GP: kvmpy does not.
- What kvm_pvm (a software KVM: CPL0 guest code runs in KVM's instruction emulator)
  cannot run: hypercalls never return, so every hypercall-based PV feature goes;
  its emulator has no XSAVE/XRSTOR/XGETBV and no CLWB (KVM_EXIT_INTERNAL_ERROR); it
  does not apply a guest's IA32_TSC_ADJUST write to the TSC.
- What nothing here implements: nested VMX/SVM, SGX, PT, debug store, the thermal
  monitor, IBS, LWP, ... (KVM does not report most of them anyway).

Platform note (kvm_pvm): KVM_SET_CPUID2 decides what the guest reads at CPL0 for every
leaf except 1 (ECX/EDX, apart from x2APIC, TSC-deadline and the hypervisor bit), 7 and
0xD, which the guest reads from the host CPU there (measured: a guest given all-zero
leaves 1/7/0xD still reads the host's bits). kvmpy's table is about what kvmpy passes.
"""

from __future__ import annotations

from dataclasses import dataclass

USER, KERNEL = "user", "kernel"  # irqchip modes (MachineConfig.irqchip)
KVM_PVM = "kvm_pvm"

ISA = ("an instruction set extension: the CPU executes it (KVM's instruction emulator "
       "at CPL0 on kvm_pvm); KVM reports it supported")
KVM_MMU = "paging/CR4 behaviour implemented by KVM's MMU and CR4/EFER handling"
KVM_MSR = "MSRs KVM implements in kvm_set_msr_common/kvm_get_msr_common (no VMM exit)"
KVM_SPEC = "speculation-control MSR/enumeration KVM implements for the guest"
HINT = "a property of the host CPU, nothing to emulate"
XSAVE_KVM = "XSAVE state KVM context-switches (KVM_GET/SET_XSAVE)"
KVMCLOCK = "kvmclock: KVM updates the pvclock page in-kernel (kvm_guest_time_update)"

_ISA_NAMES = """
fpu cx8 cmov clflush mmx fxsr sse sse2 pni pclmulqdq ssse3 fma cx16 sse4.1 sse4.2 movbe
popcnt aes avx f16c rdrand bmi1 hle avx2 bmi2 erms rtm avx512f avx512dq rdseed adx
avx512ifma clflushopt clwb avx512cd sha-ni avx512bw avx512vl avx512vbmi avx512vbmi2 gfni
vaes vpclmulqdq avx512vnni avx512bitalg avx512-vpopcntdq rdpid cldemote movdiri movdir64b
avx512-4vnniw avx512-4fmaps avx512-vp2intersect serialize tsx-ldtrk amx-bf16 avx512-fp16
amx-tile amx-int8 sha512 sm3 sm4 avx-vnni avx512-bf16 cmpccxadd wrmsrns amx-fp16 avx-ifma
avx-vnni-int8 avx-ne-convert amx-complex avx-vnni-int16 prefetchiti mmxext fxsr-opt
3dnowext 3dnow lahf-lm abm sse4a misalignsse 3dnowprefetch xop fma4 tbm clzero xsaveerptr
wbnoinvd sep syscall
""".split()

HONOURED: dict[str, str] = {name: ISA for name in _ISA_NAMES}
HONOURED.update({
    # leaf 1 EDX
    "vme": "virtual-8086 mode extensions, run by KVM",
    "de": "CR4.DE debug extensions, handled by KVM",
    "pse": KVM_MMU, "pae": KVM_MMU, "pge": KVM_MMU, "pse36": KVM_MMU, "pat": KVM_MSR,
    "tsc": "the TSC, virtualized by KVM (offset and rate)",
    "msr": "RDMSR/WRMSR: KVM's MSRs, and kvmpy's for the local APIC (MSR exits)",
    "mce": KVM_MSR + " (machine-check MSRs)", "mca": KVM_MSR + " (MCG/MCi banks)",
    "mtrr": KVM_MSR + " (MTRRs)",
    "apic": "the local APIC: kvmpy's (kvmpy/apic) or KVM's with --irqchip kernel",
    "ss": HINT + " (self snoop)",
    "ht": "kvmpy's topology: leaf 1 EBX logical count and leaf 0xB (kvmpy/cpuid.py)",
    # leaf 1 ECX
    "pdcm": KVM_MSR + " (IA32_PERF_CAPABILITIES)",
    "pcid": KVM_MMU + " (CR4.PCIDE, INVPCID)",
    "x2apic": "x2APIC mode: kvmpy's local APIC (x2APIC MSRs exit to kvmpy) or KVM's",
    "tsc-deadline": "IA32_TSC_DEADLINE: kvmpy's APIC timer (MSR filter) or KVM's",
    "xsave": XSAVE_KVM,
    "hypervisor": "kvmpy is a hypervisor (leaf 0x40000000 is KVM's signature)",
    # leaf 6
    "arat": "the APIC timer runs on host time in every guest state (kvmpy's or KVM's)",
    # leaf 7
    "fsgsbase": KVM_MMU + " (CR4.FSGSBASE)", "tsc-adjust": KVM_MSR + " (IA32_TSC_ADJUST)",
    "fdp-excptn-only": HINT + " (x87 FDP behaviour)",
    "zero-fcs-fds": HINT + " (x87 FCS/FDS deprecated)",
    "smep": KVM_MMU, "smap": KVM_MMU, "invpcid": KVM_MMU + " (INVPCID)",
    "umip": "UMIP: KVM enforces (or emulates) CR4.UMIP",
    "pku": KVM_MMU + " (CR4.PKE, PKRU)", "pks": KVM_MMU + " (CR4.PKS, IA32_PKRS)",
    "la57": KVM_MMU + " (5-level paging)", "lam": KVM_MMU + " (linear address masking)",
    "bus-lock-detect": "bus-lock #DB: KVM's DEBUGCTL handling",
    "fsrm": HINT + " (fast short REP MOV)", "fzrm": HINT, "fsrs": HINT, "fsrc": HINT,
    "md-clear": HINT + " (VERW clears buffers)", "mcdt-no": HINT,
    "spec-ctrl": KVM_SPEC, "stibp": KVM_SPEC, "ssbd": KVM_SPEC, "flush-l1d": KVM_SPEC,
    "arch-capabilities": KVM_SPEC + " (IA32_ARCH_CAPABILITIES)",
    "core-capability": KVM_MSR + " (IA32_CORE_CAPABILITIES)",
    "intel-psfd": KVM_SPEC, "ipred-ctrl": KVM_SPEC, "rrsba-ctrl": KVM_SPEC,
    "ddpd-u": KVM_SPEC, "bhi-ctrl": KVM_SPEC,
    # leaf 0xD.1
    "xsaveopt": XSAVE_KVM, "xsavec": XSAVE_KVM, "xgetbv1": XSAVE_KVM, "xsaves": XSAVE_KVM,
    "xfd": XSAVE_KVM + " (XFD MSRs)",
    # KVM's paravirtual leaf 0x40000001
    "kvmclock": KVMCLOCK, "kvmclock2": KVMCLOCK, "kvmclock-stable-bit": KVMCLOCK,
    "kvm-nopiodelay": "a hint that port-0x80 delays are not needed (always true here)",
    "kvm-steal-time": "MSR_KVM_STEAL_TIME: KVM records steal time (record_steal_time), "
                      "no local APIC involved",
    "kvm-pv-tlb-flush": "KVM flushes on the steal-time flag (record_steal_time), no APIC",
    "kvm-asyncpf": "MSR_KVM_ASYNC_PF_EN: KVM's async page faults (in-kernel APIC)",
    "kvm-asyncpf-vmexit": "async PF as #PF vmexit (nested; in-kernel APIC)",
    "kvm-asyncpf-int": "MSR_KVM_ASYNC_PF_INT: KVM delivers through its in-kernel APIC",
    "kvm-pv-eoi": "MSR_KVM_PV_EOI_EN: KVM's in-kernel APIC skips the EOI exit",
    "kvm-pv-unhalt": "KVM_HC_KICK_CPU: KVM wakes the target through its in-kernel APIC",
    "kvm-pv-ipi": "KVM_HC_SEND_IPI: KVM delivers through its in-kernel APIC map",
    "kvm-pv-sched-yield": "KVM_HC_SCHED_YIELD: KVM finds the target in its APIC map",
    "kvm-poll-control": "MSR_KVM_POLL_CONTROL: tunes KVM's in-kernel halt polling",
    # 0x80000001
    "nx": KVM_MMU + " (EFER.NXE)", "lm": "long mode: KVM's EFER.LME/LMA and 64-bit paging",
    "rdtscp": KVM_MSR + " (TSC_AUX; RDTSCP)", "pdpe1gb": KVM_MMU + " (1 GiB pages)",
    "cmp-legacy": HINT + " (AMD core topology hint)",
    "cr8legacy": "LOCK MOV CR0 as CR8 (AMD): KVM's emulator",
    "osvw": KVM_MSR + " (AMD OS-visible workarounds)",
    # 0x80000007, 0x80000008
    "invtsc": "an invariant TSC: KVM's TSC runs at a constant rate (not migratable)",
    "ibpb": KVM_SPEC, "ibrs": KVM_SPEC, "amd-stibp": KVM_SPEC, "stibp-always-on": KVM_SPEC,
    "amd-ssbd": KVM_SPEC, "virt-ssbd": KVM_SPEC, "amd-no-ssb": KVM_SPEC, "amd-psfd": KVM_SPEC,
})

# Bits withheld in a mode (irqchip) or on a backend, with the reason.
NEEDS_KERNEL_APIC = ("needs KVM's in-kernel local APIC, which --irqchip user does not "
                     "create (see the module docstring)")
HYPERCALL_ON_PVM = "a hypercall: vmcall/vmmcall never return on kvm_pvm"
EMULATOR_ON_PVM = "kvm_pvm's instruction emulator cannot run it at CPL0"


@dataclass(frozen=True)
class Withheld:
    """Where a bit is not honoured: in these irqchip modes, or on these backends."""

    modes: frozenset[str] = frozenset()
    backends: frozenset[str] = frozenset()
    reason: str = ""


def _w(reason: str, modes: tuple[str, ...] = (), backends: tuple[str, ...] = ()) -> Withheld:
    return Withheld(frozenset(modes), frozenset(backends), reason)


_NOTHING = ("nothing in kvmpy or KVM implements it for a guest here", (USER, KERNEL))
WITHHELD: dict[str, Withheld] = {
    "kvm-asyncpf": _w(NEEDS_KERNEL_APIC, (USER,)),
    "kvm-asyncpf-vmexit": _w(NEEDS_KERNEL_APIC, (USER,)),
    "kvm-asyncpf-int": _w(NEEDS_KERNEL_APIC, (USER,)),
    "kvm-pv-eoi": _w(NEEDS_KERNEL_APIC, (USER,)),
    "kvm-pv-unhalt": _w(NEEDS_KERNEL_APIC + "; " + HYPERCALL_ON_PVM, (USER,), (KVM_PVM,)),
    "kvm-pv-ipi": _w(NEEDS_KERNEL_APIC + "; " + HYPERCALL_ON_PVM, (USER,), (KVM_PVM,)),
    "kvm-pv-sched-yield": _w(NEEDS_KERNEL_APIC + "; " + HYPERCALL_ON_PVM, (USER,),
                             (KVM_PVM,)),
    "kvm-poll-control": _w("HLT exits to kvmpy, so KVM's halt polling it tunes never "
                           "runs", (USER,)),
    "xsave": _w(EMULATOR_ON_PVM + " (XSAVE/XRSTOR/XGETBV)", (), (KVM_PVM,)),
    "xsaveopt": _w(EMULATOR_ON_PVM, (), (KVM_PVM,)),
    "xsavec": _w(EMULATOR_ON_PVM, (), (KVM_PVM,)),
    "xgetbv1": _w(EMULATOR_ON_PVM, (), (KVM_PVM,)),
    "xsaves": _w(EMULATOR_ON_PVM, (), (KVM_PVM,)),
    "xfd": _w(EMULATOR_ON_PVM, (), (KVM_PVM,)),
    "clwb": _w(EMULATOR_ON_PVM + " (CLWB)", (), (KVM_PVM,)),
    "tsc-adjust": _w("kvm_pvm keeps the guest's TSC offset: after a guest write to "
                     "IA32_TSC_ADJUST the MSR reads back but RDTSC does not move "
                     "(measured; docs/conformance-suite.md, tsc_adjust)", (), (KVM_PVM,)),
}
for _name in """pn ds acpi tm ia64 pbe dtes64 monitor ds-cpl vmx smx est tm2 cid xtpr dca sgx
        mpx pcommit intel-pt avx512pf avx512er waitpkg sgxlc arch-lbr fred lkgs avx10
        kvm-mmu kvm-msi-ext-dest-id kvm-hc-map-gpa-range kvm-migration-control
        kvm-hint-dedicated svm extapic ibs skinit wdt lwp tce nodeid-msr topoext
        perfctr-core perfctr-nb npt lbrv svm-lock nrip-save tsc-scale vmcb-clean
        flushbyasid decodeassists pause-filter pfthreshold avic v-vmsave-vmload vgif vnmi
        svme-addr-chk""".split():
    WITHHELD[_name] = _w(_NOTHING[0], _NOTHING[1])
WITHHELD["kvm-msi-ext-dest-id"] = _w("kvmpy's I/O APIC and MSIs take 8-bit destinations "
                                     "only", (USER, KERNEL))


def honour(name: str, irqchip: str, backend: str) -> tuple[bool, str]:
    """(passed?, why) for the feature `name` in this irqchip mode on this backend."""
    w = WITHHELD.get(name)
    if w is not None and (irqchip in w.modes or backend in w.backends):
        return False, w.reason
    reason = HONOURED.get(name)
    if reason is None:
        return False, "not reviewed: kvmpy has no reason to believe it is honoured"
    return True, reason
