"""The bundled guests by name: `kvmpy run ipi_stress --cpus 4`, `kvmpy guests`.

Each guest in guest/ (kvmpy/guestbuild.py builds it on demand and caches the image) has
a one-line description here and the vCPU count it wants. `resolve_image` turns what a
user typed after `kvmpy run` into an image path: an existing file wins; else a bundled
guest's name; else one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import KvmpyError


@dataclass(frozen=True)
class GuestInfo:
    """What `kvmpy guests` shows for one bundled guest."""

    description: str
    cpus: int = 1  # a vCPU count it runs well with (`kvmpy guests` shows the command)
    append: str = ""  # an example command line, if it needs or shows one


CATALOG: dict[str, GuestInfo] = {
    "acpi": GuestInfo("reads the ACPI tables as an OS does, starts the CPUs the MADT lists; "
                      "test=s3 sleeps and wakes on the RTC alarm", 2),
    "apic_gp": GuestInfo("the architectural #GP cases of x2APIC MSRs and IA32_APIC_BASE, "
                         "and ESR's send-illegal-vector bit"),
    "apic_ipi": GuestInfo("exact per-CPU, per-vector IPI counts: physical, logical, "
                          "shorthands, broadcast, lowest priority, NMI", 4, "mode=x2apic"),
    "apic_smp": GuestInfo("SMP bring-up with INIT-SIPI-SIPI; checks every AP's APIC ID", 4),
    "apic_timer": GuestInfo("the local APIC timer: one-shot, periodic, TSC-deadline",
                            1, "mode=x2apic"),
    "cpu_model": GuestInfo("what the guest sees of its CPU model (--cpu), and that hidden "
                           "APIC features #GP"),
    "exitcode": GuestInfo("exits with code=N from its command line", 1, "code=5"),
    "fuzz": GuestInfo("a hostile guest: random APIC, MSR, port and MMIO operations on "
                      "every CPU (python -m kvmpy.fuzz drives it)", 2, "seed=1 ops=500"),
    "gp_msr": GuestInfo("reads and writes a nonexistent MSR and prints the #GP it got"),
    "hello": GuestInfo("prints a greeting and its command line"),
    "invalid_opcode": GuestInfo("runs bytes that are no instruction and expects #UD "
                                "(kvmpy injects it where KVM's emulator gives up)"),
    "ioapic_irq": GuestInfo("the I/O APIC driven through pc-testdev's lines: edge, level, "
                            "masks, exact counts", 4),
    "ipi_bench": GuestInfo("IPI latencies by the guest's TSC (kvmpy bench ipi); "
                           "report=median prints each test's median", 2,
                           "n=100 report=median"),
    "ipi_coalesce": GuestInfo("a sender's cost of IPI bursts that merge at a target with "
                              "interrupts off (docs/hacking.md)", 2, "n=50 burst=4"),
    "ipi_stress": GuestInfo("every CPU sends random IPIs; counts must be exact (no IPI "
                            "lost)", 4, "ipis=4000"),
    "mbinfo": GuestInfo("prints the multiboot information the loader passed"),
    "mmio_touch": GuestInfo("touches MMIO with nothing behind it (reads give all ones)"),
    "smp_hello": GuestInfo("every vCPU prints its index and APIC ID", 4, "cpus=4"),
    "timer_storm": GuestInfo("a 1 ns periodic APIC timer: the guest must still make "
                             "progress between interrupts", 1, "mode=x2apic"),
    "trace_ipi": GuestInfo("a short, exactly counted IPI and timer workload to look at "
                           "with --trace", 2, "n=20 timer=5"),
    "triple_fault": GuestInfo("an empty IDT and UD2: a triple fault (exit status 4)"),
    "tsc_adjust_probe": GuestInfo("writes IA32_TSC_ADJUST and IA32_TSC and prints how far "
                                  "the TSC moved (docs/conformance-suite.md)", 1),
}


def bundled_guests(source_dir: Path | None = None) -> list[str]:
    """The guests in guest/ (empty if kvmpy was installed without its sources)."""
    from kvmpy.guestbuild import guest_dir, guest_names

    try:
        return guest_names(source_dir or guest_dir())
    except OSError:
        return []


def describe(name: str) -> GuestInfo:
    return CATALOG.get(name, GuestInfo("(no description)"))


def example_command(name: str) -> str:
    """`kvmpy run NAME [--cpus N] [--append "..."]` as a user would type it."""
    info = describe(name)
    cmd = f"kvmpy run {name}"
    if info.cpus > 1:
        cmd += f" --cpus {info.cpus}"
    if info.append:
        cmd += f' --append "{info.append}"'
    return cmd


def guest_list_text(width: int = 14) -> str:
    """One line per bundled guest: its name and what it does (for --help and `guests`)."""
    names = bundled_guests()
    if not names:
        return "  (no bundled guests: guest/ is not next to this kvmpy)"
    import textwrap

    indent = " " * (width + 3)
    return "\n".join(textwrap.fill(describe(n).description, 88, initial_indent=f"  {n:<{width}} ",
                                   subsequent_indent=indent) for n in names)


def resolve_image(text: str, source_dir: Path | None = None) -> tuple[Path, bool]:
    """(image path, is a bundled guest) for `kvmpy run TEXT`: a file, else a guest name
    (from `source_dir`, default this kvmpy's guest/)."""
    path = Path(text)
    if path.exists():
        return path, False
    if text in bundled_guests(source_dir):
        from kvmpy.guestbuild import build_guest

        return build_guest(text, source_dir=source_dir), True
    if "/" in text:  # a path: no guest is named like that
        raise KvmpyError(f"image {text}: no such file")
    raise KvmpyError(f"image {text}: no such file, nor a bundled guest (`kvmpy guests` "
                     "lists them)")
