"""kvmpy's KVM ABI layer (`kvmpy.kvm.structs`, `kvmpy.kvm.ioctls`) against <linux/kvm.h>.

A C probe is generated from the ctypes classes themselves (their `_fields_`, walked
recursively), compiled once per session with the machine's gcc and run; it prints the
C header's `sizeof`/`offsetof` of every field kvmpy declares and the value of every
`KVM_*` constant kvmpy defines. A field or constant added to kvmpy is checked without
touching this file. Each struct and each constant is its own test id, so a failure
names exactly what differs.

Without gcc or the header the tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from kvmpy.kvm import ioctls, structs, system

IN_CI = os.environ.get("CI") == "true"

# C member names that differ from the ctypes field names, keyed by (class, field).
# "" marks a member that is anonymous in C: its own fields are reached directly.
C_MEMBER_NAMES: dict[tuple[str, str], str] = {
    ("KvmRun", "exit"): "",  # kvm_run's exit union is anonymous: run.io, run.msr, ...
    ("KvmVcpuEvents", "triple_fault_pending"): "triple_fault.pending",
}

# ctypes classes that exist only as members of another struct (no C struct name).
NESTED_ONLY = {"KvmRunExit"}

# kvmpy maps only a prefix of these C structs (the rest is never touched).
PREFIX_STRUCTS = {"KvmRun"}

# Constants kvmpy derives from the layout rather than copying from the header.
DERIVED_CONSTANTS = {"KVM_RUN_EXIT_OFFSET": "offsetof(struct kvm_run, hw)"}

_SIGNED_CODES = "bhilq"
_INT_CODES = "bBhHiIlLqQ"


def c_struct_name(cls: type) -> str:
    """KvmCpuidEntry2 -> kvm_cpuid_entry2, KvmMsrFilterRange -> kvm_msr_filter_range."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


@dataclass(frozen=True)
class Member:
    """One field kvmpy declares, as ctypes lays it out, and how C names it."""

    path: str  # ctypes path, e.g. "exit.io.port"
    c_path: str  # C member designator, e.g. "io.port"
    offset: int  # from the start of the top-level struct
    size: int | None  # None for a flexible array member (no sizeof in C)
    signed: bool | None  # None for non-integers (arrays, structs, pointers, chars)


@dataclass
class StructCheck:
    """A top-level ctypes class and the C struct it must match."""

    test_id: str
    cls: type
    c_name: str
    prefix: bool = False  # kvmpy maps only the start of the C struct
    flexible: frozenset[str] = frozenset()  # fields that are flexible arrays in C
    members: list[Member] = field(default_factory=list)


def _walk(
    cls: type, py_prefix: str, c_prefix: str, base: int, flexible: frozenset[str]
) -> list[Member]:
    out: list[Member] = []
    for name, ctype, *_bits in cls._fields_:
        offset = base + getattr(cls, name).offset
        py_path = f"{py_prefix}{name}"
        c_name = C_MEMBER_NAMES.get((cls.__name__, name), name)
        c_path = f"{c_prefix}{c_name}"
        if c_name == "":  # anonymous in C: only its members have names
            out += _walk(ctype, f"{py_path}.", c_prefix, offset, frozenset())
            continue
        is_flexible = not py_prefix and name in flexible
        signed = None
        code = getattr(ctype, "_type_", None)
        if isinstance(code, str) and code in _INT_CODES:
            signed = code in _SIGNED_CODES
        size = None if is_flexible else ctypes.sizeof(ctype)
        out.append(Member(py_path, c_path, offset, size, signed))
        if issubclass(ctype, ctypes.Structure | ctypes.Union):
            out += _walk(ctype, f"{py_path}.", f"{c_path}.", offset, frozenset())
        elif issubclass(ctype, ctypes.Array) and issubclass(
            ctype._type_, ctypes.Structure | ctypes.Union
        ):
            # Element 0 checks the element layout; element 1 the stride (a flexible
            # array has no sizeof to check it with).
            step = ctypes.sizeof(ctype._type_)
            for i in (0, 1) if ctype._length_ > 1 else (0,):
                out += _walk(
                    ctype._type_,
                    f"{py_path}[{i}].",
                    f"{c_path}[{i}].",
                    offset + i * step,
                    frozenset(),
                )
    return out


def _is_ctypes_aggregate(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, ctypes.Structure | ctypes.Union)


def struct_checks() -> list[StructCheck]:
    """Every Kvm* class in structs.py, plus the variable-length buffers it builds."""
    checks = [
        StructCheck(name, cls, c_struct_name(cls), prefix=name in PREFIX_STRUCTS)
        for name, cls in vars(structs).items()
        if _is_ctypes_aggregate(cls) and name.startswith("Kvm") and name not in NESTED_ONLY
    ]
    flex = frozenset({"entries"})
    checks.append(
        StructCheck("cpuid2_buffer", type(structs.cpuid2_buffer(2)), "kvm_cpuid2", flexible=flex)
    )
    checks.append(
        StructCheck("msrs_buffer", type(structs.msrs_buffer([0, 1])), "kvm_msrs", flexible=flex)
    )
    for check in checks:
        check.members = _walk(check.cls, "", "", 0, check.flexible)
    return checks


