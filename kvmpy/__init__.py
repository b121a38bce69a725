"""kvmpy: a hackable virtual machine monitor in Python on Linux KVM.

The local APIC (xAPIC and x2APIC) is emulated in userspace and the vCPU exit path
follows the LKML design "KVM: X86: Single target IPI fastpath" (Nov 2019): every
x2APIC ICR write is handled in an early fastpath right after KVM_RUN returns.
"""

__version__ = "0.1.0"
