"""kvmpy.kvm.system against the real /dev/kvm: open errors, capabilities, CPUID, and
tiny real-mode guests for port I/O, HLT, register state, KVM_TRANSLATE and MSR exits.

Tests marked `kvm` skip when /dev/kvm is missing, except in CI (CI=true), where they
fail. Guest code here runs in KVM's instruction emulator on kvm_pvm (DESIGN.md), so
each guest is a handful of instructions. Every test checks that it leaks no fd.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable, Iterator

import pytest

from kvmpy.errors import KvmUnavailable
from kvmpy.kvm import Kvm, VcpuFd, VmFd
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import structs as s
from kvmpy.memory import GuestMemory

KVM_PATH = "/dev/kvm"
IN_CI = os.environ.get("CI") == "true"

CODE_GPA = 0x1000  # guest code; real mode, CS base 0
MEM_SIZE = 0x10000

# mov $0x42, %al; out %al, $0x10; hlt
OUT_HLT = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])
# wrmsr; hlt  (ECX, EDX:EAX set with set_regs)
WRMSR_HLT = bytes([0x0F, 0x30, 0xF4])


def _open_fds() -> dict[str, str]:
    """fd -> what it refers to (the directory fd listdir used is gone by readlink time)."""
    gc.collect()
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return fds


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = _open_fds()
    yield
    after = _open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"fds leaked by the test: {leaked}"


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm; skip without one (a failure when CI=true)."""
    if not os.path.exists(KVM_PATH):
        reason = f"{KVM_PATH} does not exist: KVM is not available on this machine"
        if IN_CI:
            pytest.fail(f"{reason} (required when CI=true)")
        pytest.skip(reason)
    if not os.access(KVM_PATH, os.R_OK | os.W_OK):
        reason = f"{KVM_PATH} is not readable and writable by this user"
        if IN_CI:
            pytest.fail(f"{reason} (required when CI=true)")
        pytest.skip(reason)
    handle = Kvm.open(KVM_PATH)
    try:
        yield handle
    finally:
        handle.close()


class TinyVm:
    """One VM, one memory region at guest-physical 0, one vCPU in real mode at CODE_GPA."""

    def __init__(self, kvm: Kvm, code: bytes) -> None:
        self.vm: VmFd = kvm.create_vm()
        self.mem = GuestMemory(MEM_SIZE)
        self.vcpu: VcpuFd | None = None
        try:
            for region in self.mem.regions:
                self.vm.set_user_memory_region(
                    region.slot, region.gpa, region.size, region.host_address
                )
            self.mem.write(CODE_GPA, code)
            self.vcpu = self.vm.create_vcpu(0)
            sregs = self.vcpu.get_sregs()
            sregs.cs.base = 0
            sregs.cs.selector = 0
            self.vcpu.set_sregs(sregs)
            self.set_regs(rip=CODE_GPA)
        except BaseException:
            self.close()
            raise

    def set_regs(self, **values: int) -> None:
        """Reset the GPRs to 0 (RFLAGS to its fixed bit 1) and set `values`."""
        regs = s.KvmRegs()
        regs.rflags = 0x2
        for name, value in values.items():
            setattr(regs, name, value)
        self.cpu.set_regs(regs)

    @property
    def cpu(self) -> VcpuFd:
        assert self.vcpu is not None
        return self.vcpu

    def run(self) -> int:
        """KVM_RUN once; the exit reason."""
        assert self.cpu.run() == 0
        return self.cpu.run_struct.exit_reason

    def close(self) -> None:
        if self.vcpu is not None:
            self.vcpu.close()
        self.vm.close()
        self.mem.close()


@pytest.fixture
def make_vm(kvm: Kvm) -> Iterator[Callable[[bytes], TinyVm]]:
    vms: list[TinyVm] = []

    def make(code: bytes) -> TinyVm:
        vm = TinyVm(kvm, code)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.close()


# --- /dev/kvm itself -------------------------------------------------------------------------


@pytest.mark.kvm
def test_open_reports_backend(kvm: Kvm) -> None:
    assert kvm.fd >= 0
    assert kvm.vcpu_mmap_size >= ctypes.sizeof(s.KvmRun)
    assert kvm.backend in ("kvm_pvm", "kvm_intel", "kvm_amd")
    if os.path.exists("/sys/module/kvm_pvm"):
        assert kvm.backend == "kvm_pvm"


