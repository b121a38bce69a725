"""The floor benchmark (kvmpy/bench/floor.py): the guest's code, the C floor's build
cache, and a small run of all three sides checked for structure and sanity. Timings are
reported by the benchmark, never asserted here (this machine is shared and noisy)."""

from __future__ import annotations

import io
import json
import math

import capstone
import pytest

from kvmpy.bench import floor

pytestmark = pytest.mark.kvm

N = 2000


def _disassemble(image: bytes) -> list[tuple[str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    code = image[: floor.RESULT_OFFSET]
    out = []
    for insn in md.disasm(code, floor.FLAT_LOAD_ADDRESS):
        out.append((insn.mnemonic, insn.op_str))
        if insn.mnemonic == "jmp":
            break
    return out


def test_guest_switches_to_x2apic_then_loops_on_icr_and_exits() -> None:
    insns = _disassemble(floor.guest_image(12345))
    mnemonics = [m for m, _ in insns]
    assert mnemonics == [
        "mov", "rdmsr", "or", "wrmsr", "mov", "rdtsc", "mov", "mov", "mov", "mov", "mov",
        "wrmsr", "dec", "jne", "rdtsc", "mov", "mov", "mov", "out", "hlt", "jmp",
    ]
    ops = [o for _, o in insns]
    assert ops[0] == "ecx, 0x1b"
    assert ops[2] == "eax, 0xc00"  # x2APIC enable: EXTD (bit 10) | EN (bit 11)
    assert ops[4] == "esi, 0x3039"  # the loop count
    assert ops[8:11] == ["ecx, 0x830", "eax, 0x40", "edx, 0x7fff0000"]
    loop = floor.FLAT_LOAD_ADDRESS + floor.guest_image(1).index(b"\x0f\x30\x4e")
    assert ops[13] == hex(loop)  # jnz back to the wrmsr
    assert ops[18] == "0xf4, al"


def test_guest_rejects_empty_loop() -> None:
    with pytest.raises(ValueError):
        floor.guest_image(0)


def test_floor_binary_is_cached_and_rebuilt_when_the_source_changes(
    tmp_path, monkeypatch
) -> None:
    first = floor.build_floor(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert floor.build_floor(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt
    changed = tmp_path / "floor.c"
    changed.write_text(floor.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(floor, "SOURCE", changed)
    second = floor.build_floor(tmp_path)
    assert second != first and second.is_file()


def test_small_floor_run_structure_and_sanity() -> None:
    result = floor.run_floor(N, 1)
    assert result.backend in ("kvm_pvm", "kvm_intel", "kvm_amd", "unknown")
    expected_exits = N + floor.NON_ICR_EXITS
    for side in floor.SIDES:
        (run,) = result.runs[side]
        assert run.side == side and run.n == N
        assert run.exits == expected_exits, side
        assert run.icr_exits == N, side
        assert run.loop_ns > 0 and run.wall_ns > 0
        assert 0 < run.handle_p50_ns <= run.handle_p99_ns
    c = result.runs["c"][0]
    assert c.icr_fast == 0
    assert c.rt_p50_ns is not None and c.rt_p99_ns is not None
    assert 0 < c.rt_p50_ns <= c.rt_p99_ns
    # Every ICR write of the fastpath run completed there; none of the slow-path run did.
    assert result.runs["fastpath"][0].icr_fast == N
    assert result.runs["slowpath"][0].icr_fast == 0
    # The C side, timed around its whole loop, saw the guest's loop inside that time.
    assert c.loop_ns <= c.wall_ns
    for side in ("fastpath", "slowpath"):
        ratio = result.ratio(side)
        assert math.isfinite(ratio) and ratio > 0

    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["columns"]["fastpath"]["icr_fast"] == N
    out = io.StringIO()
    floor.print_table(result, file=out)
    text = out.getvalue()
    assert "C floor" in text and result.backend in text


def test_kvmpy_fastpath_run_counts_from_exit_stats() -> None:
    """run_kvmpy reads ExitStats: WRMSR exits = the ICR loop + the APIC-base write."""
    run = floor.run_kvmpy(300, fastpath=True)
    assert run.icr_fast == 300
    assert run.exits == 300 + floor.NON_ICR_EXITS


def test_cli_json(capsys) -> None:
    assert floor.main(["--n", "300", "--repeats", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n"] == 300 and data["repeats"] == 1
    assert set(data["columns"]) == set(floor.SIDES)
    assert data["columns"]["c"]["exits"] == data["columns"]["fastpath"]["exits"] == 303
