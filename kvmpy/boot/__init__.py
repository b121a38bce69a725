"""Guest image loaders (multiboot v1, flat binaries) and CPU mode setup."""

from kvmpy.boot.flat import FLAT_LOAD_ADDRESS, load_flat
from kvmpy.boot.multiboot import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    MULTIBOOT_HEADER_MAGIC,
    BootInfo,
    MultibootHeader,
    find_header,
    is_multiboot,
    load_multiboot,
)

__all__ = [
    "FLAT_LOAD_ADDRESS",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MULTIBOOT_HEADER_MAGIC",
    "BootInfo",
    "MultibootHeader",
    "find_header",
    "is_multiboot",
    "load_flat",
    "load_multiboot",
]