def test_open_missing_path_is_one_clear_line() -> None:
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/nonexistent")
    message = str(info.value)
    assert "/nonexistent" in message
    assert "\n" not in message


def test_open_non_kvm_file_is_unavailable() -> None:
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/dev/null")
    assert "/dev/null" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.kvm
def test_required_caps_present(kvm: Kvm) -> None:
    assert kvm.missing_caps() == []
    kvm.require_caps()
    assert kvm.check_extension(k.KVM_CAP_USER_MEMORY) > 0


@pytest.mark.kvm
def test_missing_caps_names_an_absent_capability(kvm: Kvm) -> None:
    bogus = 0x7FFF_FFF0  # far past any KVM_CAP_* number
    assert kvm.missing_caps([k.KVM_CAP_USER_MEMORY, bogus]) == [str(bogus)]
    with pytest.raises(KvmUnavailable, match=str(bogus)):
        kvm.require_caps([bogus])


@pytest.mark.kvm
def test_supported_cpuid_has_leaves_0_and_1(kvm: Kvm) -> None:
    entries = kvm.supported_cpuid()
    by_leaf = {e.function: e for e in entries}
    assert 0 in by_leaf and 1 in by_leaf
    # Leaf 0: the maximum basic leaf is itself listed, and the vendor is a known one.
    assert by_leaf[0].eax in by_leaf
    vendor = b"".join(
        v.to_bytes(4, "little") for v in (by_leaf[0].ebx, by_leaf[0].edx, by_leaf[0].ecx)
    )
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")
    # Leaf 1: a family is reported, and KVM always offers the APIC (EDX bit 9).
    assert by_leaf[1].eax != 0
    assert by_leaf[1].edx & (1 << 9)


