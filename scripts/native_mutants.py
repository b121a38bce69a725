"""Mutation check of tests/test_native_differential.py: each mutant is one deliberate bug
in kvmpy/native (a routing rule, a verdict, a counter, PPR, CR8, the kick); the
differential test must fail on every one.

Each mutant is built in a temporary copy of the tree (the repository's own .so is not
touched) and the property machine runs there without shrinking, then the pinned cases.
A mutant whose source text is no longer found is reported as STALE (update it here).

Usage: python scripts/native_mutants.py [mutant names]   (about 10 minutes for all)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
L, V = "kvmpy/native/lapic_fast.c", "kvmpy/native/vcpu_loop.c"
# name: (file, text, replacement)
MUTANTS = {
    "lp_tie": (L,
        "a->r[R_PPR] < best->apic.r[R_PPR]",
        "a->r[R_PPR] <= best->apic.r[R_PPR]"),
    "focus_bit": (L,
        "if (!(a->r[R_SVR] & SVR_FOCUS_DISABLED) &&",
        "if ("),
    "allbut": (L,
        "sh == SH_ALL_BUT ? src : NULL",
        "NULL"),
    "pend_cls": (L,
        "(vector >> 4) <= (int)(a->r[R_PPR] >> 4)",
        "(vector >> 4) < (int)(a->r[R_PPR] >> 4)"),
    "eoi_tmr": (L,
        "atomic_load_explicit((_Atomic uint8_t *)&a->tmr[vector], mem"
        "ory_order_relaxed))\n\t\treturn FASTPATH_NONE;",
        "0)\n\t\treturn FASTPATH_NONE;"),
    "tmr_clear": (L,
        "atomic_store_explicit((_Atomic uint8_t *)&a->tmr[vector], 0,"
        " memory_order_relaxed);",
        ";"),
    "rsvd13": (L,
        "((1ull << 13) | (0x3ull << 16)",
        "((0x3ull << 16)"),
    "cluster": (L,
        "return (mda >> 4) == (logical_id >> 4) && (mda & logical_id "
        "& 0xF) != 0;",
        "return (mda & logical_id & 0xF) != 0;"),
    "ppr_ge": (L,
        "(tpr & 0xF0) >= ((uint32_t)isrv & 0xF0)",
        "(tpr & 0xF0) > ((uint32_t)isrv & 0xF0)"),
    "selfipi_vec": (L,
        "(value & ~0xFFull) || value < 16",
        "(value & ~0xFFull)"),
    "window": (V,
        "} else {\n\t\trun->request_interrupt_window = 1;\n",
        "} else {\n\t\trun->request_interrupt_window = 0;\n"),
    "hlt_if": (L,
        "return if_flag && lapic_pending_vector(v) >= 0;",
        "return lapic_pending_vector(v) >= 0;"),
    "bit12": (L,
        "(uint32_t)value & 0xFFFFEFFFu",
        "(uint32_t)value"),
    "x2bcast": (L,
        "dest == (x2 ? 0xFFFFFFFFu : 0xFFu)",
        "dest == 0xFFu"),
    "xmask": (V,
        "value & XAPIC_ICR_LOW_WRITABLE",
        "value"),
    "rejected": (L,
        "atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_RX_REJ"
        "ECTED], 1,\n\t\t\t\t\t  memory_order_relaxed);",
        ";"),
    "sw_check": (L,
        "if (!a->r[R_SW_ENABLED] || a->r[R_MODE] == APIC_DISABLED) {",
        "if (a->r[R_MODE] == APIC_DISABLED) {"),
    "lp_sw": (L,
        "if (t == skip || peer_reg(a, R_MODE) == APIC_DISABLED || !a->r[R_SW"
        "_ENABLED])",
        "if (t == skip || peer_reg(a, R_MODE) == APIC_DISABLED)"),
    "no_kick": (L,
        "\tint mode = kvm_vcpu_kick(t, src);\n",
        "\tint mode = OUTSIDE_GUEST;\n"),
    "ack_count": (L,
        "atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_INJECT"
        "ED], 1, memory_order_relaxed);",
        ";"),
    "alias_all": (L,
        "if (dm == DM_FIXED && atomic_load_explicit(&vm->renumbered, m"
        "emory_order_relaxed)) {",
        "if (0) {"),
    "alias_index_first": (L,
        "if (dest < (uint32_t)vm->nvcpus && has_physical_id(vm->vcpus"
        "[dest], dest))",
        "if (0)"),
    "eoi_nonzero": (V,
        "if (value || v->apic.r[R_MODE] != APIC_X2APIC)",
        "if (v->apic.r[R_MODE] != APIC_X2APIC)"),
    "mmio_len": (V,
        "if (!exit->c || exit->b != 4 || a->r[R_MODE] != APIC_XAPIC)",
        "if (!exit->c || a->r[R_MODE] != APIC_XAPIC)"),
    "icr_store_early": (L,
        "\tsa->r[R_ICR_LOW] = low;\n",
        "\n"),
    "nmi_dm": (L,
        "if ((dm != DM_FIXED && dm != DM_LOWEST) || vector < 16)",
        "if ((dm != DM_FIXED && dm != DM_LOWEST && dm != 4) || vector"
        " < 16)"),
    "phys_disabled": (L,
        "if (mode == APIC_DISABLED)\n\t\treturn false;",
        ""),
    "phys_mode": (L,
        "mode == APIC_X2APIC ? R_APIC_ID : R_XAPIC_ID",
        "R_XAPIC_ID"),
    "lp_logical": (L,
        "if (!broadcast && !match_logical(t, dest))\n\t\t\tcontinue;",
        ""),
    "x2logical": (L,
        "return (dest >> 16) == (ldr >> 16) && (dest & ldr & 0xFFFF) "
        "!= 0;",
        "return (dest & ldr & 0xFFFF) != 0;"),
    "selfipi_mode": (L,
        "if (a->r[R_MODE] != APIC_X2APIC || (value & ~0xFFull) || val"
        "ue < 16)",
        "if ((value & ~0xFFull) || value < 16)"),
    "cr8_sync": (V,
        "\tv->apic.r[R_TPR] = (uint32_t)cr8 << 4;\n\tlapic_update_ppr(v)"
        ";",
        "\tv->apic.r[R_TPR] = (uint32_t)cr8 << 4;"),
    "inject_sw": (L,
        "|| !a->r[R_SW_ENABLED])\n\t\treturn -1;",
        ")\n\t\treturn -1;"),
}

DRIVER = """
import sys
sys.path[:0] = [".", "tests"]
import test_native_differential as t
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test
run_state_machine_as_test(t.NativeVsPython, settings=settings(
    t.DEFAULT, phases=[Phase.generate], print_blob=False))
