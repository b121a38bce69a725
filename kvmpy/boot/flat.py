"""Flat binary loader: a raw image copied to one address and entered at its first byte.

For tiny 32-bit protected-mode tests assembled to a plain binary (objcopy -O binary):
there is no header to read, so the VMM starts the vCPU at `load_address` with EAX and
EBX zero. The image is bounds-checked before anything is written.
"""

from __future__ import annotations

from kvmpy.boot.multiboot import BootInfo, require_ram
from kvmpy.errors import ImageError
from kvmpy.memory import GuestMemory, GuestMemoryError

FLAT_LOAD_ADDRESS = 0x100000


def load_flat(mem: GuestMemory, image: bytes, *, load_address: int = FLAT_LOAD_ADDRESS) -> BootInfo:
    """Copy `image` to `load_address`; entry is `load_address`, EAX = EBX = 0."""
    if not image:
        raise ImageError("flat image is empty")
    if load_address < 0 or load_address + len(image) > 1 << 32:
        raise ImageError(f"flat image at {load_address:#x} does not fit below 4 GiB")
    require_ram(mem, load_address, len(image), "flat image")
    try:
        mem.write(load_address, image)
    except GuestMemoryError as exc:  # require_ram checked the range; kept as a guard
        raise ImageError(f"flat image does not fit in guest memory: {exc}") from None
    return BootInfo(entry=load_address, eax=0, ebx=0, image_end=load_address + len(image))
