"""KVM ioctl numbers, capabilities, exit reasons and flags (include/uapi/linux/kvm.h).

Numbers are computed from the `_IOC` encoding and the ctypes struct sizes in
`structs.py`, exactly as the C macros do; `tests/test_kvm_abi.py` checks every one
against the C header.
"""

from __future__ import annotations

import ctypes

from kvmpy.kvm import structs as s

# asm-generic/ioctl.h
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(ctype))


def _iow(nr: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype))


# System ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, s.KvmCpuid2)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, s.KvmMsrList)

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, s.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, s.KvmIrqLevel)
KVM_CREATE_PIT2 = _iow(0x77, s.KvmPitConfig)
KVM_SIGNAL_MSI = _iow(0xA5, s.KvmMsi)
KVM_ENABLE_CAP = _iow(0xA3, s.KvmEnableCap)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, s.KvmMsrFilter)

# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, s.KvmRegs)
KVM_SET_REGS = _iow(0x82, s.KvmRegs)
KVM_GET_SREGS = _ior(0x83, s.KvmSregs)
KVM_SET_SREGS = _iow(0x84, s.KvmSregs)
KVM_TRANSLATE = _iowr(0x85, s.KvmTranslation)
KVM_INTERRUPT = _iow(0x86, s.KvmInterrupt)
KVM_GET_MSRS = _iowr(0x88, s.KvmMsrs)
KVM_SET_MSRS = _iow(0x89, s.KvmMsrs)
KVM_SET_CPUID2 = _iow(0x90, s.KvmCpuid2)
KVM_NMI = _io(0x9A)
KVM_GET_MP_STATE = _ior(0x98, s.KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, s.KvmMpState)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_VCPU_EVENTS = _ior(0x9F, s.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, s.KvmVcpuEvents)

# Capabilities (KVM_CHECK_EXTENSION arguments)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_HYPERV = 44
KVM_CAP_SYNC_REGS = 74
KVM_SYNC_X86_EVENTS = 1 << 2  # kvm_run.s.regs.events (arch/x86/include/uapi/asm/kvm.h)
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X2APIC_API = 129
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

CAPABILITY_NAMES = {
    KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID",
    KVM_CAP_MP_STATE: "KVM_CAP_MP_STATE",
    KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    KVM_CAP_X86_USER_SPACE_MSR: "KVM_CAP_X86_USER_SPACE_MSR",
    KVM_CAP_X86_MSR_FILTER: "KVM_CAP_X86_MSR_FILTER",
    KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    KVM_CAP_SPLIT_IRQCHIP: "KVM_CAP_SPLIT_IRQCHIP",
    KVM_CAP_X2APIC_API: "KVM_CAP_X2APIC_API",
}

# Exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_") :]
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}
# The read of a signal-interrupted KVM_RUN: not a kvm_run exit reason but an errno.
EXIT_EINTR_NAME = "INTR"

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.msr.reason and the KVM_CAP_X86_USER_SPACE_MSR mask
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# KVM_X86_SET_MSR_FILTER
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1

# kvm_mp_state.mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

# Internal error suberrors
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# Memory slot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
