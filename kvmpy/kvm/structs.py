"""ctypes layouts of the KVM structures kvmpy uses (include/uapi/linux/kvm.h, x86).

Every size and field offset here is checked against the C header by
`tests/test_kvm_abi.py`, which compiles a probe with the machine's gcc.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64


class KvmRegs(ctypes.Structure):
    """struct kvm_regs: general purpose registers (KVM_GET/SET_REGS)."""

    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(ctypes.Structure):
    """struct kvm_segment: a segment register with its hidden descriptor cache."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable: GDTR / IDTR."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs: segment, control and descriptor-table registers."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2."""

    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class KvmCpuid2(ctypes.Structure):
    """struct kvm_cpuid2 header; the entries follow it (see `cpuid2_buffer`)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> ctypes.Structure:
    """A kvm_cpuid2 with room for `nent` entries, as one contiguous structure."""

    class KvmCpuid2N(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * nent)]

    buf = KvmCpuid2N()
    buf.nent = nent
    return buf


class KvmMsrEntry(ctypes.Structure):
    """struct kvm_msr_entry."""

    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrs(ctypes.Structure):
    """struct kvm_msrs header; the entries follow it (see `msrs_buffer`)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(indices: list[int]) -> ctypes.Structure:
    """A kvm_msrs with one entry per MSR index."""

    class KvmMsrsN(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * len(indices))]

    buf = KvmMsrsN()
    buf.nmsrs = len(indices)
    for i, index in enumerate(indices):
        buf.entries[i].index = index
    return buf


class KvmMsrList(ctypes.Structure):
    """struct kvm_msr_list header."""

    _fields_ = [("nmsrs", u32)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmEnableCap(ctypes.Structure):
    """struct kvm_enable_cap (KVM_ENABLE_CAP)."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmInterrupt(ctypes.Structure):
    """struct kvm_interrupt (KVM_INTERRUPT, userspace irqchip only)."""

    _fields_ = [("irq", u32)]


class KvmTranslation(ctypes.Structure):
    """struct kvm_translation (KVM_TRANSLATE): guest linear -> physical address."""

    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class KvmMpState(ctypes.Structure):
    """struct kvm_mp_state."""

    _fields_ = [("mp_state", u32)]


class KvmIrqLevel(ctypes.Structure):
    """struct kvm_irq_level (KVM_IRQ_LINE)."""

    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(ctypes.Structure):
    """struct kvm_pit_config (KVM_CREATE_PIT2)."""

    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmMsi(ctypes.Structure):
    """struct kvm_msi (KVM_SIGNAL_MSI)."""

    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class KvmMsrFilterRange(ctypes.Structure):
    """struct kvm_msr_filter_range: `bitmap` points to one bit per MSR, 1 = allow."""

    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.c_void_p)]


KVM_MSR_FILTER_MAX_RANGES = 16


class KvmMsrFilter(ctypes.Structure):
    """struct kvm_msr_filter (KVM_X86_SET_MSR_FILTER)."""

    _fields_ = [("flags", u32), ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES)]


class _ExceptionEvent(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _InterruptEvent(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _NmiEvent(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _SmiEvent(ctypes.Structure):
    _fields_ = [
        ("smm", u8),
        ("pending", u8),
        ("smm_inside_nmi", u8),
        ("latched_init", u8),
    ]


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (KVM_GET/SET_VCPU_EVENTS)."""

    _fields_ = [
        ("exception", _ExceptionEvent),
        ("interrupt", _InterruptEvent),
        ("nmi", _NmiEvent),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _SmiEvent),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


# --- struct kvm_run and its exit union -------------------------------------------------


class ExitHw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class ExitException(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class ExitIo(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class ExitMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class ExitHypercall(ctypes.Structure):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class ExitEmulationFailure(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class ExitSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class ExitMsr(ctypes.Structure):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class KvmRunExit(ctypes.Union):
    _fields_ = [
        ("hw", ExitHw),
        ("fail_entry", ExitFailEntry),
        ("ex", ExitException),
        ("io", ExitIo),
        ("mmio", ExitMmio),
        ("hypercall", ExitHypercall),
        ("internal", ExitInternal),
        ("emulation_failure", ExitEmulationFailure),
        ("system_event", ExitSystemEvent),
        ("msr", ExitMsr),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """struct kvm_run: the vCPU's shared page, mapped from the vCPU fd."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
    ]


KVM_RUN_EXIT_OFFSET = KvmRun.exit.offset