def constants() -> dict[str, tuple[str, int]]:
    """test id -> (C name, kvmpy value) for every KVM_* integer kvmpy defines."""
    out: dict[str, tuple[str, int]] = {}
    modules: list[ModuleType] = [ioctls, structs]
    for module in modules:
        short = module.__name__.rsplit(".", 1)[-1]
        for name, value in vars(module).items():
            if name.startswith("KVM") and isinstance(value, int) and not isinstance(value, bool):
                out[f"{short}.{name}"] = (name, value)
    out["system.KVM_API_VERSION"] = ("KVM_API_VERSION", system.KVM_API_VERSION)
    return out


STRUCTS = struct_checks()
CONSTANTS = constants()


# --- the C probe --------------------------------------------------------------------------


def _struct_lines(check: StructCheck) -> list[tuple[str, str]]:
    """(key, C statement) pairs; one statement per line so a gcc error names its key."""
    t = f"struct {check.c_name}"
    lines = [(f"S {check.test_id}", f'printf("S {check.test_id} %zu\\n", sizeof({t}));')]
    for m in check.members:
        key = f"M {check.test_id} {m.path}"
        size = "(size_t)0" if m.size is None else f"sizeof((({t} *)0)->{m.c_path})"
        signed = "-1" if m.signed is None else f"(int)((__typeof__((({t} *)0)->{m.c_path}))-1 < 0)"
        lines.append(
            (
                key,
                f'printf("{key} %zu %zu %d\\n", offsetof({t}, {m.c_path}), {size}, {signed});',
            )
        )
    return lines


def _constant_lines(test_id: str, c_name: str) -> list[tuple[str, str]]:
    key = f"C {test_id}"
    if c_name in DERIVED_CONSTANTS:
        expr = DERIVED_CONSTANTS[c_name]
        return [(key, f'printf("{key} %llu\\n", (unsigned long long)({expr}));')]
    return [
        ("", f"#ifdef {c_name}"),
        (key, f'printf("{key} %llu\\n", (unsigned long long)({c_name}));'),
        ("", "#else"),
        (key, f'printf("U {test_id}\\n");'),
        ("", "#endif"),
    ]


def probe_source() -> tuple[str, dict[int, str]]:
    """The probe's C source and, per line number, the key that line reports."""
    head = [
        "/* Generated by tests/test_kvm_abi.py from kvmpy/kvm/structs.py and ioctls.py. */",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "int main(void)",
        "{",
    ]
    body: list[tuple[str, str]] = []
    for check in STRUCTS:
        body += _struct_lines(check)
    for test_id, (c_name, _value) in CONSTANTS.items():
        body += _constant_lines(test_id, c_name)
    lines = head + [f"    {stmt}" if key else stmt for key, stmt in body]
    lines += ["    return 0;", "}", ""]
    keys = {len(head) + i + 1: key for i, (key, _stmt) in enumerate(body) if key}
    return "\n".join(lines), keys


@dataclass
class ProbeResult:
    sizes: dict[str, int]  # struct test id -> C sizeof
    members: dict[str, tuple[int, int, int]]  # "M id path" -> (offset, size, signed)
    constants: dict[str, int | None]  # constant test id -> value (None: undefined in C)
    errors: dict[str, str]  # key -> gcc's error for a line it could not compile


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