# --- tiny guests ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_guest_out_then_hlt(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(OUT_HLT)
    assert vm.run() == k.KVM_EXIT_IO
    io = vm.cpu.run_struct.exit.io
    direction, size, port, count, offset = io.direction, io.size, io.port, io.count, io.data_offset
    del io
    assert (direction, size, port, count) == (k.KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert offset >= ctypes.sizeof(s.KvmRun)  # the data lies past the fields kvmpy maps
    assert bytes(vm.cpu.io_data(offset, size)) == b"\x42"
    assert vm.run() == k.KVM_EXIT_HLT
    assert vm.cpu.get_regs().rip == CODE_GPA + len(OUT_HLT)


@pytest.mark.kvm
def test_regs_round_trip(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(OUT_HLT)
    names = [name for name, _t in s.KvmRegs._fields_ if name != "rflags"]
    values = {name: 0x0101_0101_0101_0101 * (i + 1) for i, name in enumerate(names)}
    vm.set_regs(**values, rflags=0x2 | 0x1 | 0x40)  # fixed bit 1, CF, ZF
    got = vm.cpu.get_regs()
    assert {name: getattr(got, name) for name in names} == values
    assert got.rflags == 0x43


@pytest.mark.kvm
def test_sregs_round_trip(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(OUT_HLT)
    sregs = vm.cpu.get_sregs()
    sregs.ds.base, sregs.ds.selector = 0x1230, 0x123
    sregs.es.base, sregs.es.selector = 0x45670, 0x4567
    sregs.gdt.base, sregs.gdt.limit = 0x8000, 0x27
    sregs.idt.base, sregs.idt.limit = 0x9000, 0x3FF
    sregs.cr2 = 0xDEAD_B000
    vm.cpu.set_sregs(sregs)
    got = vm.cpu.get_sregs()
    assert (got.ds.base, got.ds.selector) == (0x1230, 0x123)
    assert (got.es.base, got.es.selector) == (0x45670, 0x4567)
    assert (got.gdt.base, got.gdt.limit) == (0x8000, 0x27)
    assert (got.idt.base, got.idt.limit) == (0x9000, 0x3FF)
    assert got.cr2 == 0xDEAD_B000
    assert (got.cs.base, got.cs.selector) == (0, 0)


@pytest.mark.kvm
def test_translate_real_mode_and_paged(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(OUT_HLT)
    assert vm.cpu.translate(0x1234) == 0x1234  # paging off: identity
    # 4-level paging (kvm_pvm drops CR0.PG outside long mode), tables at 0x2000-0x5000:
    # linear page 5 -> physical 0x7000, nothing else mapped.
    present_rw = 0x3
    vm.mem.write_u64(0x2000, 0x4000 | present_rw)  # PML4E 0
    vm.mem.write_u64(0x4000, 0x5000 | present_rw)  # PDPTE 0
    vm.mem.write_u64(0x5000, 0x3000 | present_rw)  # PDE 0
    vm.mem.write_u64(0x3000 + 5 * 8, 0x7000 | present_rw)  # PTE 5
    sregs = vm.cpu.get_sregs()
    sregs.cr3 = 0x2000
    sregs.cr4 = 1 << 5  # PAE
    sregs.efer = (1 << 8) | (1 << 10)  # LME | LMA
    sregs.cr0 = 0x8000_0011  # PG | ET | PE
    sregs.cs.l, sregs.cs.db, sregs.cs.s, sregs.cs.type, sregs.cs.present = 1, 0, 1, 0xB, 1
    vm.cpu.set_sregs(sregs)
    assert vm.cpu.get_sregs().cr0 & 0x8000_0000, "KVM_SET_SREGS did not enable paging"
    assert vm.cpu.translate(0x5123) == 0x7123
    assert vm.cpu.translate(0x6000) is None  # PTE 6 not present
    assert vm.cpu.translate(0x40_0000) is None  # PDE 2 not present


@pytest.mark.kvm
def test_msr_exits_filter_and_inval(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(WRMSR_HLT)
    vm.vm.set_msr_filter([0x6E0])  # IA32_TSC_DEADLINE
    mask = (
        k.KVM_MSR_EXIT_REASON_INVAL | k.KVM_MSR_EXIT_REASON_UNKNOWN | k.KVM_MSR_EXIT_REASON_FILTER
    )
    vm.vm.enable_cap(k.KVM_CAP_X86_USER_SPACE_MSR, mask)

    # Denied by the filter: exits with reason FILTER.
    vm.set_regs(rip=CODE_GPA, rcx=0x6E0, rdx=0x1, rax=0x2345_6789)
    assert vm.run() == k.KVM_EXIT_X86_WRMSR
    assert read_msr_exit(vm) == (k.KVM_MSR_EXIT_REASON_FILTER, 0x6E0, 0x1_2345_6789)
    vm.cpu.run_struct.exit.msr.error = 0  # the write succeeded: the guest goes on
    assert vm.run() == k.KVM_EXIT_HLT
    assert vm.cpu.get_regs().rip == CODE_GPA + len(WRMSR_HLT)

    # x2APIC ICR with no in-kernel APIC: exits with reason INVAL and the full 64 bits.
    # The upper halves of RAX/RDX are not part of the value (SDM: WRMSR uses EDX:EAX).
    vm.set_regs(rip=CODE_GPA, rcx=0x830, rdx=0xFFFF_FFFF_1234_5678, rax=0xFFFF_FFFF_9ABC_DEF0)
    assert vm.run() == k.KVM_EXIT_X86_WRMSR
    assert read_msr_exit(vm) == (k.KVM_MSR_EXIT_REASON_INVAL, 0x830, 0x1234_5678_9ABC_DEF0)
    vm.cpu.run_struct.exit.msr.error = 0
    assert vm.run() == k.KVM_EXIT_HLT


def read_msr_exit(vm: TinyVm) -> tuple[int, int, int]:
    msr = vm.cpu.run_struct.exit.msr
    return msr.reason, msr.index, msr.data


@pytest.mark.kvm
def test_msrs_mp_state_and_events_round_trip(make_vm: Callable[[bytes], TinyVm]) -> None:
    vm = make_vm(OUT_HLT)
    sysenter_cs, sysenter_esp = 0x174, 0x175
    assert vm.cpu.set_msrs({sysenter_cs: 0x10, sysenter_esp: 0x1234_5678_9000}) == 2
    assert vm.cpu.get_msrs([sysenter_cs, sysenter_esp]) == [0x10, 0x1234_5678_9000]
    assert vm.cpu.get_mp_state() == k.KVM_MP_STATE_RUNNABLE
    events = vm.cpu.get_vcpu_events()
    assert not events.exception.injected and not events.nmi.pending
    events.flags = k.KVM_VCPUEVENT_VALID_NMI_PENDING
    events.nmi.pending = 1
    vm.cpu.set_vcpu_events(events)
    assert vm.cpu.get_vcpu_events().nmi.pending == 1
