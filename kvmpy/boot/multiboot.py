"""Multiboot v1 loader, as QEMU's `-kernel` loads a multiboot image.

Mirrors QEMU hw/i386/multiboot.c `load_multiboot`: the header is searched for in the
first 8192 bytes; an image whose header sets flag bit 16 (the a.out kludge) is loaded
from the header's addresses, any other must be an ELF32 i386 image loaded by its PT_LOAD
program headers at their physical addresses (p_paddr). The multiboot information
structure, module descriptors, memory map and strings go at 0x9000 (QEMU's MBI and e820
address), or on the first page boundary after the kernel when the kernel occupies
0x9000 (QEMU's mb_buf); modules follow the info below the EBDA when they fit, else the
kernel, each on its own page boundary.

Unlike QEMU there is no option ROM: the loader writes the info structure itself and
returns the register state the entry point expects (EAX = 0x2BADB002, EBX = info).
Every failure is an `ImageError` with one sentence; nothing is written to guest memory
until the whole layout is known to fit.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from elftools.elf.elffile import ELFFile

from kvmpy.errors import ImageError
from kvmpy.memory import HIGH_RAM_START, PAGE_SIZE, GuestMemory, GuestMemoryError

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_AOUT_KLUDGE = 1 << 16
BOOTLOADER_NAME = "kvmpy"

# multiboot_info.flags bits (Multiboot 0.6.96 section 3.3)
MBI_FLAG_MEM = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9

MBI_SIZE = 88  # QEMU's MBI_SIZE: up to and including the VBE fields
MB_MOD_SIZE = 16  # mod_start, mod_end, cmdline, reserved
MMAP_ENTRY_SIZE = 24  # size (4, not counting itself) + base (8) + length (8) + type (4)
E820_RAM = 1
E820_RESERVED = 2

MiB = 1 << 20
EBDA_START = 0x9FC00
VGA_START = 0xA0000
BIOS_START = 0xF0000

EM_386 = 3
ELFCLASS32 = 1


@dataclass(frozen=True)
class BootInfo:
    """Register state at the kernel entry point and where the loaded image ends."""

    entry: int  # EIP
    eax: int  # 0x2BADB002 for multiboot
    ebx: int  # address of the multiboot info struct
    image_end: int  # first byte after everything loaded (kernel + bss + mbi + modules)


@dataclass(frozen=True)
class MultibootHeader:
    """The multiboot header fields QEMU reads (Multiboot 0.6.96 section 3.1.1)."""

    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0
    truncated: bool = False  # the file ends inside the a.out address fields

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & MULTIBOOT_AOUT_KLUDGE)


@dataclass(frozen=True)
class _Chunk:
    """Bytes to place at a guest-physical address, followed by `zero_tail` zero bytes."""

    gpa: int
    data: bytes
    zero_tail: int = 0

    @property
    def end(self) -> int:
        return self.gpa + len(self.data) + self.zero_tail


def page_align(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def find_header(image: bytes) -> MultibootHeader | None:
    """The first valid multiboot header: magic 4-aligned in the first 8192 bytes, checksum ok.

    Like QEMU, the magic is looked for below 8192 - 48, so that the whole 48-byte header
    (up to the video fields) lies in the first 8192 bytes.
    """
    limit = min(MULTIBOOT_SEARCH - 48, len(image) - 11)
    for off in range(0, limit, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic != MULTIBOOT_HEADER_MAGIC or (magic + flags + checksum) & 0xFFFF_FFFF:
            continue
        if not flags & MULTIBOOT_AOUT_KLUDGE:
            return MultibootHeader(off, flags)
        if off + 32 > len(image):
            return MultibootHeader(off, flags, truncated=True)
        return MultibootHeader(off, flags, *struct.unpack_from("<5I", image, off + 12))
    return None


def is_multiboot(image: bytes) -> bool:
    """True if `image` has a multiboot v1 header QEMU would accept."""
    return find_header(image) is not None


def require_ram(mem: GuestMemory, gpa: int, length: int, what: str) -> None:
    """Raise ImageError unless [gpa, gpa+length) is guest RAM."""
    if length <= 0 or mem.is_ram(gpa, length):
        return
    end = gpa + length
    have = mem.size // MiB
    if end <= mem.low_size or (gpa < mem.low_size and end <= HIGH_RAM_START):
        need = -(-end // MiB)
        raise ImageError(f"image needs {need} MiB of guest memory, have {have}")
    raise ImageError(
        f"{what} at {gpa:#x}-{end:#x} is outside guest RAM ({have} MiB, "
        f"{mem.low_size // MiB} MiB below the PCI hole)"
    )


def _aout_chunks(image: bytes, hdr: MultibootHeader) -> tuple[list[_Chunk], int]:
    """Kernel chunks and entry for an a.out-kludge image (QEMU: MULTIBOOT_AOUT_KLUDGE branch)."""
    if hdr.truncated:
        raise ImageError("image is truncated: it ends inside the multiboot header's address fields")
    if hdr.header_addr < hdr.load_addr:
        raise ImageError("multiboot header_addr is below load_addr")
    text_offset = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if text_offset < 0:
        raise ImageError("multiboot load_addr would start before the beginning of the file")
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise ImageError("multiboot load_end_addr is below load_addr")
        load_size = hdr.load_end_addr - hdr.load_addr
    else:
        load_size = len(image) - text_offset
    if text_offset + load_size > len(image):
        raise ImageError(
            f"image is truncated: multiboot header asks for {load_size:#x} bytes "
            f"from file offset {text_offset:#x}, the file has {len(image):#x}"
        )
    kernel_size = load_size
    if hdr.bss_end_addr:
        if hdr.bss_end_addr < hdr.load_addr + load_size:
            raise ImageError("multiboot bss_end_addr is below load_end_addr")
        kernel_size = hdr.bss_end_addr - hdr.load_addr
    data = image[text_offset : text_offset + load_size]
    return [_Chunk(hdr.load_addr, data, kernel_size - load_size)], hdr.entry_addr


def _parse_elf(image: bytes) -> tuple[int, str, int, list[tuple[int, int, int, int]]]:
    """ELF class, machine, entry and (paddr, offset, filesz, memsz) of each PT_LOAD."""
    try:
        elf = ELFFile(io.BytesIO(image))
        loads = [
            (seg["p_paddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]
        return elf.elfclass, elf["e_machine"], elf["e_entry"], loads
    except Exception as exc:  # pyelftools raises ELFError, construct and struct errors
        raise ImageError(f"malformed or truncated ELF image: {exc}") from None


def _elf_chunks(image: bytes) -> tuple[list[_Chunk], int]:
    """Kernel chunks and entry for an ELF image (QEMU: load_elf with I386_ELF_MACHINE)."""
    if image[4:5] == b"\x02":  # EI_CLASS = ELFCLASS64; QEMU refuses EM_X86_64 the same way
        raise ImageError("cannot load a 64-bit ELF image with multiboot: build an ELF32 (i386) one")
    elfclass, machine, entry, loads = _parse_elf(image)
    if elfclass != 32:
        raise ImageError(f"unsupported ELF class {elfclass}: multiboot needs an ELF32 (i386) image")
    if machine != "EM_386":
        raise ImageError(f"ELF image is for {machine}, not i386 (EM_386)")
    chunks = []
    for paddr, offset, filesz, memsz in loads:
        if memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError(f"malformed ELF image: segment at {paddr:#x} has filesz > memsz")
        if offset + filesz > len(image):
            raise ImageError(
                f"image is truncated: segment at {paddr:#x} needs file bytes up to "
                f"{offset + filesz:#x}, the file has {len(image):#x}"
            )
        chunks.append(_Chunk(paddr, image[offset : offset + filesz], memsz - filesz))
    if not chunks:
        raise ImageError("ELF image has no loadable (PT_LOAD) segments")
    return chunks, entry


def _cstring(text: str, what: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ImageError(f"{what} contains a NUL byte")
    return data + b"\0"


def _mmap(mem: GuestMemory) -> bytes:
    """The e820-style memory map, as QEMU's option ROM reports it for a PC."""
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, VGA_START - EBDA_START, E820_RESERVED),
        (BIOS_START, MiB - BIOS_START, E820_RESERVED),
        (MiB, mem.low_size - MiB, E820_RAM),
    ]
    if mem.size > mem.low_size:
        entries.append((HIGH_RAM_START, mem.size - mem.low_size, E820_RAM))
    return b"".join(
        struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, base, length, kind)
        for base, length, kind in entries
    )


