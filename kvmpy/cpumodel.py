"""CPU models: QEMU's `-cpu MODEL[,+feat][,-feat][,feat=on|off]` as kvmpy offers it.

Models (QEMU target/i386/cpu.c, as QEMU builds them on KVM):
- `host`, `max`: every feature KVM_GET_SUPPORTED_CPUID reports (QEMU's host
  passthrough; on KVM `max` is the same), plus x2APIC and TSC-deadline, which kvmpy's
  own local APIC emulates. The default of `kvmpy run`.
- `qemu64`: QEMU's builtin_x86_defs "qemu64" (AuthenticAMD, family 6 model 6
  stepping 3, level 0xd, xlevel 0x8000000a, PPro features + SSE2, SSE3, CX16, LM,
  SYSCALL, NX, LAHF_LM), each bit only where KVM supports it, with QEMU's KVM defaults
  (kvm_default_props: x2apic on, svm off; hypervisor bit set) and no TSC-deadline
  unless asked (`+tsc-deadline`). The default of `kvmpy-qemu`, as of QEMU.

Feature flags kvmpy can change: `x2apic` and `tsc-deadline` (alias `tsc_deadline`),
the two CPU features that are kvmpy's to emulate. They are not only hidden from CPUID
but enforced by the local APIC (kvmpy/apic/lapic.py): without x2APIC, setting
IA32_APIC_BASE.EXTD and every x2APIC MSR #GP (SDM 10.12.1, 10.12.5); without
TSC-deadline, IA32_TSC_DEADLINE #GPs and timer mode 10b is reserved (SDM 10.5.4.1).
Any other flag is refused with one line: kvmpy does not pretend to honour it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmpy.errors import KvmpyError


@dataclass(frozen=True)
class CpuModel:
    """A guest CPU: a base model and the two APIC features kvmpy emulates."""

    name: str = "host"  # "host", "max" or "qemu64"
    x2apic: bool = True
    tsc_deadline: bool = True

    @property
    def spec(self) -> str:
        """The model as a `-cpu` string (round-trips through parse_cpu)."""
        flags = [("+" if on else "-") + name for name, on in
                 (("x2apic", self.x2apic), ("tsc-deadline", self.tsc_deadline))]
        return ",".join([self.name, *flags])


MODELS: dict[str, CpuModel] = {
    "host": CpuModel("host", x2apic=True, tsc_deadline=True),
    "max": CpuModel("max", x2apic=True, tsc_deadline=True),
    "qemu64": CpuModel("qemu64", x2apic=True, tsc_deadline=False),
}
HOST = MODELS["host"]
QEMU64 = MODELS["qemu64"]

# -cpu flag name -> CpuModel field.
FEATURES = {"x2apic": "x2apic", "tsc-deadline": "tsc_deadline", "tsc_deadline": "tsc_deadline"}
_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_cpu(spec: str) -> CpuModel:
    """`MODEL[,+feat|-feat|feat|feat=on|off]...` as QEMU's -cpu; KvmpyError otherwise."""
    name, *flags = [part.strip() for part in spec.split(",")]
    if name not in MODELS:
        raise KvmpyError(f"CPU model {name!r} is not implemented (kvmpy offers: "
                         f"{', '.join(MODELS)})")
    model = MODELS[name]
    for flag in flags:
        if not flag:
            continue
        if flag[0] in "+-":
            feature, on = flag[1:], flag[0] == "+"
        elif "=" in flag:
            feature, value = flag.split("=", 1)
            if value.lower() not in _ON:
                raise KvmpyError(f"-cpu {feature}={value}: expected on or off")
            on = _ON[value.lower()]
        else:
            feature, on = flag, True
        field = FEATURES.get(feature)
        if field is None:
            raise KvmpyError(f"-cpu feature {feature!r} is not implemented (kvmpy can set: "
                             "x2apic, tsc-deadline)")
        model = replace(model, **{field: on})
    return model


def describe_models() -> str:
    """`-cpu help`: the models and flags, one per line."""
    lines = ["Available CPUs:"]
    lines += [f"x86 {m.name:<10} ({m.spec})" for m in MODELS.values()]
    lines += ["", "Recognized CPUID flags:", "  x2apic tsc-deadline"]
    return "\n".join(lines)
