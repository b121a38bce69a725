"""Guest build system: every guest builds into a multiboot ELF32 the loader accepts, the
cache is reused until a source changes, and failures are one clear line."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from kvmpy.boot import is_multiboot, load_multiboot
from kvmpy.guestbuild import GUEST_DIR, GuestBuildError, build_guest, guest_names
from kvmpy.memory import GuestMemory

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# Every guest source in guest/ (C or GNU as) is a guest; the first ones must stay.
GUESTS = sorted(p.stem for p in (Path(__file__).parent.parent / "guest").glob("*.[cS]"))
assert {"exitcode", "gp_msr", "hello", "mbinfo", "mmio_touch", "smp_hello",
        "triple_fault"} <= set(GUESTS)
# Instructions the KVM emulator here cannot run (see DESIGN.md, platform facts).
FORBIDDEN_MNEMONICS = {
    "iretd",
    "iret",
    "int3",
    "popcnt",
    "xsave",
    "xrstor",
    "fxsave",
    "fxrstor",
    "cmpxchg16b",
    "ldmxcsr",
    "fwait",
    "wait",
}


@pytest.fixture
def guest_copy(tmp_path: Path) -> Path:
    """A private copy of guest/ (without its build cache) to edit freely."""
    dst = tmp_path / "guest"
    shutil.copytree(GUEST_DIR, dst, ignore=shutil.ignore_patterns("build"))
    return dst


def test_guest_names_lists_every_guest() -> None:
    assert guest_names() == GUESTS


@pytest.mark.parametrize("name", GUESTS)
def test_guest_is_a_multiboot_elf32_the_loader_accepts(name: str) -> None:
    path = build_guest(name)
    image = path.read_bytes()
    elf = ELFFile(io.BytesIO(image))
    assert elf.elfclass == 32 and elf["e_machine"] == "EM_386"
    symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert elf["e_entry"] == symbols["_start"]
    assert is_multiboot(image)

    text = elf.get_section_by_name(".text")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    insns = list(md.disasm(text.data(), text["sh_addr"]))
    assert sum(i.size for i in insns) == text["sh_size"]  # the whole .text decodes
    bad = [
        f"{i.address:#x} {i.mnemonic} {i.op_str}"
        for i in insns
        if i.mnemonic in FORBIDDEN_MNEMONICS or "xmm" in i.op_str
    ]
    assert not bad

    mem = GuestMemory(16 << 20)
    try:
        info = load_multiboot(mem, image, cmdline="code=5")
        assert info.entry == symbols["_start"]
        assert mem.read(0x100000, 12)[:4] == (0x1BADB002).to_bytes(4, "little")
        assert info.image_end >= symbols["__image_end"]
        assert mem.read_cstring(mem.read_u32(info.ebx + 16)) == b"code=5"
    finally:
        mem.close()


def test_second_build_hits_the_cache(guest_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_guest("hello", source_dir=guest_copy, cache_dir=cache)
    mtime = first.stat().st_mtime_ns
    second = build_guest("hello", source_dir=guest_copy, cache_dir=cache)
    assert second == first and second.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("changed", ["hello.c", "lib/console.c", "lib/kvmpy.h", "lib/link.ld"])
def test_changed_source_rebuilds(guest_copy: Path, tmp_path: Path, changed: str) -> None:
    cache = tmp_path / "cache"
    first = build_guest("hello", source_dir=guest_copy, cache_dir=cache)
    other = build_guest("exitcode", source_dir=guest_copy, cache_dir=cache)
    with open(guest_copy / changed, "a") as f:
        f.write("\n/* changed */\n")
    second = build_guest("hello", source_dir=guest_copy, cache_dir=cache)
    assert second != first and second.is_file()
    assert not first.exists()  # the stale build of the same guest is dropped
    assert other.exists()  # other guests' builds are left alone
    assert is_multiboot(second.read_bytes())


def test_a_real_code_change_changes_the_image(guest_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = build_guest("hello", source_dir=guest_copy, cache_dir=cache).read_bytes()
    src = guest_copy / "hello.c"
    src.write_text(src.read_text().replace("hello from kvmpy", "howdy from kvmpy"))
    after = build_guest("hello", source_dir=guest_copy, cache_dir=cache).read_bytes()
    assert b"howdy from kvmpy" in after and b"howdy" not in before


def test_concurrent_builds_agree(guest_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(
            pool.map(
                lambda _: build_guest("mbinfo", source_dir=guest_copy, cache_dir=cache), range(2)
            )
        )
    assert paths[0] == paths[1]
    assert sorted(p.name for p in cache.iterdir()) == [paths[0].name]  # no temporary left


def test_compile_error_is_one_line_with_the_first_error(guest_copy: Path, tmp_path: Path) -> None:
    (guest_copy / "broken.c").write_text(
        '#include "kvmpy.h"\nint main(struct multiboot_info *mbi) { return nope; }\n'
    )
    with pytest.raises(GuestBuildError) as err:
        build_guest("broken", source_dir=guest_copy, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("building guest 'broken' failed: ")
    assert "broken.c:2" in msg and "error" in msg and "nope" in msg
    assert not any((tmp_path / "cache").iterdir())


def test_64bit_division_is_refused_at_link_time(guest_copy: Path, tmp_path: Path) -> None:
    (guest_copy / "div64.c").write_text(
        '#include "kvmpy.h"\n'
        "int main(struct multiboot_info *mbi) { return (int)(rdtsc() / mbi->flags); }\n"
    )
    with pytest.raises(GuestBuildError, match="__udivdi3"):
        build_guest("div64", source_dir=guest_copy, cache_dir=tmp_path / "cache")


def test_unknown_guest(guest_copy: Path) -> None:
    with pytest.raises(GuestBuildError, match="no guest named 'nosuch'.*hello"):
        build_guest("nosuch", source_dir=guest_copy)


def test_missing_gcc(guest_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestBuildError, match="^gcc not found"):
        build_guest("hello", source_dir=guest_copy, cache_dir=tmp_path / "cache")


def test_command_line_prebuilds_named_guests(guest_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, KVMPY_GUEST_DIR=str(guest_copy), KVMPY_GUEST_BUILD_DIR=str(cache))
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "kvmpy.guestbuild"]
    run = subprocess.run(
        [*cmd, "hello", "exitcode"], env=env, cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["hello", "exitcode"]
    assert len(list(cache.glob("*.elf"))) == 2
    bad = subprocess.run(
        [*cmd, "nosuch"], env=env, cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.startswith("kvmpy: no guest named 'nosuch'")
