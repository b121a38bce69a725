"""Typed, allocation-light views of the mapped `struct kvm_run`.

The exit path reads a few fields per exit. ctypes attribute access on nested
structures builds a new ctypes object per access, so the hot fields are read through
`memoryview.cast` views at offsets computed once from the ctypes layout (which
`tests/test_kvm_abi.py` checks against the C header).
"""

from __future__ import annotations

import mmap

from kvmpy.kvm import structs as s

_EXIT = s.KvmRun.exit.offset


def _index(offset: int, width: int) -> int:
    assert offset % width == 0, "misaligned kvm_run field"
    return offset // width


# Byte offsets / element indices into the u8/u16/u32/u64 views.
REQUEST_INTERRUPT_WINDOW = s.KvmRun.request_interrupt_window.offset
IMMEDIATE_EXIT = s.KvmRun.immediate_exit.offset
READY_FOR_INJECTION = s.KvmRun.ready_for_interrupt_injection.offset
IF_FLAG = s.KvmRun.if_flag.offset
EXIT_REASON = _index(s.KvmRun.exit_reason.offset, 4)
CR8 = _index(s.KvmRun.cr8.offset, 8)
APIC_BASE = _index(s.KvmRun.apic_base.offset, 8)

IO_DIRECTION = _EXIT + s.ExitIo.direction.offset
IO_SIZE = _EXIT + s.ExitIo.size.offset
IO_PORT = _index(_EXIT + s.ExitIo.port.offset, 2)
IO_COUNT = _index(_EXIT + s.ExitIo.count.offset, 4)
IO_DATA_OFFSET = _index(_EXIT + s.ExitIo.data_offset.offset, 8)

MMIO_PHYS_ADDR = _index(_EXIT + s.ExitMmio.phys_addr.offset, 8)
MMIO_DATA = _EXIT + s.ExitMmio.data.offset  # byte offset of data[8]
MMIO_DATA_U64 = _index(MMIO_DATA, 8)
MMIO_LEN = _index(_EXIT + s.ExitMmio.len.offset, 4)
MMIO_IS_WRITE = _EXIT + s.ExitMmio.is_write.offset

MSR_ERROR = _EXIT + s.ExitMsr.error.offset
MSR_REASON = _index(_EXIT + s.ExitMsr.reason.offset, 4)
MSR_INDEX = _index(_EXIT + s.ExitMsr.index.offset, 4)
MSR_DATA = _index(_EXIT + s.ExitMsr.data.offset, 8)


class RunView:
    """u8/u16/u32/u64 views of one vCPU's kvm_run page (shared with the kernel)."""

    __slots__ = ("u8", "u16", "u32", "u64")

    def __init__(self, mapping: mmap.mmap) -> None:
        self.u8 = memoryview(mapping)
        self.u16 = self.u8.cast("H")
        self.u32 = self.u8.cast("I")
        self.u64 = self.u8.cast("Q")

    def release(self) -> None:
        for view in (self.u64, self.u32, self.u16, self.u8):
            view.release()
