"""Multiboot and flat loaders, on synthetic images written byte by byte (no KVM needed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.boot import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    BootInfo,
    find_header,
    is_multiboot,
    load_flat,
    load_multiboot,
)
from kvmpy.errors import ImageError
from kvmpy.memory import GuestMemory

MiB = 1 << 20
MB_MAGIC = 0x1BADB002
EM_386 = 3
EM_X86_64 = 62
HEADER_OFFSET = 0x200


def mb_header(flags: int = 0x3, addrs: tuple[int, ...] = ()) -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF) + b"".join(
        struct.pack("<I", a) for a in addrs
    )


def elf32(
    segments: list[tuple[int, bytes, int]],
    *,
    entry: int = 0x100000,
    machine: int = EM_386,
    header: bytes | None = None,
) -> bytes:
    """An ELF32 executable: PT_LOAD (paddr, data, memsz) each, vaddr = paddr + 3 GiB (mod 4 GiB).

    The multiboot header sits at HEADER_OFFSET, outside every segment; the data of
    segment i is at file offset 0x1000 * (i + 1).
    """
    phoff, phentsize = 52, 32
    out = bytearray(0x1000 * (len(segments) + 1))
    out[:52] = struct.pack(
        "<4sBBBB8xHHIIIIIHHHHHH",
        b"\x7fELF", 1, 1, 1, 0,  # ELFCLASS32, little endian, EV_CURRENT, SYSV
        2, machine, 1, entry, phoff, 0, 0, 52, phentsize, len(segments), 40, 0, 0,
    )  # fmt: skip
    for i, (paddr, data, memsz) in enumerate(segments):
        offset = 0x1000 * (i + 1)
        struct.pack_into(
            "<8I", out, phoff + i * phentsize,
            1, offset, (paddr + 0xC000_0000) & 0xFFFFFFFF, paddr, len(data), memsz, 7, 0x1000,
        )  # fmt: skip
        out[offset : offset + len(data)] = data
    hdr = mb_header() if header is None else header
    out[HEADER_OFFSET : HEADER_OFFSET + len(hdr)] = hdr
    return bytes(out)


def filled_memory(size: int = 64 * MiB) -> GuestMemory:
    """Guest memory whose first 32 MiB hold 0xAA, so zeroing is visible."""
    mem = GuestMemory(size)
    mem.write(0, b"\xaa" * min(size, 32 * MiB))
    return mem


@pytest.fixture
def mem() -> GuestMemory:
    m = filled_memory()
    yield m
    m.close()


def decode_mbi(mem: GuestMemory, addr: int) -> dict:
    fields = struct.unpack("<22I", mem.read(addr, 88))
    mbi = {
        "flags": fields[0],
        "mem_lower": fields[1],
        "mem_upper": fields[2],
        "cmdline": mem.read_cstring(fields[4]).decode(),
        "mods": [],
        "mmap": [],
        "boot_loader_name": mem.read_cstring(fields[16]).decode(),
        "mods_addr": fields[6],
        "mmap_addr": fields[12],
    }
    for i in range(fields[5]):
        start, end, cmdline, _ = struct.unpack("<4I", mem.read(fields[6] + 16 * i, 16))
        mbi["mods"].append((start, end, mem.read_cstring(cmdline).decode()))
    p, end = fields[12], fields[12] + fields[11]
    while p < end:
        size, base, length, kind = struct.unpack("<IQQI", mem.read(p, 24))
        mbi["mmap"].append((base, length, kind))
        p += size + 4
    return mbi


# ---- header search ----


def test_header_found_at_4_aligned_offsets_below_8144_only() -> None:
    for off, found in [(0, True), (8140, True), (8144, False), (2, False), (4096 + 4, True)]:
        image = bytearray(9000)
        image[off : off + 12] = mb_header()
        assert is_multiboot(bytes(image)) is found, off
        if found:
            assert find_header(bytes(image)).offset == off


def test_bad_checksum_or_short_file_is_not_multiboot() -> None:
    bad = struct.pack("<III", MB_MAGIC, 3, 0)
    assert not is_multiboot(bad + bytes(100))
    assert not is_multiboot(mb_header()[:11])
    assert is_multiboot(mb_header())


def test_first_valid_header_wins() -> None:
    image = bytes(16) + struct.pack("<III", MB_MAGIC, 3, 1) + mb_header(0x10003, (1, 2, 3, 4, 5))
    hdr = find_header(image)
    assert hdr.offset == 28 and hdr.aout_kludge and hdr.entry_addr == 5


# ---- ELF loading ----


def test_elf_segments_at_paddr_with_bss_zeroed(mem: GuestMemory) -> None:
    text = bytes(range(256)) * 4
    data = b"DATA" * 100
    image = elf32([(0x100000, text, len(text)), (0x200000, data, 0x2800)], entry=0x100040)
    info = load_multiboot(mem, image)
    assert info.entry == 0x100040
    assert info.eax == MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002
    assert mem.read(0x100000, len(text)) == text
    assert mem.read(0x200000, len(data)) == data
    assert mem.read(0x200000 + len(data), 0x2800 - len(data)) == bytes(0x2800 - len(data))
    assert mem.read(0x202800, 0x800) == b"\xaa" * 0x800  # nothing past memsz touched
    # the info area is in low memory at 0x9000, QEMU's MBI address
    assert info.ebx == 0x9000
    assert info.image_end == 0x203000 - 0x800


def test_elf_loads_at_paddr_not_vaddr(mem: GuestMemory) -> None:
    image = elf32([(0x400000, b"\x90" * 16, 16)])
    load_multiboot(mem, image)
    assert mem.read(0x400000, 16) == b"\x90" * 16
    assert mem.read(0x100000, 16) == b"\xaa" * 16


def test_mbi_fields_mmap_and_cmdline(mem: GuestMemory) -> None:
    info = load_multiboot(mem, elf32([(0x100000, b"k" * 100, 0x1800)]), cmdline="a=1 b=two")
    mbi = decode_mbi(mem, info.ebx)
    assert mbi["flags"] == 0x1 | 0x4 | 0x8 | 0x40 | 0x200
    assert mbi["mem_lower"] == 640
    assert mbi["mem_upper"] == (64 * MiB - MiB) // 1024
    assert mbi["cmdline"] == "a=1 b=two"
    assert mbi["boot_loader_name"] == "kvmpy"
    assert mbi["mods"] == []
    assert mbi["mmap"] == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (MiB, 63 * MiB, 1),
    ]


def test_mmap_has_ram_above_4g_when_memory_is_split() -> None:
    mem = GuestMemory(3 * 1024 * MiB + 8 * MiB)  # lazily mapped: nothing is touched
    try:
        info = load_multiboot(mem, elf32([(0x100000, b"k", 1)]))
        mbi = decode_mbi(mem, info.ebx)
        assert mbi["mem_upper"] == (3 * 1024 - 1) * 1024
        assert mbi["mmap"][-2:] == [(MiB, 3 * 1024 * MiB - MiB, 1), (1 << 32, 8 * MiB, 1)]
    finally:
        mem.close()


def test_kernel_name_is_prepended_like_qemu(mem: GuestMemory) -> None:
    info = load_multiboot(mem, elf32([(0x100000, b"k", 1)]), cmdline="x", kernel_name="apic.flat")
    assert decode_mbi(mem, info.ebx)["cmdline"] == "apic.flat x"


def test_modules_page_aligned_after_info_with_cmdlines(mem: GuestMemory) -> None:
    env = b"TEST_DEVICE=0\nFOO=bar\n"
    blob = bytes(range(256)) * 20  # 5120 bytes: the next module starts two pages on
    image = elf32([(0x100000, b"k" * 10, 0x5000)])
    info = load_multiboot(mem, image, cmdline="c", modules=[(env, "env file"), (blob, "blob")])
    mbi = decode_mbi(mem, info.ebx)
    (s0, e0, c0), (s1, e1, c1) = mbi["mods"]
    assert (c0, c1) == ("env file", "blob")
    assert s0 % 4096 == 0 and s0 > info.ebx and e0 - s0 == len(env)
    assert s1 == s0 + 4096 and e1 - s1 == len(blob)
    assert mem.read(s0, len(env)) == env
    assert mem.read(s1, len(blob)) == blob
    assert info.ebx == 0x9000
    assert e1 < 0x9FC00  # small modules stay in low memory, below the EBDA
    assert info.image_end == 0x105000


def test_large_modules_go_after_the_kernel(mem: GuestMemory) -> None:
    big = b"m" * (700 * 1024)  # does not fit between 0x9000 and the EBDA
    info = load_multiboot(mem, elf32([(0x100000, b"k" * 10, 0x5000)]), modules=[(big, "big")])
    ((s0, e0, _),) = decode_mbi(mem, info.ebx)["mods"]
    assert s0 == 0x105000 and e0 == s0 + len(big)
    assert mem.read(s0, len(big)) == big
    assert info.image_end == e0


def test_aout_kludge_uses_header_addresses() -> None:
    mem = filled_memory(16 * MiB)
    load_addr = 0x200000
    payload = b"\xf4" * 0x40
    # the header is at file offset 0x10 and header_addr says that is load_addr + 0x10
    hdr = mb_header(0x10003, (load_addr + 0x10, load_addr, load_addr + 0x80, load_addr + 0x1000,
                              load_addr + 0x20))  # fmt: skip
    image = bytes(0x10) + hdr + payload + b"TRAILING-NOT-LOADED"
    info = load_multiboot(mem, image)
    assert info.entry == load_addr + 0x20
    assert mem.read(load_addr, 0x80) == image[:0x80]
    assert mem.read(load_addr + 0x80, 0x1000 - 0x80) == bytes(0x1000 - 0x80)
    assert info.ebx == 0x9000


def test_aout_kludge_without_end_addresses_loads_the_rest_of_the_file() -> None:
    mem = filled_memory(16 * MiB)
    hdr = mb_header(0x10000, (0x100000, 0x100000, 0, 0, 0x100000))
    image = hdr + b"rest of file" * 10
    info = load_multiboot(mem, image)
    assert mem.read(0x100000, len(image)) == image
    assert info.ebx == 0x9000


def test_aout_kludge_wins_over_elf_program_headers(mem: GuestMemory) -> None:
    hdr_addr = 0x300000 + HEADER_OFFSET
    hdr = mb_header(0x10003, (hdr_addr, 0x300000, 0x300400, 0, 0x300000))
    image = elf32([(0x100000, b"ELF-SEGMENT", 11)], header=hdr)
    info = load_multiboot(mem, image)
    assert info.entry == 0x300000
    assert mem.read(0x300000, 0x400) == image[:0x400]
    assert mem.read(0x100000, 11) == b"\xaa" * 11


# ---- errors ----


def expect_error(match: str, mem: GuestMemory, image: bytes, **kw) -> None:
    with pytest.raises(ImageError, match=match) as err:
        load_multiboot(mem, image, **kw)
    assert "\n" not in str(err.value)


def test_error_not_multiboot(mem: GuestMemory) -> None:
    expect_error("no valid multiboot header in its first 8192 bytes", mem, b"\x7fELF" + bytes(100))


def test_error_not_elf_without_aout_kludge(mem: GuestMemory) -> None:
    expect_error("not an ELF image, and its multiboot header has no a.out kludge", mem,
                 bytes(64) + mb_header())  # fmt: skip


def test_error_elf64(mem: GuestMemory) -> None:
    image = bytearray(elf32([(0x100000, b"k", 1)]))
    image[4] = 2
    expect_error("cannot load a 64-bit ELF image with multiboot", mem, bytes(image))


def test_error_wrong_machine(mem: GuestMemory) -> None:
    expect_error("ELF image is for EM_X86_64, not i386", mem,
                 elf32([(0x100000, b"k", 1)], machine=EM_X86_64))  # fmt: skip


def test_error_truncated_segment(mem: GuestMemory) -> None:
    image = elf32([(0x100000, b"k" * 0x800, 0x800)])
    expect_error("image is truncated: segment at 0x100000", mem, image[:0x1400])


def test_error_program_headers_past_end_of_file(mem: GuestMemory) -> None:
    image = bytearray(elf32([(0x100000, b"k", 1)]))
    struct.pack_into("<I", image, 28, 0x100000)  # e_phoff far past the end
    expect_error("malformed or truncated ELF image", mem, bytes(image))


def test_error_no_loadable_segments(mem: GuestMemory) -> None:
    expect_error("no loadable", mem, elf32([]))


def test_error_filesz_above_memsz(mem: GuestMemory) -> None:
    expect_error("filesz > memsz", mem, elf32([(0x100000, b"k" * 16, 8)]))


def test_error_kernel_does_not_fit_and_nothing_is_written() -> None:
    mem = filled_memory(4 * MiB)
    image = elf32([(0x100000, b"k" * 16, 8 * MiB)])
    expect_error(r"^image needs 9 MiB of guest memory, have 4$", mem, image)
    assert mem.read(0x100000, 16) == b"\xaa" * 16


def test_error_modules_do_not_fit() -> None:
    mem = filled_memory(4 * MiB)
    image = elf32([(0x100000, b"k", 1)])
    expect_error(r"^image needs 5 MiB of guest memory, have 4$", mem, image,
                 modules=[(bytes(3 * MiB + 1), "big")])  # fmt: skip


def test_error_segment_in_the_pci_hole(mem: GuestMemory) -> None:
    expect_error("image segment at 0xd0000000-0xd0000010 is outside guest RAM", mem,
                 elf32([(0xD000_0000, b"k" * 16, 16)]))  # fmt: skip


def test_error_memory_of_1mib_or_less() -> None:
    mem = GuestMemory(MiB)
    expect_error("more than 1 MiB of guest memory", mem, elf32([(0x1000, b"k", 1)]))


def test_error_nul_in_cmdline(mem: GuestMemory) -> None:
    expect_error("command line contains a NUL byte", mem, elf32([(0x100000, b"k", 1)]),
                 cmdline="a\0b")  # fmt: skip


@pytest.mark.parametrize(
    ("addrs", "match"),
    [
        ((0x100000, 0x100010, 0, 0, 0), "header_addr is below load_addr"),
        ((0x101000, 0x100000, 0, 0, 0), "before the beginning of the file"),
        ((0x100000, 0x100000, 0xFF000, 0, 0), "load_end_addr is below load_addr"),
        ((0x100000, 0x100000, 0x100020, 0x100010, 0), "bss_end_addr is below load_end_addr"),
        ((0x100000, 0x100000, 0x200000, 0, 0), "image is truncated"),
    ],
)
def test_error_bad_aout_header(mem: GuestMemory, addrs: tuple, match: str) -> None:
    expect_error(match, mem, mb_header(0x10000, addrs) + bytes(64))


def test_error_aout_header_cut_short(mem: GuestMemory) -> None:
    expect_error("ends inside the multiboot header's address fields", mem,
                 mb_header(0x10000, (0x100000,)))  # fmt: skip


VALID = elf32([(0x100000, b"\x90" * 64, 0x2000), (0x104000, b"d" * 32, 32)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(VALID)))  # fmt: skip
def test_corrupted_images_raise_only_image_error(flips: list, cut: int) -> None:
    image = bytearray(VALID)
    for pos, value in flips:
        image[pos] = value
    mem = GuestMemory(16 * MiB)
    try:
        info = load_multiboot(mem, bytes(image[:cut]))
        assert isinstance(info, BootInfo)
    except ImageError as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        mem.close()


# ---- flat ----


def test_flat_loads_at_1mib_by_default(mem: GuestMemory) -> None:
    info = load_flat(mem, b"\xeb\xfe" * 8)
    assert info == BootInfo(entry=0x100000, eax=0, ebx=0, image_end=0x100010)
    assert mem.read(0x100000, 16) == b"\xeb\xfe" * 8


def test_flat_custom_address(mem: GuestMemory) -> None:
    info = load_flat(mem, b"abc", load_address=0x7000)
    assert (info.entry, info.image_end) == (0x7000, 0x7003)
    assert mem.read(0x7000, 4) == b"abc\xaa"


def test_flat_errors() -> None:
    mem = filled_memory(2 * MiB)
    with pytest.raises(ImageError, match="empty"):
        load_flat(mem, b"")
    with pytest.raises(ImageError, match=r"^image needs 3 MiB of guest memory, have 2$"):
        load_flat(mem, bytes(MiB + 1))
    with pytest.raises(ImageError, match="outside guest RAM"):
        load_flat(mem, b"x", load_address=0xC000_0000)
    with pytest.raises(ImageError, match="below 4 GiB"):
        load_flat(mem, b"xy", load_address=0xFFFF_FFFF)
    assert mem.read(0x100000, 4) == b"\xaa" * 4


def test_info_goes_after_a_kernel_that_occupies_0x9000(mem: GuestMemory) -> None:
    # kvm-unit-tests' realmode.flat: text at 0x8000, data and bss up to 0xda30. QEMU's
    # MBI address 0x9000 is inside it; the info goes on the page after the kernel, the
    # module after that, and the kernel's bytes are intact.
    text, data = bytes(range(256)) * 0x10, b"d" * 0x800  # (elf32 keeps each < 4 KiB)
    image = elf32([(0x8000, text, 0x286C), (0xB000, data, 0x2A30)])
    env = b"TEST_DEVICE=0\n"
    info = load_multiboot(mem, image, cmdline="x", modules=[(env, "env")], kernel_name="rm")
    assert info.ebx == 0xE000
    mbi = decode_mbi(mem, info.ebx)
    assert mbi["cmdline"] == "rm x" and mbi["mmap"][0][0] == 0
    ((start, end, name),) = mbi["mods"]
    assert start == 0xF000 and mem.read(start, end - start) == env and name == "env"
    assert mem.read(0x8000, len(text)) == text and mem.read(0xB000, len(data)) == data
    assert mem.read(0x9000, 0x100) == bytes(0x100)  # the kernel's zeroed tail, not info
    assert mem.read(0xB000 + len(data), 0x2A30 - len(data)) == bytes(0x2A30 - len(data))


def test_a_kernel_below_0x9000_leaves_the_info_there(mem: GuestMemory) -> None:
    info = load_multiboot(mem, elf32([(0x1000, b"k" * 0x100, 0x100)]), cmdline="c")
    assert info.ebx == 0x9000 and decode_mbi(mem, 0x9000)["cmdline"] == "c"


def test_no_room_after_a_kernel_at_the_end_of_ram_is_one_clear_error() -> None:
    small = filled_memory(2 * MiB)
    try:
        image = elf32([(0x8000, b"k", 0x200000 - 0x8000)])  # 0x8000 to the end of RAM
        expect_error("no room for the multiboot information: the kernel covers 0x9000 and "
                     "ends at 0x200000, the end of RAM", small, image)
    finally:
        small.close()
