"""CPU register state at boot: 32-bit flat protected mode (multiboot) and real mode (SIPI).

Multiboot v1 spec section 3.2 "Machine state": CS a 32-bit read/execute code segment
with offset 0 and limit 0xFFFFFFFF, DS/ES/FS/GS/SS 32-bit read/write data segments with
the same base and limit, CR0.PG = 0, CR0.PE = 1, EFLAGS.IF = 0, EAX = 0x2BADB002,
EBX = the multiboot information address. The segment caches are loaded directly; a GDT
with the same descriptors is also placed in guest memory (selectors 0x08 and 0x10) so a
guest that reloads a segment before installing its own GDT still gets flat segments.
"""

from __future__ import annotations

from kvmpy.kvm import ioctls as k
from kvmpy.kvm.structs import KvmRegs, KvmSegment, KvmVcpuEvents
from kvmpy.kvm.system import VcpuFd
from kvmpy.memory import GuestMemory

BOOT_GDT_ADDRESS = 0x500  # in the BIOS data area, unused by multiboot kernels
# ESP is undefined at multiboot entry; kvmpy points it into free low memory (below the
# AP trampoline page 0x8000 and the MBI at 0x9000) so that a kernel which calls a
# function before setting up its own stack still has one.
BOOT_STACK_TOP = 0x7000
CODE32_SELECTOR = 0x08
DATA32_SELECTOR = 0x10
BOOT_GDT = [
    0x0000_0000_0000_0000,  # null
    0x00CF_9B00_0000_FFFF,  # 0x08: 32-bit code, base 0, limit 4 GiB, accessed
    0x00CF_9300_0000_FFFF,  # 0x10: 32-bit data, base 0, limit 4 GiB, accessed
]

CR0_PE = 1 << 0
CR0_ET = 1 << 4
RFLAGS_RESERVED = 1 << 1


def _segment(base: int, limit: int, selector: int, seg_type: int, *, big: bool) -> KvmSegment:
    """A present, DPL 0 code/data segment; `big`: 32-bit (D/B=1) with 4 KiB granularity."""
    return KvmSegment(
        base=base, limit=limit, selector=selector, type=seg_type, present=1, dpl=0,
        db=int(big), s=1, l=0, g=int(big), avl=0, unusable=0,
    )


def _flat_segment(selector: int, seg_type: int) -> KvmSegment:
    return _segment(0, 0xFFFF_FFFF, selector, seg_type, big=True)


def write_boot_gdt(mem: GuestMemory) -> None:
    """Put the flat 32-bit GDT at BOOT_GDT_ADDRESS."""
    for i, desc in enumerate(BOOT_GDT):
        mem.write_u64(BOOT_GDT_ADDRESS + 8 * i, desc)


def setup_protected_mode(vcpu: VcpuFd, *, entry: int, eax: int, ebx: int) -> None:
    """Enter 32-bit flat protected mode at `entry` (the multiboot machine state)."""
    sregs = vcpu.get_sregs()
    sregs.cs = _flat_segment(CODE32_SELECTOR, 0xB)
    data = _flat_segment(DATA32_SELECTOR, 0x3)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base = BOOT_GDT_ADDRESS
    sregs.gdt.limit = 8 * len(BOOT_GDT) - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = KvmRegs()
    regs.rip = entry
    regs.rax = eax
    regs.rbx = ebx
    regs.rsp = BOOT_STACK_TOP
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)


def clear_pending_events(vcpu: VcpuFd) -> None:
    """INIT drops what was on its way into the guest (SDM 8.4.1; KVM's kvm_vcpu_reset:
    kvm_clear_interrupt_queue, kvm_clear_exception_queue, nmi_injected/nmi_pending = 0):
    an interrupt already queued for the next entry (KVM_INTERRUPT, or the native core's
    kvm_queue_interrupt) must not reach the code the SIPI starts."""
    events = KvmVcpuEvents()
    events.flags = k.KVM_VCPUEVENT_VALID_NMI_PENDING | k.KVM_VCPUEVENT_VALID_SHADOW
    vcpu.set_vcpu_events(events)


def setup_real_mode_sipi(vcpu: VcpuFd, vector: int) -> None:
    """The state an AP starts in after a Startup IPI (SDM 8.4.4.1, 10.6.1):
    real mode, CS selector = vector << 8, CS base = vector << 12, IP = 0, nothing
    pending from before the INIT."""
    clear_pending_events(vcpu)
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(vector << 12, 0xFFFF, vector << 8, 0xB, big=False)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(0, 0xFFFF, 0, 0x3, big=False))
    sregs.gdt.base = sregs.idt.base = 0
    sregs.gdt.limit = sregs.idt.limit = 0xFFFF
    sregs.cr0 = CR0_ET
    sregs.cr3 = sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = KvmRegs()
    regs.rip = 0
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)


def setup_real_mode(vcpu: VcpuFd, *, cs: int, ip: int) -> None:
    """Real mode at CS:IP with the other segments 0 (base 0, limit 64 KiB), paging and
    protection off, EFER 0, general registers 0: where the firmware hands a resuming
    OS its FACS waking vector (ACPI 6.3 section 16.3.2, CS = vector >> 4, IP = vector
    & 0xF; SeaBIOS's s3_resume far-calls it with the other segments zero)."""
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(cs << 4, 0xFFFF, cs, 0xB, big=False)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(0, 0xFFFF, 0, 0x3, big=False))
    sregs.gdt.base = sregs.idt.base = 0
    sregs.gdt.limit = sregs.idt.limit = 0xFFFF
    sregs.cr0 = CR0_ET
    sregs.cr2 = sregs.cr3 = sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = KvmRegs()
    regs.rip = ip
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)
