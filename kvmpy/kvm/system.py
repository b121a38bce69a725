"""File-descriptor wrappers for /dev/kvm, a VM and a vCPU.

ioctls go through libc's `ioctl` via ctypes: the call releases the GIL (so vCPU
threads run KVM_RUN in parallel), does not retry on EINTR (a kick must surface as an
exit), and passes buffers of any size (CPython's `fcntl.ioctl` holds the GIL for
buffers over 1024 bytes; see DESIGN.md "Platform facts").
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from kvmpy.errors import KvmUnavailable
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import structs as s
from kvmpy.kvm.run import RunView

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

KVM_API_VERSION = 12

# What kvmpy cannot run without (userspace APIC through MSR exits, race-free kicks).
REQUIRED_CAPS = (
    k.KVM_CAP_USER_MEMORY,
    k.KVM_CAP_EXT_CPUID,
    k.KVM_CAP_MP_STATE,
    k.KVM_CAP_IMMEDIATE_EXIT,
    k.KVM_CAP_X86_USER_SPACE_MSR,
    k.KVM_CAP_X86_MSR_FILTER,
)


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """ioctl(2) that raises OSError on failure. `arg` is a ctypes object or an int."""
    if arg is None:
        ret = _ioctl(fd, request, None)
    elif isinstance(arg, int):
        ret = _ioctl(fd, request, arg)
    else:
        ret = _ioctl(fd, request, ctypes.byref(arg))  # type: ignore[arg-type]
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (ioctl {request:#x})")
    return ret


def detect_backend() -> str:
    """Which KVM module serves /dev/kvm: kvm_intel, kvm_amd or kvm_pvm (software)."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if Path("/sys/module", name).exists():
            return name
    return "unknown"


