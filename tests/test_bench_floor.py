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
from kvmpy.boot.flat import FLAT_LOAD_ADDRESS

pytestmark = pytest.mark.kvm

N = 2000


def _disassemble(image: bytes) -> list[tuple[str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    out = []
    for insn in md.disasm(image, FLAT_LOAD_ADDRESS):
        out.append((insn.mnemonic, insn.op_str))
        if insn.mnemonic == "jmp":
            break
    return out


def test_guest_switches_to_x2apic_then_loops_on_icr_and_exits() -> None:
    image = floor.guest_image(5 * floor.CHUNK)
    insns = _disassemble(image)
    mnemonics = [m for m, _ in insns]
    assert mnemonics == [
        "mov", "rdmsr", "or", "wrmsr", "mov", "mov", "mov",
        "rdtsc", "mov", "mov", "add", "mov", "mov", "mov",  # per chunk: TSC, ICR value
        "wrmsr", "dec", "jne", "dec", "jne",
        "rdtsc", "mov", "mov", "add", "mov", "out", "hlt", "jmp",
    ]
    ops = [o for _, o in insns]
    assert ops[0] == "ecx, 0x1b"
    assert ops[2] == "eax, 0xc00"  # x2APIC enable: EXTD (bit 10) | EN (bit 11)
    assert ops[4] == f"edi, {floor.TSC_GPA:#x}"
    assert ops[5] == "ebx, 5"  # chunks
    assert ops[6] == "ecx, 0x830"
    assert ops[11:14] == ["eax, 0x40", "edx, 0x7fff0000", f"esi, {floor.CHUNK:#x}"]
    wrmsr = FLAT_LOAD_ADDRESS + image.index(b"\x0f\x30\x4e")
    assert ops[16] == hex(wrmsr)  # jnz back to the ICR wrmsr
    assert ops[18] == hex(FLAT_LOAD_ADDRESS + image.index(b"\x0f\x31"))  # next chunk
    assert ops[24] == "0xf4, al"
    assert floor.tsc_count(5 * floor.CHUNK) == 6


def test_guest_chunking_rules() -> None:
    assert floor.chunk_size(4 * floor.CHUNK) == floor.CHUNK
    assert floor.chunk_size(7) == 7  # below CHUNK: one chunk
    assert floor.tsc_count(7) == 2
    with pytest.raises(ValueError):
        floor.guest_image(floor.CHUNK + 1)


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
        assert len(run.chunks_ns) == N // floor.CHUNK and min(run.chunks_ns) > 0
        assert run.wall_ns > 0
        if side == "fastpath-untimed":  # counts only: no handling-time histogram
            assert run.handle_p50_ns == run.handle_p99_ns == 0
        else:
            assert 0 < run.handle_p50_ns <= run.handle_p99_ns
    c_run = result.runs["c"][0]  # the C floor also times ioctls after its loop
    assert c_run.vcpu_ioctl_p50_ns is not None and c_run.vcpu_ioctl_p50_ns > 0
    assert c_run.vm_ioctl_p50_ns is not None and c_run.vm_ioctl_p50_ns > 0
    for side in ("c", "python"):  # the bare loops time every exit themselves
        bare = result.runs[side][0]
        assert bare.icr_fast == 0
        assert bare.rt_p50_ns is not None and bare.rt_p99_ns is not None
        assert 0 < bare.rt_p50_ns <= bare.rt_p99_ns
    c = result.runs["c"][0]
    # Every ICR write of the fastpath run completed there; none of the slow-path run did.
    assert result.runs["fastpath"][0].icr_fast == N
    assert result.runs["slowpath"][0].icr_fast == 0
    # The C side, timed around its whole loop, saw the guest's loop inside that time.
    assert sum(c.chunks_ns) * floor.CHUNK <= c.wall_ns
    for side in ("python", "fastpath", "slowpath"):
        ratio = result.ratio(side)
        assert math.isfinite(ratio) and ratio > 0

    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["columns"]["fastpath"]["icr_fast"] == N
    out = io.StringIO()
    floor.print_table(result, file=out)
    text = out.getvalue()
    assert all(title in text for title in floor.TITLES.values())
    assert result.backend in text


def test_kvmpy_fastpath_run_counts_from_exit_stats() -> None:
    """run_kvmpy reads ExitStats: WRMSR exits = the ICR loop + the APIC-base write."""
    run = floor.run_kvmpy(400, fastpath=True)
    assert run.icr_fast == 400
    assert run.exits == 400 + floor.NON_ICR_EXITS


def test_cli_json(capsys) -> None:
    assert floor.main(["--n", "400", "--repeats", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n"] == 400 and data["repeats"] == 1
    assert set(data["columns"]) == set(floor.SIDES)
    exits = {side: column["exits"] for side, column in data["columns"].items()}
    assert exits == {side: 403 for side in floor.SIDES}
