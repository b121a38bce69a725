"""Crash diagnostics: where a vCPU was and what instruction it was running.

Used when a guest ends the VM abnormally (triple fault, KVM internal error, failed
entry, an unhandled exit): the message names the vCPU, the exit, RIP and the
instruction at RIP, decoded with capstone in the vCPU's current mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import capstone

if TYPE_CHECKING:
    from kvmpy.vcpu import Vcpu

_CR0_PE = 1
_EFER_LMA = 1 << 10


def cpu_mode(cr0: int, efer: int, cs_db: int, cs_l: int) -> tuple[str, int]:
    """(name, capstone mode) of the CPU: real, 16/32-bit protected, or 64-bit."""
    if not cr0 & _CR0_PE:
        return "real mode", capstone.CS_MODE_16
    if efer & _EFER_LMA and cs_l:
        return "64-bit mode", capstone.CS_MODE_64
    if cs_db:
        return "32-bit protected mode", capstone.CS_MODE_32
    return "16-bit protected mode", capstone.CS_MODE_16


def decode(code: bytes, address: int, mode: int) -> str:
    """The first instruction in `code`, as 'mnemonic operands' (or its bytes)."""
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    for insn in md.disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return "undecodable bytes " + code[:8].hex(" ")


def code_at_rip(vcpu: Vcpu) -> tuple[str, int, int, bytes | None]:
    """(where, RIP, capstone mode, up to 15 code bytes at RIP, or None if not in RAM)."""
    regs = vcpu.fd.get_regs()
    sregs = vcpu.fd.get_sregs()
    name, mode = cpu_mode(sregs.cr0, sregs.efer, sregs.cs.db, sregs.cs.l)
    linear = (sregs.cs.base + regs.rip) & 0xFFFF_FFFF_FFFF_FFFF
    where = f"RIP={regs.rip:#x} CS={sregs.cs.selector:#x} ({name})"
    phys = linear if not sregs.cr0 & (1 << 31) else vcpu.fd.translate(linear)
    memory = vcpu.machine.memory
    if phys is None or not memory.is_ram(phys, 1):
        return where, regs.rip, mode, None
    length = 15
    while length and not memory.is_ram(phys, length):
        length -= 1
    return where, regs.rip, mode, memory.read(phys, length)


def describe(vcpu: Vcpu) -> str:
    """'RIP=... (32-bit protected mode): <instruction>' for a stopped vCPU."""
    try:
        where, rip, mode, code = code_at_rip(vcpu)
    except OSError as e:
        return f"registers unavailable ({e.strerror})"
    if code is None:
        return f"{where}: RIP is not in guest RAM"
    return f"{where}: {decode(code, rip, mode)}"


def is_invalid_opcode(code: bytes, address: int, mode: int) -> bool:
    """True if `code` starts with no x86 instruction (capstone finds none)."""
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return next(md.disasm(code, address), None) is None