class Kvm:
    """/dev/kvm: capability checks, supported CPUID, VM creation."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = ioctl(fd, k.KVM_GET_VCPU_MMAP_SIZE)
        self.backend = detect_backend()

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> Kvm:
        """Open /dev/kvm, with one clear line when it is missing, not permitted or too old."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: KVM is not available on this machine"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path}: permission denied (run as root or join the 'kvm' group)"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"{path}: {e.strerror}") from None
        try:
            version = ioctl(fd, k.KVM_GET_API_VERSION)
        except OSError as e:
            os.close(fd)
            raise KvmUnavailable(f"{path} is not a KVM device: {e.strerror}") from None
        if version != KVM_API_VERSION:
            os.close(fd)
            raise KvmUnavailable(f"{path}: KVM API version {version}, need {KVM_API_VERSION}")
        return cls(fd)

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)

    def missing_caps(self, caps: Iterable[int] = REQUIRED_CAPS) -> list[str]:
        return [k.CAPABILITY_NAMES.get(c, str(c)) for c in caps if self.check_extension(c) <= 0]

    def require_caps(self, caps: Iterable[int] = REQUIRED_CAPS) -> None:
        missing = self.missing_caps(caps)
        if missing:
            raise KvmUnavailable(f"KVM lacks capabilities kvmpy needs: {', '.join(missing)}")

    def supported_cpuid(self) -> list[s.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits (E2BIG)."""
        nent = 64
        while True:
            buf = s.cpuid2_buffer(nent)
            try:
                ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [s.KvmCpuidEntry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def create_vm(self) -> VmFd:
        return VmFd(self, ioctl(self.fd, k.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A KVM VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        region = s.KvmUserspaceMemoryRegion(slot, flags, gpa, size, host_address)
        ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = s.KvmEnableCap()
        ec.cap = cap
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, k.KVM_ENABLE_CAP, ec)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, k.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, k.KVM_CREATE_IRQCHIP)

    def irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` of the in-kernel irqchip."""
        ioctl(self.fd, k.KVM_IRQ_LINE, s.KvmIrqLevel(irq, 1 if level else 0))

    def set_msr_filter(self, deny: Iterable[int], *, read: bool = True, write: bool = True) -> None:
        """Default-allow filter that denies `deny` (each becomes an exit, reason FILTER).

        One range per MSR, a one-bit bitmap of 0 (= deny). KVM copies the bitmaps.
        """
        msrs = list(deny)
        if len(msrs) > s.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError("too many MSRs for one filter")
        filt = s.KvmMsrFilter()
        filt.flags = k.KVM_MSR_FILTER_DEFAULT_ALLOW
        bitmaps = [ctypes.create_string_buffer(8) for _ in msrs]  # all zero: deny
        flags = (k.KVM_MSR_FILTER_READ if read else 0) | (k.KVM_MSR_FILTER_WRITE if write else 0)
        for i, (msr, bitmap) in enumerate(zip(msrs, bitmaps, strict=True)):
            r = filt.ranges[i]
            r.flags = flags
            r.nmsrs = 1
            r.base = msr
            r.bitmap = ctypes.addressof(bitmap)
        ioctl(self.fd, k.KVM_X86_SET_MSR_FILTER, filt)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = ioctl(self.fd, k.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A KVM vCPU file descriptor and its mapped `struct kvm_run`."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # ctypes view for clarity (diagnostics, tests); RunView for the exit path.
        self.run_struct = s.KvmRun.from_buffer(self._map)
        self.view = RunView(self._map)
        # Called before every vCPU ioctl but KVM_RUN: the native core's
        # Core.events_changed (an interrupt it queued in kvm_run.s.regs reaches KVM
        # first, and its snapshot of the vCPU's events is no longer trusted).
        self.before_ioctl: Callable[[], None] | None = None

    def _ioctl(self, request: int, arg: object = None) -> int:
        if self.before_ioctl is not None:
            self.before_ioctl()
        return ioctl(self.fd, request, arg)

    @property
    def mapping(self) -> mmap.mmap:
        """The mapped kvm_run page (the native core holds a buffer view of it)."""
        return self._map

    def run(self) -> int:
        """KVM_RUN. Returns 0, or -errno for EINTR/EAGAIN (a kick is an ordinary exit)."""
        if _ioctl(self.fd, k.KVM_RUN, None) == 0:
            return 0
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.EAGAIN):
            return -err
        raise OSError(err, f"KVM_RUN: {os.strerror(err)}")

    def io_data(self, offset: int, size: int) -> memoryview:
        """The KVM_EXIT_IO data buffer inside the kvm_run mapping."""
        return memoryview(self._map)[offset : offset + size]

    def get_regs(self) -> s.KvmRegs:
        regs = s.KvmRegs()
        self._ioctl(k.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.KvmRegs) -> None:
        self._ioctl(k.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        sregs = s.KvmSregs()
        self._ioctl(k.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self._ioctl(k.KVM_SET_SREGS, sregs)

    def set_cpuid(self, entries: list[s.KvmCpuidEntry2]) -> None:
        buf = s.cpuid2_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self._ioctl(k.KVM_SET_CPUID2, buf)

    def get_msrs(self, indices: list[int]) -> list[int]:
        buf = s.msrs_buffer(indices)
        n = self._ioctl(k.KVM_GET_MSRS, buf)
        return [buf.entries[i].data for i in range(n)]

    def set_msrs(self, values: dict[int, int]) -> int:
        buf = s.msrs_buffer(list(values))
        for i, v in enumerate(values.values()):
            buf.entries[i].data = v
        return self._ioctl(k.KVM_SET_MSRS, buf)

    def translate(self, linear_address: int) -> int | None:
        """Guest linear -> physical address through the guest's page tables, or None."""
        tr = s.KvmTranslation()
        tr.linear_address = linear_address
        try:
            self._ioctl(k.KVM_TRANSLATE, tr)
        except OSError:
            return None
        return tr.physical_address if tr.valid else None

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return self._ioctl(k.KVM_GET_TSC_KHZ)

    def interrupt(self, vector: int) -> None:
        self._ioctl(k.KVM_INTERRUPT, s.KvmInterrupt(vector))

    def nmi(self) -> None:
        self._ioctl(k.KVM_NMI)

    def get_mp_state(self) -> int:
        st = s.KvmMpState()
        self._ioctl(k.KVM_GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        self._ioctl(k.KVM_SET_MP_STATE, s.KvmMpState(state))

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        ev = s.KvmVcpuEvents()
        self._ioctl(k.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev: s.KvmVcpuEvents) -> None:
        self._ioctl(k.KVM_SET_VCPU_EVENTS, ev)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        del self.run_struct
        try:
            self._map.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1