LOW_INFO_ADDRESS = 0x9000
LOW_INFO_LIMIT = 0x9FC00  # the EBDA starts here (reserved in the mmap)


def _overlaps(start: int, end: int, chunks: Sequence[_Chunk]) -> bool:
    return any(c.gpa < end and start < c.end for c in chunks)


def _place_info(size: int, kernel: Sequence[_Chunk], kernel_high: int) -> int:
    """Where the info structure, mmap and strings go (`size` bytes).

    In low memory at 0x9000 where QEMU puts its MBI and e820 map (test kernels such as
    kvm-unit-tests own everything from their end of image up as heap, yet read the MBI
    again later), unless the kernel itself is loaded there: then on the first page
    boundary after the kernel, where QEMU puts its mb_buf (module list and strings).
    QEMU's option ROM writes its MBI at 0x9500 regardless and the kernel copied over it
    wins (kvm-unit-tests' realmode.flat, loaded at 0x8000, never reads it); kvmpy keeps
    the whole info intact instead. Whether that spot is RAM is checked with the rest.
    """
    low_end = LOW_INFO_ADDRESS + size
    if low_end <= LOW_INFO_LIMIT and not _overlaps(LOW_INFO_ADDRESS, low_end, kernel):
        return LOW_INFO_ADDRESS
    return page_align(kernel_high)


