"""CPU models: QEMU's `-cpu MODEL[,+feat][,-feat][,feat=on|off][,prop=value]`.

Models, as QEMU 7.2 defines them (target/i386/cpu.c builtin_x86_defs; the feature
lists below are QEMU 7.2's own `query-cpu-model-expansion type=static` output) and as
QEMU builds them on KVM (x86_cpu_load_model, x86_cpu_filter_features):
- `host`, `max`: every feature KVM_GET_SUPPORTED_CPUID reports, plus x2APIC and
  TSC-deadline, which kvmpy's own local APIC emulates (`kvmpy run`'s default);
  host-phys-bits on; invtsc only with `migratable=no` (QEMU's unmigratable flag).
- `qemu64`, `Opteron_G1`, `IvyBridge`, `Skylake-Server`: the model's vendor-neutral
  definition (family/model/stepping, level, xlevel, model-id, features), with QEMU's
  KVM defaults (kvm_default_props: kvmclock, kvm-nopiodelay, kvm-asyncpf,
  kvm-steal-time, kvm-pv-eoi, kvmclock-stable-bit, x2apic on; svm, acpi, monitor off),
  the host's vendor unless `vendor=` (QEMU on KVM always takes the host's, see
  x86_cpu_load_model), phys-bits 40 unless `host-phys-bits`/`phys-bits=`.

Every feature is then filtered by what KVM supports (a requested feature KVM lacks is
dropped with QEMU's warning, "host doesn't support requested feature") and by what
this VMM honours in its irqchip mode (kvmpy/cpuid_policy.py). Feature names are QEMU's
(kvmpy/cpufeatures.py), with its legacy spellings. x2APIC and TSC-deadline are not
only hidden from CPUID but enforced by kvmpy's local APIC (kvmpy/apic/lapic.py).

Properties: `vendor=` (12 characters), `host-phys-bits[=on|off]`, `phys-bits=N`,
`migratable=on|off`, `check`, `enforce` (a missing feature is an error, not a warning),
`hv-passthrough`/`hv_passthrough` (refused where KVM has no Hyper-V emulation,
KVM_CAP_HYPERV: see `check_host`). Anything else is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmpy.cpufeatures import COMPANIONS, FEATURES, VMX_FEATURES, canonical
from kvmpy.errors import KvmpyError

KVM_DEFAULTS = frozenset({"kvmclock", "kvmclock2", "kvm-nopiodelay", "kvm-asyncpf",
                          "kvm-steal-time", "kvm-pv-eoi", "kvmclock-stable-bit", "x2apic",
                          "hypervisor"})
KVM_DEFAULT_OFF = frozenset({"svm", "acpi", "monitor"})
QEMU_DEFAULT_PHYS_BITS = 40  # QEMU's TCG_PHYS_ADDR_BITS, its default on KVM too


@dataclass(frozen=True)
class ModelDef:
    """One of QEMU's builtin_x86_defs (or host/max: KVM's whole set)."""

    name: str
    family: int = 0
    model: int = 0
    stepping: int = 0
    level: int = 0
    xlevel: int = 0
    model_id: str = ""
    features: frozenset[str] = frozenset()
    vendor: str = ""  # QEMU's definition; on KVM the host's vendor is used instead
    host: bool = False  # host/max: every feature KVM supports

    @property
    def signature(self) -> int:
        """CPUID.1:EAX (SDM Vol. 2A CPUID: family/model with their extended fields)."""
        fam, mod = self.family, self.model
        ext_fam = fam - 0xF if fam > 0xF else 0
        return ((ext_fam << 20) | ((mod >> 4) << 16) | (min(fam, 0xF) << 8)
                | ((mod & 0xF) << 4) | self.stepping)


def _def(name: str, vendor: str, fms: tuple[int, int, int], level: int, xlevel: int,
         model_id: str, features: str) -> ModelDef:
    return ModelDef(name, *fms, level, xlevel, model_id, frozenset(features.split()), vendor)


MODEL_DEFS: dict[str, ModelDef] = {d.name: d for d in (
    ModelDef("host", host=True),
    ModelDef("max", host=True),
    _def("qemu64", "AuthenticAMD", (15, 107, 1), 0xD, 0x8000_000A,
         "QEMU Virtual CPU version 2.5+",
         """apic clflush cmov cx16 cx8 de fpu fxsr lahf-lm lm mca mce mmx msr mtrr nx pae
         pat pge pni pse pse36 sep sse sse2 svm syscall tsc"""),
    _def("Opteron_G1", "AuthenticAMD", (15, 6, 1), 5, 0x8000_0008,
         "AMD Opteron 240 (Gen 1 Class Opteron)",
         """apic clflush cmov cx8 de fpu fxsr lm mca mce mmx msr mtrr nx pae pat pge pni pse
         pse36 sep sse sse2 syscall tsc vme"""),
    _def("IvyBridge", "GenuineIntel", (6, 58, 9), 0xD, 0x8000_0008,
         "Intel Xeon E3-12xx v2 (Ivy Bridge)",
         """aes apic arat avx clflush cmov cx16 cx8 de erms f16c fpu fsgsbase fxsr lahf-lm lm
         mca mce mmx msr mtrr nx pae pat pclmulqdq pge pni popcnt pse pse36 rdrand rdtscp
         sep smep sse sse2 sse4.1 sse4.2 ssse3 syscall tsc tsc-deadline vme x2apic xsave
         xsaveopt"""),
    _def("Skylake-Server", "GenuineIntel", (6, 85, 4), 0xD, 0x8000_0008,
         "Intel Xeon Processor (Skylake)",
         """3dnowprefetch abm adx aes apic arat avx avx2 avx512bw avx512cd avx512dq avx512f
         avx512vl bmi1 bmi2 clflush clflushopt clwb cmov cx16 cx8 de erms f16c fma fpu
         fsgsbase fxsr hle invpcid lahf-lm lm mca mce mmx movbe msr mtrr nx pae pat pcid
         pclmulqdq pdpe1gb pge pku pni popcnt pse pse36 rdrand rdseed rdtscp rtm sep smap
         smep sse sse2 sse4.1 sse4.2 ssse3 syscall tsc tsc-deadline vme x2apic xgetbv1
         xsave xsavec xsaveopt"""),
)}
_MODEL_ALIASES = {"Skylake-Server-v1": "Skylake-Server", "Opteron_G1-v1": "Opteron_G1",
                  "qemu64-v1": "qemu64", "IvyBridge-v1": "IvyBridge"}
_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
_MSR_FEATURE_HINT = "kvmpy does not set feature MSRs"


@dataclass(frozen=True)
class CpuModel:
    """A parsed `-cpu` option: a model and what the command line changed."""

    name: str = "host"
    flags: tuple[tuple[str, bool], ...] = ()  # (QEMU feature name, on), in order given
    vendor: str | None = None
    host_phys_bits: bool | None = None  # None: the model's default
    phys_bits: int | None = None
    migratable: bool = True
    enforce: bool = False
    hv_passthrough: bool = False
    props: tuple[str, ...] = field(default=(), compare=False)  # as given, for `spec`

    @property
    def definition(self) -> ModelDef:
        return MODEL_DEFS[self.name]

    def requested(self, name: str) -> bool | None:
        """The last +/- (or =on/off) the command line gave `name`, else None."""
        for flag, on in reversed(self.flags):
            if flag == name or name in COMPANIONS.get(flag, ()):
                return on
        return None

    def wants(self, name: str) -> bool:
        """Does the model (with QEMU's KVM defaults and the flags) ask for `name`?"""
        asked = self.requested(name)
        if asked is not None:
            return asked
        d = self.definition
        if d.host:
            return True
        if name in KVM_DEFAULT_OFF:
            return False
        return name in d.features or name in KVM_DEFAULTS

    @property
    def x2apic(self) -> bool:
        return self.wants("x2apic")

    @property
    def tsc_deadline(self) -> bool:
        return self.wants("tsc-deadline")

    @property
    def uses_host_phys_bits(self) -> bool:
        if self.host_phys_bits is not None:
            return self.host_phys_bits
        return self.definition.host and self.phys_bits is None

    @property
    def spec(self) -> str:
        """The model as a `-cpu` string (round-trips through parse_cpu)."""
        flags = [("+" if on else "-") + name for name, on in self.flags]
        return ",".join([self.name, *self.props, *flags])


def parse_cpu(spec: str) -> CpuModel:
    """`MODEL[,+feat|-feat|feat|feat=on|off|prop=value]...` as QEMU's -cpu."""
    name, *items = [part.strip() for part in spec.split(",")]
    name = _MODEL_ALIASES.get(name, name)
    if name not in MODEL_DEFS:
        raise KvmpyError(f"CPU model {name!r} is not implemented (kvmpy offers: "
                         f"{', '.join(MODEL_DEFS)})")
    flags: list[tuple[str, bool]] = []
    kw: dict[str, object] = {}
    props: list[str] = []
    for item in items:
        if not item:
            continue
        if item[0] in "+-":
            feature, value = item[1:], "on" if item[0] == "+" else "off"
        else:
            feature, _, value = item.partition("=")
            value = value or "on"
        key = canonical(feature)
        if _property(key, value, kw):
            props.append(item)
            continue
        if key in FEATURES or key in VMX_FEATURES:
            flags.append((key, _onoff(feature, value)))
        elif key in _MSR_FEATURE_NAMES:
            raise KvmpyError(f"-cpu feature {feature!r} is an MSR bit: not implemented "
                             f"({_MSR_FEATURE_HINT})")
        else:
            raise KvmpyError(f"-cpu feature {feature!r} is not implemented (not a QEMU "
                             "CPUID flag kvmpy knows; see -cpu help)")
    return CpuModel(name, tuple(flags), props=tuple(props), **kw)  # type: ignore[arg-type]


def _onoff(feature: str, value: str) -> bool:
    on = _ON.get(value.lower())
    if on is None:
        raise KvmpyError(f"-cpu {feature}={value}: expected on or off")
    return on


def _property(key: str, value: str, kw: dict[str, object]) -> bool:
    """A non-feature property (vendor=, phys-bits=, ...): record it in `kw`."""
    if key == "vendor":
        if len(value) != 12 or not value.isascii():
            raise KvmpyError(f"-cpu vendor={value}: a vendor is exactly 12 characters, "
                             "e.g. GenuineIntel or AuthenticAMD")
        kw["vendor"] = value
    elif key == "host-phys-bits":
        kw["host_phys_bits"] = _onoff(key, value)
    elif key == "phys-bits":
        try:
            bits = int(value, 0)
        except ValueError:
            raise KvmpyError(f"-cpu phys-bits={value}: not a number") from None
        if not 32 <= bits <= 52:
            raise KvmpyError(f"-cpu phys-bits={value}: must be between 32 and 52")
        kw["phys_bits"] = bits
    elif key == "migratable":
        kw["migratable"] = _onoff(key, value)
    elif key in ("check", "enforce"):
        kw["enforce"] = key == "enforce" and _onoff(key, value)
    elif key == "hv-passthrough":
        kw["hv_passthrough"] = _onoff(key, value)
    elif key.startswith("hv-"):
        raise KvmpyError(f"-cpu {key}: Hyper-V enlightenments are not implemented (kvmpy "
                         "offers hv-passthrough where KVM emulates Hyper-V)")
    else:
        return False
    return True


# QEMU's MSR feature words other than VMX (IA32_ARCH_CAPABILITIES, CORE_CAPABILITY,
# PERF_CAPABILITIES): known names kvmpy refuses.
_MSR_FEATURE_NAMES = frozenset("""rdctl-no ibrs-all rsba skip-l1dfl-vmentry ssb-no mds-no
pschange-mc-no tsx-ctrl taa-no sbdr-ssdp-no fbsdp-no psdp-no fb-clear bhi-no pbrsb-no
gds-no rfds-no rfds-clear split-lock-detect full-width-write""".split())


def check_host(model: CpuModel, *, has_hyperv: bool) -> None:
    """Refuse, with one line, what kvmpy cannot give this model on this host's KVM.

    hv-passthrough (QEMU: every Hyper-V enlightenment KVM_GET_SUPPORTED_HV_CPUID
    reports) needs KVM's Hyper-V emulation, KVM_CAP_HYPERV; kvm_pvm has none. Where a
    KVM has it, kvmpy still does not build the Hyper-V leaves (0x40000000-0x4000000A,
    with KVM's own moved to 0x40000100), so it refuses there too."""
    if not model.hv_passthrough:
        return
    if not has_hyperv:
        raise KvmpyError("-cpu hv-passthrough: this KVM has no Hyper-V emulation "
                         "(KVM_CAP_HYPERV is 0), so there is nothing to pass through")
    raise KvmpyError("-cpu hv-passthrough: not implemented (kvmpy does not build the "
                     "Hyper-V CPUID leaves)")


def describe_models() -> str:
    """`-cpu help`: the models and flags."""
    lines = ["Available CPUs:"]
    for d in MODEL_DEFS.values():
        what = "KVM's supported CPUID, x2APIC and TSC-deadline" if d.host else d.model_id
        lines.append(f"x86 {d.name:<16} {what}")
    names = sorted(set(FEATURES) | VMX_FEATURES)
    lines += ["", "Recognized CPUID flags:"]
    line = " "
    for n in names:
        if len(line) + len(n) > 100:
            lines.append(line)
            line = " "
        line += " " + n
    lines.append(line)
    return "\n".join(lines)


HOST = CpuModel("host")
QEMU64 = CpuModel("qemu64")