def _compile(gcc: str, src: Path, exe: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [gcc, "-std=gnu11", "-O0", "-w", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def build_and_run_probe(workdir: Path) -> ProbeResult:
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc not found: cannot compile the <linux/kvm.h> ABI probe")
    check_src = workdir / "header_check.c"
    check_src.write_text("#include <linux/kvm.h>\nint main(void) { return 0; }\n")
    res = _compile(gcc, check_src, workdir / "header_check")
    if res.returncode != 0:
        _unavailable(
            "<linux/kvm.h> does not compile (install linux-libc-dev): "
            + res.stderr.strip().splitlines()[0]
        )

    source, keys = probe_source()
    lines = source.split("\n")
    src, exe = workdir / "abi_probe.c", workdir / "abi_probe"
    errors: dict[str, str] = {}
    error_re = re.compile(rf"^{re.escape(str(src))}:(\d+):\d+: error: (.*)$", re.M)
    for _attempt in range(5):
        src.write_text("\n".join(lines))
        res = _compile(gcc, src, exe)
        if res.returncode == 0:
            break
        bad = {int(n): msg for n, msg in error_re.findall(res.stderr)}
        if not bad or any(n not in keys for n in bad):
            pytest.fail(f"ABI probe does not compile:\n{res.stderr}")
        # Drop the lines gcc rejects (a field or macro the header lacks), keep the rest.
        for n, msg in bad.items():
            errors.setdefault(keys[n], msg)
            lines[n - 1] = "    /* dropped: " + msg.replace("*/", "* /") + " */"
    else:
        pytest.fail(f"ABI probe does not compile:\n{res.stderr}")

    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    result = ProbeResult({}, {}, {}, errors)
    for line in out.stdout.splitlines():
        kind, test_id, *rest = line.split()
        if kind == "S":
            result.sizes[test_id] = int(rest[0])
        elif kind == "M":
            path, offset, size, signed = rest
            result.members[f"M {test_id} {path}"] = (int(offset), int(size), int(signed))
        elif kind == "C":
            result.constants[test_id] = int(rest[0])
        elif kind == "U":
            result.constants[test_id] = None
    return result


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    return build_and_run_probe(tmp_path_factory.mktemp("abi_probe"))


# --- the comparisons ----------------------------------------------------------------------


def struct_differences(check: StructCheck, probe: ProbeResult) -> list[str]:
    diffs: list[str] = []
    t = f"struct {check.c_name}"
    # A flexible array member adds nothing to the C sizeof; kvmpy's buffer holds it.
    py_size = ctypes.sizeof(check.cls) - sum(
        ctypes.sizeof(ctype) for name, ctype, *_bits in check.cls._fields_ if name in check.flexible
    )
    if f"S {check.test_id}" in probe.errors:
        return [f"{t}: {probe.errors[f'S {check.test_id}']}"]
    c_size = probe.sizes[check.test_id]
    if check.prefix:
        if py_size > c_size:
            diffs.append(f"sizeof: kvmpy maps {py_size} bytes, past the end of {t} ({c_size})")
    elif py_size != c_size:
        diffs.append(f"sizeof({t}): kvmpy {py_size}, C {c_size}")
    for m in check.members:
        key = f"M {check.test_id} {m.path}"
        if key in probe.errors:
            diffs.append(f"{m.path} (C {m.c_path}): not in {t}: {probe.errors[key]}")
            continue
        c_offset, c_size, c_signed = probe.members[key]
        if m.offset != c_offset:
            diffs.append(f"offsetof({m.c_path}): kvmpy {m.offset}, C {c_offset}")
        if m.size is not None and m.size != c_size:
            diffs.append(f"sizeof({m.c_path}): kvmpy {m.size}, C {c_size}")
        if m.signed is not None and c_signed != -1 and m.signed != bool(c_signed):
            diffs.append(
                f"{m.c_path}: kvmpy {'signed' if m.signed else 'unsigned'}, "
                f"C {'signed' if c_signed else 'unsigned'}"
            )
    return diffs


@pytest.mark.parametrize("check", STRUCTS, ids=[c.test_id for c in STRUCTS])
def test_struct_layout_matches_header(check: StructCheck, probe: ProbeResult) -> None:
    diffs = struct_differences(check, probe)
    assert not diffs, f"{check.test_id} vs struct {check.c_name}:\n  " + "\n  ".join(diffs)


@pytest.mark.parametrize("test_id", list(CONSTANTS))
def test_constant_matches_header(test_id: str, probe: ProbeResult) -> None:
    c_name, value = CONSTANTS[test_id]
    key = f"C {test_id}"
    assert key not in probe.errors, f"{c_name}: gcc rejected it: {probe.errors[key]}"
    assert test_id in probe.constants, f"{c_name}: the probe printed nothing for it"
    c_value = probe.constants[test_id]
    assert c_value is not None, f"{c_name} is not defined in <linux/kvm.h>"
    assert value == c_value, f"{c_name}: kvmpy {value:#x}, <linux/kvm.h> {c_value:#x}"


def test_every_struct_class_is_checked() -> None:
    """A ctypes class in structs.py is either checked itself or reached from one that is."""
    reached: set[type] = set()

    def reach(cls: type) -> None:
        reached.add(cls)
        for _name, ctype, *_bits in cls._fields_:
            while issubclass(ctype, ctypes.Array):
                ctype = ctype._type_
            if _is_ctypes_aggregate(ctype) and ctype not in reached:
                reach(ctype)

    for check in STRUCTS:
        reach(check.cls)
    unchecked = [
        name
        for name, cls in vars(structs).items()
        if _is_ctypes_aggregate(cls) and cls.__module__ == structs.__name__ and cls not in reached
    ]
    assert unchecked == []


def test_exit_union_members_used_are_checked() -> None:
    """The exit-union members kvmpy reads are all covered, as C names them (run.io...)."""
    run = next(c for c in STRUCTS if c.test_id == "KvmRun")
    c_paths = {m.c_path for m in run.members}
    used = "io mmio msr internal emulation_failure fail_entry hw ex hypercall system_event"
    missing = [name for name in used.split() if name not in c_paths]
    assert missing == []


def test_probe_reports_every_item(probe: ProbeResult) -> None:
    """The probe answered for every struct, member and constant (nothing silently lost)."""
    expected = {f"M {c.test_id} {m.path}" for c in STRUCTS for m in c.members}
    reported = set(probe.members) | set(probe.errors)
    assert expected - reported == set()
    assert set(CONSTANTS) <= set(probe.constants) | {k[2:] for k in probe.errors}