"""


def run_mutant(name: str, work: Path) -> str:
    path, old, new = MUTANTS[name]
    tree = work / name
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "__pycache__", ".hypothesis", "guest", "*.whl"))
    source = tree / path
    text = source.read_text()
    if text.count(old) != 1:
        return "STALE (source text not found once)"
    source.write_text(text.replace(old, new))
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                           capture_output=True, text=True)
    if built.returncode:
        return "BUILD FAILED " + built.stderr[-300:]
    r = subprocess.run([sys.executable, "-c", DRIVER], cwd=tree, capture_output=True,
                       text=True)
    if not r.returncode:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            "-m", "not slow", "-k", "not TestNative",
                            "tests/test_native_differential.py"],
                           cwd=tree, capture_output=True, text=True)
    shutil.rmtree(tree, ignore_errors=True)
    why = [line for line in (r.stdout + r.stderr).splitlines()
           if "Error" in line or "FAILED" in line][-1:]
    return ("CAUGHT " if r.returncode else "SURVIVED ") + (why[0][:140] if why else "")


def main(names: list[str]) -> int:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="kvmpy-mutants.") as work:
        for name in names or list(MUTANTS):
            t0 = time.monotonic()
            verdict = run_mutant(name, Path(work))
            survived += not verdict.startswith("CAUGHT")
            print(f"{name:16} {time.monotonic() - t0:4.0f}s {verdict}", flush=True)
    print(f"{survived} mutant(s) not caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
