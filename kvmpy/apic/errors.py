"""The one exception the APIC model raises toward the guest."""


class ApicGP(Exception):
    """Architectural #GP(0): the access path injects #GP into the guest.

    Raised by ``rdmsr``/``wrmsr``/``set_cr8`` before any state is changed, so a
    faulting access has no side effect (SDM 10.12.1.3, 10.12.5).
    """