def load_multiboot(
    mem: GuestMemory,
    image: bytes,
    *,
    cmdline: str = "",
    modules: Sequence[tuple[bytes, str]] = (),
    kernel_name: str | None = None,
) -> BootInfo:
    """Load a multiboot v1 kernel and its modules into `mem`; build the info structure.

    `modules` are (contents, command line) pairs; kvm-unit-tests reads its environment
    from the first one. With `kernel_name`, the kernel command line is
    "<kernel_name> <cmdline>" as QEMU passes it (kvm-unit-tests takes argv[0] from it);
    without it the command line is `cmdline` alone.
    """
    image = bytes(image)
    hdr = find_header(image)
    if hdr is None:
        raise ImageError("not a multiboot image: no valid multiboot header in its first 8192 bytes")
    if hdr.aout_kludge:
        kernel, entry = _aout_chunks(image, hdr)
    elif image[:4] == b"\x7fELF":
        kernel, entry = _elf_chunks(image)
    else:
        raise ImageError("not an ELF image, and its multiboot header has no a.out kludge (bit 16)")
    if mem.low_size <= MiB:
        raise ImageError(
            f"multiboot needs more than 1 MiB of guest memory, have {mem.size // MiB} MiB"
        )

    kernel_high = max(c.end for c in kernel)
    full_cmdline = cmdline if kernel_name is None else f"{kernel_name} {cmdline}"
    mmap_data = _mmap(mem)
    string_list = [
        _cstring(full_cmdline, "the kernel command line"),
        _cstring(BOOTLOADER_NAME, "the boot loader name"),
        *(_cstring(c, f"module {i}'s command line") for i, (_, c) in enumerate(modules)),
    ]
    info_size = MBI_SIZE + MB_MOD_SIZE * len(modules) + len(mmap_data) \
        + sum(len(x) for x in string_list)
    info = _place_info(info_size, kernel, kernel_high)
    if info != LOW_INFO_ADDRESS and not mem.is_ram(info, info_size):
        raise ImageError(f"no room for the multiboot information: the kernel covers "
                         f"{LOW_INFO_ADDRESS:#x} and ends at {kernel_high:#x}, the end of RAM "
                         "(give the guest more memory)")
    mods_addr = info + MBI_SIZE
    mmap_addr = mods_addr + MB_MOD_SIZE * len(modules)
    strings_addr = mmap_addr + len(mmap_data)
    string_addrs = [strings_addr + off for off in accumulate(map(len, string_list), initial=0)]
    cmdline_addr, loader_name_addr, *mod_cmdline_addrs = string_addrs[:-1]
    info_end = info + info_size
    strings = b"".join(string_list)
    mod_table = bytearray()
    mod_chunks = []
    # Modules go in low memory after the info when they fit below the EBDA, else after
    # the kernel (and the info); each starts on a page boundary (QEMU).
    mod_addr = page_align(info_end)
    mods_end = mod_addr + sum(page_align(len(data)) for data, _ in modules)
    if mods_end > LOW_INFO_LIMIT or _overlaps(mod_addr, mods_end, kernel):
        mod_addr = page_align(max(kernel_high, info_end))
    for (data, _), mod_cmdline_addr in zip(modules, mod_cmdline_addrs, strict=True):
        mod_table += struct.pack("<4I", mod_addr, mod_addr + len(data), mod_cmdline_addr, 0)
        mod_chunks.append(_Chunk(mod_addr, bytes(data)))
        mod_addr = page_align(mod_addr + len(data))

    mbi = struct.pack(
        "<IIIIIII16xII12xI20x",
        MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME,
        640,  # mem_lower, KiB
        (mem.low_size - MiB) // 1024,  # mem_upper, KiB from 1 MiB
        0,  # boot_device (flag bit 1 clear)
        cmdline_addr,
        len(modules),
        mods_addr,
        len(mmap_data),
        mmap_addr,
        loader_name_addr,
    )
    assert len(mbi) == MBI_SIZE
    info_chunk = _Chunk(info, mbi + bytes(mod_table) + mmap_data + bytes(strings))
    chunks = [*kernel, info_chunk, *mod_chunks]
    image_end = max(c.end for c in chunks)
    if image_end > 1 << 32:
        raise ImageError(f"image does not fit below 4 GiB: it ends at {image_end:#x}")
    for c in chunks:
        require_ram(mem, c.gpa, c.end - c.gpa, "image segment")
    try:
        for c in chunks:
            mem.write(c.gpa, c.data)
            if c.zero_tail:
                mem.zero(c.gpa + len(c.data), c.zero_tail)
    except GuestMemoryError as exc:  # require_ram checked every chunk; kept as a guard
        raise ImageError(f"image does not fit in guest memory: {exc}") from None
    return BootInfo(entry=entry, eax=MULTIBOOT_BOOTLOADER_MAGIC, ebx=info, image_end=image_end)
